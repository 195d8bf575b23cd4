"""torchvision / timm ``state_dict`` keys <-> our variables: ``from_torchvision`` and back.

The mapping is exact because our parameter names mirror torchvision's (see
``resnet_jax.models.resnet``): ``layer{s}.{b}.conv{k}.weight`` -> ``layer{s}_{b}/conv{k}/kernel``
(OIHW -> HWIO), ``downsample.0``/``downsample.1`` -> ``downsample_conv``/``downsample_bn``,
``fc.weight`` -> ``fc/kernel`` (transposed), BN ``weight``/``bias`` -> ``scale``/``bias`` and
``running_mean``/``running_var`` -> ``batch_stats`` ``mean``/``var``. torch normalises with
``running_var`` as stored (its unbiased-update convention only affects training), exactly like our
``var``, and both use epsilon 1e-5, so eval-mode logits agree.

timm's Bag of Tricks nets (``resnet50c``/``resnet50d``, ...) add two things: the deep stem
``conv1.{0,1,3,4,6}`` (``models.stems``: ``stem_conv{k}``/``stem_bn{k}``) and, with ``avg_down``,
an ``nn.Sequential`` downsample whose index 0 is the parameter-free pool, so its conv and BN sit at
``downsample.1``/``downsample.2``. Its SE-ResNets (``seresnet50``, ...) add ``se.fc1``/``se.fc2``
to each block: 1x1 convs with biases, mapped like any conv (``models.attention``).

timm's Big Transfer nets (``resnetv2_50x1_bit`` ...: ``ResNetV2``) have their own names
(``bit_torch_key``): ``stem.conv``, ``stages.{s-1}.blocks.{b}.{conv,norm}{k}``,
``...downsample.conv``, ``norm`` (the final GroupNorm) and ``head.fc``, a 1x1 conv whose
(out, in, 1, 1) weight is our Dense kernel transposed. GroupNorm keeps no running statistics and
a standardised conv stores its raw weight, so every tensor is a parameter and a transpose away.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.models import create_model, layout, parse_name
from resnet_jax.models.stems import DEEP_STEM_TORCH_INDEX, STEM_POOL_TORCH_INDEX

# Keys torchvision stores that carry no model state (BN's update counter).
IGNORED_SUFFIXES = ('num_batches_tracked',)
_LEAF_NAMES = {
  ('params', 'kernel'): 'weight',  # conv and dense
  ('params', 'bias'): 'bias',  # dense and BN
  ('params', 'scale'): 'weight',  # BN
  ('batch_stats', 'mean'): 'running_mean',
  ('batch_stats', 'var'): 'running_var',
}


def torch_key(collection: str, path: Sequence[str], avg_down: bool = False) -> str:
  """The torchvision (timm) ``state_dict`` key of the flax variable ``collection/path``.

  ``avg_down``: the net's projections pool first (timm's ``downsample_avg``: the pool is the
  Sequential's entry 0, so the conv and BN are entries 1 and 2).
  """
  *modules, leaf = path
  parts = []
  for m in modules:
    if m.startswith('layer') and '_' in m:  # layer2_3 -> layer2.3
      parts.extend(m.split('_', 1))
    elif m in ('downsample_conv', 'downsample_bn'):
      parts.extend(['downsample', str(int(avg_down) + (m == 'downsample_bn'))])
    elif m in DEEP_STEM_TORCH_INDEX:  # stem_conv2 -> conv1.3
      parts.extend(['conv1', str(DEEP_STEM_TORCH_INDEX[m])])
    elif m in STEM_POOL_TORCH_INDEX:  # ResNet-RS: stem_pool_bn -> maxpool.1
      parts.extend(['maxpool', str(STEM_POOL_TORCH_INDEX[m])])
    else:
      parts.append(m)
  parts.append(_LEAF_NAMES[collection, leaf])
  return '.'.join(parts)


_BIT_MODULES = {'conv1': 'stem.conv', 'bn_final': 'norm', 'fc': 'head.fc'}
BIT_HEAD_KEY = 'head.fc.weight'


def bit_torch_key(collection: str, path: Sequence[str]) -> str:
  """timm's ``ResNetV2`` (BiT) ``state_dict`` key of the flax variable ``collection/path``."""
  *modules, leaf = path
  parts = []
  for i, m in enumerate(modules):
    if i == 0 and m in _BIT_MODULES:  # the net's own conv1, bn_final, fc (not a block's conv1)
      parts.append(_BIT_MODULES[m])
    elif m.startswith('layer') and '_' in m:  # layer2_3 -> stages.1.blocks.3
      stage, block = m.removeprefix('layer').split('_', 1)
      parts.extend(['stages', str(int(stage) - 1), 'blocks', block])
    elif m == 'downsample_conv':
      parts.extend(['downsample', 'conv'])
    elif m.startswith('bn') and m[2:].isdigit():  # bn1 -> norm1
      parts.append('norm' + m[2:])
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
  if torch_value.ndim == 4 and path[-2] == 'fc':  # timm's 1x1 conv head (BiT) -> dense
    return torch_value.reshape(torch_value.shape[:2]).T
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


def _attention_hint(sd: Mapping[str, Any], model: Any, name: str) -> str:
  """When the file has squeeze-and-excitation blocks and `name` not, or the reverse, says so."""
  se = any('.se.fc1.' in k for k in sd)
  if se == (model.attention == 'se'):
    return ''
  if se:
    return (
      f' (the file has squeeze-and-excitation blocks (se.fc1/fc2), {name} has not: is --arch '
      f'se{name}?)'
    )
  return f' ({name} has squeeze-and-excitation blocks, the file has none: is --arch right?)'


def _tweaks_hint(sd: Mapping[str, Any], model: Any, name: str) -> str:
  """When the file's stem or shortcuts are not `name`'s (timm's c / d nets), says so."""
  deep = all(f'conv1.{i}.weight' in sd for i in (0, 3, 6))  # timm's three stem convs
  avg = any(k.endswith('downsample.2.weight') for k in sd)
  if (deep, avg) == (model.stem == 'deep', model.avg_down):
    return ''
  if not deep and 'conv1.weight' not in sd:  # neither stem whole (a damaged file): no guess
    return ''
  kind = lambda deep, avg: (
    f'a {"deep (3x3 x3)" if deep else "7x7"} stem and {"avg-pool" if avg else "strided"} '
    'projection shortcuts'
  )
  return (
    f' (the file has {kind(deep, avg)}, {name} has {kind(model.stem == "deep", model.avg_down)}:'
    " is --arch right? timm's resnet50c has the deep stem, resnet50d both)"
  )


def from_torchvision(
  state_dict: Mapping[str, Any], name: str, *, scan: bool = False, features_only: bool = False
) -> dict[str, Any]:
  """A torchvision ResNet ``state_dict`` as ``create_model(name)``'s ``{'params', 'batch_stats'}``.

  ``name``: resnet18/34/50/101/152, resnext{50,101}_{G}x{W}d, wide_resnet{50,101}_{k} (grouped
  3x3 kernels map like any other: OIHW with I = in / groups -> HWIO), and timm's
  resnet{18,34,50,101,152}d, resnet{50,101,152}c and resnext50d_32x4d (deep stem, avg-pool
  shortcuts: see the module's docstring). The number of classes is
  read from ``fc.weight``. The keys map onto the unrolled layout; ``scan=True`` returns the
  variables of ``create_model(name, scan=True)`` instead (stacked blocks,
  ``models.layout.to_scanned``). timm's BiT nets ``resnetv2_{50,101,152}x{1,2,3,4}_bit`` map
  by ``bit_torch_key`` and give ``{'params'}`` only (GroupNorm). ``features_only=True``: the
  variables of the backbone (``create_model(name, features_only=True)``, any
  ``output_stride``: dilation adds no parameters): ``fc.*`` is not needed and is dropped if
  present. Key accounting is strict: a variable with no torchvision key, a torchvision key that
  no variable uses (other than ``num_batches_tracked``), or a shape mismatch is a
  ``ValueError`` naming them. A ``module.`` prefix (DataParallel) is stripped.
  """
  spec = parse_name(name)
  if spec.family != 'imagenet' or not spec.residual:
    raise ValueError(
      f'torchvision and timm have weights for ImageNet ResNets, ResNeXts and Wide ResNets only, '
      f'not {name!r}'
    )
  sd = {k.removeprefix('module.'): v for k, v in state_dict.items()}
  bit = spec.variant == 'bit'
  head = BIT_HEAD_KEY if bit else 'fc.weight'
  key_of = (lambda c, p, _: bit_torch_key(c, p)) if bit else torch_key
  if features_only:
    sd = {k: v for k, v in sd.items() if not k.startswith(head.removesuffix('weight'))}
    model = create_model(name, num_classes=1, features_only=True)
  else:
    if head not in sd:
      raise ValueError(
        f'state_dict has no {head}: not a {_family(bit)} state_dict{_bit_hint(sd, bit)}'
      )
    model = create_model(name, num_classes=int(np.shape(sd[head])[0]))
  abstract = jax.eval_shape(
    lambda x: model.init(jax.random.key(0), x, train=False),
    jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
  )

  used, missing, reshaped = set(), [], []

  def convert(keypath, leaf):
    names = [k.key for k in keypath]
    key = key_of(names[0], names[1:], model.avg_down)
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
      + (
        _bit_hint(sd, bit)
        or _blocks_hint(sd, used | set(missing), name)
        or _attention_hint(sd, model, name)
        or _tweaks_hint(sd, model, name)
      )
    )
  variables = {k: variables[k] for k in ('params', 'batch_stats') if k in variables}
  return layout.to_scanned(variables, model.stage_sizes) if scan else variables


def _family(bit: bool) -> str:
  return 'timm ResNetV2 (BiT)' if bit else 'torchvision ResNet'


def _bit_hint(sd: Mapping[str, Any], bit: bool = False) -> str:
  """When the file is timm's BiT (ResNetV2) and the arch not, or the reverse, says so."""
  if ('stem.conv.weight' in sd) == bit or not ('stem.conv.weight' in sd or 'conv1.weight' in sd):
    return ''
  if bit:
    return ' (the file has torchvision-style keys (conv1, layer1...): is --arch right?)'
  return " (the file is timm's ResNetV2 / BiT (stem.conv, stages...): is --arch resnetv2_50x1_bit?)"


def to_torchvision(
  variables: Mapping[str, Any], avg_down: bool = False, *, bit: bool = False
) -> dict[str, np.ndarray]:
  """The torchvision ``state_dict`` (numpy arrays) of a ResNet's variables, either layout.

  The inverse of ``from_torchvision`` (``num_batches_tracked`` is not written): export weights
  trained here to torch, or check a round trip. ``avg_down``: the model's (``ResNet.avg_down``),
  which the variables do not show (timm's ``downsample.1/.2`` keys instead of ``.0/.1``).
  ``bit``: a BiT net's variables, written with timm's ``ResNetV2`` keys (``bit_torch_key``).
  """
  unrolled = layout.to_unrolled(dict(variables))
  out = {}
  for collection in ('params', 'batch_stats'):
    flat = jax.tree_util.tree_flatten_with_path(unrolled.get(collection, {}))[0]
    for keypath, leaf in flat:
      names = [k.key for k in keypath]
      value = np.asarray(leaf, np.float32)
      if names[-1] == 'kernel':
        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        if bit and names[0] == 'fc':  # timm's 1x1 conv head
          value = value[:, :, None, None]
      key = bit_torch_key(collection, names) if bit else torch_key(collection, names, avg_down)
      out[key] = value
  return out
