"""TrivialAugment Wide (Mueller & Hutter 2021) on the host, as torchvision's PIL backend does it.

torchvision's new ResNet-50 recipe (the IMAGENET1K_V2 weights) applies ``TrivialAugmentWide`` to
every training crop after the random-resized crop and the flip: one of 14 operations chosen
uniformly, at one of 31 magnitudes chosen uniformly, negated with probability 1/2 for the signed
operations; geometric ones resample with nearest neighbour and fill with black. Every operation
here is the PIL call torchvision's PIL backend makes, with the same parameters, so the same image
and draws give the same pixels (``tests/test_auto_augment.py`` checks this against torchvision,
live where it is installed and against its recorded outputs everywhere). The draws come from the
example's own ``np.random.Generator``, so runs stay deterministic per example and resume exactly.

The same operations at other magnitudes make torchvision's two other automatic augmentations:
RandAugment (Cubuk et al. 2020: ``num_ops`` operations in a row, each uniform over the 14, all at
one ``magnitude`` of 31 bins; torchvision's reference trainer's ``--auto-augment ra``) and
AutoAugment's learned policies (Cubuk et al. 2019: one of 25 sub-policies of two operations, each
applied with its probability at its magnitude of 10 bins; ``imagenet`` and ``cifar10``).
timm's own RandAugment (``rand-m7-mstd0.5-inc1``, other operations and rules) is timm_augment.py;
``parse`` and ``augment_array`` here dispatch to it.
"""

from __future__ import annotations

import argparse
import functools
import re
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from resnet_jax.data import timm_augment

AUTO_AUGMENTS = (
  'none',
  'trivial_wide',
  'rand_augment',  # torchvision's defaults: 2 operations at magnitude 9 of 31
  'rand_augment_n{N}_m{M}',  # N operations at magnitude M (0-30)
  'autoaugment_imagenet',
  'autoaugment_cifar10',
  timm_augment.FORM,  # timm's RandAugment (timm_augment.py), e.g. rand-m7-mstd0.5-inc1
)
NUM_BINS = 31
# RandAugment's papers use 1-3 operations; more than the 14 there are only burns host time (a
# typo such as n100 would stall the input pipeline).
MAX_RAND_AUGMENT_OPS = 14


def _black(img: Image.Image) -> int | tuple[int, ...]:
  bands = len(img.getbands())
  return 0 if bands == 1 else (0,) * bands


def _affine(img: Image.Image, coefficients: tuple[float, ...]) -> Image.Image:
  """Output pixel (x, y) takes input pixel (a x + b y + c, d x + e y + f); black outside."""
  return img.transform(img.size, Image.AFFINE, coefficients, Image.NEAREST, fillcolor=_black(img))


def _enhance(kind: type) -> Callable[[Image.Image, float], Image.Image]:
  return lambda img, m: kind(img).enhance(1.0 + m)


# name -> (the operation of (image, magnitude), its 31 magnitudes or None, signed). torchvision's
# are float32 linspaces, whose last bit depends on the CPU's vector width; these are the correctly
# rounded float32 values (so a translation of 32 * 15 / 30 pixels is 16, not 15).
_linear = lambda top: np.linspace(0.0, top, NUM_BINS).astype(np.float32)
OPERATIONS: dict[
  str, tuple[Callable[[Image.Image, float], Image.Image], np.ndarray | None, bool]
] = {
  'Identity': (lambda img, m: img, None, False),
  # torchvision shears by the angle atan(m) about the top-left corner: the inverse map is x + m y.
  'ShearX': (lambda img, m: _affine(img, (1.0, m, 0.0, 0.0, 1.0, 0.0)), _linear(0.99), True),
  'ShearY': (lambda img, m: _affine(img, (1.0, 0.0, 0.0, m, 1.0, 0.0)), _linear(0.99), True),
  # whole pixels (torchvision truncates the magnitude to an int), 32 at most whatever the size
  'TranslateX': (lambda img, m: _affine(img, (1, 0, -int(m), 0, 1, 0)), _linear(32.0), True),
  'TranslateY': (lambda img, m: _affine(img, (1, 0, 0, 0, 1, -int(m))), _linear(32.0), True),
  'Rotate': (
    lambda img, m: img.rotate(m, Image.NEAREST, fillcolor=_black(img)),
    _linear(135.0),
    True,
  ),
  'Brightness': (_enhance(ImageEnhance.Brightness), _linear(0.99), True),
  'Color': (_enhance(ImageEnhance.Color), _linear(0.99), True),
  'Contrast': (_enhance(ImageEnhance.Contrast), _linear(0.99), True),
  'Sharpness': (_enhance(ImageEnhance.Sharpness), _linear(0.99), True),
  # bits kept: 8 down to 2 in 31 steps
  'Posterize': (
    lambda img, m: ImageOps.posterize(img, int(m)),
    8 - np.round(np.arange(NUM_BINS) / ((NUM_BINS - 1) / 6)).astype(np.int64),
    False,
  ),
  'Solarize': (
    lambda img, m: ImageOps.solarize(img, m),
    np.linspace(255.0, 0.0, NUM_BINS).astype(np.float32),
    False,
  ),
  'AutoContrast': (lambda img, m: ImageOps.autocontrast(img), None, False),
  'Equalize': (lambda img, m: ImageOps.equalize(img), None, False),
}


# AutoAugment's policies use one more operation.
_FUNCTIONS = {name: fn for name, (fn, _, _) in OPERATIONS.items()}
_FUNCTIONS['Invert'] = lambda img, m: ImageOps.invert(img)


def magnitude_space(
  num_bins: int, height: int, width: int
) -> dict[str, tuple[np.ndarray | None, bool]]:
  """RandAugment's and AutoAugment's magnitudes (``num_bins`` of each) and signedness for an
  ``height`` x ``width`` image, as torchvision defines them: milder than TrivialAugment Wide's,
  translations up to 150/331 of the side (the fraction of a 331-pixel image the papers used)."""
  linear = lambda top: np.linspace(0.0, top, num_bins).astype(np.float32)
  return {
    'Identity': (None, False),
    'ShearX': (linear(0.3), True),
    'ShearY': (linear(0.3), True),
    'TranslateX': (linear(150.0 / 331.0 * width), True),
    'TranslateY': (linear(150.0 / 331.0 * height), True),
    'Rotate': (linear(30.0), True),
    'Brightness': (linear(0.9), True),
    'Color': (linear(0.9), True),
    'Contrast': (linear(0.9), True),
    'Sharpness': (linear(0.9), True),
    # bits kept: 8 down to 4
    'Posterize': (8 - np.round(np.arange(num_bins) / ((num_bins - 1) / 4)).astype(np.int64), False),
    'Solarize': (np.linspace(255.0, 0.0, num_bins).astype(np.float32), False),
    'AutoContrast': (None, False),
    'Equalize': (None, False),
    'Invert': (None, False),
  }


# RandAugment draws uniformly over these, in this order (torchvision's).
RAND_AUGMENT_OPERATIONS = tuple(OPERATIONS)


def _policy(text: str) -> tuple[tuple[tuple[str, float, int | None], ...], ...]:
  """Sub-policies written 'Op:probability:magnitude_bin Op:probability' one per line."""
  parse = lambda op, p, *m: (op, float(p), int(m[0]) if m else None)
  return tuple(
    tuple(parse(*item.split(':')) for item in line.split()) for line in text.strip().splitlines()
  )


# AutoAugment's learned policies (Cubuk et al. 2019, Appendix), in torchvision's order: each line
# one sub-policy of two (operation, probability, magnitude bin of 10).
AUTOAUGMENT_POLICIES = {
  'imagenet': _policy(
    """
    Posterize:0.4:8 Rotate:0.6:9
    Solarize:0.6:5 AutoContrast:0.6
    Equalize:0.8 Equalize:0.6
    Posterize:0.6:7 Posterize:0.6:6
    Equalize:0.4 Solarize:0.2:4
    Equalize:0.4 Rotate:0.8:8
    Solarize:0.6:3 Equalize:0.6
    Posterize:0.8:5 Equalize:1.0
    Rotate:0.2:3 Solarize:0.6:8
    Equalize:0.6 Posterize:0.4:6
    Rotate:0.8:8 Color:0.4:0
    Rotate:0.4:9 Equalize:0.6
    Equalize:0.0 Equalize:0.8
    Invert:0.6 Equalize:1.0
    Color:0.6:4 Contrast:1.0:8
    Rotate:0.8:8 Color:1.0:2
    Color:0.8:8 Solarize:0.8:7
    Sharpness:0.4:7 Invert:0.6
    ShearX:0.6:5 Equalize:1.0
    Color:0.4:0 Equalize:0.6
    Equalize:0.4 Solarize:0.2:4
    Solarize:0.6:5 AutoContrast:0.6
    Invert:0.6 Equalize:1.0
    Color:0.6:4 Contrast:1.0:8
    Equalize:0.8 Equalize:0.6
    """
  ),
  'cifar10': _policy(
    """
    Invert:0.1 Contrast:0.2:6
    Rotate:0.7:2 TranslateX:0.3:9
    Sharpness:0.8:1 Sharpness:0.9:3
    ShearY:0.5:8 TranslateY:0.7:9
    AutoContrast:0.5 Equalize:0.9
    ShearY:0.2:7 Posterize:0.3:7
    Color:0.4:3 Brightness:0.6:7
    Sharpness:0.3:9 Brightness:0.7:9
    Equalize:0.6 Equalize:0.5
    Contrast:0.6:7 Sharpness:0.6:5
    Color:0.7:7 TranslateX:0.5:8
    Equalize:0.3 AutoContrast:0.4
    TranslateY:0.4:3 Sharpness:0.2:6
    Brightness:0.9:6 Color:0.2:8
    Solarize:0.5:2 Invert:0.0
    Equalize:0.2 AutoContrast:0.6
    Equalize:0.2 Equalize:0.6
    Color:0.9:9 Equalize:0.6
    AutoContrast:0.8 Solarize:0.2:8
    Brightness:0.1:3 Color:0.7:0
    Solarize:0.4:5 AutoContrast:0.9
    TranslateY:0.9:9 TranslateY:0.7:9
    AutoContrast:0.9 Solarize:0.8:3
    Equalize:0.8 Invert:0.1
    TranslateY:0.7:9 AutoContrast:0.9
    """
  ),
}


class Policy(NamedTuple):
  """A parsed ``config.data.auto_augment``: its kind and RandAugment's two numbers."""

  kind: str  # 'none' | 'trivial_wide' | 'rand_augment' | 'autoaugment_imagenet' | ...
  num_ops: int = 2
  magnitude: int = 9


@functools.lru_cache(maxsize=None)
def parse(text: str) -> Policy | timm_augment.TimmRandAugment:
  """``config.data.auto_augment`` as a ``Policy`` (timm's ``rand-...`` strings: a
  ``timm_augment.TimmRandAugment``); a ValueError names the accepted forms."""
  if text == 'rand' or text.startswith('rand-'):
    return timm_augment.parse(text)
  if text in ('none', 'trivial_wide', 'rand_augment') or (
    text.startswith('autoaugment_') and text.removeprefix('autoaugment_') in AUTOAUGMENT_POLICIES
  ):
    return Policy(text)
  match = re.fullmatch(r'rand_augment_n(\d+)_m(\d+)', text)
  if match and 1 <= int(match[1]) <= MAX_RAND_AUGMENT_OPS and int(match[2]) < NUM_BINS:
    return Policy('rand_augment', int(match[1]), int(match[2]))
  raise ValueError(
    f'config.data.auto_augment={text!r} is not one of {", ".join(AUTO_AUGMENTS)} '
    f'(N of 1-{MAX_RAND_AUGMENT_OPS} operations, magnitude M of 0-{NUM_BINS - 1})'
  )


def cli_type(text: str) -> str:
  """``parse`` as an argparse ``type``: a bad value is argparse's one-line usage error."""
  try:
    parse(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e).removeprefix('config.data.auto_augment=')) from None
  return text


def policy_draws(policy: Policy, rng: np.random.Generator, size: tuple[int, int]) -> list:
  """The (operation, signed magnitude) pairs ``policy`` applies to an image of ``size`` = (W, H),
  drawn as torchvision's ``RandAugment.forward`` / ``AutoAugment.forward`` draw them."""
  width, height = size
  if policy.kind == 'trivial_wide':
    return [draw(rng)]
  if policy.kind == 'rand_augment':
    space = magnitude_space(NUM_BINS, height, width)
    ops = []
    for _ in range(policy.num_ops):
      name = RAND_AUGMENT_OPERATIONS[int(rng.integers(len(RAND_AUGMENT_OPERATIONS)))]
      magnitudes, signed = space[name]
      magnitude = 0.0 if magnitudes is None else float(magnitudes[policy.magnitude])
      if signed and rng.integers(2):
        magnitude = -magnitude
      ops.append((name, magnitude))
    return ops
  if policy.kind.startswith('autoaugment_'):
    subpolicies = AUTOAUGMENT_POLICIES[policy.kind.removeprefix('autoaugment_')]
    chosen = subpolicies[int(rng.integers(len(subpolicies)))]
    probabilities, signs = rng.random(2), rng.integers(2, size=2)
    space = magnitude_space(10, height, width)
    ops = []
    for (name, p, level), u, sign in zip(chosen, probabilities, signs):
      if u <= p:  # torchvision applies an operation when its uniform draw is <= p
        magnitudes, signed = space[name]
        magnitude = 0.0 if level is None else float(magnitudes[level])
        if signed and sign == 0:  # AutoAugment negates on 0 (RandAugment on 1)
          magnitude = -magnitude
        ops.append((name, magnitude))
    return ops
  return []


def apply_operation(img: Image.Image, name: str, magnitude: float) -> Image.Image:
  """One named operation at `magnitude` (torchvision's ``_apply_op`` for PIL images)."""
  return _FUNCTIONS[name](img, magnitude)


def draw(rng: np.random.Generator) -> tuple[str, float]:
  """An operation and its signed magnitude, drawn as ``TrivialAugmentWide.forward`` draws them."""
  names = list(OPERATIONS)
  name = names[int(rng.integers(len(names)))]
  _, magnitudes, signed = OPERATIONS[name]
  magnitude = 0.0 if magnitudes is None else float(magnitudes[int(rng.integers(NUM_BINS))])
  if signed and rng.integers(2):
    magnitude = -magnitude
  return name, magnitude


def trivial_augment_wide(img: Image.Image, rng: np.random.Generator) -> Image.Image:
  """One TrivialAugment Wide draw applied to a PIL image ('L' or 'RGB')."""
  return apply_operation(img, *draw(rng))


def augment_array(
  array: np.ndarray, kind: str, rng: np.random.Generator, interpolation: str = 'random'
) -> np.ndarray:
  """`kind` (a ``config.data.auto_augment``, see ``parse``) applied to a uint8 [H, W, C] image.
  `interpolation` is the resampling of timm's RandAugment ('random', 'bilinear', 'bicubic'; see
  timm_augment.py); torchvision's operations always resample with nearest neighbour."""
  policy = parse(kind)
  if policy.kind == 'none':
    return array
  if isinstance(policy, timm_augment.TimmRandAugment):
    return timm_augment.augment_array(array, policy, rng, interpolation)
  grey = array.shape[-1] == 1
  img = Image.fromarray(array[..., 0] if grey else array)
  for name, magnitude in policy_draws(policy, rng, img.size):
    img = apply_operation(img, name, magnitude)
  out = np.asarray(img)
  return np.ascontiguousarray(out[..., None] if grey else out)
