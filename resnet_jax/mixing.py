"""Mixup and CutMix inside the jitted train step, on the normalised batch (torchvision's recipe).

torchvision's reference trainer (references/classification/train.py and transforms.py,
github.com/pytorch/vision, `RandomChoice([RandomMixup(p=1.0), RandomCutmix(p=1.0)])` in its
collate function) mixes every batch: it picks Mixup or CutMix with equal probability, draws one
lambda ~ Beta(alpha, alpha) for the whole batch, pairs each example with its neighbour
(`batch.roll(1, 0)`), and mixes the one-hot targets with the same weights. CutMix cuts one box,
centred uniformly, of side sqrt(1 - lambda) times the image's (`int()` of the half sides), clips
it to the image and recomputes lambda from the clipped box's area. The loss then smooths the mixed
target (`CrossEntropyLoss(label_smoothing=...)` with probability targets); its train accuracy is
measured against the mixed target's argmax, the dominant label: so is our train `top1_error`.

One difference, so that no example moves between devices: the partner of example i is i ^ 1 (the
other one of its adjacent pair), not i - 1. Pairs lie inside each device's share and inside each
of its gradient-accumulation micro-batches whenever those hold an even number of examples
(`validate` requires it), and the pairing is a function of the global batch alone: a run is the
same on 1 device or 1,000. Every random draw (the choice, lambda, the box) is one scalar per
batch from the step's key, so a resumed run mixes exactly as the uninterrupted one.

Fields (`config.data`): `mixup_alpha`, `cutmix_alpha` (0: that one is off; both 0: no mixing, the
step is exactly the one without this module), `mix_prob` (probability that a batch is mixed at
all; torchvision 1.0) and `mix_switch_prob` (probability of CutMix when both are on; torchvision's
`RandomChoice` 0.5).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from resnet_jax.validation import ConfigError


def partners(x: jax.Array) -> jax.Array:
  """`x` with each adjacent pair (2k, 2k+1) swapped along the batch axis: example i's partner.

  A reshape and a reverse of the size-2 axis: with an even share per device, no data moves
  between devices (a gather by index would make XLA all-gather the batch).
  """
  b = x.shape[0]
  pairs = x.reshape((b // 2, 2) + x.shape[1:])
  return pairs[:, ::-1].reshape(x.shape)


def cutmix_box(
  rng: jax.Array, lam: jax.Array, height: int, width: int
) -> tuple[jax.Array, jax.Array]:
  """(mask [H, W] of the pixels taken from the partner, lambda recomputed from the clipped box).

  torchvision's `RandomCutmix`: centre (r_x, r_y) uniform over the pixels, half sides
  int(0.5 * sqrt(1 - lam) * W) and int(... * H), clipped to the image.
  """
  kx, ky = jax.random.split(rng)
  r_x = jax.random.randint(kx, (), 0, width)
  r_y = jax.random.randint(ky, (), 0, height)
  r = 0.5 * jnp.sqrt(1.0 - lam)
  half_w = jnp.floor(r * width).astype(jnp.int32)
  half_h = jnp.floor(r * height).astype(jnp.int32)
  x1, x2 = jnp.maximum(r_x - half_w, 0), jnp.minimum(r_x + half_w, width)
  y1, y2 = jnp.maximum(r_y - half_h, 0), jnp.minimum(r_y + half_h, height)
  ys = jnp.arange(height)[:, None]
  xs = jnp.arange(width)[None, :]
  mask = (ys >= y1) & (ys < y2) & (xs >= x1) & (xs < x2)
  area = ((x2 - x1) * (y2 - y1)).astype(jnp.float32)
  return mask, 1.0 - area / (height * width)


@dataclasses.dataclass(frozen=True)
class Mixing:
  """Mixup / CutMix of a normalised batch; `__call__` is traced into the train step."""

  num_classes: int
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  prob: float = 1.0
  switch_prob: float = 0.5

  def __call__(
    self, images: jax.Array, labels: jax.Array, rng: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    """(mixed images [B, H, W, C], soft targets [B, num_classes] summing to 1)."""
    k_apply, k_switch, k_mixup, k_cutmix, k_box = jax.random.split(rng, 5)
    _, h, w, _ = images.shape
    other = partners(images)
    use_cutmix = self._use_cutmix(k_switch)
    lam = jnp.ones((), jnp.float32)
    mixed = images
    if self.mixup_alpha > 0:
      lam_mixup = jax.random.beta(k_mixup, self.mixup_alpha, self.mixup_alpha)
      mixed = lam_mixup * images + (1.0 - lam_mixup) * other
      lam = lam_mixup
    if self.cutmix_alpha > 0:
      lam_cut = jax.random.beta(k_cutmix, self.cutmix_alpha, self.cutmix_alpha)
      mask, lam_cut = cutmix_box(k_box, lam_cut, h, w)
      cut = jnp.where(mask[None, :, :, None], other, images)
      mixed = jnp.where(use_cutmix, cut, mixed)
      lam = jnp.where(use_cutmix, lam_cut, lam)
    apply = jax.random.bernoulli(k_apply, self.prob)
    mixed = jnp.where(apply, mixed, images)
    lam = jnp.where(apply, lam, 1.0)
    one_hot = jax.nn.one_hot(labels, self.num_classes, dtype=jnp.float32)
    targets = lam * one_hot + (1.0 - lam) * partners(one_hot)
    return mixed.astype(images.dtype), targets

  def _use_cutmix(self, rng: jax.Array) -> jax.Array:
    if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
      return jax.random.bernoulli(rng, self.switch_prob)
    return jnp.asarray(self.cutmix_alpha > 0)


def from_config(config: ml_collections.ConfigDict, num_classes: int) -> Mixing | None:
  """The configured mixing, or None when both alphas are 0 (the step is then left as it was)."""
  d = config.data
  if not (d.mixup_alpha > 0 or d.cutmix_alpha > 0):
    return None
  return Mixing(
    num_classes=int(num_classes),
    mixup_alpha=float(d.mixup_alpha),
    cutmix_alpha=float(d.cutmix_alpha),
    prob=float(d.mix_prob),
    switch_prob=float(d.mix_switch_prob),
  )


def validate(config: ml_collections.ConfigDict, n_devices: int) -> None:
  """Refuses mixing values that cannot give a correct run, before anything is written."""
  d = config.data
  for key in ('mixup_alpha', 'cutmix_alpha'):
    if d[key] < 0:
      raise ConfigError(f'data.{key} must be >= 0 (0: off), got {d[key]}')
  for key in ('mix_prob', 'mix_switch_prob'):
    if not 0 <= d[key] <= 1:
      raise ConfigError(f'data.{key} must be a probability in [0, 1], got {d[key]}')
  if not (d.mixup_alpha > 0 or d.cutmix_alpha > 0):
    return
  per_micro = config.batch_size // max(n_devices, 1) // max(config.grad_accum_steps, 1)
  if per_micro % 2:
    raise ConfigError(
      f"data.mixup_alpha/cutmix_alpha pair adjacent examples inside each device's share: the "
      f'{per_micro} examples per device{" and micro-batch" if config.grad_accum_steps > 1 else ""}'
      f' (batch_size {config.batch_size} / {n_devices} devices'
      f'{f" / {config.grad_accum_steps} grad_accum_steps" if config.grad_accum_steps > 1 else ""})'
      ' must be even'
    )
