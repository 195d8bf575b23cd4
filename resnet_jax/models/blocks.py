"""Residual blocks: post-activation (He et al. 2015) and pre-activation (He et al. 2016) ones.

Every block takes the same fields (``_Block``), so the ResNet builds any kind with one call, and
every block after the first of a stage is identical (stride 1, same width), which is what lets the
ResNet run those as one ``nn.scan`` over stacked parameters (``ResNet.scan``).
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax

from resnet_jax.models import attention, drop_path, layers

ModuleDef = Any


def _last_bn_init(zero: bool):
  """Zero the last BN's scale so the residual branch starts as zero (Goyal et al. 2017)."""
  return nn.initializers.zeros if zero else nn.initializers.ones


def _projects(kind: str, changes: bool) -> bool:
  return kind == 'C' or (kind == 'B' and changes)


class _Block(nn.Module):
  """The fields every block takes: the ResNet builds any block kind with the same arguments."""

  features: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  residual: bool = True
  shortcut: str = 'B'
  stride_on: str = '3x3'  # bottlenecks only: a basic block's one stride is on its first 3x3 conv
  zero_init_last_bn: bool = False
  # ResNeXt / torchvision Wide ResNet (bottlenecks only): the 3x3 conv has
  # int(features * base_width / 64) * groups channels in `groups` groups (torchvision's
  # `groups` / `width_per_group`); resnet50 is groups=1, base_width=64.
  groups: int = 1
  base_width: int = 64
  dilation: int = 1  # of the 3x3 convs: a backbone's output stride 16 / 8 (see ResNet)
  dropout_rate: float = 0.0  # between the convs (Wide ResNets, Zagoruyko & Komodakis 2016)
  deterministic: bool = True  # no dropout (evaluation); False needs a 'dropout' rng
  drop_path_mode: str = 'row'  # stochastic depth per example | per batch (models.drop_path)
  avg_down: bool = False  # ResNet-D projections: average pool, then a stride-1 1x1 conv
  stage_dilation: int = 1  # the stage's dilation (block 0's ``dilation`` is the previous one's)
  # 'se': squeeze-and-excitation of the branch's output before the addition (models.attention)
  attention: str = 'none'
  se_reduction: int = 16  # SE's ratio r (ResNet-RS: 4)
  expansion = 1  # output channels per unit of `features`
  preact = False

  def _dropout(self, y: jax.Array) -> jax.Array:
    """Dropout between the convs; absent (no rng needed) when the rate is 0 or not training."""
    if self.dropout_rate <= 0 or self.deterministic:
      return y
    return nn.Dropout(self.dropout_rate, deterministic=False, name='dropout')(y)

  def _drop_path(self, branch: jax.Array, rate: Optional[drop_path.Rate]) -> jax.Array:
    """The residual branch under stochastic depth (``models.drop_path``): ``rate`` is this
    block's drop probability (a call argument, so a scan can give each block its own), None
    when off; evaluation (``deterministic``) never drops."""
    if rate is None or self.deterministic:
      return branch
    return drop_path.drop_path(self, branch, rate, self.drop_path_mode)

  def _shortcut(self, x: jax.Array, out: int, norm: Optional[ModuleDef]) -> jax.Array:
    return layers.shortcut(
      x,
      out,
      self.strides,
      kind=self.shortcut,
      conv=self.conv,
      norm=norm,
      avg_down=self.avg_down,
      dilated=self.stage_dilation > 1,
    )

  @property
  def inner_width(self) -> int:
    """Channels of a bottleneck's 3x3 conv: torchvision's int(planes * base_width / 64) * groups."""
    return int(self.features * (self.base_width / 64.0)) * self.groups


class _PreActBlock(_Block):
  """Where a pre-activation unit's input BN-ReLU comes from (fb.resnet.torch ``preresnet.lua``).

  ``shared_preact``: the unit's own BN-ReLU also feeds the shortcut ('both_preact'): the first
  unit after the bare CIFAR conv stem, and every unit that changes shape.
  ``input_preactivated``: the input is already BN-ReLU'd by the stem (ImageNet: conv-BN-ReLU-
  max-pool), so the unit has no BN-ReLU of its own ('no_preact'; no ``bn1``).
  """

  shared_preact: bool = False
  input_preactivated: bool = False
  preact = True

  def _preactivate(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(branch input, shortcut input) of this unit."""
    if self.input_preactivated:
      return x, x
    pre = nn.relu(self.norm(name='bn1')(x))
    out = self.features * self.expansion
    changes = layers.changes_shape(x, out, self.strides)
    shared = self.shared_preact or changes or _projects(self.shortcut, changes)
    return pre, (pre if shared else x)


class BasicBlock(_Block):
  """Two 3x3 convs, each followed by BN; ReLU after the first and after the shortcut addition.

  Dilated (a backbone at output stride 16 / 8; torchvision refuses dilation in basic blocks),
  the first conv has ``dilation`` (the previous stage's in a stage's first block) and the second
  the stage's, as timm's ``BasicBlock`` does, so resnet18/34 backbones match timm's.
  """

  @nn.compact
  def __call__(self, x: jax.Array, drop_rate: Optional[drop_path.Rate] = None) -> jax.Array:
    d = self.dilation
    y = self.conv(self.features, 3, self.strides, name='conv1', dilation=d)(x)
    y = self._dropout(nn.relu(self.norm(name='bn1')(y)))
    y = self.conv(self.features, 3, name='conv2', dilation=max(d, self.stage_dilation))(y)
    y = self.norm(name='bn2', scale_init=_last_bn_init(self.zero_init_last_bn))(y)
    y = attention.attend(self.attention, y, self.se_reduction)
    if self.residual:
      y = self._drop_path(y, drop_rate) + self._shortcut(x, self.features, self.norm)
    return nn.relu(y)


class Bottleneck(_Block):
  """1x1 reduce, 3x3, 1x1 expand (x4). ``stride_on`` picks v1 ('1x1', paper) or v1.5 ('3x3')."""

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, drop_rate: Optional[drop_path.Rate] = None) -> jax.Array:
    s1, s3 = (self.strides, 1) if self.stride_on == '1x1' else (1, self.strides)
    out, width = self.features * self.expansion, self.inner_width
    y = self.conv(width, 1, s1, name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(width, 3, s3, name='conv2', groups=self.groups, dilation=self.dilation)(y)
    y = self._dropout(nn.relu(self.norm(name='bn2')(y)))
    y = self.conv(out, 1, name='conv3')(y)
    y = self.norm(name='bn3', scale_init=_last_bn_init(self.zero_init_last_bn))(y)
    y = attention.attend(self.attention, y, self.se_reduction)
    if self.residual:
      y = self._drop_path(y, drop_rate) + self._shortcut(x, out, self.norm)
    return nn.relu(y)


class PreActBasicBlock(_PreActBlock):
  """He et al. 2016 full pre-activation: BN-ReLU-conv twice, nothing after the addition.

  The shortcut of a unit that changes shape (any option) or projects reads the pre-activated
  input and a projection has no BN of its own (fb.resnet.torch 'both_preact'); an identity
  shortcut of a unit that keeps the shape reads the raw sum. See ``_PreActBlock`` for the first
  unit after the stem.
  """

  @nn.compact
  def __call__(self, x: jax.Array, drop_rate: Optional[drop_path.Rate] = None) -> jax.Array:
    pre, src = self._preactivate(x)
    d = self.dilation  # the second conv has the stage's, as in BasicBlock
    y = self.conv(self.features, 3, self.strides, name='conv1', dilation=d)(pre)
    y = nn.relu(self.norm(name='bn2', scale_init=_last_bn_init(self.zero_init_last_bn))(y))
    y = self.conv(self.features, 3, name='conv2', dilation=max(d, self.stage_dilation))(
      self._dropout(y)
    )
    y = attention.attend(self.attention, y, self.se_reduction)
    if not self.residual:
      return y
    return self._drop_path(y, drop_rate) + self._shortcut(src, self.features, None)


class PreActBottleneck(_PreActBlock):
  """Pre-activation bottleneck: (BN-ReLU-conv) x3 with 1x1, 3x3, 1x1 (x4) convs."""

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, drop_rate: Optional[drop_path.Rate] = None) -> jax.Array:
    s1, s3 = (self.strides, 1) if self.stride_on == '1x1' else (1, self.strides)
    out, width = self.features * self.expansion, self.inner_width
    pre, src = self._preactivate(x)
    y = self.conv(width, 1, s1, name='conv1')(pre)
    y = nn.relu(self.norm(name='bn2')(y))
    y = self.conv(width, 3, s3, name='conv2', groups=self.groups, dilation=self.dilation)(y)
    y = nn.relu(self.norm(name='bn3', scale_init=_last_bn_init(self.zero_init_last_bn))(y))
    y = attention.attend(
      self.attention, self.conv(out, 1, name='conv3')(self._dropout(y)), self.se_reduction
    )
    if not self.residual:
      return y
    return self._drop_path(y, drop_rate) + self._shortcut(src, out, None)
