"""Stochastic depth (drop path) for residual blocks: Huang et al. 2016, "Deep Networks with
Stochastic Depth" (ECCV), who trained the CIFAR ResNet-110 and ResNet-1202 with it.

During training each residual block's branch is dropped at random, so the block is its shortcut
alone (identity or projection; a post-activation block still applies its final ReLU, as in the
paper's ``H_l = ReLU(b_l f_l(H_{l-1}) + id(H_{l-1}))``). The drop probability grows linearly
with depth (the paper's "linear decay" of the survival probability):

  p_l = 1 - l / L (1 - p_L),  l = 1 .. L,   i.e.   rate_l = 1 - p_l = l / L * drop_path_rate

with L the number of blocks of the whole net (all stages) and ``drop_path_rate = 1 - p_L`` the
rate of the last block (the paper's p_L = 0.5 is ``drop_path_rate=0.5``): the first block's rate
is rate / L. ``rule='timm'`` is timm's ResNet instead, ``rate_l = (l - 1) / (L - 1) * rate``
(``drop_path_rate * net_block_idx / (net_num_blocks - 1)``): the first block is never dropped, the
last one still at ``rate`` ("ResNet strikes back" trains with it, so its recipes here use it).
``rule='stage'`` is the TF ResNet-RS code's (tensorflow/tpu models/official/resnet, Bello et al.
2021): every block of stage s of S gets ``(s + 1) / (S + 1) * rate`` (0.4, 0.6, 0.8, 1.0 x rate
for the four ImageNet stages), one rate per stage rather than per block.

Huang et al. drop a block for the whole mini-batch and scale the branch by p_l at test time.
Here (``mode='row'``, timm's ``drop_path`` / torchvision's ``StochasticDepth(mode='row')``) each
example draws its own Bernoulli(p_l) and the surviving branches are scaled by 1 / p_l during
training, so evaluation is the plain forward: deterministic, no rng, and the same function as a
net trained without drop path. Per example is equal in expectation to per batch, gives lower-
variance gradients at the same cost (under ``jit`` a dropped branch is computed and masked either
way: nothing is skipped) and is the same in distribution however the batch is sharded over
devices or split into micro-batches. ``mode='batch'`` draws one Bernoulli per block and step (the
paper's, with the same 1 / p_l scaling): with data parallelism, the draw is the one of the global
batch (one jitted program) or, with gradient accumulation, of each micro-batch.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

MODES = ('row', 'batch')
# block l of L: l / L x rate | (l - 1) / (L - 1) x rate | stage s of S: (s + 1) / (S + 1) x rate
RULES = ('huang', 'timm', 'stage')
# Where each block records its rate and per-example keep mask (train mode, drop path on) when
# the caller makes it mutable: ``apply(..., mutable=['batch_stats', COLLECTION])``.
COLLECTION = 'drop_path'

Rate = Union[float, jax.Array]


def block_rates(stage_sizes: Sequence[int], rate: float, rule: str = 'huang') -> list[list[float]]:
  """Drop probability of every block, per stage: block l of L (from 1) gets l / L * rate
  (``'huang'``: Huang et al.'s linear decay, p_l = 1 - l / L (1 - p_L), with ``rate`` = 1 - p_L)
  or (l - 1) / (L - 1) * rate (``'timm'``: timm's ResNet, the first block never dropped), or
  (s + 1) / (S + 1) * rate for every block of stage s of S (``'stage'``: TF's ResNet-RS)."""
  if rule == 'stage':
    n = len(stage_sizes)
    return [[(s + 2) / (n + 1) * rate] * size for s, size in enumerate(stage_sizes)]
  total = sum(stage_sizes)
  if rule == 'timm':
    position = lambda l: l / (total - 1) if total > 1 else 0.0  # l counted from 0
  else:
    position = lambda l: (l + 1) / total
  out, l = [], 0
  for n in stage_sizes:
    out.append([position(l + j) * rate for j in range(n)])
    l += n
  return out


def check(rate: float, mode: str, rule: str = 'huang') -> None:
  """Refuses a rate outside [0, 1) (a last block that never survives), an unknown mode or rule."""
  if not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
    raise ValueError(f'drop_path_rate must be in [0, 1), got {rate!r}')
  if mode not in MODES:
    raise ValueError(f"drop_path_mode must be 'row' or 'batch', got {mode!r}")
  if rule not in RULES:
    raise ValueError(
      f"drop_path_rule must be 'huang' or 'timm', or 'stage' (TF's ResNet-RS), got {rule!r}"
    )


def drop_path(module: nn.Module, branch: jax.Array, rate: Optional[Rate], mode: str) -> jax.Array:
  """``branch`` with examples (``'row'``) or the whole batch (``'batch'``) zeroed with
  probability ``rate`` and the rest scaled by 1 / (1 - rate); unchanged when ``rate`` is None.

  The mask comes from ``module``'s 'dropout' rng stream (the train step's, folded in per module
  and per scan iteration), so ``apply`` needs ``rngs={'dropout': key}`` when this is on.
  """
  if rate is None:
    return branch
  keep = 1.0 - jnp.asarray(rate, jnp.float32)
  shape = (branch.shape[0],) if mode == 'row' else (1,)
  kept = jax.random.bernoulli(module.make_rng('dropout'), keep, shape)
  module.sow(COLLECTION, 'rate', jnp.asarray(rate, jnp.float32))
  module.sow(COLLECTION, 'kept', jnp.broadcast_to(kept, (branch.shape[0],)))
  scale = jnp.where(kept, 1.0 / keep, 0.0).astype(branch.dtype)
  return branch * scale.reshape(scale.shape + (1,) * (branch.ndim - 1))
