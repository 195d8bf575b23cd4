"""The ResNet family of He et al. 2015 (and the pre-activation blocks of He et al. 2016) in linen.

One module serves every name of ``models.names``: ResNeXt and torchvision's Wide ResNets are
bottleneck ResNets with other block fields (``groups``, ``base_width``), the CIFAR Wide ResNets
pre-activation CIFAR nets with wider stages and dropout, and backbones the same nets returning
C2-C5 (``features_only``, ``output_stride``, frozen BN / stages).

Structure follows the Flax ImageNet example (conv and norm factories injected into the blocks with
``functools.partial``) and torchvision's ``resnet.py`` (``BasicBlock``/``Bottleneck``).

Parameter naming scheme (chosen to map 1:1 onto torchvision's ``state_dict`` keys):

==========================================  ===============================================
flax path (``params`` / ``batch_stats``)      torchvision key
==========================================  ===============================================
``conv1/kernel``                              ``conv1.weight`` (stem)
``bn1/{scale,bias}``, ``bn1/{mean,var}``      ``bn1.{weight,bias,running_mean,running_var}``
``layer{s}_{b}/conv{k}/kernel``               ``layer{s}.{b}.conv{k}.weight`` (k = 1, 2[, 3])
``layer{s}_{b}/bn{k}/...``                    ``layer{s}.{b}.bn{k}.*``
``layer{s}_{b}/downsample_conv/kernel``       ``layer{s}.{b}.downsample.0.weight``
``layer{s}_{b}/downsample_bn/...``            ``layer{s}.{b}.downsample.1.*``
``fc/{kernel,bias}``                          ``fc.{weight,bias}``
``bn_final/...`` (pre-activation nets only)   (no torchvision counterpart)
``stem_conv{k}``, ``stem_bn{k}`` (deep stem)  timm's ``conv1.{0,1,3,4,6}`` (``models.stems``)
==========================================  ===============================================

Stages are numbered from 1 (``layer1``..``layer4`` on ImageNet, ``layer1``..``layer3`` on CIFAR)
and blocks from 0, exactly as in torchvision. For the Fig. 7 analysis (responses of the BN layers
that follow 3x3 convs), ``capture_intermediates=True`` records each BatchNorm's ``__call__``
output, which is the normalised response *before* the ReLU and before the shortcut addition.

With ``scan=True`` blocks 1.. of stage ``s`` live in one module ``layer{s}_scan`` whose variables
carry a leading axis (entry ``k`` is block ``k + 1``); ``resnet_jax.models.layout`` converts
variable trees between that layout and the one above.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.models import attention as attention_lib
from resnet_jax.models import drop_path, layers, stems
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

ModuleDef = Any


class ResNet(nn.Module):
  """Stem, stages of blocks (first block of every stage but the first downsamples), pool, dense.

  ``stem='imagenet'``: 7x7/2 conv + BN + ReLU + 3x3/2 max-pool; ``'deep'``: ResNet-C's three 3x3
  convs instead of the 7x7 (``models.stems``); ``stem='cifar'``: 3x3 conv + BN + ReLU
  (pre-activation CIFAR nets keep only the conv: the first block's BN-ReLU follows it).
  ``avg_down``: ResNet-D's projection shortcuts (``layers.shortcut``).
  Pre-activation nets end with ``bn_final`` + ReLU before pooling (He et al. 2016, Sec. 4.1); on
  the ImageNet stem the first unit takes the stem's BN-ReLU as its pre-activation (fb.resnet.torch
  'no_preact'), so no BN-ReLU is applied twice.

  ``scan=True``: blocks 1.. of each stage (identical by construction) run as one ``nn.scan`` over
  parameters stacked on a leading axis, module ``layer{s}_scan`` (see ``models.layout``): the
  compiled program holds two blocks per stage whatever the depth. ``remat=True`` recomputes each
  block's activations in the backward pass (``nn.remat``) instead of keeping them.

  ``drop_path_rate`` > 0: stochastic depth (Huang et al. 2016; see ``models.drop_path``) in
  training, block l of L dropped with probability l / L * drop_path_rate, per example
  (``drop_path_mode='row'``) or per batch (``'batch'``); no variables, so the same parameters and
  checkpoints; evaluation is the plain forward. The rate reaches each block as a call argument
  (a scanned stage scans over its blocks' rates).

  Backbone use (see ``models.backbone``): ``features_only`` returns ``{'C2'..'C5'}`` (ImageNet
  stages, strides 4/8/16/32; a pre-activation net's C5 is after ``bn_final`` + ReLU) instead of
  logits, with no ``fc``; ``output_stride`` 16 / 8 replaces the stride of the last one / two
  stages by dilation as torchvision's ``replace_stride_with_dilation`` does (same parameters);
  ``frozen_bn`` normalises with the running statistics even when ``train=True`` and never updates
  them (``frozen_bn_affine``: nor scale/bias: torchvision's ``FrozenBatchNorm2d``);
  ``frozen_stages`` k >= 0 freezes the stem and stages 1..k (mmdetection's convention; -1: none):
  no gradient (``stop_gradient`` on their output) and BN in inference mode there.
  """

  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int
  widths: Sequence[int] = IMAGENET_WIDTHS
  stem: str = 'imagenet'
  residual: bool = True
  shortcut: str = 'B'
  stride_on: str = '3x3'
  zero_init_last_bn: bool = False
  bn_group_size: Optional[int] = None
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32
  scan: bool = False
  remat: bool = False
  groups: int = 1
  base_width: int = 64
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  drop_path_mode: str = 'row'
  drop_path_rule: str = 'huang'
  output_stride: int = 32
  features_only: bool = False
  frozen_bn: bool = False
  frozen_bn_affine: bool = False
  frozen_stages: int = -1
  stem_width: Optional[int] = None  # None: widths[0]; Wide ResNets keep a 16-channel stem
  avg_down: bool = False  # ResNet-D: projection shortcuts average-pool instead of striding
  attention: str = 'none'  # 'se': squeeze-and-excitation blocks (models.attention)
  se_reduction: int = 16  # SE's ratio r (ResNet-RS: 4)
  norm: str = 'batch'  # 'group': GroupNorm of gn_groups groups (BiT), no batch_stats
  gn_groups: int = 32
  weight_std_eps: Optional[float] = None  # weight-standardised convs with this epsilon (BiT)
  head_dropout_rate: float = 0.0  # dropout on the pooled features before fc, in training only

  def _norm(self, train: bool, frozen: bool):
    if self.norm == 'group':  # no statistics to freeze or update: train / frozen do not matter
      return functools.partial(
        nn.GroupNorm,
        num_groups=self.gn_groups,
        epsilon=self.bn_epsilon,
        use_fast_variance=False,  # two-pass, as torch's group_norm
        dtype=self.dtype,
        param_dtype=jnp.float32,
      )
    return functools.partial(
      layers.BatchNorm,
      use_running_average=not train or self.frozen_bn or frozen,
      momentum=self.bn_momentum,
      epsilon=self.bn_epsilon,
      group_size=self.bn_group_size,
      dtype=self.dtype,
      frozen_affine=self.frozen_bn_affine,
    )

  def stage_geometry(self) -> list[tuple[int, int, int]]:
    """(stride, first block's dilation, other blocks' dilation) per stage (torchvision's rule)."""
    dilated = {32: 0, 16: 1, 8: 2}[self.output_stride]
    n = len(self.stage_sizes)
    out, dilation = [], 1
    for i in range(n):
      stride, previous = (1 if i == 0 else 2), dilation
      if i >= n - dilated:
        dilation *= stride
        stride = 1
      out.append((stride, previous, dilation))
    return out

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> Any:
    conv = functools.partial(layers.conv, dtype=self.dtype, weight_std_eps=self.weight_std_eps)
    frozen = lambda stage: stage <= self.frozen_stages  # stage 0 is the stem
    norm = self._norm(train, frozen(0))
    preact = self.block_cls.preact
    stem_width = self.stem_width or self.widths[0]
    x = stems.apply_stem(self.stem, x, stem_width, conv=conv, norm=norm, preact=preact)
    if frozen(0):
      x = jax.lax.stop_gradient(x)

    block_cls = nn.remat(self.block_cls) if self.remat else self.block_cls
    features = {}
    # Each block's drop-path rate, per stage (None: off, as in evaluation: no rng needed).
    rates = drop_path.block_rates(self.stage_sizes, self.drop_path_rate, self.drop_path_rule)
    if not (train and self.drop_path_rate > 0):
      rates = [[None] * n for n in self.stage_sizes]
    for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      stride, first_dilation, dilation = self.stage_geometry()[i]
      common = dict(
        conv=conv,
        norm=self._norm(train, frozen(i + 1)),
        residual=self.residual,
        shortcut=self.shortcut,
        stride_on=self.stride_on,
        zero_init_last_bn=self.zero_init_last_bn,
        groups=self.groups,
        base_width=self.base_width,
        dropout_rate=self.dropout_rate,
        deterministic=not train or frozen(i + 1),
        drop_path_mode=self.drop_path_mode,
        avg_down=self.avg_down,
        stage_dilation=dilation,
        attention=self.attention,
        se_reduction=self.se_reduction,
      )
      for j in range(1 if self.scan else num_blocks):
        extra = {}
        if preact and i == 0 and j == 0:  # the unit right after the stem: see _PreActBlock
          bare_stem = self.stem in ('cifar', 'bit')  # no norm in the stem: the unit has its own
          extra = {'shared_preact': True} if bare_stem else {'input_preactivated': True}
        x = block_cls(
          width,
          strides=stride if j == 0 else 1,
          name=f'layer{i + 1}_{j}',
          dilation=first_dilation if j == 0 else dilation,
          **common,
          **extra,
        )(x, rates[i][j])
      if self.scan and num_blocks > 1:
        x = self._scanned_blocks(
          width, f'layer{i + 1}_scan', dict(common, dilation=dilation), rates[i][1:]
        )(x)
      if frozen(i + 1):
        x = jax.lax.stop_gradient(x)
      features[f'C{i + 2}'] = x
    if preact:
      x = nn.relu(self._norm(train, False)(name='bn_final')(x))
      features[f'C{len(self.stage_sizes) + 1}'] = x
    if self.features_only:
      return features
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if self.head_dropout_rate > 0:  # timm's drop_rate, TF's dropout_rate (ResNet-RS: 0.25-0.4)
      x = nn.Dropout(self.head_dropout_rate, deterministic=not train, name='head_dropout')(x)
    return nn.Dense(
      self.num_classes,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      kernel_init=layers.dense_kernel_init,
      name='fc',
    )(x)

  def _scanned_blocks(self, width: int, name: str, common: dict, rates: list):
    """``len(rates)`` identical stride-1 blocks as one scan: variables gain a leading axis.

    ``rates``: the blocks' drop-path rates (all None: off), scanned over with the variables.
    """
    block_cls = nn.remat(self.block_cls, prevent_cse=False) if self.remat else self.block_cls
    common = dict(
      common,
      conv=functools.partial(
        layers.conv, dtype=self.dtype, loop_friendly=None, weight_std_eps=self.weight_std_eps
      ),
    )
    block = block_cls(width, strides=1, name=name, **common)
    xs = None if rates[0] is None else jnp.asarray(rates, jnp.float32)
    body = nn.scan(
      lambda module, carry, rate: (module(carry, rate), None),
      variable_axes={'params': 0, 'batch_stats': 0, 'intermediates': 0, drop_path.COLLECTION: 0},
      split_rngs={'params': True, 'dropout': True},
      length=len(rates),
    )
    return lambda x: body(block, x, xs)[0]


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
  multiplier. ``norm='group'`` / ``weight_standardization=True`` give any net those layers (None:
  the name's own); a GroupNorm net has no ``batch_stats`` and refuses BatchNorm's options.
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
  if bit and (stride_on != '3x3' or deep_stem or avg_down):
    raise ValueError(
      f"{name} (timm's BiT) strides its 3x3 convs and has the 7x7 stem and strided projections: "
      f'stride_on={stride_on!r}, stem={stem!r}, avg_down={avg_down!r} contradicts it'
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
  )
