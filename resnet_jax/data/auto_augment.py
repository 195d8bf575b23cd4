"""TrivialAugment Wide (Mueller & Hutter 2021) on the host, as torchvision's PIL backend does it.

torchvision's new ResNet-50 recipe (the IMAGENET1K_V2 weights) applies ``TrivialAugmentWide`` to
every training crop after the random-resized crop and the flip: one of 14 operations chosen
uniformly, at one of 31 magnitudes chosen uniformly, negated with probability 1/2 for the signed
operations; geometric ones resample with nearest neighbour and fill with black. Every operation
here is the PIL call torchvision's PIL backend makes, with the same parameters, so the same image
and draws give the same pixels (``tests/test_auto_augment.py`` checks this against torchvision,
live where it is installed and against its recorded outputs everywhere). The draws come from the
example's own ``np.random.Generator``, so runs stay deterministic per example and resume exactly.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

AUTO_AUGMENTS = ('none', 'trivial_wide')
NUM_BINS = 31


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


def apply_operation(img: Image.Image, name: str, magnitude: float) -> Image.Image:
  """One named operation at `magnitude` (torchvision's ``_apply_op`` for PIL images)."""
  return OPERATIONS[name][0](img, magnitude)


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


def augment_array(array: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
  """`kind` ('none' or 'trivial_wide') applied to a uint8 [H, W, C] image."""
  if kind == 'none':
    return array
  grey = array.shape[-1] == 1
  out = np.asarray(trivial_augment_wide(Image.fromarray(array[..., 0] if grey else array), rng))
  return np.ascontiguousarray(out[..., None] if grey else out)
