"""``create_model(name, **options)``: a name and the paper's options to a configured ``ResNet``.

Kept apart from the module (``models.resnet``) because it is where names, options and their
refusals meet (``models.names`` resolves what a name implies; this checks the combination), while
``ResNet`` only builds what it is given.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import jax.numpy as jnp

from resnet_jax.models import attention as attention_lib
from resnet_jax.models import drop_path
from resnet_jax.models.blocks import (
  BasicBlock,
  Bottleneck,
  PreActBasicBlock,
  PreActBottleneck,
)
from resnet_jax.models.names import (
  CIFAR_WIDTHS,
  IMAGENET_WIDTHS,
  check_shortcut,
  default_shortcut,
  parse_name,
  resolve_grouping,
  resolve_norm,
  resolve_tweaks,
  stage_sizes,
)
from resnet_jax.models.resnet import ResNet

_BLOCKS = {
  ('basic', False): BasicBlock,
  ('basic', True): PreActBasicBlock,
  ('bottleneck', False): Bottleneck,
  ('bottleneck', True): PreActBottleneck,
}


def create_model(
  name: str,
  *,
  num_classes: Optional[int] = None,
  residual: bool = True,
  shortcut: Optional[str] = None,
  stride_on: Optional[str] = None,
  preact: Optional[bool] = None,
  block: Optional[str] = None,
  zero_init_last_bn: bool = False,
  bn_group_size: Optional[int] = None,
  dtype: Any = jnp.float32,
  bn_momentum: float = 0.9,
  bn_epsilon: float = 1e-5,
  scan: bool = False,
  remat: bool = False,
  groups: Optional[int] = None,
  width_per_group: Optional[int] = None,
  dropout_rate: float = 0.0,
  drop_path_rate: float = 0.0,
  drop_path_mode: str = 'row',
  drop_path_rule: str = 'huang',
  output_stride: int = 32,
  features_only: bool = False,
  frozen_bn: bool = False,
  frozen_bn_affine: bool = False,
  frozen_stages: int = -1,
  stem: Optional[str] = None,
  avg_down: Optional[bool] = None,
  attention: Optional[str] = None,
  norm: Optional[str] = None,
  weight_standardization: Optional[bool] = None,
  head_dropout_rate: float = 0.0,
  zero_init_head: bool = False,
) -> ResNet:
  """Build a ResNet, ResNeXt or Wide ResNet by name (see ``VALID_NAMES``) with the paper's options.

  Defaults: ImageNet names have 1000 classes, ``shortcut='B'``, ``stride_on='3x3'`` (v1.5, the
  torchvision layout; ``'1x1'`` is the paper's v1); CIFAR names have 10 classes and
  ``shortcut='A'``, except CIFAR bottleneck nets (``block='bottleneck'``), which default to
  ``'B'``: He et al. 2016 project where the width grows (16 -> 64 in the very first block), and
  ``stride_on='1x1'`` (the authors' code strides the first 1x1 conv). ``plain<N>`` names (or
  ``residual=False``) drop every shortcut. ``scan``/``remat``: see ``ResNet`` (same function,
  different parameter layout: ``models.layout`` converts).

  ``preact=None`` is the name's own: pre-activation for ``wrn*`` (Zagoruyko & Komodakis 2016,
  shortcut B: a bare 1x1 projection where the shape changes), post-activation otherwise.
  ``groups``/``width_per_group`` (torchvision's fields; None: the name's) turn a bottleneck
  ResNet into a ResNeXt / Wide ResNet. ``dropout_rate``: dropout between a block's convs when
  ``train=True`` (then ``apply`` needs ``rngs={'dropout': key}``); 0 by default for every name,
  WRN included: the rate is a recipe choice (``configs/wrn.py`` uses the paper's 0.3), and a
  net without it needs no rng. ``drop_path_rate``: stochastic depth (Huang et al. 2016,
  ``models.drop_path``): in training block l of L (over all stages) drops its residual branch
  with probability l / L * drop_path_rate (the paper's p_l = 1 - l / L (1 - p_L), so the rate is
  1 - p_L, 0.5 in the paper; ``drop_path_rule='timm'``: (l - 1) / (L - 1) * drop_path_rate, as
  timm's ResNet), per example (``drop_path_mode='row'``) or per batch (``'batch'``),
  scaling survivors by 1 / p_l; needs ``rngs={'dropout': key}`` in training; refused for plain
  nets (their block is all branch). 0 (default): exactly the net without it. Backbone fields
  (``output_stride``, ``features_only``, ``frozen_bn``, ``frozen_bn_affine``,
  ``frozen_stages``): see ``ResNet``.

  Bag of Tricks (He et al. 2019, Sec. 4.1; timm's names): ``stem='deep'`` is ResNet-C's three
  3x3 convs (32-32-64) for the 7x7 one (``'7x7'``: the paper's), ``avg_down=True`` ResNet-D's
  shortcuts (a 2x2 average pool does a projection's downsampling; its 1x1 conv has stride 1).
  None: the name's own (``resnet50c``: deep stem; ``resnet50d``: both; other names: neither).
  ResNet-B is ``stride_on='3x3'``, the ImageNet default. ``attention='se'``: squeeze-and-excitation
  blocks (Hu et al. 2018, ``models.attention``); None: the name's own (``seresnet50``: 'se').

  Big Transfer (``resnetv2_50x1_bit`` ...; Kolesnikov et al. 2020, timm's ``ResNetV2``):
  pre-activation bottlenecks (whatever ``preact`` says) strided on the 3x3, projection from the
  pre-activated input in each stage's first unit, GroupNorm (32 groups) + ReLU, weight-standardised
  convs (epsilon 1e-8), stem conv + zero pad + max-pool, final norm + ReLU; widths x the
  multiplier. ``norm='group'`` / ``weight_standardization=True`` give any ImageNet-family net those
  layers (None: the name's own; a CIFAR net's 16 channels do not make 32 groups); a GroupNorm
  net has no ``batch_stats`` and refuses BatchNorm's options.
  ``zero_init_head``: ``fc``'s kernel starts at zero (BiT's fine-tuning head).
  ``head_dropout_rate``: dropout on the pooled features before ``fc`` in training (timm's
  ``drop_rate``, TF's ``dropout_rate``; ResNet-RS trains with 0.25-0.4); 0: no module, no rng.
  """
  spec = parse_name(name, block)
  residual = residual and spec.residual
  imagenet = spec.family == 'imagenet'
  wrn = spec.variant == 'wrn'
  preact = wrn if preact is None else bool(preact)
  shortcut = check_shortcut(default_shortcut(spec) if shortcut is None else shortcut)
  if stride_on is None:
    stride_on = '1x1' if not imagenet and spec.block == 'bottleneck' else '3x3'
  if stride_on not in ('1x1', '3x3'):
    raise ValueError(f"stride_on must be '1x1' or '3x3', got {stride_on!r}")
  if num_classes is not None and (not isinstance(num_classes, numbers.Integral) or num_classes < 1):
    raise ValueError(f'num_classes must be a positive int or None, got {num_classes!r}')
  if bn_group_size is not None and (not isinstance(bn_group_size, int) or bn_group_size < 1):
    raise ValueError(f'bn_group_size must be a positive int or None, got {bn_group_size!r}')
  if zero_init_last_bn and not residual:
    raise ValueError('zero_init_last_bn=True would make every block of a plain net output zero')
  groups, width_per_group = resolve_grouping(spec, name, groups, width_per_group)
  deep_stem, avg_down = resolve_tweaks(spec, name, stem, avg_down, residual, shortcut)
  attention = attention_lib.resolve(spec.attention, name, attention)
  bit = spec.variant == 'bit'
  norm, ws_eps = resolve_norm(
    spec,
    name,
    norm,
    weight_standardization,
    bn_group_size=bn_group_size,
    frozen_bn=frozen_bn,
    frozen_bn_affine=frozen_bn_affine,
  )
  if bit and (stride_on != '3x3' or deep_stem or avg_down or shortcut != 'B' or not residual):
    raise ValueError(
      f"{name} (timm's BiT) strides its 3x3 convs and has the 7x7 stem, residual blocks and "
      "strided projections where the shape changes (shortcut 'B'): "
      f'stride_on={stride_on!r}, stem={stem!r}, avg_down={avg_down!r}, shortcut={shortcut!r}, '
      f'residual={residual} contradicts it'
    )
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f'dropout_rate must be in [0, 1), got {dropout_rate!r}')
  if not 0.0 <= head_dropout_rate < 1.0:
    raise ValueError(f'head_dropout_rate must be in [0, 1), got {head_dropout_rate!r}')
  drop_path.check(drop_path_rate, drop_path_mode, drop_path_rule)
  if drop_path_rate > 0 and not residual:
    raise ValueError(
      f'drop_path_rate={drop_path_rate} needs residual blocks: a plain net ({name}, '
      'residual=False) has no shortcut, its block is all branch, and dropping it would zero '
      'the signal'
    )
  if output_stride not in (32, 16, 8):
    raise ValueError(f'output_stride must be 32, 16 or 8, got {output_stride!r}')
  if not imagenet and (output_stride != 32 or features_only):
    raise ValueError(
      f'output_stride / features_only are for ImageNet-family backbones (C2-C5 at '
      f'strides 4-32), not the CIFAR net {name}'
    )

  sizes = stage_sizes(spec)
  if imagenet:
    widths, stem = IMAGENET_WIDTHS, 'deep' if deep_stem else 'imagenet'
    stem = 'deep_conv_pool' if spec.variant == 'resnetrs' else stem
    if bit:
      widths, stem, preact = tuple(w * spec.widen for w in IMAGENET_WIDTHS), 'bit', True
  else:
    widths, stem = tuple(w * spec.widen for w in CIFAR_WIDTHS), 'cifar'
  if not isinstance(frozen_stages, int) or not -1 <= frozen_stages <= len(sizes):
    raise ValueError(
      f'frozen_stages must be -1 (none), 0 (stem) .. {len(sizes)} (stem and '
      f'every stage), got {frozen_stages!r}'
    )
  return ResNet(
    stage_sizes=sizes,
    block_cls=_BLOCKS[spec.block, preact],
    num_classes=num_classes if num_classes is not None else (1000 if imagenet else 10),
    widths=widths,
    stem=stem,
    residual=residual,
    shortcut=shortcut,
    stride_on=stride_on,
    zero_init_last_bn=zero_init_last_bn,
    bn_group_size=bn_group_size,
    bn_momentum=bn_momentum,
    bn_epsilon=bn_epsilon,
    dtype=jnp.dtype(dtype),
    scan=bool(scan),
    remat=bool(remat),
    groups=groups,
    base_width=width_per_group,
    dropout_rate=float(dropout_rate),
    drop_path_rate=float(drop_path_rate),
    drop_path_mode=drop_path_mode,
    drop_path_rule=drop_path_rule,
    output_stride=output_stride,
    features_only=bool(features_only),
    frozen_bn=bool(frozen_bn),
    frozen_bn_affine=bool(frozen_bn_affine),
    frozen_stages=frozen_stages,
    stem_width=CIFAR_WIDTHS[0] if wrn else None,
    avg_down=avg_down,
    attention=attention,
    se_reduction=4 if spec.variant == 'resnetrs' else attention_lib.SE_RATIO,
    norm=norm,
    weight_std_eps=ws_eps,
    head_dropout_rate=float(head_dropout_rate),
    zero_init_head=bool(zero_init_head),
  )
