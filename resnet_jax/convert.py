"""Import torchvision ResNet / ResNeXt / Wide ResNet weights: ``from_torchvision`` and a CLI.

    python -m resnet_jax.convert --arch resnet50 \
        --torchvision-weights resnet50-11ad3fa6.pth --out DIR

writes an Orbax checkpoint of ``{'params', 'batch_stats'}`` that ``--config.init_from=DIR`` (and
``python -m resnet_jax.predict --checkpoint DIR``) accept. torchvision's weight files are listed in
``torchvision.models.ResNet50_Weights`` etc.; download one (e.g. from
https://download.pytorch.org/models/resnet50-11ad3fa6.pth) on a machine with internet access.

The mapping is exact because our parameter names mirror torchvision's (see
``resnet_jax.models.resnet``): ``layer{s}.{b}.conv{k}.weight`` -> ``layer{s}_{b}/conv{k}/kernel``
(OIHW -> HWIO), ``downsample.0``/``downsample.1`` -> ``downsample_conv``/``downsample_bn``,
``fc.weight`` -> ``fc/kernel`` (transposed), BN ``weight``/``bias`` -> ``scale``/``bias`` and
``running_mean``/``running_var`` -> ``batch_stats`` ``mean``/``var``. torch normalises with
``running_var`` as stored (its unbiased-update convention only affects training), exactly like our
``var``, and both use epsilon 1e-5, so eval-mode logits agree.

torch is not needed: ``--torchvision-weights`` reads ``.pth`` files with
``resnet_jax.torch_checkpoint`` (a restricted unpickler that builds numpy arrays and refuses
anything else) and ``.safetensors`` files (e.g. timm's ``resnet50.a1_in1k`` / ``resnet50.tv_in1k``
``model.safetensors``: timm's v1.5 ResNets use torchvision's key names) with ``safetensors``.
``from_torchvision`` takes any mapping of array-likes.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import cli, torch_checkpoint, torch_weights
from resnet_jax.models import create_model, layout, parse_name

# Keys torchvision stores that carry no model state (BN's update counter).
IGNORED_SUFFIXES = ('num_batches_tracked',)
_LEAF_NAMES = {
  ('params', 'kernel'): 'weight',  # conv and dense
  ('params', 'bias'): 'bias',  # dense and BN
  ('params', 'scale'): 'weight',  # BN
  ('batch_stats', 'mean'): 'running_mean',
  ('batch_stats', 'var'): 'running_var',
}


def torch_key(collection: str, path: Sequence[str]) -> str:
  """The torchvision ``state_dict`` key of the flax variable ``collection/path``."""
  *modules, leaf = path
  parts = []
  for m in modules:
    if m.startswith('layer') and '_' in m:  # layer2_3 -> layer2.3
      parts.extend(m.split('_', 1))
    elif m == 'downsample_conv':
      parts.extend(['downsample', '0'])
    elif m == 'downsample_bn':
      parts.extend(['downsample', '1'])
    else:
      parts.append(m)
  parts.append(_LEAF_NAMES[collection, leaf])
  return '.'.join(parts)


def _to_numpy(value: Any) -> np.ndarray:
  """torch tensors (without importing torch), numpy arrays, jax arrays -> float32 numpy."""
  if hasattr(value, 'detach'):
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, dtype=np.float32)


def _to_flax_layout(torch_value: np.ndarray, path: Sequence[str]) -> np.ndarray:
  if path[-1] != 'kernel':
    return torch_value
  if torch_value.ndim == 4:  # conv OIHW -> HWIO
    return torch_value.transpose(2, 3, 1, 0)
  return torch_value.T  # dense (out, in) -> (in, out)


_SHOWN = 8  # items of each list an error names: a wrong --arch gave one line of ~10 KB


def _first(items: list[str]) -> str:
  """The first few items of a list in an error message, and how many there are in all."""
  if len(items) <= _SHOWN:
    return str(items)
  return str(items[:_SHOWN])[:-1] + f', ... ({len(items)} in all)]'


def _structure(keys: Any) -> tuple[str, tuple[int, ...]]:
  """Block kind and blocks per stage of a torchvision state_dict's keys (layerS.B.*)."""
  blocks = tuple(
    1 + max((int(k.split('.')[1]) for k in keys if k.startswith(f'layer{s}.')), default=-1)
    for s in (1, 2, 3, 4)
  )
  return ('bottleneck' if 'layer1.0.conv3.weight' in keys else 'basic'), blocks


def _blocks_hint(sd: Mapping[str, Any], expected: set[str], name: str) -> str:
  """When the file's blocks are not `name`'s, says so: a wrong --arch then shows itself."""
  (kind, blocks), (want_kind, want) = _structure(sd), _structure(expected)
  if (kind, blocks) == (want_kind, want) or not all(blocks):
    return ''
  per_stage = ','.join(map(str, blocks))
  return (
    f' (the file has {kind} blocks {per_stage} per stage, {name} has {want_kind} '
    f'{",".join(map(str, want))}: is --arch right?)'
  )


def from_torchvision(
  state_dict: Mapping[str, Any], name: str, *, scan: bool = False, features_only: bool = False
) -> dict[str, Any]:
  """A torchvision ResNet ``state_dict`` as ``create_model(name)``'s ``{'params', 'batch_stats'}``.

  ``name``: resnet18/34/50/101/152, resnext{50,101}_{G}x{W}d, wide_resnet{50,101}_{k} (grouped
  3x3 kernels map like any other: OIHW with I = in / groups -> HWIO). The number of classes is
  read from ``fc.weight``. The keys map onto the unrolled layout; ``scan=True`` returns the
  variables of ``create_model(name, scan=True)`` instead (stacked blocks,
  ``models.layout.to_scanned``). ``features_only=True``: the variables of the backbone
  (``create_model(name, features_only=True)``, any ``output_stride``: dilation adds no
  parameters): ``fc.*`` is not needed and is dropped if present. Key accounting is strict: a
  variable with no torchvision key, a torchvision key that no variable uses (other than
  ``num_batches_tracked``), or a shape mismatch is a ``ValueError`` naming them. A ``module.``
  prefix (DataParallel) is stripped.
  """
  spec = parse_name(name)
  if spec.family != 'imagenet' or not spec.residual:
    raise ValueError(
      f'torchvision has weights for ImageNet ResNets, ResNeXts and Wide ResNets only, not {name!r}'
    )
  sd = {k.removeprefix('module.'): v for k, v in state_dict.items()}
  if features_only:
    sd = {k: v for k, v in sd.items() if not k.startswith('fc.')}
    model = create_model(name, num_classes=1, features_only=True)
  else:
    if 'fc.weight' not in sd:
      raise ValueError('state_dict has no fc.weight: not a torchvision ResNet state_dict')
    model = create_model(name, num_classes=int(np.shape(sd['fc.weight'])[0]))
  abstract = jax.eval_shape(
    lambda x: model.init(jax.random.key(0), x, train=False),
    jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
  )

  used, missing, reshaped = set(), [], []

  def convert(keypath, leaf):
    names = [k.key for k in keypath]
    key = torch_key(names[0], names[1:])
    if key not in sd:
      missing.append(key)
      return None
    used.add(key)
    value = _to_flax_layout(_to_numpy(sd[key]), names)
    if value.shape != leaf.shape:
      reshaped.append(f'{key} {tuple(np.shape(sd[key]))} -> {"/".join(names)} {leaf.shape}')
    return value

  variables = jax.tree_util.tree_map_with_path(convert, abstract)
  unused = sorted(k for k in sd if k not in used and not k.endswith(IGNORED_SUFFIXES))
  problems = []
  if missing:
    problems.append(f'missing torchvision keys {_first(sorted(missing))}')
  if unused:
    problems.append(f'unused torchvision keys {_first(unused)}')
  if reshaped:
    problems.append(f'shape mismatches {_first(reshaped)}')
  if problems:
    raise ValueError(
      f'state_dict does not fit {name}: '
      + '; '.join(problems)
      + _blocks_hint(sd, used | set(missing), name)
    )
  variables = {'params': variables['params'], 'batch_stats': variables['batch_stats']}
  return layout.to_scanned(variables, model.stage_sizes) if scan else variables


def to_torchvision(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The torchvision ``state_dict`` (numpy arrays) of a ResNet's variables, either layout.

  The inverse of ``from_torchvision`` (``num_batches_tracked`` is not written): export weights
  trained here to torch, or check a round trip.
  """
  unrolled = layout.to_unrolled(dict(variables))
  out = {}
  for collection in ('params', 'batch_stats'):
    flat = jax.tree_util.tree_flatten_with_path(unrolled[collection])[0]
    for keypath, leaf in flat:
      names = [k.key for k in keypath]
      value = np.asarray(leaf, np.float32)
      if names[-1] == 'kernel':
        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
      out[torch_key(collection, names)] = value
  return out


def adapt_input_channels(variables: dict[str, Any], in_channels: int) -> dict[str, Any]:
  """Re-shape the stem conv for ``in_channels`` inputs (e.g. 1 for grayscale data).

  For one channel the RGB kernels are summed, so a grey image gives the response the RGB model
  gives to that image replicated over three channels; for other counts the RGB kernels are cycled
  and rescaled by 3 / in_channels to keep the response's magnitude.
  """
  params = dict(variables['params'])
  kernel = np.asarray(params['conv1']['kernel'])
  rgb = kernel.shape[2]
  if in_channels == rgb:
    return variables
  if in_channels == 1:
    new = kernel.sum(axis=2, keepdims=True)
  else:
    new = kernel[:, :, np.arange(in_channels) % rgb, :] * (rgb / in_channels)
  params['conv1'] = {**params['conv1'], 'kernel': new.astype(kernel.dtype)}
  return {**variables, 'params': params}


SAFETENSORS_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def is_safetensors(path: str) -> bool:
  """Whether ``path`` starts like a safetensors file: a little-endian u64 header length, then
  the JSON header's ``{``. Sniffed from the bytes, so the file's name does not matter."""
  try:
    with open(path, 'rb') as f:
      head = f.read(9)
  except OSError:
    return False
  if len(head) < 9 or head[8:9] != b'{':
    return False
  return 2 <= int.from_bytes(head[:8], 'little') <= SAFETENSORS_MAX_HEADER


def _load_safetensors(path: str) -> dict[str, Any]:
  import ml_dtypes  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
  from safetensors import SafetensorError  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

  # ml_dtypes (imported above) registers numpy's 'bfloat16', which BF16 tensors need.
  try:
    return load_file(path)
  except (SafetensorError, TypeError, KeyError, ValueError, OSError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(
      f'{path} could not be read as a safetensors file ({type(e).__name__}: {first[:300]})'
    ) from None


def load_weight_sets(path: str) -> dict[str, dict[str, Any]]:
  """The weights in a PyTorch file, without torch: ``{'model': state_dict}``, plus ``'ema'``
  for a training checkpoint that keeps an EMA of them (``torch_weights.weight_sets``).

  ``.pth``/``.pt`` files written by ``torch.save`` (the zip format of torch >= 1.6 and the older
  stream format) go through ``torch_checkpoint.load``, whose unpickler builds tensors and nothing
  else: a file that would run code is refused unread. safetensors files (timm's and the Hugging
  Face hub's ``model.safetensors``) go through ``safetensors.numpy``.
  """
  if not os.path.exists(path):
    raise ValueError(f'{path}: no such file')
  if is_safetensors(path):
    return {'model': _load_safetensors(path)}
  try:
    return torch_weights.weight_sets(torch_checkpoint.load(path))
  except torch_checkpoint.CheckpointError as e:  # '{path}: why', one line
    raise ValueError(str(e) if str(e).startswith(f'{path}: ') else f'{path}: {e}') from None


def load_torch_state_dict(path: str, weights: str = 'model') -> dict[str, Any]:
  """A PyTorch weights file as ``{name: numpy array}``: its state_dict, or of a training
  checkpoint the model's weights (``weights='model'``) or their EMA (``'ema'``)."""
  return pick_weights(load_weight_sets(path), weights, path)


def pick_weights(sets: dict[str, dict[str, Any]], weights: str, path: str) -> dict[str, Any]:
  """``sets[weights]`` of ``load_weight_sets(path)``, or the error that says there is none."""
  if weights not in sets:
    raise ValueError(
      f"{path} holds no EMA weights (only a training checkpoint of torchvision's reference "
      "trainer, 'model_ema', or timm's, 'state_dict_ema', does): leave --weights out"
    )
  return sets[weights]


def check_out_dir(out: str) -> str:
  """The absolute `--out`; refuses an existing non-empty path (nothing may be overwritten)."""
  out = os.path.abspath(out)
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f'--out {out} is a file: choose a new directory (nothing was written)')
  ancestor = os.path.dirname(out)
  while not os.path.exists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    raise ValueError(f'--out {out}: {ancestor} is a file, not a directory (nothing was written)')
  if os.path.exists(out) and os.listdir(out):
    raise ValueError(
      f'--out {out} already exists and is not empty: choose a new directory (nothing was written)'
    )
  return out


def save_to_new_dir(out: str, variables: dict[str, Any]) -> None:
  """Writes into a temporary sibling of `out` and renames it into place, so `out` is only ever
  absent (or empty) or complete; a failure removes the temporary directory."""
  from resnet_jax import pretrained  # pylint: disable=import-outside-toplevel

  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.tmp-', dir=parent)
  try:
    pretrained.save_model_variables(os.path.join(tmp, 'ckpt'), variables)
    if os.path.isdir(out):
      os.rmdir(out)  # empty (checked): replaced by the finished checkpoint
    os.rename(os.path.join(tmp, 'ckpt'), out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = cli.ArgumentParser(
    prog='python -m resnet_jax.convert', description=__doc__.split('\n')[0]
  )
  parser.add_argument(
    '--arch',
    required=True,
    help='a torchvision net: resnet18/34/50/101/152, resnext50_32x4d, resnext101_32x8d, '
    'resnext101_64x4d, wide_resnet50_2, wide_resnet101_2',
  )
  parser.add_argument(
    '--torchvision-weights',
    required=True,
    help='torchvision .pth state_dict file, or a .safetensors file with the same keys '
    "(timm's v1.5 ResNets); torch is not needed",
  )
  parser.add_argument('--out', required=True, help='output checkpoint directory (new, or empty)')
  parser.add_argument(
    '--weights',
    choices=('model', 'ema'),
    default='model',
    help="of a training checkpoint (torchvision's reference trainer, timm's train.py): the "
    "model's weights (default) or their exponential moving average (model_ema/state_dict_ema)",
  )
  parser.add_argument(
    '--in-channels',
    type=cli.positive_int,
    default=3,
    help='adapt the stem to this many input channels (1: grayscale datasets)',
  )
  args = parser.parse_args(argv)

  try:
    out = check_out_dir(args.out)  # before anything slow: a mistyped --out costs nothing
    sets = load_weight_sets(args.torchvision_weights)
    state_dict = pick_weights(sets, args.weights, args.torchvision_weights)
    variables = from_torchvision(state_dict, args.arch)
    variables = adapt_input_channels(variables, args.in_channels)
    check_out_dir(out)  # again: it may have appeared while converting
    save_to_new_dir(out, variables)
  except (ValueError, OSError) as e:  # one clear line, no traceback (OSError: --out unwritable)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  n = sum(np.size(x) for x in jax.tree.leaves(variables['params']))
  classes = variables['params']['fc']['kernel'].shape[1]
  source = ' (the EMA weights)' if args.weights == 'ema' else ''
  print(f'wrote {args.arch}{source} ({n:,} parameters, {classes} classes) to {out}')
  if 'ema' in sets and args.weights == 'model':
    print('note: the file also holds an EMA of the weights; --weights ema converts those')
  print(finetune_hint(args.arch, out, args.in_channels))


def finetune_hint(arch: str, out: str, in_channels: int) -> str:
  """The command that fine-tunes these weights. finetune.py's default dataset, digits, is
  grayscale: RGB weights need another dataset there (they stopped with a stem-shape error)."""
  dataset = '' if in_channels == 1 else ',dataset=NAME'
  note = '  (digits, the default; dataset=NAME for another grayscale dataset)'
  if in_channels != 1:
    note = (
      f'  (NAME: a prepared TFDS dataset of {in_channels}-channel images; for digits, the '
      'default, convert with --in-channels 1)'
    )
  return (
    f'fine-tune: python -m resnet_jax.main --config=configs/finetune.py:arch={arch}{dataset} '
    f'--config.init_from={out} --workdir=...{note}'
  )


if __name__ == '__main__':
  main()
