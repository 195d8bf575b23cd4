"""Squeeze-and-excitation (Hu et al. 2018, "Squeeze-and-Excitation Networks", CVPR): channel
attention at the end of each residual branch, the ``se`` of timm's SE-ResNets.

A block's branch output y ([N, H, W, C]) is rescaled per example and channel by
sigmoid(W2 relu(W1 mean_hw(y) + b1) + b2), before the shortcut is added (the paper's Fig. 3, the
"SE-ResNet module"; timm's ``Bottleneck``/``BasicBlock`` call their ``se`` right after the last BN).
W1 reduces C to ``se_channels(C)`` and W2 expands back; both are 1x1 convolutions with biases,
named ``se/fc1`` and ``se/fc2`` like timm's ``SEModule``, so its ``state_dict`` keys map as any
other conv's. The reduction is the paper's ratio r = 16 rounded as timm rounds it: to the nearest
multiple of 8 and at least 8, so C/16 exactly for every ImageNet bottleneck stage (256 -> 16 ...
2048 -> 128) and 8 where C/16 is smaller (a ResNet-18's first stage, every CIFAR net), where the
paper would keep C/16.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.models import layers

ATTENTIONS = ('none', 'se')
SE_RATIO = 16  # the paper's reduction ratio r
SE_DIVISOR = 8  # timm's rd_divisor


def se_channels(channels: int, reduction: int = SE_RATIO) -> int:
  """The SE bottleneck's width for `channels` (timm's make_divisible(C / r, 8, round_limit=0));
  ResNet-RS reduces by r = 4."""
  v = channels / reduction
  return max(SE_DIVISOR, int(v + SE_DIVISOR / 2) // SE_DIVISOR * SE_DIVISOR)


class SqueezeExcite(nn.Module):
  """y * sigmoid(fc2(relu(fc1(mean over H, W of y)))), in y's dtype (the mean in float32)."""

  reduction: int = SE_RATIO

  @nn.compact
  def __call__(self, y: jax.Array) -> jax.Array:
    channels = y.shape[-1]
    s = jnp.mean(y, axis=(1, 2), keepdims=True, dtype=jnp.float32).astype(y.dtype)

    def fc(features: int, name: str) -> nn.Conv:
      return nn.Conv(
        features,
        (1, 1),
        use_bias=True,
        dtype=y.dtype,
        param_dtype=jnp.float32,
        kernel_init=layers.conv_kernel_init,
        name=name,
      )

    s = nn.relu(fc(se_channels(channels, self.reduction), 'fc1')(s))
    return y * nn.sigmoid(fc(channels, 'fc2')(s))


def attend(kind: str, y: jax.Array, reduction: int = SE_RATIO) -> jax.Array:
  """The branch output `y` after the block's attention (`kind` 'none': unchanged)."""
  return SqueezeExcite(reduction, name='se')(y) if kind == 'se' else y


def resolve(own: str, name: str, attention: Optional[str]) -> str:
  """The net's attention: the name's own (``own``: 'se' for ``seresnet50``, else 'none'), unless
  given; a name with SE given 'none' is a contradiction."""
  if attention is not None and attention not in ATTENTIONS:
    raise ValueError(f'attention must be one of {", ".join(ATTENTIONS)} or None, got {attention!r}')
  if attention is None:
    return own
  if own == 'se' and attention != 'se':
    raise ValueError(
      f'{name} has squeeze-and-excitation blocks; attention={attention!r} contradicts it (use '
      f'{name.removeprefix("se")} for the net without)'
    )
  return attention
