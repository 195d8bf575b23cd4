"""Per-example host preprocessing: the paper's CIFAR/ImageNet geometry, Inception and eval crops.

Pure NumPy + PIL (no TF, no JAX, picklable) so Grain worker processes can run it. The host emits
**uint8** images; normalisation, PCA lighting and CIFAR's pad/crop/flip run inside the jitted step
(`resnet_jax.data.device_preprocess`), which moves a quarter of the bytes and skips the per-pixel
float work on the host. Encoded JPEGs are decoded at reduced size with PIL's `draft` (DCT scaling
by 1/2, 1/4, 1/8) whenever the output still has the resolution the crop needs.

Modes (`config.data.augment`):
- 'none':      resize (if needed) to image_size; eval the same.
- 'translate': CIFAR's pad + random crop without the flip (digits: a mirrored 2 is no 2).
- 'cifar':     paper: per-pixel-mean-normalise, pad `image_size // 8` (4 for 32) zeros, random crop,
               flip. The host emits the whole image; the device normalises, pads, crops and flips.
- 'imagenet':  paper: shorter side uniform in [256, 480] * image_size/224, random crop, flip (host),
               PCA colour (device: AlexNet lighting, alpha ~ N(0, 0.1), eigen-decomposition of the
               train split's RGB covariance).
- 'inception': random-resized crop (area 8%-100%, aspect 3/4-4/3) + flip.
- 'bit':       BiT's fine-tuning (Kolesnikov et al. 2020, Sec. 3.3): the whole image resized to
               `train_resize` x `train_resize` (aspect not kept), a random image_size crop, flip;
               eval: the whole image resized straight to image_size x image_size.
Eval ('imagenet'/'inception'): shorter side resized to image_size*256/224, then centre / 10 crops;
`scale=S` gives a centred S x S square at shorter side S. The paper's Table 4 testing uses the
whole image instead (`whole_image_shape`, `Preprocessor.whole_image`, `resnet_jax.multiscale`).
`interpolation` / `eval_crop_pct` (config.data) give timm's filters and eval resize instead.
Decoding, resizing and the eval views live in `views` (re-exported here), OpenCV's training crop
in `opencv_crop`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from PIL import Image

from resnet_jax.data import auto_augment
from resnet_jax.data.opencv_crop import crop_opencv
from resnet_jax.data.views import (  # noqa: F401  (public names importable from here too)
  GEOMETRIES,
  INTERPOLATIONS,
  PIL_FILTERS,
  RANDOM_CHOICES,
  RANDOM_EVAL,
  center_crop,
  crop_pct_resize,
  decode,
  eval_filter,
  eval_views,
  image_hw,
  open_image,
  resize_shorter,
  squash,
  ten_crops,
  to_array,
  whole_image_shape,
)

AUGMENTS = ('none', 'cifar', 'translate', 'imagenet', 'inception', 'bit')
EVAL_RESIZE_RATIO = 256 / 224  # eval resize of the shorter side relative to the crop (256 for 224)
SCALE_AUG_RANGE = (256 / 224, 480 / 224)  # paper's [256, 480] for 224 crops
PCA_ALPHA_STD = 0.1
DECODERS = ('pil', 'opencv')


@dataclasses.dataclass
class Normalizer:
  """(x - mean) / std in NumPy: the statistics the device applies, and its tests' reference."""

  mean: np.ndarray  # (H, W, C) per-pixel mean, or (C,) / () per channel
  std: np.ndarray  # broadcastable to the image
  _resized: dict[tuple[int, int], np.ndarray] = dataclasses.field(default_factory=dict, repr=False)

  def mean_for(self, hw: tuple[int, int]) -> np.ndarray:
    """The mean for an [H, W] image: a per-pixel mean is resized bilinearly (PIL), once per size."""
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
    x -= self.mean_for(tuple(image.shape[-3:-1]))
    x /= self.std
    return x


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


def _encoded(image: Any) -> bytes:
  return image.item() if isinstance(image, np.ndarray) else bytes(image)


def resized_crop(
  img: Image.Image, box: tuple[float, float, float, float], size: int, resample: int, cut: bool
) -> Image.Image:
  """`box` = (left, top, right, bottom) of `img` resampled to size x size.

  `cut` with a whole-pixel box: cut the box out first, then resize, as torchvision's
  `F.resized_crop` does on PIL images (pixel for pixel equal). Otherwise PIL's `box` argument,
  whose filter also reads the pixels just outside the box (the pipeline's historical bilinear
  crop: up to ~9 levels from torchvision's at the crop's border, ~0.1 on average).
  """
  if cut and all(float(v).is_integer() for v in box):
    return img.crop(tuple(int(v) for v in box)).resize((size, size), resample)
  return img.resize((size, size), resample, box=box)


def check_train_resize(augment: str, train_resize: int, image_size: int) -> None:
  """`data.train_resize` (0: off) is the square the 'bit' augment crops `image_size` from: other
  modes would silently ignore it, and a smaller square has no such crop. One home for the
  config's validation and the preprocessor's own check."""
  if train_resize and (augment != 'bit' or train_resize < image_size):
    raise ValueError(
      f"data.train_resize={train_resize} is the square augment 'bit' crops image_size="
      f'{image_size} from: at least image_size, with augment bit only (0: off)'
    )


@dataclasses.dataclass
class Preprocessor:
  """Everything one example needs on the host, from stored record to uint8 model input."""

  augment: str
  image_size: int
  channels: int
  # Training crops of JPEGs: 'pil' (draft + antialiased bilinear) or 'opencv' (IMREAD_REDUCED_* +
  # bilinear; 1.6x PIL's per-core rate, `pip install 'resnet_jax[opencv]'`)
  decoder: str = 'pil'
  # After the geometry, on the training images only: 'trivial_wide' (torchvision's new recipe)
  auto_augment: str = 'none'
  # Testing at another resolution than training (FixRes, Touvron et al. 2019; torchvision's new
  # recipe trains at 176 and tests at 224 after a resize to 232): the eval crop's side and the
  # shorter side it is cut from; 0: image_size and image_size x 256/224 (ImageNet modes only)
  eval_size: int = 0
  eval_resize_size: int = 0
  # The resampling filter (views.INTERPOLATIONS) of the training crops ('random': bilinear or
  # bicubic per image, as timm's RandomResizedCropAndInterpolation) and of every eval resize
  # ('random' evaluates with views.RANDOM_EVAL). Anything but 'bilinear' also follows
  # torchvision's geometry exactly (views module docstring), as timm's transforms do.
  interpolation: str = 'bilinear'
  # timm's crop_pct: the eval crop is cut from the shorter side resized to floor(crop / crop_pct)
  # with torchvision's geometry; 0: eval_resize_size's rule
  eval_crop_pct: float = 0.0
  # 'bit': the square side the whole image is resized to before the random crop (0: image_size)
  train_resize: int = 0

  def __post_init__(self):
    if self.augment not in AUGMENTS:
      raise ValueError(f'config.data.augment={self.augment!r} is not one of {AUGMENTS}')
    check_train_resize(self.augment, self.train_resize, self.image_size)
    auto_augment.parse(self.auto_augment)  # a ValueError names the accepted forms
    imagenet = self.augment in ('imagenet', 'inception')
    if (self.eval_size or self.eval_resize_size) and not imagenet:
      raise ValueError(
        'config.data.eval_image_size / eval_resize set another test resolution, which needs the '
        f"crop-based augment 'imagenet' or 'inception', not {self.augment!r}"
      )
    if self.interpolation not in INTERPOLATIONS:
      raise ValueError(
        f'config.data.interpolation={self.interpolation!r} is not one of {INTERPOLATIONS}'
      )
    if not 0 <= self.eval_crop_pct <= 1:
      raise ValueError(f'config.data.eval_crop_pct must be in (0, 1], got {self.eval_crop_pct}')
    if self.eval_crop_pct and self.eval_resize_size:
      raise ValueError(
        'config.data.eval_crop_pct and config.data.eval_resize both set the eval resize: set one'
      )
    if (self.interpolation != 'bilinear' or self.eval_crop_pct) and not imagenet:
      raise ValueError(
        'config.data.interpolation / eval_crop_pct resample the crops and eval resizes of the '
        f"crop-based augment 'imagenet' or 'inception', not {self.augment!r}"
      )
    if self.eval_resize_size and self.eval_resize_size < self.eval_image_size:
      raise ValueError(
        f'config.data.eval_resize={self.eval_resize_size} is smaller than the eval crop '
        f'{self.eval_image_size} it is cut from'
      )
    if self.decoder not in DECODERS:
      raise ValueError(f'config.data.decoder={self.decoder!r} is not one of {DECODERS}')
    if self.decoder == 'opencv':
      try:
        import cv2  # noqa: F401  (only checks that OpenCV is installed)
      except ImportError as e:
        raise ValueError(
          "config.data.decoder='opencv' needs OpenCV: pip install 'resnet_jax[opencv]'"
        ) from e

  @property
  def pad(self) -> int:
    return max(1, self.image_size // 8) if self.augment in ('cifar', 'translate') else 0

  @property
  def geometry(self) -> str:
    """The eval geometry (views.GEOMETRIES): torchvision's for any timm-style setting."""
    timm = self.interpolation != 'bilinear' or self.eval_crop_pct
    return 'torchvision' if timm else 'pil'

  @property
  def centre_resize(self) -> int:
    """The shorter side that `eval_uint8`'s training-size centre crop is cut from."""
    small = self.augment in ('none', 'cifar', 'translate')
    return self.image_size if small else round(self.image_size * EVAL_RESIZE_RATIO)

  @property
  def eval_image_size(self) -> int:
    return self.eval_size or self.image_size

  @property
  def eval_resize(self) -> int:
    if self.eval_resize_size:
      return self.eval_resize_size
    if self.eval_crop_pct:
      return crop_pct_resize(self.eval_image_size, self.eval_crop_pct)
    return round(self.eval_size * EVAL_RESIZE_RATIO) if self.eval_size else self.centre_resize

  def base_uint8(
    self, image: Any, short: int | None = None, resample: int | None = None
  ) -> np.ndarray:
    """Shorter side resized to `short` (default: `centre_resize`), uint8 [H, W, C].

    `resample` None: bilinear in the pipeline's geometry (the statistics' input); otherwise that
    PIL filter in `self.geometry`.
    """
    short = short or self.centre_resize
    if (
      isinstance(image, np.ndarray)
      and image.dtype == np.uint8
      and image.ndim == 3
      and min(image.shape[:2]) == short
    ):
      return image  # already decoded at the right size (CIFAR, digits): skip the PIL round trip
    img = open_image(image, self.channels)
    if resample is None:
      return to_array(resize_shorter(img, short, self.channels), self.channels)
    img = resize_shorter(img, short, self.channels, resample, self.geometry)
    return to_array(img, self.channels)

  def eval_uint8(self, image: Any) -> np.ndarray:
    """The centre crop at the training size, bilinear in the pipeline's geometry whatever
    `interpolation` says: what the dataset statistics are computed on (so they and their cache
    do not depend on the filter), and the training input of the small-image modes ('bit': its
    eval input, the whole image squashed to image_size)."""
    if self.augment == 'bit':
      return squash(image, self.image_size, self.channels)
    return center_crop(self.base_uint8(image), self.image_size)

  def eval(self, image: Any, crops: int = 1, scale: int | None = None) -> np.ndarray:
    """uint8 [S, S, C] (crops == 1) or [crops, S, S, C]; crops: 1 centre, 2 centre + flip, 10 paper.

    With `scale`, S = scale: the shorter side resized to `scale` and the centred square kept (the
    fully-convolutional multi-scale testing input); otherwise S = eval_image_size, cut from the
    shorter side resized to `eval_resize`. Normalise on the
    device with `DevicePreprocess` (eval: `rng=None`), which knows each view's geometry.
    """
    if crops not in (1, 2, 10):
      raise ValueError(f'crops must be 1, 2 or 10, got {crops}')
    if self.augment == 'bit':  # BiT evaluates the whole image resized to the crop's square
      side = self.image_size if scale is None else int(scale)
      return np.ascontiguousarray(eval_views(squash(image, side, self.channels), crops, side))
    resample, geometry = eval_filter(self.interpolation), self.geometry
    if scale is not None:
      if crops == 10:
        raise ValueError('scale=... supports crops 1 or 2 (image and its flip)')
      base = self.base_uint8(image, int(scale), resample)
      return np.ascontiguousarray(eval_views(base, crops, int(scale), geometry=geometry))
    base = self.base_uint8(image, self.eval_resize, resample)
    return np.ascontiguousarray(eval_views(base, crops, self.eval_image_size, self.pad, geometry))

  def whole_image(self, image: Any, shape: tuple[int, int]) -> np.ndarray:
    """The whole image resized to `shape` = (H, W), uint8 [H, W, C] (Table 4's test input).

    JPEGs are decoded at the smallest DCT scale still at least `shape`, then resized (with the
    eval filter, antialiased when shrinking, as every other eval resize here).
    """
    h, w = (int(v) for v in shape)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape[:2] == (h, w):
      return image if image.ndim == 3 else image[..., None]
    img = decode(open_image(image, self.channels), self.channels, (w, h))
    img = img if img.size == (w, h) else img.resize((w, h), eval_filter(self.interpolation))
    return np.ascontiguousarray(to_array(img, self.channels))

  def train(self, image: Any, rng: np.random.Generator) -> np.ndarray:
    """One uint8 [image_size, image_size, C] training input (random geometry and flip applied,
    then `auto_augment`, whose draws follow the geometry's in `rng`).

    'none' and 'cifar' return the un-augmented image: CIFAR's pad/crop/flip need the normalised
    image (the padding is zero after normalisation), so the device does them.
    """
    # timm's RandAugment resamples with the training interpolation ('random': per operation)
    geometry = self._train_geometry(image, rng)
    return auto_augment.augment_array(geometry, self.auto_augment, rng, self.interpolation)

  def _train_geometry(self, image: Any, rng: np.random.Generator) -> np.ndarray:
    size = self.image_size
    if self.augment in ('none', 'cifar', 'translate'):
      return np.ascontiguousarray(self.eval_uint8(image))
    if self.augment == 'bit':  # BiT: Resize((R, R)), RandomCrop(size), RandomHorizontalFlip
      big = squash(image, self.train_resize or size, self.channels)
      top, left = (int(rng.integers(0, big.shape[0] - size + 1)) for _ in range(2))
      crop = big[top : top + size, left : left + size]
      return np.ascontiguousarray(crop[:, ::-1] if rng.random() < 0.5 else crop)
    img = open_image(image, self.channels)
    w, h = img.size
    if self.augment == 'imagenet':
      # "resize the shorter side to s, then take a random size x size crop", done as: pick the crop
      # in the would-be resized image, map it back to the original, resample only that region.
      lo, hi = (round(size * r) for r in SCALE_AUG_RANGE)
      factor = int(rng.integers(lo, hi + 1)) / min(w, h)
      top = int(rng.integers(0, max(size, round(h * factor)) - size + 1))
      left = int(rng.integers(0, max(size, round(w * factor)) - size + 1))
      left, top, cw, ch = left / factor, top / factor, size / factor, size / factor
    else:  # inception
      left, top, cw, ch = _random_resized_box(rng, w, h)
      factor = size / min(cw, ch)
    interpolation = self.interpolation
    if interpolation == 'random':  # after the box, before the flip: timm's order of draws
      interpolation = RANDOM_CHOICES[int(rng.integers(0, len(RANDOM_CHOICES)))]
    flip = bool(rng.random() < 0.5)
    if self.decoder == 'opencv' and img.format == 'JPEG':
      return crop_opencv(
        _encoded(image),
        self.channels,
        (w, h),
        factor,
        (left, top, cw, ch),
        size,
        flip,
        interpolation,
      )
    img = decode(img, self.channels, (math.ceil(w * factor), math.ceil(h * factor)))  # reduced
    sx, sy = img.size[0] / w, img.size[1] / h
    box = (
      left * sx,
      top * sy,
      min(img.size[0], (left + cw) * sx),
      min(img.size[1], (top + ch) * sy),
    )
    cut = self.interpolation != 'bilinear'  # torchvision's crop-then-resize (timm parity)
    img = resized_crop(img, box, size, PIL_FILTERS[interpolation], cut)
    if flip:
      img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # 7x cheaper than a NumPy mirror copy
    return np.ascontiguousarray(to_array(img, self.channels))
