"""Decoding, resizing and the eval views of one image: the geometry every eval input shares.

Two geometries. The pipeline's own ('pil', the default, unchanged so existing runs and their
cached statistics stay byte for byte): the longer side of a shorter-side resize is rounded from
the decoded (possibly DCT-reduced) image's aspect and the centre crop's offset is floored.
torchvision's ('torchvision', which timm's eval transform also uses: `Resize(int)` +
`CenterCrop`): the longer side is `int(short * long / short_side)` of the original image and the
centre offset is `int(round((H - S) / 2))`. Pure NumPy + PIL, picklable for Grain workers.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from PIL import Image

# config.data.interpolation: the resampling filter of the training crops and the eval resizes.
# 'random' (timm's default --train-interpolation) draws bilinear or bicubic per training image.
INTERPOLATIONS = ('bilinear', 'bicubic', 'random')
RANDOM_CHOICES = ('bilinear', 'bicubic')  # timm's _RANDOM_INTERPOLATION, in its order
# What evaluation resizes with under 'random': timm's eval transform has no random mode
# (str_to_interp_mode('random') is a KeyError); timm's train.py evaluates with
# resolve_data_config's interpolation, 'bicubic' unless --interpolation or the model's
# pretrained cfg names another (the "ResNet strikes back" cfgs name bicubic).
RANDOM_EVAL = 'bicubic'
PIL_FILTERS = {'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC}
GEOMETRIES = ('pil', 'torchvision')


def eval_filter(interpolation: str) -> int:
  """The PIL filter evaluation resizes with under `interpolation`."""
  return PIL_FILTERS[RANDOM_EVAL if interpolation == 'random' else interpolation]


def crop_pct_resize(crop: int, crop_pct: float) -> int:
  """timm's eval resize for `crop_pct` (transforms_imagenet_eval): floor(crop / crop_pct)."""
  return math.floor(crop / crop_pct)


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


def squash(image: Any, side: int, channels: int) -> np.ndarray:
  """The whole image resized (bilinear, aspect not kept) to side x side, uint8 [side, side, C]:
  BiT's `Resize((s, s))`, the 'bit' augment's pre-crop and eval input. JPEGs decode at the
  smallest DCT scale still >= side x side."""
  if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape[:2] == (side, side):
    return image if image.ndim == 3 else image[..., None]
  img = decode(open_image(image, channels), channels, (side, side))
  img = img if img.size == (side, side) else img.resize((side, side), Image.BILINEAR)
  return np.ascontiguousarray(to_array(img, channels))


def to_array(img: Image.Image, channels: int) -> np.ndarray:
  array = np.asarray(img, dtype=np.uint8)
  return array[..., None] if channels == 1 else array


def shorter_side_size(w: int, h: int, short: int) -> tuple[int, int]:
  """torchvision's `Resize(short)` output (width, height) of a w x h image (long side: int())."""
  if w <= h:
    return short, int(short * h / w)
  return int(short * w / h), short


def resize_shorter(
  img: Image.Image,
  short: int,
  channels: int,
  resample: int = Image.BILINEAR,
  geometry: str = 'pil',
) -> Image.Image:
  """Decodes (reduced where possible) and resizes so that the shorter side is `short`.

  'torchvision' geometry: the output size is torchvision's for the original image (so a JPEG
  decoded at a reduced DCT size still comes out at timm's shape).
  """
  w, h = img.size
  factor = short / min(w, h)
  img = decode(img, channels, (math.ceil(w * factor), math.ceil(h * factor)))
  if geometry == 'torchvision':
    new = shorter_side_size(w, h, short)
  else:
    new = (
      max(short, round(img.size[0] * short / min(img.size))),
      max(short, round(img.size[1] * short / min(img.size))),
    )
  return img if img.size == new else img.resize(new, resample)


def image_hw(image: Any, channels: int) -> tuple[int, int]:
  """(height, width) of a stored image; encoded bytes: read from the header, no decode."""
  if isinstance(image, np.ndarray) and image.dtype.kind not in 'SO':
    return int(image.shape[0]), int(image.shape[1])
  w, h = open_image(image, channels).size
  return int(h), int(w)


def whole_image_shape(h: int, w: int, short: int, step: int) -> tuple[int, int]:
  """(H, W) of an h x w image for whole-image testing at scale `short` (orientation kept).

  The shorter side becomes `short`; the longer becomes `short` plus the multiple of `step` nearest
  to `short * aspect - short` (ties round up), so images of similar aspect share one shape and
  batch together. With `short` a multiple of `step` (the paper's scales and a stride-32 net) the
  longer side is the stride multiple nearest to `short * aspect`: it is off by at most `step / 2`
  pixels, and exact whenever `short * aspect` already is such a value. Square images stay square.
  """
  if min(h, w) < 1 or short < 1 or step < 1:
    raise ValueError(f'bad whole-image geometry: {h}x{w} image, scale {short}, step {step}')
  extra = short * max(h, w) / min(h, w) - short
  long = short + step * math.floor(extra / step + 0.5)
  return (short, long) if h <= w else (long, short)


def center_crop(array: np.ndarray, size: int, geometry: str = 'pil') -> np.ndarray:
  """The centred size x size square ('torchvision': its CenterCrop's rounded offset)."""
  h, w = array.shape[:2]
  if geometry == 'torchvision':
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  else:
    top, left = (h - size) // 2, (w - size) // 2
  return array[top : top + size, left : left + size]


def ten_crops(array: np.ndarray, size: int, geometry: str = 'pil') -> np.ndarray:
  """[10, size, size, C]: 4 corners + centre, then the five flipped (the paper's Tables 2-3)."""
  h, w = array.shape[:2]
  five = [
    array[:size, :size],
    array[:size, w - size :],
    array[h - size :, :size],
    array[h - size :, w - size :],
    center_crop(array, size, geometry),
  ]
  return np.stack(five + [c[:, ::-1] for c in five])


def eval_views(
  array: np.ndarray, crops: int, size: int, pad: int = 0, geometry: str = 'pil'
) -> np.ndarray:
  """The eval views of one [H, W, C] array: [size, size, C] (crops 1) or [crops, size, size, C].

  `pad` > 0 (small images): zero-pad first, as in training, and cut the views from the padded
  array. crops: 1 centre, 2 centre + its flip, 10 the paper's corners + centre and their flips.
  The device applies the same function to the mean image and to ones, so each view is normalised
  with exactly the mean pixels it covers and padding stays zero after normalisation.
  """
  if crops not in (1, 2, 10):
    raise ValueError(f'crops must be 1, 2 or 10, got {crops}')
  if pad:
    array = np.pad(array, ((pad, pad), (pad, pad), (0, 0)))
  if crops == 10:
    return ten_crops(array, size, geometry)
  centre = center_crop(array, size, geometry)
  return np.stack([centre, centre[:, ::-1]]) if crops == 2 else centre
