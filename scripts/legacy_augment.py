# FROZEN COPY of resnet_jax/data/augment.py as of main cf6edf9 (host float32 normalisation).
# Kept unchanged so scripts/benchmark_input.py can time the old per-example path side by side with
# the new uint8 one on the same JPEGs, and tests can check that the new host + device split
# reproduces it. Do not edit it, and do not import it from product code.
"""Per-example preprocessing: the paper's CIFAR/ImageNet augmentations, Inception and eval crops.

Pure NumPy + PIL (no TF, picklable) so Grain worker processes can run it. Encoded JPEGs are decoded
at reduced size with PIL's `draft` (DCT scaling by 1/2, 1/4, 1/8) whenever the output still has at
least the resolution the crop needs: this is the cheap part of "decode-and-crop".

Modes (`config.data.augment`):
- 'none':      resize (if needed) to image_size; eval the same.
- 'cifar':     paper: per-pixel-mean-normalise, pad `image_size // 8` (4 for 32) zeros, random
               crop, flip.
- 'imagenet':  paper: shorter side uniform in [256, 480] * image_size/224, random crop, flip, PCA
               colour (AlexNet lighting, alpha ~ N(0, 0.1), eigen-decomposition of the train
               split's RGB covariance).
- 'inception': random-resized crop (area 8%-100%, aspect 3/4-4/3) + flip.
Eval ('imagenet'/'inception'): shorter side resized to image_size*256/224, then centre / 10 crops;
`scale=S` gives the paper's fully-convolutional testing input: shorter side S, centre S x S.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any

import numpy as np
from PIL import Image

AUGMENTS = ('none', 'cifar', 'imagenet', 'inception')
EVAL_RESIZE_RATIO = 256 / 224  # eval resize of the shorter side relative to the crop (256 for 224)
SCALE_AUG_RANGE = (256 / 224, 480 / 224)  # paper's [256, 480] for 224 crops
PCA_ALPHA_STD = 0.1


@dataclasses.dataclass
class Normalizer:
  """(x - mean) / std; a per-pixel mean image is resized when eval runs at another scale."""

  mean: np.ndarray  # (H, W, C) per-pixel mean, or (C,) / () per channel
  std: np.ndarray  # broadcastable to the image
  _resized: dict[tuple[int, int], np.ndarray] = dataclasses.field(default_factory=dict, repr=False)

  def _mean_for(self, hw: tuple[int, int]) -> np.ndarray:
    if self.mean.ndim < 3 or self.mean.shape[:2] == hw:
      return self.mean
    if hw not in self._resized:
      self._resized[hw] = np.stack(
        [
          np.asarray(
            Image.fromarray(self.mean[..., c].astype(np.float32), mode='F').resize(
              (hw[1], hw[0]), Image.BILINEAR
            )
          )
          for c in range(self.mean.shape[-1])
        ],
        axis=-1,
      )
    return self._resized[hw]

  def __call__(self, image: np.ndarray) -> np.ndarray:
    x = image.astype(np.float32)
    x -= self._mean_for(tuple(image.shape[-3:-1]))
    x /= self.std
    return x


def open_image(image: Any, channels: int) -> Image.Image:
  """A lazily decoded PIL image from encoded bytes or a decoded uint8 array."""
  if isinstance(image, (bytes, np.bytes_)) or (
    isinstance(image, np.ndarray) and image.dtype.kind in 'SO'
  ):
    return Image.open(io.BytesIO(image.item() if isinstance(image, np.ndarray) else bytes(image)))
  array = np.asarray(image)
  return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)


def decode(img: Image.Image, channels: int, min_size: tuple[int, int] | None = None) -> Image.Image:
  """Decodes `img` in the right mode (JPEG: at the smallest DCT scale still >= `min_size`)."""
  mode = 'L' if channels == 1 else 'RGB'
  if min_size is not None and img.format == 'JPEG':
    img.draft(mode, (max(1, int(min_size[0])), max(1, int(min_size[1]))))
  return img.convert(mode) if img.mode != mode else img


def to_array(img: Image.Image, channels: int) -> np.ndarray:
  array = np.asarray(img, dtype=np.uint8)
  return array[..., None] if channels == 1 else array


def resize_shorter(img: Image.Image, short: int, channels: int) -> Image.Image:
  """Decodes (reduced where possible) and resizes so that the shorter side is `short`."""
  w, h = img.size
  factor = short / min(w, h)
  img = decode(img, channels, (math.ceil(w * factor), math.ceil(h * factor)))
  new = (
    max(short, round(img.size[0] * short / min(img.size))),
    max(short, round(img.size[1] * short / min(img.size))),
  )
  return img if img.size == new else img.resize(new, Image.BILINEAR)


def center_crop(array: np.ndarray, size: int) -> np.ndarray:
  h, w = array.shape[:2]
  top, left = (h - size) // 2, (w - size) // 2
  return array[top : top + size, left : left + size]


def ten_crops(array: np.ndarray, size: int) -> np.ndarray:
  """[10, size, size, C]: 4 corners + centre, then the five flipped (the paper's Tables 2-3)."""
  h, w = array.shape[:2]
  five = [
    array[:size, :size],
    array[:size, w - size :],
    array[h - size :, :size],
    array[h - size :, w - size :],
    center_crop(array, size),
  ]
  return np.stack(five + [c[:, ::-1] for c in five])


def _random_resized_box(rng: np.random.Generator, w: int, h: int) -> tuple[int, int, int, int]:
  """Inception crop box (left, top, width, height): 8%-100% of the area, aspect in [3/4, 4/3]."""
  area = w * h
  for _ in range(10):
    target = area * rng.uniform(0.08, 1.0)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
    if 0 < cw <= w and 0 < ch <= h:
      return int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1)), cw, ch
  side = min(w, h)  # fallback: the centred largest square
  return (w - side) // 2, (h - side) // 2, side, side


@dataclasses.dataclass
class Preprocessor:
  """Everything one example needs, from stored record to normalised float32 model input."""

  augment: str
  image_size: int
  channels: int
  normalize: Normalizer
  pca_eigvals: np.ndarray | None = None  # (C,) eigenvalues of the RGB covariance (pixels in [0, 1])
  pca_eigvecs: np.ndarray | None = None  # (C, C) columns = eigenvectors

  def __post_init__(self):
    if self.augment not in AUGMENTS:
      raise ValueError(f'config.data.augment={self.augment!r} is not one of {AUGMENTS}')

  @property
  def pad(self) -> int:
    return max(1, self.image_size // 8) if self.augment == 'cifar' else 0

  @property
  def eval_resize(self) -> int:
    small = self.augment in ('none', 'cifar')
    return self.image_size if small else round(self.image_size * EVAL_RESIZE_RATIO)

  def base_uint8(self, image: Any, short: int | None = None) -> np.ndarray:
    """Shorter side resized to `short` (default: the eval resize), uint8 [H, W, C]."""
    short = short or self.eval_resize
    if (
      isinstance(image, np.ndarray)
      and image.dtype == np.uint8
      and image.ndim == 3
      and min(image.shape[:2]) == short
    ):
      return image  # already decoded at the right size (CIFAR, digits): skip the PIL round trip
    img = open_image(image, self.channels)
    return to_array(resize_shorter(img, short, self.channels), self.channels)

  def eval_uint8(self, image: Any) -> np.ndarray:
    """The single centre crop before normalisation (what the dataset statistics are computed on)."""
    return center_crop(self.base_uint8(image), self.image_size)

  def eval(self, image: Any, crops: int = 1, scale: int | None = None) -> np.ndarray:
    """float32 [S, S, C] (crops == 1) or [crops, S, S, C]; crops: 1 centre, 2 with flip, 10 paper.

    With `scale`, S = scale: the shorter side resized to `scale` and the centred square kept (the
    fully-convolutional multi-scale testing input); otherwise S = image_size.
    """
    if crops not in (1, 2, 10):
      raise ValueError(f'crops must be 1, 2 or 10, got {crops}')
    if scale is not None:
      if crops == 10:
        raise ValueError('scale=... supports crops 1 or 2 (image and its flip)')
      out = self.normalize(center_crop(self.base_uint8(image, int(scale)), int(scale)))
    elif self.pad:  # small images: normalise, zero-pad as in training, crop the padded image
      out = np.pad(
        self.normalize(self.base_uint8(image)), ((self.pad,) * 2, (self.pad,) * 2, (0, 0))
      )
      if crops != 10:
        out = center_crop(out, self.image_size)
    else:
      out = self.base_uint8(image)
      out = self.normalize(
        ten_crops(out, self.image_size) if crops == 10 else center_crop(out, self.image_size)
      )
    if crops == 10:
      return ten_crops(out, self.image_size) if out.ndim == 3 else out
    if crops == 2:
      return np.stack([out, out[:, ::-1]])
    return out

  def train(self, image: Any, rng: np.random.Generator) -> np.ndarray:
    """One randomly augmented, normalised float32 [image_size, image_size, C] training input."""
    size = self.image_size
    if self.augment in ('none', 'cifar'):
      out = self.normalize(self.eval_uint8(image))
      if self.augment == 'cifar':
        p = self.pad
        out = np.pad(out, ((p, p), (p, p), (0, 0)))
        top, left = rng.integers(0, 2 * p + 1, size=2)
        out = out[top : top + size, left : left + size]
        if rng.random() < 0.5:
          out = out[:, ::-1]
      return np.ascontiguousarray(out)
    img = open_image(image, self.channels)
    w, h = img.size
    if self.augment == 'imagenet':
      # "resize the shorter side to s, then take a random size x size crop", done as: pick the crop
      # in the would-be resized image, map it back to the original, and resample only that region.
      lo, hi = (round(size * r) for r in SCALE_AUG_RANGE)
      factor = int(rng.integers(lo, hi + 1)) / min(w, h)
      top = int(rng.integers(0, max(size, round(h * factor)) - size + 1))
      left = int(rng.integers(0, max(size, round(w * factor)) - size + 1))
      left, top, cw, ch = left / factor, top / factor, size / factor, size / factor
    else:  # inception
      left, top, cw, ch = _random_resized_box(rng, w, h)
      factor = size / min(cw, ch)
    img = decode(
      img, self.channels, (math.ceil(w * factor), math.ceil(h * factor))
    )  # reduced if possible
    sx, sy = img.size[0] / w, img.size[1] / h
    box = (
      left * sx,
      top * sy,
      min(img.size[0], (left + cw) * sx),
      min(img.size[1], (top + ch) * sy),
    )
    array = to_array(img.resize((size, size), Image.BILINEAR, box=box), self.channels)
    if rng.random() < 0.5:
      array = array[:, ::-1]
    out = array.astype(np.float32)
    if self.augment == 'imagenet' and self.pca_eigvals is not None:
      alpha = rng.normal(0.0, PCA_ALPHA_STD, size=self.pca_eigvals.shape)
      out += (self.pca_eigvecs @ (alpha * self.pca_eigvals) * 255.0).astype(np.float32)
    return np.ascontiguousarray(self.normalize(out))
