"""The ResNet stems: the paper's 7x7 conv, the CIFAR 3x3 conv and the "Bag of Tricks" deep stem.

He et al. 2019 (*Bag of Tricks for Image Classification with Convolutional Neural Networks*,
Sec. 4.1, Fig. 2b) call a ResNet whose 7x7/2 stem conv is replaced by three 3x3 convs ResNet-C:
a 3x3/2 conv of width/2 channels, a 3x3 conv of width/2 and a 3x3 conv of width (32-32-64 before
a 64-wide first stage), each followed by BN and ReLU, then the same 3x3/2 max-pool. That is timm's
``stem_type='deep'`` with ``stem_width=32`` (the ``resnet50c`` / ``resnet50d`` stems).

Variables (and the timm keys ``convert`` maps them to):

======================================  ==========================================
flax                                    timm ``state_dict``
======================================  ==========================================
``conv1`` (7x7 and CIFAR stems)         ``conv1.weight``
``stem_conv1``, ``stem_bn1``            ``conv1.0.weight``, ``conv1.1.*``
``stem_conv2``, ``stem_bn2``            ``conv1.3.weight``, ``conv1.4.*``
``stem_conv3``                          ``conv1.6.weight``
``bn1`` (every post-act stem)           ``bn1.*``
``stem_pool_conv``, ``stem_pool_bn``    ``maxpool.0.weight``, ``maxpool.1.*`` (ResNet-RS)
======================================  ==========================================
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Any
# ResNet.stem; create_model spells the first two 7x7/deep; 'deep_conv_pool' is ResNet-RS's deep
# stem whose max-pool is a 3x3/2 conv + BN + ReLU (timm's replace_stem_pool: ``maxpool.0/.1``)
# 'bit': Big Transfer's 7x7/2 conv alone (its first unit normalises), zero pad 1, 3x3/2 max-pool
STEMS = ('imagenet', 'deep', 'cifar', 'deep_conv_pool', 'bit')
# Input pixels per pixel of each stem's output: every ImageNet stem halves twice (a strided conv,
# then a max-pool or ResNet-RS's strided conv), the CIFAR stem keeps the size.
STEM_STRIDES = {'imagenet': 4, 'deep': 4, 'cifar': 1, 'deep_conv_pool': 4, 'bit': 4}
# The deep stem's modules in the order of timm's nn.Sequential ``conv1``, with their indices there.
DEEP_STEM_TORCH_INDEX = {
  'stem_conv1': 0,
  'stem_bn1': 1,
  'stem_conv2': 3,
  'stem_bn2': 4,
  'stem_conv3': 6,
}
STEM_POOL_TORCH_INDEX = {'stem_pool_conv': 0, 'stem_pool_bn': 1}  # in timm's ``maxpool``
STEM_MODULES = ('conv1', 'bn1', *DEEP_STEM_TORCH_INDEX, *STEM_POOL_TORCH_INDEX)


def apply_stem(
  kind: str, x: jax.Array, width: int, *, conv: ModuleDef, norm: ModuleDef, preact: bool
) -> jax.Array:
  """The stem ``kind`` of ``STEMS`` on ``x``, ``width`` output channels (called inside the
  ResNet's compact ``__call__``, so the modules are the ResNet's own children).

  A pre-activation CIFAR net keeps only the conv: its first block's BN-ReLU follows it. BiT's
  stem (timm's ``stem_type='fixed'``) has no norm either: its conv output, negative values
  included, is padded with zeros (not -inf: a zero can win the max) and max-pooled unpadded.
  """
  if kind == 'bit':
    x = conv(width, 7, 2, name='conv1', space_to_depth=None)(x)
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')
  if kind == 'imagenet':
    x = conv(width, 7, 2, name='conv1', space_to_depth=None)(x)
  elif kind in ('deep', 'deep_conv_pool'):
    inner = width // 2
    x = conv(inner, 3, 2, name='stem_conv1')(x)
    x = nn.relu(norm(name='stem_bn1')(x))
    x = conv(inner, 3, name='stem_conv2')(x)
    x = nn.relu(norm(name='stem_bn2')(x))
    x = conv(width, 3, name='stem_conv3')(x)
  elif kind == 'cifar':
    x = conv(width, 3, name='conv1')(x)
    return x if preact else nn.relu(norm(name='bn1')(x))
  else:
    raise ValueError(f'unknown stem {kind!r}; expected one of {STEMS}')
  x = nn.relu(norm(name='bn1')(x))
  if kind == 'deep_conv_pool':
    return nn.relu(norm(name='stem_pool_bn')(conv(width, 3, 2, name='stem_pool_conv')(x)))
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def input_conv_name(params: Mapping[str, Any]) -> str:
  """The name of the conv that reads the image (the one whose kernel has the input channels)."""
  return 'stem_conv1' if 'stem_conv1' in params else 'conv1'
