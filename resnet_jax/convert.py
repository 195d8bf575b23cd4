"""Import torchvision / timm ResNet / ResNeXt / Wide ResNet weights: ``from_torchvision``, a CLI.

    python -m resnet_jax.convert --arch resnet50 \
        --torchvision-weights resnet50-11ad3fa6.pth --out DIR

writes an Orbax checkpoint of ``{'params', 'batch_stats'}`` that ``--config.init_from=DIR`` (and
``python -m resnet_jax.predict --checkpoint DIR``) accept. torchvision's weight files are listed in
``torchvision.models.ResNet50_Weights`` etc.; download one (e.g. from
https://download.pytorch.org/models/resnet50-11ad3fa6.pth) on a machine with internet access.

The key mapping (``from_torchvision``, ``to_torchvision``, ``torch_key``) lives in
``resnet_jax.torch_keys``: torchvision's names, and timm's deep stems and avg-pool shortcuts
(``--arch resnet50d`` etc., He et al. 2019's ResNet-C/D), and timm's ``ResNetV2`` keys of the
Big Transfer nets (``--arch resnetv2_50x1_bit``: GroupNorm, so the checkpoint has no
``batch_stats``).

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
from typing import Any, Optional, Sequence

import jax
import numpy as np

from resnet_jax import cli, torch_checkpoint, torch_weights
from resnet_jax.models.names import parse_name
from resnet_jax.models.stems import input_conv_name
from resnet_jax.torch_keys import (  # noqa: F401  (re-exported: convert's API)
  IGNORED_SUFFIXES,
  _to_numpy,
  from_torchvision,
  to_torchvision,
  torch_key,
)


def adapt_input_channels(variables: dict[str, Any], in_channels: int) -> dict[str, Any]:
  """Re-shape the stem conv for ``in_channels`` inputs (e.g. 1 for grayscale data).

  For one channel the RGB kernels are summed, so a grey image gives the response the RGB model
  gives to that image replicated over three channels; for other counts the RGB kernels are cycled
  and rescaled by 3 / in_channels to keep the response's magnitude.
  """
  params = dict(variables['params'])
  stem = input_conv_name(params)  # conv1, or a deep stem's stem_conv1
  kernel = np.asarray(params[stem]['kernel'])
  rgb = kernel.shape[2]
  if in_channels == rgb:
    return variables
  if in_channels == 1:
    new = kernel.sum(axis=2, keepdims=True)
  else:
    new = kernel[:, :, np.arange(in_channels) % rgb, :] * (rgb / in_channels)
  params[stem] = {**params[stem], 'kernel': new.astype(kernel.dtype)}
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
    "resnext101_64x4d, wide_resnet50_2, wide_resnet101_2; or timm's Bag of Tricks nets "
    "resnet{18,34,50,101,152}d, resnet{50,101,152}c, resnext50d_32x4d; timm's SE nets "
    'seresnet{18,34,50,101,152}, seresnet152d, seresnext{50,101}_32x4d, seresnext101_32x8d, '
    'seresnext101d_32x8d; ResNet-RS resnetrs{50,101,152,200,270,350,420}; Big Transfer '
    'resnetv2_{50,101,152}x{1,2,3,4}_bit (timm ResNetV2 keys)',
  )
  parser.add_argument(
    '--torchvision-weights',
    required=True,
    help='torchvision .pth state_dict file, or a .safetensors file with the same keys '
    "(timm's ResNets, e.g. model.safetensors of timm/resnet50d.a1_in1k); torch is not needed",
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
  """The command that fine-tunes these weights (BiT's: configs/bit.py, the BiT-HyperRule). The
  configs' default dataset, digits, is grayscale: RGB weights need another dataset there (they
  stopped with a stem-shape error)."""
  dataset = '' if in_channels == 1 else ',dataset=NAME'
  note = '  (digits, the default; dataset=NAME for another grayscale dataset)'
  if in_channels != 1:
    note = (
      f'  (NAME: a prepared TFDS dataset of {in_channels}-channel images; for digits, the '
      'default, convert with --in-channels 1)'
    )
  config = 'bit.py' if parse_name(arch).variant == 'bit' else 'finetune.py'  # BiT-HyperRule
  return (
    f'fine-tune: python -m resnet_jax.main --config=configs/{config}:arch={arch}{dataset} '
    f'--config.init_from={out} --workdir=...{note}'
  )


if __name__ == '__main__':
  main()
