"""Classify images with a ResNet (converted weights or a training run): top-5 classes, one per line.

    python -m resnet_jax.predict --arch resnet50 --torchvision-weights resnet50-11ad3fa6.pth cat.jpg
    python -m resnet_jax.predict --arch resnet50 --checkpoint DIR cat.jpg dog.png

``--checkpoint`` takes a directory written by ``python -m resnet_jax.convert`` or a training workdir
(its newest checkpoint). Converted torchvision weights get torchvision's ImageNet eval transform:
resize the shorter side to 256 (PIL bilinear, antialiased), centre-crop 224, scale to [0, 1],
normalise with the ImageNet mean/std. A training workdir's model gets the run's own evaluation
input instead (its image size, channels and normalisation statistics, e.g. the per-pixel mean of
its training set, read from the prepared dataset): the model was trained on nothing else.
Converted timm weights want timm's eval input instead: ``--interpolation bicubic --crop-pct 0.95``
(the "ResNet strikes back" resnet50.a1_in1k's pretrained config) resizes the shorter side to
floor(224 / 0.95) = 235 with PIL's bicubic, then centre-crops 224, as timm's
``transforms_imagenet_eval`` does. BiT's weights (``resnetv2_*_bit``) were trained on inputs
scaled to [-1, 1] (timm's pretrained configs: mean = std = 0.5, its IMAGENET_INCEPTION_MEAN/STD),
so those names are normalised that way by default (``--normalize``). Class
names come from ``--labels FILE`` (one name per line), else from a training run's own dataset
(its ``class_names.json``: a tree's class folders, a TFDS dataset's label names), else, for 1000
classes, from torchvision's metadata when it is installed (read as a file, without importing
torch; also for runs on ImageNet, whose names are WordNet ids), else are ``class <i>``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import os
import sys
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from resnet_jax import cli, runtime
from resnet_jax.data import views
from resnet_jax.default_config import base_config
from resnet_jax.models import layout, parse_name
from resnet_jax.models.stems import input_conv_name
from resnet_jax.workdir import CONFIG_FILE, as_path, read_class_names, read_run_config

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# --normalize: name -> (mean, std) of the [0, 1] pixels the converted weights were trained on.
NORMALIZATIONS = {
  'imagenet': (IMAGENET_MEAN, IMAGENET_STD),  # torchvision's and most of timm's weights
  'inception': (np.full(3, 0.5, np.float32), np.full(3, 0.5, np.float32)),  # BiT's: [-1, 1]
}


# Images with more pixels than this are refused before decoding (PIL's own default bound); a
# decompression bomb declares a huge size in a few bytes.
MAX_IMAGE_PIXELS = 89_478_485
# Above this many pixels after the eval resize, only the centre crop is resampled.
MAX_RESIZED_PIXELS = 4096 * 4096


def open_image(path: str) -> Image.Image:
  """Opens and decodes one image, refusing what cannot be classified with a one-line ValueError.

  Non-images, truncated files and images over `MAX_IMAGE_PIXELS` (checked from the header,
  before any pixel is decoded, so a decompression bomb costs nothing) are refused.
  """
  try:
    image = Image.open(path)
  except FileNotFoundError:
    raise ValueError(f'{path}: no such file') from None
  except Image.DecompressionBombError as e:
    raise ValueError(f'{path} is refused as a decompression bomb ({e})') from None
  except (Image.UnidentifiedImageError, OSError) as e:
    raise ValueError(f'{path} is not an image PIL can read ({e})') from None
  w, h = image.size
  if w <= 0 or h <= 0 or w * h > MAX_IMAGE_PIXELS:
    raise ValueError(
      f'{path} is {w}x{h} pixels, over the {MAX_IMAGE_PIXELS:,} this tool '
      'decodes (a decompression bomb or a huge scan): downscale it first'
    )
  try:
    image.load()
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f'{path} could not be decoded ({e}): a truncated or damaged image') from None
  return image


def preprocess(
  image: Image.Image,
  image_size: int = 224,
  resize_size: int = 256,
  resample: int = Image.BILINEAR,
  normalize: str = 'imagenet',
) -> np.ndarray:
  """torchvision ``Resize(resize_size) + CenterCrop(image_size) + ToTensor + Normalize``, as HWC
  (`resample`: the PIL filter of the resize; timm's eval transform with bicubic and crop_pct is
  this with `resize_size` = floor(image_size / crop_pct); `normalize`: a `NORMALIZATIONS` key).

  When the resized image would exceed `MAX_RESIZED_PIXELS` (an extreme aspect ratio such as
  1 x 20000 becomes 256 x 5,120,000), only the centre crop is resampled, with PIL ``resize``'s
  source ``box`` (the same filter, within one 8-bit level of rounding), so memory stays bounded.
  """
  image = image.convert('RGB')
  w, h = image.size
  new_w, new_h = views.shorter_side_size(w, h, resize_size)
  if new_w < image_size or new_h < image_size:
    raise ValueError(f'--image-size {image_size} is larger than the resized image {new_w}x{new_h}')
  top = int(round((new_h - image_size) / 2.0))
  left = int(round((new_w - image_size) / 2.0))
  crop = (left, top, left + image_size, top + image_size)
  if new_w * new_h <= MAX_RESIZED_PIXELS:  # torchvision's exact order: resize, then crop
    image = image.resize((new_w, new_h), resample).crop(crop)
  else:
    sx, sy = w / new_w, h / new_h  # resized -> source coordinates
    box = (crop[0] * sx, crop[1] * sy, crop[2] * sx, crop[3] * sy)
    image = image.resize((image_size, image_size), resample, box=box)
  x = np.asarray(image, np.float32) / 255.0
  mean, std = NORMALIZATIONS[normalize]
  return (x - mean) / std


def is_training_run(checkpoint: Optional[str]) -> bool:
  """Whether `--checkpoint` is a training workdir (its config.json says how it saw its images)."""
  return bool(checkpoint) and (as_path(checkpoint) / CONFIG_FILE).exists()


def run_preprocess(workdir: str) -> Callable[[Image.Image], np.ndarray]:
  """The image -> model input function of the run in `workdir`: its evaluation's single centre
  crop (`augment.Preprocessor.eval`) and normalisation (`DevicePreprocess`), so a prediction sees
  what the run's evaluation sees. Needs the run's dataset prepared (its cached statistics)."""
  from resnet_jax.data import device_preprocess, pipeline  # pylint: disable=import-outside-toplevel

  config = read_run_config(workdir)
  try:
    host = pipeline.make_preprocessor(config)
    device = device_preprocess.make_device_preprocess(config)
  except ValueError as e:
    raise ValueError(
      f'{workdir}: its evaluation preprocessing needs the statistics of its dataset '
      f'{config.data.name!r}: {e}'
    ) from None
  mode = 'L' if host.channels == 1 else 'RGB'

  def preprocess_for_run(image: Image.Image) -> np.ndarray:
    uint8 = host.eval(np.asarray(image.convert(mode), np.uint8), crops=1)
    return np.asarray(device(jnp.asarray(uint8[None]), rng=None))[0]

  return preprocess_for_run


def class_names(
  num_classes: int, labels_file: Optional[str] = None, run_names: Optional[list[str]] = None
) -> list[str]:
  """Names for the model's classes (see module docstring for the sources, in order).
  `run_names`: a training run's (its class_names.json); ImageNet's WordNet ids give way to
  torchvision's words for them, which are in the same (sorted-id) order."""
  if labels_file:
    try:
      with open(labels_file) as f:
        names = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
      raise ValueError(f'--labels {labels_file}: cannot read it ({e})') from None
    if len(names) != num_classes:
      raise ValueError(f'{labels_file} has {len(names)} names, the model has {num_classes} classes')
    return names
  if run_names is not None and len(run_names) == num_classes and not _wordnet_ids(run_names):
    return run_names
  if num_classes == 1000:
    spec = importlib.util.find_spec('torchvision')  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
      meta = os.path.join(list(spec.submodule_search_locations)[0], 'models', '_meta.py')
      if os.path.exists(meta):
        loader_spec = importlib.util.spec_from_file_location('_torchvision_meta', meta)
        module = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(module)  # a plain data module: no imports
        names = list(getattr(module, '_IMAGENET_CATEGORIES', []))
        if len(names) == 1000:
          return names
  if run_names is not None and len(run_names) == num_classes:
    return run_names
  return [f'class {i}' for i in range(num_classes)]


def _wordnet_ids(names: list[str]) -> bool:
  """ImageNet's 1000 WordNet ids ('n01440764', ...), TFDS imagenet2012's and a tree's names."""
  return len(names) == 1000 and all(len(n) == 9 and n[0] == 'n' and n[1:].isdigit() for n in names)


def load_variables(args: argparse.Namespace) -> dict[str, Any]:
  if args.torchvision_weights:
    from resnet_jax import convert  # pylint: disable=import-outside-toplevel

    return convert.from_torchvision(
      convert.load_torch_state_dict(args.torchvision_weights), args.arch
    )
  from resnet_jax import pretrained  # pylint: disable=import-outside-toplevel

  return pretrained.load_model_variables(args.checkpoint)


def model_config(args: argparse.Namespace) -> Any:
  """The config of the model to run: a training workdir's own, else the command line's."""
  if args.checkpoint and (as_path(args.checkpoint) / CONFIG_FILE).exists():
    config = read_run_config(args.checkpoint)
    if config.model.name != args.arch:
      raise ValueError(f'{args.checkpoint} trained {config.model.name}, not --arch {args.arch}')
    return config
  config = base_config()
  config.model.name = args.arch
  config.model.shortcut = args.shortcut
  config.model.stride_on = args.stride_on
  # WRNs are pre-activation nets by definition; the flag selects it for the ResNets.
  config.model.preact = args.preact or parse_name(args.arch, args.block).variant == 'wrn'
  config.model.block = args.block
  return config


def top5(model, variables: dict[str, Any], images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Indices and probabilities of the five most likely classes, best first, per image."""
  logits = model.apply(variables, jnp.asarray(images), train=False)
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  k = min(5, probs.shape[-1])
  idx = np.argsort(-probs, axis=-1, kind='stable')[:, :k]
  return idx, np.take_along_axis(probs, idx, axis=-1)


def crop_pct(text: str) -> float:
  """argparse `type` of --crop-pct: timm's crop_pct, in (0, 1]."""
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if not 0 < value <= 1:
    raise argparse.ArgumentTypeError(f"expected timm's crop_pct in (0, 1], got {text!r}")
  return value


def build_parser() -> argparse.ArgumentParser:
  parser = cli.ArgumentParser(
    prog='python -m resnet_jax.predict', description=__doc__.split('\n')[0]
  )
  parser.add_argument('--arch', required=True, help='model name, e.g. resnet50')
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument(
    '--torchvision-weights',
    help='torchvision .pth or .safetensors state_dict (read without torch; see convert)',
  )
  source.add_argument('--checkpoint', help='converted checkpoint directory or training workdir')
  parser.add_argument(
    '--shortcut', choices=['A', 'B', 'C'], help='for checkpoints of non-default models'
  )
  parser.add_argument('--stride-on', choices=['1x1', '3x3'])
  parser.add_argument('--preact', action='store_true')
  parser.add_argument(
    '--block',
    choices=['basic', 'bottleneck'],
    help='CIFAR-family nets: the block kind (bottleneck: 9n+2 layers)',
  )
  parser.add_argument(
    '--image-size',
    type=cli.positive_int,
    help="crop size (resize = size * 256 / 224); default 224, or a training run's own",
  )
  parser.add_argument(
    '--interpolation',
    choices=['bilinear', 'bicubic'],
    help="the resize's filter (default bilinear, torchvision's; timm's RSB weights: bicubic)",
  )
  parser.add_argument(
    '--crop-pct',
    type=crop_pct,
    help="timm's crop_pct: resize the shorter side to floor(size / crop_pct) (RSB: 0.95)",
  )
  parser.add_argument(
    '--normalize',
    choices=sorted(NORMALIZATIONS),
    help="the pixels' mean/std: imagenet (torchvision's), inception (0.5/0.5: [-1, 1]); "
    'default inception for BiT names (resnetv2_*_bit), imagenet otherwise',
  )
  parser.add_argument('--labels', help='text file with one class name per line')
  parser.add_argument('images', nargs='+', help='image files')
  return parser


def default_normalization(arch: str) -> str:
  """The normalisation converted weights of `arch` expect: BiT's [-1, 1], else ImageNet's."""
  try:
    bit = parse_name(arch).variant == 'bit'
  except ValueError:  # an unknown name: reported when the model is built
    bit = False
  return 'inception' if bit else 'imagenet'


def eval_geometry(args: argparse.Namespace) -> tuple[int, int, int]:
  """(crop, resize, PIL filter) of converted weights' input, from the flags: torchvision's
  `Resize(size x 256/224)` bilinear by default, timm's `floor(size / crop_pct)` with --crop-pct."""
  size = args.image_size or 224
  if args.crop_pct:
    resize = views.crop_pct_resize(size, args.crop_pct)
  else:
    resize = int(round(size * 256 / 224))
  return size, resize, views.PIL_FILTERS[args.interpolation or 'bilinear']


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = build_parser()
  args = parser.parse_args(argv)

  try:
    if is_training_run(args.checkpoint):
      for flag in ('image_size', 'interpolation', 'crop_pct', 'normalize'):
        if getattr(args, flag) is not None:
          raise ValueError(
            f'--{flag.replace("_", "-")}: {args.checkpoint} is a training run, whose own '
            'evaluation input is used'
          )
      prepare = run_preprocess(args.checkpoint)
    else:
      size, resize, resample = eval_geometry(args)
      prepare = functools.partial(
        preprocess,
        image_size=size,
        resize_size=resize,
        resample=resample,
        normalize=args.normalize or default_normalization(args.arch),
      )
    batch = np.stack([prepare(open_image(p)) for p in args.images])
    variables = load_variables(args)
  except (ValueError, FileNotFoundError) as e:  # one clear line, no traceback
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  try:
    _classify(parser, args, batch, variables)
  except (ValueError, FileNotFoundError) as e:  # e.g. --arch is not the run's model, --labels
    cli.fail(e)


def _classify(
  parser: argparse.ArgumentParser, args: argparse.Namespace, batch: np.ndarray, variables: Any
) -> None:
  """Builds the model the weights belong to and prints each image's top 5."""
  kernel = variables['params']['fc']['kernel']
  num_classes = kernel.shape[1]
  in_channels = variables['params'][input_conv_name(variables['params'])]['kernel'].shape[2]
  if in_channels != batch.shape[-1]:
    parser.error(
      f'the checkpoint expects {in_channels}-channel input; predict feeds converted weights RGB '
      'images (pass the training workdir of a run on other data: its own input is used)'
    )
  model = runtime.build_model(model_config(args), num_classes)
  variables = layout.for_model(
    variables, model
  )  # converted weights are unrolled, runs may be scanned
  from resnet_jax.checkpointing import describe_mismatch  # pylint: disable=import-outside-toplevel

  expected = jax.eval_shape(
    lambda x: model.init(jax.random.key(0), x, train=False),
    jax.ShapeDtypeStruct((1, 64, 64, in_channels), jnp.float32),
  )
  mismatch = describe_mismatch(expected, variables)
  if mismatch:
    parser.error(f'the weights do not fit {args.arch} with these options: {mismatch}')

  run_names = read_class_names(args.checkpoint) if is_training_run(args.checkpoint) else None
  names = class_names(num_classes, args.labels, run_names)
  indices, probs = top5(model, variables, batch)
  for path, idx, prob in zip(args.images, indices, probs):
    if len(args.images) > 1:
      print(f'{path}:')
    for i, p in zip(idx, prob):
      print(f'{p:.4f}  {names[i]} ({i})')


if __name__ == '__main__':
  main()
