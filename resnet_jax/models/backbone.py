"""ResNets as detection / segmentation backbones: what is frozen, for the optimizer.

The model side lives in ``ResNet`` (``features_only``, ``output_stride``, ``frozen_bn``,
``frozen_bn_affine``, ``frozen_stages``): frozen parts get no gradient (``stop_gradient``) and
their BatchNorm never updates its statistics. A zero gradient is not a frozen parameter, though:
weight decay and momentum would still move it, so the optimizer must leave frozen leaves alone.
``frozen_mask`` says which they are; ``freeze`` wraps an optax transformation accordingly.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import optax

from resnet_jax.models.stems import STEM_MODULES

_BN_RE = re.compile(r'bn\d*|bn_final|downsample_bn|stem_bn\d+|stem_pool_bn')
_STAGE_RE = re.compile(r'layer(\d+)_(?:\d+|scan)')


def _top_stage(name: str) -> int | None:
  """0 for the stem, k for ``layer{k}_*``, None for the head (never frozen by stage)."""
  if name in STEM_MODULES:
    return 0
  m = _STAGE_RE.fullmatch(name)
  return int(m[1]) if m else None


def frozen_mask(params: Any, frozen_stages: int = -1, frozen_bn_affine: bool = False) -> Any:
  """A tree like ``params``: True where a leaf is frozen (stem/stages <= ``frozen_stages``, BN
  scale/bias everywhere with ``frozen_bn_affine``); either layout (unrolled or scanned)."""

  def frozen(path, _) -> bool:
    keys = [getattr(k, 'key', None) for k in path]
    stage = _top_stage(keys[0]) if keys else None
    if stage is not None and stage <= frozen_stages:
      return True
    return frozen_bn_affine and len(keys) >= 2 and bool(_BN_RE.fullmatch(str(keys[-2])))

  return jax.tree_util.tree_map_with_path(frozen, params)


def freeze(
  tx: optax.GradientTransformation, model_config: Mapping[str, Any]
) -> optax.GradientTransformation:
  """``tx`` with zero updates on the leaves ``frozen_mask`` marks; ``tx`` itself (same state,
  same numerics) when the model config freezes nothing."""
  stages = model_config['frozen_stages']
  affine = bool(model_config['frozen_bn_affine'])
  if stages is None or (stages < 0 and not affine):
    return tx

  def labels(params):
    mask = frozen_mask(params, stages, affine)
    return jax.tree.map(lambda f: 'frozen' if f else 'train', mask)

  return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)
