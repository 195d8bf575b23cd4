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
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.models import drop_path, layers, stems
from resnet_jax.models.names import IMAGENET_WIDTHS

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
  zero_init_head: bool = False  # fc's kernel starts at zero (BiT's fine-tuning; bias is zero)

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
    # the representation few-shot probes read (resnet_jax.fewshot): stored only when the caller
    # makes 'intermediates' mutable, a no-op otherwise
    self.sow('intermediates', 'pre_logits', x)
    if self.head_dropout_rate > 0:  # timm's drop_rate, TF's dropout_rate (ResNet-RS: 0.25-0.4)
      x = nn.Dropout(self.head_dropout_rate, deterministic=not train, name='head_dropout')(x)
    return nn.Dense(
      self.num_classes,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      kernel_init=nn.initializers.zeros if self.zero_init_head else layers.dense_kernel_init,
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
