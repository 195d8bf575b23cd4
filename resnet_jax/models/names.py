"""What a model name means: the registry of ResNet, ResNeXt and Wide ResNet names.

ImageNet family (7x7 stem, four stages): ``resnet18/34/50/101/152`` (He et al. 2015),
``resnext{50,101,152}_{G}x{W}d`` (Xie et al. 2017: G groups of W channels in the first stage's 3x3
conv) and ``wide_resnet{50,101,152}_{k}`` (torchvision's Wide ResNets: bottlenecks whose 3x3 is k
times wider, i.e. ``width_per_group = 64 k``); the suffixes ``c`` / ``d`` (``resnet50d``,
``resnext50d_32x4d``) are He et al. 2019's ResNet-C / ResNet-D, as timm names them. CIFAR family
(3x3 stem, three stages): ``resnet{6n+2}`` / ``resnet{9n+2}`` (bottleneck) and the Wide ResNets
of Zagoruyko & Komodakis 2016, ``wrn{6n+4}_{k}`` (pre-activation basic blocks of widths
16k/32k/64k). Big Transfer (Kolesnikov et al. 2020): ``resnetv2_{50,101,152}x{1,2,3,4}_bit``,
timm's names for BiT's pre-activation ResNet-v2s with GroupNorm and weight-standardised convs,
every width times the multiplier (``widen``).
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

IMAGENET_DEPTHS = {  # depth -> (block kind, blocks per stage), paper Table 1.
  18: ('basic', (2, 2, 2, 2)),
  34: ('basic', (3, 4, 6, 3)),
  50: ('bottleneck', (3, 4, 6, 3)),
  101: ('bottleneck', (3, 4, 23, 3)),
  152: ('bottleneck', (3, 8, 36, 3)),
}
# ResNet-RS (Bello et al. 2021, "Revisiting ResNets", Table 7; timm's resnetrs*): depth ->
# bottleneck blocks per stage; ResNet-D's stem and shortcuts, SE (ratio 1/4) and the stem's
# max-pool replaced by a 3x3/2 conv.
RS_DEPTHS = {
  50: (3, 4, 6, 3),
  101: (3, 4, 23, 3),
  152: (3, 8, 36, 3),
  200: (3, 24, 36, 3),
  270: (4, 29, 53, 4),
  350: (4, 36, 72, 4),
  420: (4, 44, 87, 4),
}
IMAGENET_WIDTHS = (64, 128, 256, 512)
CIFAR_WIDTHS = (16, 32, 64)


class ArchSpec(NamedTuple):
  """What a model name means.

  ``family``: 'imagenet' | 'cifar'; ``block``: 'basic' | 'bottleneck'; ``variant``: 'resnet',
  'resnext', 'wide_resnet' (torchvision's), 'resnetrs' (ResNet-RS), 'wrn' (CIFAR Wide ResNet,
  ``widen`` = k) or 'bit' (Big Transfer's ResNet-v2, ``widen`` = the width multiplier);
  ``groups``/``width_per_group``: torchvision's bottleneck fields (1 / 64 for a ResNet).
  ``tweak``: He et al. 2019's ResNet-C ('c') or ResNet-D ('d'), timm's ``resnet50c``/``resnet50d``.
  """

  family: str
  depth: int
  residual: bool
  block: str = 'basic'
  variant: str = 'resnet'
  groups: int = 1
  width_per_group: int = 64
  widen: int = 1
  tweak: str = ''  # '' | 'c' (deep stem) | 'd' (deep stem, avg-pool shortcuts): timm's suffixes
  attention: str = 'none'  # 'se': the se prefix, squeeze-and-excitation blocks (Hu et al. 2018)


SHORTCUTS = ('A', 'B', 'C')
STEM_KINDS = ('7x7', 'deep')  # create_model's stem: He et al. 2015's, ResNet-C's (He et al. 2019)


def default_shortcut(spec: ArchSpec) -> str:
  """The paper's shortcut for a net: A (parameter-free) for the CIFAR basic-block ResNets, B
  (projections where the shape changes) for everything else: ImageNet nets, CIFAR bottleneck nets
  (He et al. 2016 project where the width grows) and Wide ResNets."""
  return (
    'A' if spec.family == 'cifar' and spec.block == 'basic' and spec.variant == 'resnet' else 'B'
  )


def check_shortcut(shortcut: str) -> str:
  if shortcut not in SHORTCUTS:
    raise ValueError(f'shortcut must be one of {", ".join(SHORTCUTS)}, got {shortcut!r}')
  return shortcut


# CIFAR depth = 2 + this x blocks per stage: 3 stages of 2 (basic) or 3 (bottleneck) layers a block.
_CIFAR_LAYERS_PER_STAGE_BLOCK = {'basic': 6, 'bottleneck': 9}
BLOCK_KINDS = tuple(_CIFAR_LAYERS_PER_STAGE_BLOCK)
_NAME_RE = re.compile(
  r'(?P<cifar>cifar_)?(?P<se>se)?(?P<kind>resnet|plain)(?P<depth>[1-9]\d*)(?P<tweak>[cd])?'
)
_RESNEXT_RE = re.compile(
  r'(?P<se>se)?resnext(?P<depth>[1-9]\d*)(?P<tweak>d)?_(?P<groups>[1-9]\d*)x(?P<width>[1-9]\d*)d'
)
_WIDE_RE = re.compile(r'wide_resnet(?P<depth>[1-9]\d*)_(?P<k>[1-9]\d*)')
_WRN_RE = re.compile(r'wrn(?P<depth>[1-9]\d*)_(?P<k>[1-9]\d*)')
_RS_RE = re.compile(r'resnetrs(?P<depth>[1-9]\d*)')
_BIT_RE = re.compile(r'resnetv2_(?P<depth>[1-9]\d*)x(?P<k>[1-9]\d*)_bit')
BIT_DEPTHS = (50, 101, 152)  # timm's resnetv2_*_bit: bottleneck depths
BIT_WIDTHS = (1, 2, 3, 4)  # the width multipliers BiT trained (x1, x3 on 50/101; x2, x4 on 152)
VALID_NAMES = (
  'resnet18, resnet34, resnet50, resnet101, resnet152 (ImageNet); '
  'their Bag of Tricks variants resnet{18,34,50,101,152}c (deep stem) and '
  'resnet{18,34,50,101,152}d (deep stem, avg-pool shortcuts), as timm names them; '
  'resnext{50,101,152}_{G}x{W}d, e.g. resnext50_32x4d, resnext101_32x8d, resnext101_64x4d '
  '(resnext50d_32x4d: with the d tweaks); '
  'resnetrs{50,101,152,200,270,350,420} (ResNet-RS, Bello et al. 2021); '
  'resnetv2_{50,101,152}x{1,2,3,4}_bit (Big Transfer, Kolesnikov et al. 2020: GroupNorm and '
  "weight-standardised convs, timm's names, e.g. resnetv2_50x1_bit, resnetv2_152x4_bit); "
  "prefix se for squeeze-and-excitation blocks (timm's names: seresnet50, seresnet152d, "
  'seresnext50_32x4d; seresnet110 on CIFAR); '
  'wide_resnet{50,101,152}_{k}, e.g. wide_resnet50_2, wide_resnet101_2; '
  'resnet{6n+2} for n >= 1, e.g. resnet8, resnet20, resnet56, resnet110, resnet1202 (CIFAR); '
  "with block='bottleneck', resnet{9n+2} CIFAR bottleneck nets, e.g. resnet164, resnet1001; "
  'wrn{6n+4}_{k} CIFAR Wide ResNets, e.g. wrn28_10, wrn16_8, wrn40_4; '
  'plain<N> for any resnet depth (residual=False twin); '
  'prefix cifar_ (e.g. cifar_resnet50) forces the CIFAR family where depths collide'
)


def stage_sizes(spec: ArchSpec) -> tuple[int, ...]:
  """Blocks per stage of a parsed name."""
  if spec.variant == 'resnetrs':
    return RS_DEPTHS[spec.depth]
  if spec.family == 'imagenet':
    return IMAGENET_DEPTHS[spec.depth][1]
  return (cifar_stage_size(spec),) * 3


def cifar_depth_fits(depth: int, block: str) -> bool:
  per_block = _CIFAR_LAYERS_PER_STAGE_BLOCK[block]
  return depth >= per_block + 2 and (depth - 2) % per_block == 0


def cifar_stage_size(spec: ArchSpec) -> int:
  """Blocks per stage of a CIFAR-family net: (depth - 2) / (6 | 9), WRN (depth - 4) / 6."""
  if spec.variant == 'wrn':
    return (spec.depth - 4) // 6
  return (spec.depth - 2) // _CIFAR_LAYERS_PER_STAGE_BLOCK[spec.block]


def _bottleneck_depth(name: str, depth: int) -> None:
  if IMAGENET_DEPTHS.get(depth, ('',))[0] != 'bottleneck':
    raise ValueError(
      f'{name!r}: ResNeXt and Wide ResNets are bottleneck nets; depth must be one '
      f'of 50, 101, 152, got {depth}'
    )


def _parse_family_name(name: str, block: Optional[str]) -> Optional[ArchSpec]:
  """ResNeXt / Wide ResNet names, or None if ``name`` is none of them."""
  m = _RESNEXT_RE.fullmatch(name) or _WIDE_RE.fullmatch(name) or _WRN_RE.fullmatch(name)
  if m is None:
    return None
  depth = int(m['depth'])
  if name.startswith('wrn'):
    if block not in (None, 'basic'):
      raise ValueError(f'{name} is a Wide ResNet of basic blocks; block={block!r} contradicts it')
    if depth < 10 or (depth - 4) % 6:
      raise ValueError(
        f'{name!r}: a CIFAR Wide ResNet has depth 6n+4 (10, 16, 22, 28, 40, ...), got {depth}'
      )
    return ArchSpec('cifar', depth, True, 'basic', 'wrn', widen=int(m['k']))
  if block not in (None, 'bottleneck'):
    raise ValueError(f'{name} is a bottleneck net; block={block!r} contradicts it')
  _bottleneck_depth(name, depth)
  if m.re is _RESNEXT_RE:
    return ArchSpec(
      'imagenet',
      depth,
      True,
      'bottleneck',
      'resnext',
      int(m['groups']),
      int(m['width']),
      tweak=m['tweak'] or '',
      attention='se' if m['se'] else 'none',
    )
  return ArchSpec('imagenet', depth, True, 'bottleneck', 'wide_resnet', 1, 64 * int(m['k']))


def parse_name(name: str, block: Optional[str] = None) -> ArchSpec:
  """Resolve a model name; ImageNet depths win over the CIFAR rules (50 and 152 are 6n+2 too).

  CIFAR nets have basic blocks (6n+2 layers, He et al. 2015) unless ``block='bottleneck'``
  (9n+2 layers: the ResNet-164/1001 of He et al. 2016). The block kind is explicit because some
  depths fit both rules (164 = 6*27+2 = 9*18+2) and name nothing else.
  """
  if block is not None and block not in BLOCK_KINDS:
    raise ValueError(f'block must be one of {BLOCK_KINDS} or None, got {block!r}')
  family = _parse_family_name(name, block)
  if family is not None:
    return family
  bit = _BIT_RE.fullmatch(name)
  if bit is not None:
    depth, k = int(bit['depth']), int(bit['k'])
    if depth not in BIT_DEPTHS or k not in BIT_WIDTHS or block not in (None, 'bottleneck'):
      raise ValueError(
        f'{name!r}: Big Transfer nets are resnetv2_{{50,101,152}}x{{1,2,3,4}}_bit, bottleneck nets'
      )
    return ArchSpec('imagenet', depth, True, 'bottleneck', 'bit', widen=k)
  rs = _RS_RE.fullmatch(name)
  if rs is not None:
    if int(rs['depth']) not in RS_DEPTHS or block not in (None, 'bottleneck'):
      raise ValueError(
        f'{name!r}: ResNet-RS nets are resnetrs{{{",".join(map(str, RS_DEPTHS))}}}, bottleneck nets'
      )
    return ArchSpec(
      'imagenet', int(rs['depth']), True, 'bottleneck', 'resnetrs', tweak='d', attention='se'
    )
  m = _NAME_RE.fullmatch(name)
  if m is not None:
    depth = int(m['depth'])
    residual = m['kind'] == 'resnet'
    tweak = m['tweak'] or ''
    se = 'se' if m['se'] else 'none'
    if m['se'] and not residual:
      raise ValueError(
        f'{name!r}: the se prefix names squeeze-and-excitation ResNets (seresnet50); for a plain '
        "net with SE blocks use plain<N> with attention='se'"
      )
    if tweak and (m['cifar'] or not residual or depth not in IMAGENET_DEPTHS):
      raise ValueError(
        f'{name!r}: the c / d suffixes (ResNet-C / ResNet-D, He et al. 2019) name ImageNet '
        f'ResNets: resnet{{18,34,50,101,152}}{tweak}'
      )
    if not m['cifar'] and depth in IMAGENET_DEPTHS:
      kind = IMAGENET_DEPTHS[depth][0]
      if block not in (None, kind):
        raise ValueError(
          f'{name} is an ImageNet net with {kind} blocks; block={block!r} '
          f'contradicts it (use cifar_{name} for the CIFAR family)'
        )
      return ArchSpec('imagenet', depth, residual, kind, tweak=tweak, attention=se)
    if cifar_depth_fits(depth, block or 'basic'):
      return ArchSpec('cifar', depth, residual, block or 'basic', attention=se)
    if block is None and cifar_depth_fits(depth, 'bottleneck'):
      raise ValueError(
        f'{name!r} is not a basic-block CIFAR depth (6n+2); it is a bottleneck '
        f"one (9n+2): pass block='bottleneck' (config: model.block)"
      )
  raise ValueError(
    f'unknown model name {name!r}{f" with block={block!r}" if block else ""}; '
    f'valid forms: {VALID_NAMES}'
  )


def resolve_grouping(
  spec: ArchSpec, name: str, groups: Optional[int], width_per_group: Optional[int]
) -> tuple[int, int]:
  """The bottleneck's (groups, width_per_group): the name's, unless given (not contradicting)."""
  out = []
  for given, own, field in (
    (groups, spec.groups, 'groups'),
    (width_per_group, spec.width_per_group, 'width_per_group'),
  ):
    if given is not None and spec.variant in ('resnext', 'wide_resnet', 'bit') and given != own:
      raise ValueError(f'{name} has {field}={own}; {field}={given} contradicts it')
    if given is not None and (not isinstance(given, int) or given < 1):
      raise ValueError(f'{field} must be a positive int, got {given!r}')
    out.append(own if given is None else given)
  if tuple(out) != (1, 64) and (spec.family, spec.block) != ('imagenet', 'bottleneck'):
    raise ValueError(
      f'groups / width_per_group apply to ImageNet bottleneck nets (ResNet-50/101/152'
      f' -> ResNeXt, Wide ResNet) only, not {name} (torchvision refuses them in '
      f'basic blocks too)'
    )
  return out[0], out[1]


def resolve_tweaks(
  spec: ArchSpec,
  name: str,
  stem: Optional[str],
  avg_down: Optional[bool],
  residual: bool,
  shortcut: str,
) -> tuple[bool, bool]:
  """(deep stem, avg_down): the name's tweaks (``c``: deep stem, ``d``: both), unless given."""
  own_deep, own_avg = spec.tweak in ('c', 'd'), spec.tweak == 'd'
  if stem is not None and stem not in STEM_KINDS:
    raise ValueError(f'stem must be one of {", ".join(STEM_KINDS)} or None, got {stem!r}')
  if avg_down is not None and not isinstance(avg_down, bool):
    raise ValueError(f'avg_down must be true, false or None, got {avg_down!r}')
  deep = own_deep if stem is None else stem == 'deep'
  avg = own_avg if avg_down is None else avg_down
  if spec.tweak and (deep, avg) != (own_deep, own_avg):
    raise ValueError(
      f'{name} has stem={"deep" if own_deep else "7x7"!r}, avg_down={own_avg}; '
      f'stem={stem!r}, avg_down={avg_down!r} contradicts it (use resnet{spec.depth} and set them)'
    )
  if spec.family != 'imagenet' and (deep or avg):
    raise ValueError(
      f"stem='deep' and avg_down (ResNet-C/D, He et al. 2019) replace the ImageNet stem's 7x7 "
      f'conv and the stride-2 projections of the ImageNet nets; the CIFAR net {name} has a 3x3 '
      'stem and is not one of them'
    )
  if avg and not (residual and shortcut in ('B', 'C')):
    raise ValueError(
      f'avg_down moves the stride of projection shortcuts to an average pool; {name} with '
      f'{"residual=False" if not residual else f"shortcut={shortcut!r}"} has no projections'
    )
  return deep, avg


NORMS = ('batch', 'group')  # create_model's norm: BatchNorm (running statistics), GroupNorm
BIT_WS_EPSILON = 1e-8  # BiT's StdConv2d epsilon (timm's _create_resnetv2_bit; its default 1e-6)


def resolve_norm(
  spec: ArchSpec,
  name: str,
  norm: Optional[str],
  weight_standardization: Optional[bool],
  *,
  bn_group_size: Optional[int],
  frozen_bn: bool,
  frozen_bn_affine: bool,
) -> tuple[str, Optional[float]]:
  """(norm, weight-standardisation epsilon or None): the name's own (BiT: GroupNorm and
  weight-standardised convs; others: BatchNorm, plain convs) unless given. A GroupNorm net keeps
  no running statistics (no ``batch_stats``), so the options about them are refused."""
  bit = spec.variant == 'bit'
  if norm is not None and norm not in NORMS:
    raise ValueError(f'norm must be one of {", ".join(NORMS)} or None, got {norm!r}')
  norm = norm or ('group' if bit else 'batch')
  ws = bit if weight_standardization is None else bool(weight_standardization)
  if bit and (norm, ws) != ('group', True):
    raise ValueError(
      f'{name} is a Big Transfer net: GroupNorm and weight-standardised convs; norm={norm!r}, '
      f'weight_standardization={weight_standardization!r} contradicts it'
    )
  if norm == 'group' and spec.family != 'imagenet':  # flax said so only at init, obscurely
    raise ValueError(
      f"{name}: GroupNorm's 32 groups need channel counts divisible by 32, and the CIFAR nets' "
      "stem and first stage have 16; norm='group' is for the ImageNet-family nets"
    )
  if norm == 'group':
    given = [
      f'{k}={v!r}'
      for k, v, off in (
        ('bn_group_size', bn_group_size, None),
        ('frozen_bn', frozen_bn, False),
        ('frozen_bn_affine', frozen_bn_affine, False),
      )
      if v != off
    ]
    if given:
      raise ValueError(
        f'{name} normalises with GroupNorm (per example, no running statistics): '
        f'{", ".join(given)} configures BatchNorm; leave it unset (None / False)'
      )
  return norm, (BIT_WS_EPSILON if ws else None)
