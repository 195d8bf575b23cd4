"""Prepares a dataset once as TFDS ArrayRecord files, then prints the command that trains on it.

  python -m resnet_jax.data.prepare NAME [--data_dir DIR] [--manual_dir DIR] [--from FILE_OR_DIR]

Online, TFDS downloads the data. Offline, `--from` takes the official archives a user already has
(cifar-10-python.tar.gz or cifar-10-binary.tar.gz, cifar-100-python.tar.gz or -binary, the four
Fashion-MNIST IDX .gz files or their directory, an imagenette2*.tgz, ReaL's real.json), and
imagenet2012 reads ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from `--manual_dir`
(default DATA_DIR/downloads/manual, TFDS's own layout; imagenet2012_real the second only).
Either way the data goes through TFDS's own builder, so the result is exactly what `tfds`
produces (splits, features, label names). Any other TFDS image classification dataset can be
prepared online by name. Test sets (imagenet2012_real, imagenet_v2, imagenet_a, imagenet_r,
cifar10_1) end with the `evaluate` command instead of a training one. This wraps the TFDS Python
API (TFDS's command-line tool needs apache_beam, which the `[tf]` extra does not install).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil
import sys
import tempfile
from typing import Sequence

from resnet_jax import cli
from resnet_jax.data.offline import (
  PrepareError,
  check_real_labels_cover,
  imagenette_config,
  local_downloads,
  offline_download_manager,
)

INSTALL_HINT = "pip install -e '.[tf]' (run in the resnet_jax checkout)"


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How to train on a prepared dataset: the config (with args) and a default workdir."""

  config: str
  workdir: str


RECIPES = {
  'cifar10': Recipe('configs/cifar.py', 'runs/cifar10'),
  'cifar100': Recipe('configs/cifar.py:dataset=cifar100', 'runs/cifar100'),
  'fashion_mnist': Recipe('configs/fashion_mnist.py', 'runs/fashion_mnist'),
  'imagenet2012': Recipe('configs/r50.py', 'runs/r50'),
  'imagenette': Recipe('configs/imagenet.py:depth=18,dataset={tfds_name}', 'runs/imagenette'),
  'digits': Recipe('configs/digits.py', 'runs/digits'),
}
IMAGENET_TARS = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')
# Test sets with the classes of a training dataset: prepared to evaluate a run on, not to train.
# name -> the run it evaluates (the default workdir of that dataset's recipe).
EVALUATION_SETS = {
  'imagenet2012_real': 'runs/r50',  # ReaL labels of ImageNet's validation images
  'imagenet_v2': 'runs/r50',
  'imagenet_a': 'runs/r50',  # 200 of ImageNet's classes: scored on those (other_datasets)
  'imagenet_r': 'runs/r50',
  'cifar10_1': 'runs/cifar10',
}
# What each ImageNet-based builder reads from its manual directory.
MANUAL_TARS = {'imagenet2012': IMAGENET_TARS, 'imagenet2012_real': ('ILSVRC2012_img_val.tar',)}


def _parser() -> cli.ArgumentParser:
  p = cli.ArgumentParser(
    prog='python -m resnet_jax.data.prepare',
    description='Prepare a dataset as TFDS ArrayRecord files (random access for Grain).',
  )
  p.add_argument(
    'name', metavar='NAME', help=f'{", ".join(RECIPES)}, or any other TFDS dataset name'
  )
  p.add_argument(
    '--data-dir', help='TFDS data dir to write (default: TFDS_DATA_DIR or ~/tensorflow_datasets)'
  )
  p.add_argument(
    '--manual-dir',
    help='imagenet2012: directory holding '
    + ' and '.join(IMAGENET_TARS)
    + ' (default DATA_DIR/downloads/manual)',
  )
  p.add_argument(
    '--from',
    dest='sources',
    action='append',
    default=[],
    metavar='FILE_OR_DIR',
    help='official archive(s) already on disk, instead of downloading (repeatable)',
  )
  p.add_argument('--overwrite', action='store_true', help='rebuild even if already prepared')
  return p


def _require_tensorflow(name: str) -> None:
  """TFDS encodes images with TensorFlow while preparing: say how to install it, in one line."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  try:
    import importlib_resources  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise PrepareError(
      f'preparing {name} needs TensorFlow and importlib_resources ({e}): install '
      f'them with {INSTALL_HINT}'
    ) from e


def _check_tfds_name(name: str, sources: Sequence[str]) -> None:
  """A name outside RECIPES must be a TFDS dataset, prepared online (no --from for it)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    tfds.builder_cls(name.split('/')[0].split(':')[0])
  except tfds.core.registered.DatasetNotFoundError as e:
    raise PrepareError(
      f'unknown dataset {name!r}: not {", ".join(RECIPES)} nor a TFDS dataset name'
    ) from e
  if sources and name != 'imagenet2012_real':
    raise PrepareError(
      f'--from is not supported for {name} (it takes the archives of '
      "cifar10, cifar100, fashion_mnist and imagenette, and imagenet2012_real's real.json); "
      'without it TFDS downloads the data'
    )


def _check_trainable(name: str, data_dir: str | None) -> None:
  """Refuses, before any download, a dataset that training would refuse (a multi-label or
  non-class label, non-uint8 or multi-band images): `sources` holds the rule."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from resnet_jax.data import sources  # pylint: disable=g-import-not-at-top

  try:
    sources.image_and_label_keys(name, tfds.builder(name, data_dir=data_dir))
  except sources.DatasetNotFoundError as e:
    raise PrepareError(f'{e}: not prepared') from e


def _generic_recipe(tfds_name: str, image_shape: tuple | None) -> Recipe:
  """Another TFDS dataset: the CIFAR recipe for small fixed-size images, else the ImageNet one."""
  small = image_shape is not None and image_shape[0] is not None and image_shape[0] <= 64
  config = 'configs/cifar.py' if small else 'configs/imagenet.py:depth=18'
  arg = f'dataset={tfds_name}'
  return Recipe(
    f'{config},{arg}' if ':' in config else f'{config}:{arg}',
    f'runs/{tfds_name.replace("/", "_").replace(":", "_")}',
  )


def train_command(
  name: str, tfds_name: str, data_dir: str | None, image_shape: tuple | None = None
) -> str:
  """The exact command that trains the dataset's recipe on the prepared data."""
  recipe = RECIPES.get(name) or _generic_recipe(tfds_name, image_shape)
  parts = [
    'python',
    '-m',
    'resnet_jax.main',
    '--config=' + recipe.config.format(tfds_name=tfds_name),
    '--workdir=' + recipe.workdir,
  ]
  if data_dir:
    parts.append('--config.data.data_dir=' + os.path.abspath(data_dir))
  return ' '.join(shlex.quote(p) for p in parts)


def evaluate_command(name: str, data_dir: str | None) -> str:
  """The command that evaluates a run (its recipe's default workdir) on the prepared test set."""
  parts = ['python', '-m', 'resnet_jax.evaluate', f'--workdir={EVALUATION_SETS[name]}']
  parts.append(f'--dataset={name}')
  if data_dir:
    parts.append('--data-dir=' + os.path.abspath(data_dir))
  return ' '.join(shlex.quote(p) for p in parts)


def _manual_dir(args: argparse.Namespace, data_root: str) -> str:
  """Where the ImageNet tars are: --manual_dir (for imagenet2012 also a single --from DIR), else
  TFDS's default."""
  manual = args.manual_dir
  if not manual and args.name == 'imagenet2012' and len(args.sources) == 1:
    manual = args.sources[0]
  manual = os.path.expanduser(manual) if manual else os.path.join(data_root, 'downloads', 'manual')
  tars = MANUAL_TARS[args.name]
  for tar in tars:
    if not os.path.isfile(os.path.join(manual, tar)):
      raise PrepareError(
        f'{args.name} needs {" and ".join(tars)} (from image-net.org)'
        f' in {manual} (pass --manual_dir DIR): {tar} is missing'
      )
  return manual


def _image_shape(builder) -> tuple | None:
  image_key = (builder.info.supervised_keys or ('image',))[0]
  feature = builder.info.features[image_key] if isinstance(image_key, str) else None
  return tuple(feature.shape) if feature is not None and hasattr(feature, 'shape') else None


def prepare(args: argparse.Namespace) -> tuple[str, tuple | None]:
  """Builds the dataset; returns the TFDS name (with builder config) and its image shape."""
  name = args.name
  if name not in RECIPES:
    _check_tfds_name(name, args.sources)
  data_dir = os.path.abspath(os.path.expanduser(args.data_dir)) if args.data_dir else None
  if name not in RECIPES:
    _check_trainable(name, data_dir)
  if name == 'digits':
    if args.sources or args.manual_dir:
      raise PrepareError('digits ships with scikit-learn: it takes no --from or --manual_dir')
    from resnet_jax.data import digits  # pylint: disable=g-import-not-at-top

    if args.overwrite and (removed := digits.remove_prepared(data_dir)):
      print(f'--overwrite: removed {removed}')
    digits.prepare_digits(data_dir)
    return name, (8, 8, 1)
  if args.sources and name != 'imagenet2012':
    missing = [s for s in args.sources if not os.path.exists(s)]
    if missing:
      raise PrepareError(f'--from {missing[0]}: no such file or directory')
  # Wrong archives or a wrong --manual_dir fail before TensorFlow loads (in a second, not five).
  offline = bool(args.sources) and name != 'imagenet2012'
  if offline:
    local_downloads(name, args.sources, None)
  explicit_manual = name in MANUAL_TARS and (
    args.manual_dir or (name == 'imagenet2012' and len(args.sources) == 1)
  )
  manual_dir = _manual_dir(args, '') if explicit_manual else args.manual_dir
  _require_tensorflow(name)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  tfds_name = name
  if name == 'imagenette' and args.sources:
    tfds_name = f'imagenette/{imagenette_config(args.sources)}'
  builder = tfds.builder(tfds_name, data_dir=data_dir)
  if builder.is_prepared() and not args.overwrite:
    file_format = builder.info.file_format
    if file_format != tfds.core.FileFormat.ARRAY_RECORD:
      raise PrepareError(
        f'{tfds_name} in {builder.data_dir} is prepared as {file_format.value}, '
        'not ArrayRecord (needed for random access): add --overwrite to '
        'rebuild it'
      )
    print(f'{tfds_name} is already prepared in {builder.data_dir} (--overwrite rebuilds it)')
    return tfds_name, _image_shape(builder)
  if name in MANUAL_TARS and not explicit_manual:  # TFDS's default DATA_DIR/downloads/manual
    manual_dir = _manual_dir(args, os.fspath(builder.data_dir_root))
  if name == 'imagenet2012_real' and args.sources:
    check_real_labels_cover(args.sources[0], os.path.join(manual_dir, MANUAL_TARS[name][0]))
  with tempfile.TemporaryDirectory(prefix='resnet_jax_prepare_') as tmp:
    url_map = local_downloads(name, args.sources, tmp) if offline else {}  # checked before deleting
    if builder.is_prepared():  # --overwrite: a fresh builder can then write ArrayRecord
      print(f'--overwrite: removing {builder.data_dir}')
      shutil.rmtree(builder.data_dir)
      builder = tfds.builder(tfds_name, data_dir=data_dir)
    config = tfds.download.DownloadConfig(
      manual_dir=manual_dir,
      extract_dir=os.path.join(tmp, 'extracted') if offline else None,
      try_download_gcs=False,
    )
    print(f'preparing {tfds_name} into {builder.data_dir} (ArrayRecord)', flush=True)
    tfds.display_progress_bar(True)
    if offline:
      with offline_download_manager(builder, url_map):
        builder.download_and_prepare(file_format='array_record', download_config=config)
    else:
      builder.download_and_prepare(file_format='array_record', download_config=config)
  splits = ', '.join(f'{s} ({info.num_examples:,})' for s, info in builder.info.splits.items())
  print(f'prepared {tfds_name}: {splits}')
  return tfds_name, _image_shape(builder)


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry: prepare, then print the train command; bad input is one `error:` line, exit 1."""
  args = _parser().parse_args(argv)
  try:
    tfds_name, image_shape = prepare(args)
  except PrepareError as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)  # one line, whatever it quotes
    return 1
  except Exception as e:  # pylint: disable=broad-except
    # TFDS raises many types (AssertionError for a missing manual file, NonMatchingChecksumError,
    # tarfile errors on a damaged archive, ...): one line, with a traceback only on request.
    if os.environ.get('RESNET_JAX_TRACEBACK'):
      raise
    message = ' '.join(str(e).split()) or type(e).__name__
    print(
      f'error: preparing {args.name} failed: {type(e).__name__}: {message} '
      '(RESNET_JAX_TRACEBACK=1 shows the traceback)',
      file=sys.stderr,
    )
    return 1
  if args.name in EVALUATION_SETS:
    print('evaluate a run trained on its classes with:')
    print('  ' + evaluate_command(args.name, args.data_dir))
  else:
    print('train with:')
    print('  ' + train_command(args.name, tfds_name, args.data_dir, image_shape))
  return 0


if __name__ == '__main__':
  sys.exit(main())
