"""The per-pixel half of preprocessing, run inside the jitted step on the accelerator.

The host pipeline (`augment.Preprocessor`) emits uint8 images; this module turns them into the
model's float32 input: per-pixel mean / mean_std / scale normalisation, the AlexNet PCA lighting of
the paper's ImageNet recipe, CIFAR's pad + random crop + flip ('translate': no flip; the zero
padding lives in normalised space, so it has to follow the normalisation) and random erasing.
Doing this on the device keeps a quarter of the bytes in Grain's shared memory and the
host-to-device copy, and takes the float work off the host cores.

Randomness comes from a JAX key (the step compiler passes one derived from the seed and the step),
so an augmented batch is a function of (seed, step, host batch): deterministic, resumable, and the
same for any process or device count (keys are drawn for the global batch).

Usage: `pre = make_device_preprocess(config)`; in the train step `x = pre(images, rng=key)`; in eval
`x = pre(images, rng=None)` with images [b, H, W, C] or [b, crops, H, W, C].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnet_jax.data import augment as augment_lib
from resnet_jax.data import pipeline


@dataclasses.dataclass(frozen=True, eq=False)
class DevicePreprocess:
  """uint8 images -> normalised float32 model input; pure jnp, traced into the caller's jit.

  Statistics are NumPy arrays: they become constants of the compiled step (a per-pixel mean is
  resized with PIL for other eval scales at trace time, exactly as the host did before).
  """

  augment: str
  image_size: int
  normalizer: augment_lib.Normalizer
  pca_eigvals: np.ndarray | None = None
  pca_eigvecs: np.ndarray | None = None
  erase_prob: float = 0.0  # random erasing's probability per training image (data.random_erasing)

  @property
  def pad(self) -> int:
    return augment_lib.Preprocessor(self.augment, self.image_size, 1).pad

  def __call__(self, images: jax.Array, *, rng: jax.Array | None) -> jax.Array:
    """Training (`rng` a key): images [b, H, W, C]. Eval (`rng=None`): [b, H, W, C] or
    [b, crops, H, W, C] as the eval iterator built them (crops 1, 2 or 10)."""
    if rng is None:
      return self._eval(images)
    if images.ndim != 4:
      raise ValueError(f'training images must be [b, H, W, C], got shape {images.shape}')
    return self._train(images, rng)

  def _std(self) -> np.ndarray:
    return np.asarray(self.normalizer.std, np.float32)

  def _train(self, images: jax.Array, rng: jax.Array) -> jax.Array:
    b, h, w, c = images.shape
    pca_key, crop_key, flip_key = jax.random.split(rng, 3)
    x = images.astype(jnp.float32)
    if self.augment == 'imagenet' and self.pca_eigvals is not None:
      alpha = jax.random.normal(pca_key, (b, c), jnp.float32) * augment_lib.PCA_ALPHA_STD
      shift = (alpha * jnp.asarray(self.pca_eigvals)) @ jnp.asarray(self.pca_eigvecs).T * 255.0
      x = x + shift[:, None, None, :]
    x = (x - self.normalizer.mean_for((h, w)).astype(np.float32)) / self._std()
    if self.pad:
      p = self.pad
      x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
      offsets = jax.random.randint(crop_key, (b, 2), 0, 2 * p + 1)
      x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(x, offsets)
    if self.augment == 'cifar':
      flip = jax.random.bernoulli(flip_key, 0.5, (b,))
      x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)
    if self.erase_prob > 0:  # its own stream: the keys above stay what they were without it
      x = random_erasing(x, jax.random.fold_in(rng, _ERASE_STREAM), self.erase_prob)
    return x

  def _eval(self, images: jax.Array) -> jax.Array:
    crops = 1 if images.ndim == 4 else images.shape[1]
    size, c = images.shape[-2], images.shape[-1]
    mean = self.normalizer.mean_for(tuple(images.shape[-3:-1]))
    if self.pad and np.ndim(mean) == 3:  # views of the padded image: each its own mean, pad stays 0
      ones = np.ones(mean.shape[:2] + (c,), np.float32)
      valid = augment_lib.eval_views(ones, crops, size, self.pad)
      mean = augment_lib.eval_views(
        np.broadcast_to(mean, mean.shape[:2] + (c,)), crops, size, self.pad
      )
    else:
      valid = None
      if np.ndim(mean) == 3 and crops == 2:  # the host flipped the normalised centre view before
        mean = np.stack([mean, mean[:, ::-1]])
      if self.pad:  # per-channel statistics: padding is zero after normalisation too
        valid = augment_lib.eval_views(np.ones((size, size, c), np.float32), crops, size, self.pad)
    x = (images.astype(jnp.float32) - np.asarray(mean, np.float32)) / self._std()
    return x if valid is None else x * valid


_ERASE_STREAM = 0xE5A5E
ERASE_SCALE = (0.02, 0.33)  # torchvision's RandomErasing defaults: the erased area's fraction
ERASE_RATIO = (0.3, 3.3)  # and its aspect ratio (height / width)
_ERASE_ATTEMPTS = 10


def random_erasing(x: jax.Array, key: jax.Array, prob: float) -> jax.Array:
  """torchvision's ``RandomErasing(p=prob)`` (Zhong et al. 2017) on normalised images [b, H, W, C].

  With probability `prob` an image gets one rectangle set to 0 (the mean, as torchvision's
  `value=0` after `Normalize`): area a uniform fraction of `ERASE_SCALE`, log-aspect uniform in
  `ERASE_RATIO`, the first of 10 draws that fits inside the image (none fits: not erased), then a
  uniform position. Per image, so no example moves between devices.
  """
  b, h, w, _ = x.shape
  k_apply, k_scale, k_ratio, k_top, k_left = jax.random.split(key, 5)
  scale = jax.random.uniform(
    k_scale, (b, _ERASE_ATTEMPTS), minval=ERASE_SCALE[0], maxval=ERASE_SCALE[1]
  )
  log_ratio = jax.random.uniform(
    k_ratio, (b, _ERASE_ATTEMPTS), minval=np.log(ERASE_RATIO[0]), maxval=np.log(ERASE_RATIO[1])
  )
  area, ratio = h * w * scale, jnp.exp(log_ratio)
  eh = jnp.round(jnp.sqrt(area * ratio)).astype(jnp.int32)
  ew = jnp.round(jnp.sqrt(area / ratio)).astype(jnp.int32)
  fits = (eh < h) & (ew < w)
  first = jnp.argmax(fits, axis=1)  # the first attempt that fits (0 when none does: masked below)
  eh = jnp.take_along_axis(eh, first[:, None], axis=1)[:, 0]
  ew = jnp.take_along_axis(ew, first[:, None], axis=1)[:, 0]
  top = jnp.floor(jax.random.uniform(k_top, (b,)) * (h - eh + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(k_left, (b,)) * (w - ew + 1)).astype(jnp.int32)
  erase = jax.random.bernoulli(k_apply, prob, (b,)) & fits.any(axis=1)
  rows = jnp.arange(h)[None, :]
  cols = jnp.arange(w)[None, :]
  in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])
  in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])
  inside = in_rows[:, :, None] & in_cols[:, None, :] & erase[:, None, None]
  return jnp.where(inside[..., None], 0.0, x)


def make_device_preprocess(config: ml_collections.ConfigDict) -> DevicePreprocess:
  """The device half of the configured preprocessing, with the train split's cached statistics."""
  host = pipeline.make_preprocessor(config)
  norm = pipeline.make_normalization(config)
  return DevicePreprocess(
    host.augment,
    host.image_size,
    norm.normalizer,
    norm.pca_eigvals,
    norm.pca_eigvecs,
    float(config.data.random_erasing),
  )
