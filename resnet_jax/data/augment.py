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
Eval ('imagenet'/'inception'): shorter side resized to image_size*256/224, then centre / 10 crops;
`scale=S` gives a centred S x S square at shorter side S. The paper's Table 4 testing uses the
whole image instead (`whole_image_shape`, `Preprocessor.whole_image`, `resnet_jax.multiscale`).
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any

import numpy as np
from PIL import Image

from resnet_jax.data import auto_augment

AUGMENTS = ('none', 'cifar', 'translate', 'imagenet', 'inception')
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


def _encoded(image: Any) -> bytes:
  return image.item() if isinstance(image, np.ndarray) else bytes(image)


def _crop_opencv(
  data: bytes,
  channels: int,
  wh: tuple[int, int],
  factor: float,
  box: tuple[float, float, float, float],
  size: int,
  flip: bool,
) -> np.ndarray:
  """OpenCV's decode at 1/2, 1/4, 1/8 (when still >= `factor` x the image), crop of `box` (in
  original pixels, rounded outwards), bilinear resize to size x size, mirrored when `flip`.

  uint8 [size, size, channels] RGB. The DCT-domain reduction already low-passes, so what remains
  is a shrink by less than 2x (or a growth), done with plain bilinear interpolation as the
  TensorFlow reference ImageNet pipelines do (`decode_and_crop_jpeg` + `resize_bilinear`):
  OpenCV's area filter cost 6x as much (0.33 against 0.06 ms per 224x224 crop).
  """
  import cv2  # pylint: disable=g-import-not-at-top

  cv2.setNumThreads(1)  # one Grain worker = one core
  w, h = wh
  k = next(
    (
      k
      for k in (8, 4, 2)
      if math.ceil(w / k) >= math.ceil(w * factor) and math.ceil(h / k) >= math.ceil(h * factor)
    ),
    1,
  )
  grey = channels == 1
  flag = {
    1: cv2.IMREAD_GRAYSCALE if grey else cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_GRAYSCALE_2 if grey else cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_GRAYSCALE_4 if grey else cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_GRAYSCALE_8 if grey else cv2.IMREAD_REDUCED_COLOR_8,
  }[k]
  array = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
  if array is None:
    raise ValueError(f'OpenCV could not decode a {len(data)}-byte JPEG ({w}x{h} in its header)')
  sx, sy = array.shape[1] / w, array.shape[0] / h
  left, top, cw, ch = box
  x0, y0 = int(left * sx), int(top * sy)
  x1 = max(x0 + 1, min(array.shape[1], math.ceil((left + cw) * sx)))
  y1 = max(y0 + 1, min(array.shape[0], math.ceil((top + ch) * sy)))
  crop = array[y0:y1, x0:x1]
  out = cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR)
  if not grey:
    out = cv2.cvtColor(out, cv2.COLOR_BGR2RGB)
  if flip:
    out = cv2.flip(out, 1)  # a strided NumPy copy of the mirror costs 7x as much
  return out[..., None] if grey else out


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


def eval_views(array: np.ndarray, crops: int, size: int, pad: int = 0) -> np.ndarray:
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
    return ten_crops(array, size)
  centre = center_crop(array, size)
  return np.stack([centre, centre[:, ::-1]]) if crops == 2 else centre


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

  def __post_init__(self):
    if self.augment not in AUGMENTS:
      raise ValueError(f'config.data.augment={self.augment!r} is not one of {AUGMENTS}')
    auto_augment.parse(self.auto_augment)  # a ValueError names the accepted forms
    if (self.eval_size or self.eval_resize_size) and self.augment not in ('imagenet', 'inception'):
      raise ValueError(
        'config.data.eval_image_size / eval_resize set another test resolution, which needs the '
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
    return round(self.eval_size * EVAL_RESIZE_RATIO) if self.eval_size else self.centre_resize

  def base_uint8(self, image: Any, short: int | None = None) -> np.ndarray:
    """Shorter side resized to `short` (default: `centre_resize`), uint8 [H, W, C]."""
    short = short or self.centre_resize
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
    """The centre crop at the training size (what the dataset statistics are computed on; the
    evaluation input too unless `eval_size` / `eval_resize_size` say otherwise)."""
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
    if scale is not None:
      if crops == 10:
        raise ValueError('scale=... supports crops 1 or 2 (image and its flip)')
      return np.ascontiguousarray(eval_views(self.base_uint8(image, int(scale)), crops, int(scale)))
    return np.ascontiguousarray(
      eval_views(self.base_uint8(image, self.eval_resize), crops, self.eval_image_size, self.pad)
    )

  def whole_image(self, image: Any, shape: tuple[int, int]) -> np.ndarray:
    """The whole image resized to `shape` = (H, W), uint8 [H, W, C] (Table 4's test input).

    JPEGs are decoded at the smallest DCT scale still at least `shape`, then resized (bilinear,
    antialiased when shrinking, as every other eval resize here).
    """
    h, w = (int(v) for v in shape)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape[:2] == (h, w):
      return image if image.ndim == 3 else image[..., None]
    img = decode(open_image(image, self.channels), self.channels, (w, h))
    img = img if img.size == (w, h) else img.resize((w, h), Image.BILINEAR)
    return np.ascontiguousarray(to_array(img, self.channels))

  def train(self, image: Any, rng: np.random.Generator) -> np.ndarray:
    """One uint8 [image_size, image_size, C] training input (random geometry and flip applied,
    then `auto_augment`, whose draws follow the geometry's in `rng`).

    'none' and 'cifar' return the un-augmented image: CIFAR's pad/crop/flip need the normalised
    image (the padding is zero after normalisation), so the device does them.
    """
    return auto_augment.augment_array(self._train_geometry(image, rng), self.auto_augment, rng)

  def _train_geometry(self, image: Any, rng: np.random.Generator) -> np.ndarray:
    size = self.image_size
    if self.augment in ('none', 'cifar', 'translate'):
      return np.ascontiguousarray(self.eval_uint8(image))
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
    flip = bool(rng.random() < 0.5)
    if self.decoder == 'opencv' and img.format == 'JPEG':
      return _crop_opencv(
        _encoded(image), self.channels, (w, h), factor, (left, top, cw, ch), size, flip
      )
    img = decode(img, self.channels, (math.ceil(w * factor), math.ceil(h * factor)))  # reduced
    sx, sy = img.size[0] / w, img.size[1] / h
    box = (
      left * sx,
      top * sy,
      min(img.size[0], (left + cw) * sx),
      min(img.size[1], (top + ch) * sy),
    )
    img = img.resize((size, size), Image.BILINEAR, box=box)
    if flip:
      img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # 7x cheaper than a NumPy mirror copy
    return np.ascontiguousarray(to_array(img, self.channels))
