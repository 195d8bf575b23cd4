"""timm's RandAugment (``--aa rand-m7-mstd0.5-inc1``) on the host, pixel for pixel as timm 1.0.31.

The "ResNet strikes back" recipes (Wightman, Touvron & Jegou 2021, arXiv 2110.00476; timm's
``resnet50.a1_in1k``) train with timm's own RandAugment, not torchvision's: ``rand-m7-mstd0.5-inc1``
for A1 and A2, ``rand-m6-mstd0.5-inc1`` for A3. It differs from torchvision's (auto_augment.py):

- its own 15 operations (with ``inc1`` the "increasing" list, where a higher magnitude always means
  a stronger change: PosterizeIncreasing, SolarizeIncreasing, ColorIncreasing, ...; SolarizeAdd,
  Invert, and translations relative to the image side, TranslateXRel/TranslateYRel);
- ``n`` operations drawn with replacement, each applied with probability ``p`` (0.5);
- a magnitude on a 0-10 scale, with ``mstd`` > 0 redrawn per operation from a Gaussian of that
  std (uniform in [0, m] when mstd > 100) and clipped to [0, mmax] (mmax 10 unless given);
- timm's level-to-argument rules, a random sign for the signed operations;
- geometric operations fill with the ImageNet mean pixel (timm's ``img_mean``, 124 116 104 from
  its default mean 0.485 0.456 0.406) and resample bilinear or bicubic, chosen at random per
  operation (timm's default, when the training interpolation is 'random') or fixed.

Greyscale (1-channel) images fill with 117, the grey PIL's ``convert('L')`` makes of that mean
pixel (ITU-R 601 luma), so a grey image gets the fill its RGB version would, seen in grey.

Every random number comes from the example's ``np.random.Generator``, in the order timm's
``RandAugment.__call__`` / ``AugmentOp.__call__`` draw theirs (tests/test_timm_augment.py checks
the pixels against timm's own forward fed the same numbers), so runs stay deterministic per
example and resume exactly.
"""

from __future__ import annotations

import re
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from resnet_jax.data import views

FORM = 'rand-m{M}[-n{N}][-mstd{S}][-mmax{X}][-inc{0|1}][-p{P}]'
LEVEL_DENOM = 10.0  # timm's magnitude scale: M of 10 is the strongest of the default range
MAX_OPS = 14  # as auto_augment.MAX_RAND_AUGMENT_OPS caps torchvision's form
FILL_RGB = (124, 116, 104)  # round(255 x (0.485, 0.456, 0.406)), timm's img_mean
FILL_GREY = 117  # PIL's luma of FILL_RGB: (124 x 299 + 116 x 587 + 104 x 114) / 1000, rounded
INTERPOLATIONS = views.INTERPOLATIONS  # the training crops' config.data.interpolation


class TimmRandAugment(NamedTuple):
  """A parsed ``rand-...`` string, with timm's defaults."""

  magnitude: int = 10
  num_ops: int = 2
  magnitude_std: float = 0.0  # inf: uniform in [0, magnitude] (timm's mstd > 100)
  magnitude_max: int = 10
  increasing: bool = False
  prob: float = 0.5
  kind: str = 'timm_rand_augment'


# Level (the magnitude after noise and clipping, 0-10 by default) to the operation's argument,
# each as timm computes it, so the floats are the same to the last bit. `neg` is the sign draw.
def _rotate(level: float, neg: bool) -> float:
  v = (level / LEVEL_DENOM) * 30.0
  return -v if neg else v


def _shear(level: float, neg: bool) -> float:
  v = (level / LEVEL_DENOM) * 0.3
  return -v if neg else v


def _translate_rel(level: float, neg: bool) -> float:
  v = (level / LEVEL_DENOM) * 0.45  # a fraction of the side, up to 0.45
  return -v if neg else v


def _enhance(level: float, neg: bool) -> float:
  return (level / LEVEL_DENOM) * 1.8 + 0.1  # 0.1 (strong) .. 1.9 (strong), 1.0 no change at 5


def _enhance_increasing(level: float, neg: bool) -> float:
  v = (level / LEVEL_DENOM) * 0.9  # away from 1.0 (no change) either way, never below 0.1
  return max(0.1, 1.0 + (-v if neg else v))


def _posterize(level: float, neg: bool) -> int:
  return int((level / LEVEL_DENOM) * 4)  # bits kept, 0 .. 4: milder with the level


def _posterize_increasing(level: float, neg: bool) -> int:
  return 4 - _posterize(level, neg)


def _solarize(level: float, neg: bool) -> int:
  return min(256, int((level / LEVEL_DENOM) * 256))  # threshold: milder with the level


def _solarize_increasing(level: float, neg: bool) -> int:
  return 256 - _solarize(level, neg)


def _solarize_add(level: float, neg: bool) -> int:
  return min(128, int((level / LEVEL_DENOM) * 110))


def _affine(coefficients: Callable[[Image.Image, float], tuple]) -> Callable:
  """Output pixel (x, y) reads input (a x + b y + c, d x + e y + f), filled outside."""
  return lambda img, v, fill, resample: img.transform(
    img.size, Image.AFFINE, coefficients(img, v), resample, fillcolor=fill
  )


def _lut_add(img: Image.Image, add: int) -> Image.Image:
  """timm's SolarizeAdd: `add` to every value below 128, saturating at 255."""
  lut = [min(255, i + add) if i < 128 else i for i in range(256)]
  return img.point(lut * len(img.getbands()))


def _posterize_op(img: Image.Image, bits: int) -> Image.Image:
  """Keeps the `bits` high bits. 0 bits (timm's Posterize below level 2.5, PosterizeIncreasing at
  10) is a black image, as Pillow's lookup table gave timm before Pillow 12 refused bits < 1."""
  if bits >= 8:
    return img
  return Image.new(img.mode, img.size) if bits < 1 else ImageOps.posterize(img, bits)


def _enhancer(kind: type) -> Callable:
  return lambda img, v, fill, resample: kind(img).enhance(v)


_PLAIN = lambda fn: lambda img, v, fill, resample: fn(img)
_ARG = lambda fn: lambda img, v, fill, resample: fn(img, v)

# name -> (level rule or None, signed, geometric, operation of (image, argument, fill, resample))
OPERATIONS: dict[str, tuple[Callable | None, bool, bool, Callable]] = {
  'AutoContrast': (None, False, False, _PLAIN(ImageOps.autocontrast)),
  'Equalize': (None, False, False, _PLAIN(ImageOps.equalize)),
  'Invert': (None, False, False, _PLAIN(ImageOps.invert)),
  'Rotate': (
    _rotate,
    True,
    True,
    lambda img, v, fill, resample: img.rotate(v, resample, fillcolor=fill),
  ),
  'Posterize': (_posterize, False, False, _ARG(_posterize_op)),
  'PosterizeIncreasing': (_posterize_increasing, False, False, _ARG(_posterize_op)),
  'Solarize': (_solarize, False, False, _ARG(ImageOps.solarize)),
  'SolarizeIncreasing': (_solarize_increasing, False, False, _ARG(ImageOps.solarize)),
  'SolarizeAdd': (_solarize_add, False, False, _ARG(_lut_add)),
  'ShearX': (_shear, True, True, _affine(lambda img, v: (1, v, 0, 0, 1, 0))),
  'ShearY': (_shear, True, True, _affine(lambda img, v: (1, 0, 0, v, 1, 0))),
  'TranslateXRel': (
    _translate_rel,
    True,
    True,
    _affine(lambda img, v: (1, 0, v * img.size[0], 0, 1, 0)),
  ),
  'TranslateYRel': (
    _translate_rel,
    True,
    True,
    _affine(lambda img, v: (1, 0, 0, 0, 1, v * img.size[1])),
  ),
}
for _name, _kind in (
  ('Color', ImageEnhance.Color),
  ('Contrast', ImageEnhance.Contrast),
  ('Brightness', ImageEnhance.Brightness),
  ('Sharpness', ImageEnhance.Sharpness),
):
  OPERATIONS[_name] = (_enhance, False, False, _enhancer(_kind))
  OPERATIONS[_name + 'Increasing'] = (_enhance_increasing, True, False, _enhancer(_kind))

# timm's two lists, in its order (an operation's index is what the draw picks)
_COMMON = ('AutoContrast', 'Equalize', 'Invert', 'Rotate')
_TAIL = ('ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')
_MIDDLE = ('Posterize', 'Solarize', 'SolarizeAdd', 'Color', 'Contrast', 'Brightness', 'Sharpness')
RAND_TRANSFORMS = _COMMON + _MIDDLE + _TAIL  # inc0
RAND_INCREASING_TRANSFORMS = (  # inc1
  _COMMON + tuple(n if n == 'SolarizeAdd' else n + 'Increasing' for n in _MIDDLE) + _TAIL
)

_KEYS = {  # key -> (value pattern, converter); timm's other key, t (weighted lists), is refused
  'm': (r'\d+', int),
  'n': (r'\d+', int),
  'mstd': (r'\d+(\.\d+)?', float),
  'mmax': (r'\d+', int),
  'inc': (r'[01]', lambda v: bool(int(v))),
  'p': (r'\d+(\.\d+)?', float),
}


def parse(text: str) -> TimmRandAugment:
  """timm's ``rand_augment_transform`` string as a ``TimmRandAugment``; a ValueError says why."""
  fail = lambda why: ValueError(f'config.data.auto_augment={text!r}: {why} (timm form: {FORM})')
  sections = text.split('-')
  if sections[0] != 'rand':
    raise fail("timm's RandAugment strings start with 'rand'")
  values: dict = {}
  for section in sections[1:]:
    match = re.fullmatch(r'([a-z]+)(.*)', section)
    key = match[1] if match else section
    if key not in _KEYS:
      raise fail(f'unknown section {section!r}; accepted keys: {", ".join(_KEYS)}')
    pattern, convert = _KEYS[key]
    if not re.fullmatch(pattern, match[2]):
      raise fail(f'section {section!r} needs a value matching {pattern}')
    if key in values:
      raise fail(f'{key} given twice')
    values[key] = convert(match[2])
  mmax = values.get('mmax', 10)
  m = values.get('m', int(LEVEL_DENOM))
  if not 1 <= mmax:
    raise fail('mmax must be at least 1')
  if m > mmax:
    raise fail(f'magnitude m{m} is above mmax{mmax} (mmax defaults to 10)')
  if not 1 <= values.get('n', 2) <= MAX_OPS:
    raise fail(f'n must be 1-{MAX_OPS} operations')
  if not 0.0 <= values.get('p', 0.5) <= 1.0:
    raise fail('p, the probability of each operation, must be in [0, 1]')
  mstd = values.get('mstd', 0.0)
  return TimmRandAugment(
    magnitude=m,
    num_ops=values.get('n', 2),
    magnitude_std=float('inf') if mstd > 100 else mstd,
    magnitude_max=mmax,
    increasing=values.get('inc', False),
    prob=values.get('p', 0.5),
  )


class Draw(NamedTuple):
  """One operation that applies: its name, argument (None for the argument-free ones) and
  resampling filter ('bilinear' / 'bicubic'; None for the non-geometric ones)."""

  name: str
  arg: float | int | None
  resample: str | None


def draws(
  policy: TimmRandAugment, rng: np.random.Generator, interpolation: str = 'random'
) -> list[Draw]:
  """The operations ``policy`` applies to one image, drawn from `rng` in the order timm draws:
  all n indices first (with replacement), then per operation the apply draw (skipped when p is
  1), the magnitude noise (only if it applies), the sign (signed operations) and the filter
  (geometric operations, when `interpolation` is 'random')."""
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f'interpolation={interpolation!r} is not one of {INTERPOLATIONS}')
  names = RAND_INCREASING_TRANSFORMS if policy.increasing else RAND_TRANSFORMS
  out = []
  for index in rng.integers(len(names), size=policy.num_ops):
    name = names[int(index)]
    if policy.prob < 1.0 and rng.random() > policy.prob:
      continue
    level = policy.magnitude
    if policy.magnitude_std == float('inf'):
      level = rng.uniform(0, level)
    elif policy.magnitude_std > 0:
      level = rng.normal(level, policy.magnitude_std)
    level = max(0.0, min(float(level), policy.magnitude_max))
    rule, signed, geometric, _ = OPERATIONS[name]
    neg = bool(signed and rng.random() > 0.5)
    arg = None if rule is None else rule(level, neg)
    resample = interpolation if geometric else None
    if resample == 'random':
      resample = views.RANDOM_CHOICES[int(rng.integers(len(views.RANDOM_CHOICES)))]
    out.append(Draw(name, arg, resample))
  return out


def apply(img: Image.Image, draw: Draw) -> Image.Image:
  """One drawn operation on a PIL image ('L' or 'RGB'), with timm's fill."""
  fill = FILL_GREY if img.mode == 'L' else FILL_RGB
  resample = views.PIL_FILTERS.get(draw.resample)
  return OPERATIONS[draw.name][3](img, draw.arg, fill, resample)


def augment_array(
  array: np.ndarray,
  policy: TimmRandAugment,
  rng: np.random.Generator,
  interpolation: str = 'random',
) -> np.ndarray:
  """``policy`` applied to a uint8 [H, W, C] image (C 1 or 3). `interpolation`: 'random' (timm's
  default: bilinear or bicubic per operation), or the fixed filter of a fixed training
  interpolation, as timm's ``create_transform`` passes it."""
  grey = array.shape[-1] == 1
  img = Image.fromarray(array[..., 0] if grey else array)
  for draw in draws(policy, rng, interpolation):
    img = apply(img, draw)
  out = np.asarray(img)
  return np.ascontiguousarray(out[..., None] if grey else out)
