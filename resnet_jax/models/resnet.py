"""The ResNet family of He et al. 2015 (and the pre-activation blocks of He et al. 2016) in linen.

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
==========================================  ===============================================

Stages are numbered from 1 (``layer1``..``layer4`` on ImageNet, ``layer1``..``layer3`` on CIFAR) and
blocks from 0, exactly as in torchvision. For the Fig. 7 analysis (responses of the BN layers that
follow 3x3 convs), ``capture_intermediates=True`` records each BatchNorm's ``__call__`` output, which
is the normalised response *before* the ReLU and before the shortcut addition.

With ``scan=True`` blocks 1.. of stage ``s`` live in one module ``layer{s}_scan`` whose variables
carry a leading axis (entry ``k`` is block ``k + 1``); ``resnet_jax.models.layout`` converts
variable trees between that layout and the one above.
"""
from __future__ import annotations

import functools
import re
from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.models import layers
from resnet_jax.models.blocks import (
  BasicBlock,
  Bottleneck,
  PreActBasicBlock,
  PreActBottleneck,
)

ModuleDef = Any
IMAGENET_DEPTHS = {  # depth -> (block kind, blocks per stage), paper Table 1.
  18: ("basic", (2, 2, 2, 2)),
  34: ("basic", (3, 4, 6, 3)),
  50: ("bottleneck", (3, 4, 6, 3)),
  101: ("bottleneck", (3, 4, 23, 3)),
  152: ("bottleneck", (3, 8, 36, 3)),
}
IMAGENET_WIDTHS = (64, 128, 256, 512)
CIFAR_WIDTHS = (16, 32, 64)


class ResNet(nn.Module):
  """Stem, stages of blocks (first block of every stage but the first downsamples), pool, dense.

  ``stem='imagenet'``: 7x7/2 conv + BN + ReLU + 3x3/2 max-pool; ``stem='cifar'``: 3x3 conv + BN +
  ReLU (pre-activation CIFAR nets keep only the conv: the first block's BN-ReLU follows it).
  Pre-activation nets end with ``bn_final`` + ReLU before pooling (He et al. 2016, Sec. 4.1); on
  the ImageNet stem the first unit takes the stem's BN-ReLU as its pre-activation (fb.resnet.torch
  'no_preact'), so no BN-ReLU is applied twice.

  ``scan=True``: blocks 1.. of each stage (identical by construction) run as one ``nn.scan`` over
  parameters stacked on a leading axis, module ``layer{s}_scan`` (see ``models.layout``): the
  compiled program holds two blocks per stage whatever the depth. ``remat=True`` recomputes each
  block's activations in the backward pass (``nn.remat``) instead of keeping them.
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

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv = functools.partial(layers.conv, dtype=self.dtype)
    norm = functools.partial(
      layers.BatchNorm,
      use_running_average=not train,
      momentum=self.bn_momentum,
      epsilon=self.bn_epsilon,
      group_size=self.bn_group_size,
      dtype=self.dtype,
    )
    preact = self.block_cls.preact
    if self.stem == 'imagenet':
      x = conv(self.widths[0], 7, 2, name='conv1')(x)
      x = nn.relu(norm(name='bn1')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    elif self.stem == 'cifar':
      x = conv(self.widths[0], 3, name='conv1')(x)
      if not preact:
        x = nn.relu(norm(name='bn1')(x))
    else:
      raise ValueError(f'unknown stem {self.stem!r}; expected \'imagenet\' or \'cifar\'')

    block_cls = nn.remat(self.block_cls) if self.remat else self.block_cls
    common = dict(conv=conv, norm=norm, residual=self.residual, shortcut=self.shortcut,
                  stride_on=self.stride_on, zero_init_last_bn=self.zero_init_last_bn)
    for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(1 if self.scan else num_blocks):
        first = preact and i == 0 and j == 0
        extra = {}
        if first:  # the unit right after the stem: see _PreActBlock
          extra = ({'shared_preact': True} if self.stem == 'cifar'
                   else {'input_preactivated': True})
        x = block_cls(width, strides=2 if i > 0 and j == 0 else 1, name=f'layer{i + 1}_{j}',
                      **common, **extra)(x)
      if self.scan and num_blocks > 1:
        x = self._scanned_blocks(width, num_blocks - 1, f'layer{i + 1}_scan', common)(x)
    if preact:
      x = nn.relu(norm(name='bn_final')(x))
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(
      self.num_classes,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      kernel_init=layers.dense_kernel_init,
      name='fc',
    )(x)

  def _scanned_blocks(self, width: int, length: int, name: str, common: dict):
    """``length`` identical stride-1 blocks as one scan: variables gain a leading axis."""
    block_cls = (nn.remat(self.block_cls, prevent_cse=False) if self.remat
                 else self.block_cls)
    common = dict(common, conv=functools.partial(layers.conv, dtype=self.dtype, loop_friendly=True))
    block = block_cls(width, strides=1, name=name, **common)
    body = nn.scan(
      lambda module, carry, _: (module(carry), None),
      variable_axes={'params': 0, 'batch_stats': 0, 'intermediates': 0},
      split_rngs={'params': True},
      length=length,
    )
    return lambda x: body(block, x, None)[0]


class ArchSpec(NamedTuple):
  """What a model name means: family ('imagenet' | 'cifar'), depth, residual, block kind."""

  family: str
  depth: int
  residual: bool
  block: str = "basic"  # 'basic' | 'bottleneck'


# CIFAR depth = 2 + this x blocks per stage: 3 stages of 2 (basic) or 3 (bottleneck) layers a block.
_CIFAR_LAYERS_PER_STAGE_BLOCK = {"basic": 6, "bottleneck": 9}
BLOCK_KINDS = tuple(_CIFAR_LAYERS_PER_STAGE_BLOCK)
_NAME_RE = re.compile(r"(?P<cifar>cifar_)?(?P<kind>resnet|plain)(?P<depth>[1-9]\d*)")
VALID_NAMES = (
  "resnet18, resnet34, resnet50, resnet101, resnet152 (ImageNet); "
  "resnet{6n+2} for n >= 1, e.g. resnet8, resnet20, resnet56, resnet110, resnet1202 (CIFAR); "
  "with block='bottleneck', resnet{9n+2} CIFAR bottleneck nets, e.g. resnet164, resnet1001; "
  "plain<N> for any of these depths (residual=False twin); "
  "prefix cifar_ (e.g. cifar_resnet50) forces the CIFAR family where depths collide"
)


def _cifar_depth_fits(depth: int, block: str) -> bool:
  per_block = _CIFAR_LAYERS_PER_STAGE_BLOCK[block]
  return depth >= per_block + 2 and (depth - 2) % per_block == 0


def parse_name(name: str, block: Optional[str] = None) -> ArchSpec:
  """Resolve a model name; ImageNet depths win over the CIFAR rules (50 and 152 are 6n+2 too).

  CIFAR nets have basic blocks (6n+2 layers, He et al. 2015) unless ``block='bottleneck'``
  (9n+2 layers: the ResNet-164/1001 of He et al. 2016). The block kind is explicit because some
  depths fit both rules (164 = 6*27+2 = 9*18+2) and name nothing else.
  """
  if block is not None and block not in BLOCK_KINDS:
    raise ValueError(f"block must be one of {BLOCK_KINDS} or None, got {block!r}")
  m = _NAME_RE.fullmatch(name)
  if m is not None:
    depth = int(m["depth"])
    residual = m["kind"] == "resnet"
    if not m["cifar"] and depth in IMAGENET_DEPTHS:
      kind = IMAGENET_DEPTHS[depth][0]
      if block not in (None, kind):
        raise ValueError(f"{name} is an ImageNet net with {kind} blocks; block={block!r} "
                         f"contradicts it (use cifar_{name} for the CIFAR family)")
      return ArchSpec("imagenet", depth, residual, kind)
    if _cifar_depth_fits(depth, block or "basic"):
      return ArchSpec("cifar", depth, residual, block or "basic")
    if block is None and _cifar_depth_fits(depth, "bottleneck"):
      raise ValueError(f"{name!r} is not a basic-block CIFAR depth (6n+2); it is a bottleneck "
                       f"one (9n+2): pass block='bottleneck' (config: model.block)")
  raise ValueError(f"unknown model name {name!r}{f' with block={block!r}' if block else ''}; "
                   f"valid forms: {VALID_NAMES}")


def create_model(
  name: str,
  *,
  num_classes: Optional[int] = None,
  residual: bool = True,
  shortcut: Optional[str] = None,
  stride_on: Optional[str] = None,
  preact: bool = False,
  block: Optional[str] = None,
  zero_init_last_bn: bool = False,
  bn_group_size: Optional[int] = None,
  dtype: Any = jnp.float32,
  bn_momentum: float = 0.9,
  bn_epsilon: float = 1e-5,
  scan: bool = False,
  remat: bool = False,
) -> ResNet:
  """Build a ResNet by name (see ``VALID_NAMES``) with the paper's options.

  Defaults: ImageNet names have 1000 classes, ``shortcut='B'``, ``stride_on='3x3'`` (v1.5, the
  torchvision layout; ``'1x1'`` is the paper's v1); CIFAR names have 10 classes and
  ``shortcut='A'``, except CIFAR bottleneck nets (``block='bottleneck'``), which default to
  ``'B'``: He et al. 2016 project where the width grows (16 -> 64 in the very first block), and
  ``stride_on='1x1'`` (the authors' code strides the first 1x1 conv). ``plain<N>`` names (or
  ``residual=False``) drop every shortcut. ``scan``/``remat``: see ``ResNet`` (same function,
  different parameter layout: ``models.layout`` converts).
  """
  spec = parse_name(name, block)
  residual = residual and spec.residual
  imagenet = spec.family == "imagenet"
  if shortcut is None:
    shortcut = "B" if imagenet or spec.block == "bottleneck" else "A"
  if stride_on is None:
    stride_on = '1x1' if not imagenet and spec.block == 'bottleneck' else '3x3'
  if shortcut not in ("A", "B", "C"):
    raise ValueError(f"shortcut must be 'A', 'B' or 'C', got {shortcut!r}")
  if stride_on not in ("1x1", "3x3"):
    raise ValueError(f"stride_on must be '1x1' or '3x3', got {stride_on!r}")
  if bn_group_size is not None and (not isinstance(bn_group_size, int) or bn_group_size < 1):
    raise ValueError(f"bn_group_size must be a positive int or None, got {bn_group_size!r}")
  if zero_init_last_bn and not residual:
    raise ValueError("zero_init_last_bn=True would make every block of a plain net output zero")

  if imagenet:
    stage_sizes = IMAGENET_DEPTHS[spec.depth][1]
    widths, stem = IMAGENET_WIDTHS, "imagenet"
  else:
    stage_sizes = ((spec.depth - 2) // _CIFAR_LAYERS_PER_STAGE_BLOCK[spec.block],) * 3
    widths, stem = CIFAR_WIDTHS, "cifar"
  blocks = {
    ("basic", False): BasicBlock,
    ("basic", True): PreActBasicBlock,
    ("bottleneck", False): Bottleneck,
    ("bottleneck", True): PreActBottleneck,
  }
  return ResNet(
    stage_sizes=stage_sizes,
    block_cls=blocks[spec.block, bool(preact)],
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
  )
