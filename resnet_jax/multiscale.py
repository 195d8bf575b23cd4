"""He et al. 2015 Table 4 testing: the whole image, fully convolutional, averaged over scales.

Sec. 3.4: the shorter side is resized to S in {224, 256, 384, 480, 640}, the whole S x L image goes
through the net (global average pooling makes any size work), and the class scores are averaged
over the scales. Images differ in aspect ratio, so a batch cannot hold them all at one shape:
every image is resized to `augment.whole_image_shape(h, w, S, stride)` (the longer side moved to
the nearest whole number of network strides past S, at most stride/2 pixels from the exact
aspect) and images of one shape are batched together; a shape's last batch is padded with
masked-out slots. Orientation is kept: portrait images are (L, S), landscape (S, L).

Exact-once on any process count: every process reads the (h, w, label) of its own examples (i % P
== p), the sizes are all-gathered, and every process derives the same plan: for each scale and
shape, as many batches as the busiest process needs. Example i stays on process i % P at every
scale, so its probabilities are summed there; the per-example averages are then scored in one
sharded `metric_sums` (sums over every process). `crops=2` adds the horizontal flip (flipped on
the device, averaged with the image, as VGG's dense evaluation does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from typing import Any, Callable, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from resnet_jax.data import augment as augment_lib
from resnet_jax.data.pipeline import prefetched
from resnet_jax.data.split import damage_named
from resnet_jax.models.stems import STEM_STRIDES
from resnet_jax.train_step import batch_sharding, device_batch, metric_sums, replicated

logger = logging.getLogger(__name__)

_SIZE_CHUNK = 256  # examples per host batch of the size pass


def network_stride(model: Any) -> int:
  """Input pixels per pixel of the net's last feature map (32: ImageNet nets, 4: CIFAR nets)."""
  geometry = getattr(model, 'stage_geometry', None)
  stem = getattr(model, 'stem', None)
  if geometry is None or stem not in STEM_STRIDES:
    raise ValueError(f'cannot tell the total stride of {type(model).__name__}: pass stride=')
  return math.prod(s for s, _, _ in geometry()) * STEM_STRIDES[stem]


@dataclasses.dataclass(frozen=True)
class Bucket:
  """One scale's batches of one shape on this process: `indices[k]` is batch k (-1: padding)."""

  scale: int
  shape: tuple[int, int]
  indices: np.ndarray  # int64 [num_batches, local_batch]


def plan(
  sizes: np.ndarray,
  scales: Sequence[int],
  step: int,
  local_batch: int,
  process_index: int,
  process_count: int,
) -> list[Bucket]:
  """This process's batches: every example i with i % process_count == process_index exactly once
  per scale; every process gets the same sequence of (scale, shape, number of batches)."""
  n = len(sizes)
  owner = np.arange(n) % process_count
  out = []
  for scale in scales:
    shapes = np.array(
      [augment_lib.whole_image_shape(int(h), int(w), int(scale), step) for h, w in sizes],
      np.int64,
    ).reshape(n, 2)
    for shape in np.unique(shapes, axis=0):
      members = np.flatnonzero(np.all(shapes == shape, axis=1))
      busiest = np.bincount(owner[members], minlength=process_count).max()
      mine = members[owner[members] == process_index]
      slots = np.full(math.ceil(busiest / local_batch) * local_batch, -1, np.int64)
      slots[: len(mine)] = mine
      out.append(Bucket(int(scale), (int(shape[0]), int(shape[1])), slots.reshape(-1, local_batch)))
  return out


class _SizeAndLabel:
  """grain map: example index -> [h, w, label] (encoded images: header only)."""

  def __init__(self, records, channels: int):
    self._records, self._channels = records, channels

  def __call__(self, index: int) -> np.ndarray:
    record = self._records[int(index)]
    h, w = augment_lib.image_hw(record['image'], self._channels)
    return np.array([h, w, int(record['label'])], np.int64)


class _Slot:
  """grain map: (example index or -1, H, W) -> uint8 [H, W, C] image (zeros for padding)."""

  def __init__(self, records, preprocessor: Any, slots: np.ndarray):
    self._records, self._pre, self._slots = records, preprocessor, slots

  def __call__(self, position: int) -> np.ndarray:
    index, h, w = (int(v) for v in self._slots[position])
    if index < 0:
      return np.zeros((h, w, self._pre.channels), np.uint8)
    record = self._records[index]
    with damage_named(record):
      return self._pre.whole_image(record['image'], (h, w))


def gather_sizes(
  records, channels: int, config: Any, process_index: int, process_count: int
) -> tuple[np.ndarray, np.ndarray]:
  """((h, w) of every example [N, 2], labels of this process's examples [ceil(N / P)])."""
  n = len(records)
  rows = math.ceil(n / process_count)
  own = np.arange(process_index, n, process_count)
  local = np.full((rows, 3), -1, np.int64)
  if len(own):
    ds = grain.MapDataset.source(own).map(_SizeAndLabel(records, channels)).batch(_SIZE_CHUNK)
    with contextlib.closing(iter(prefetched(ds, config))) as chunks:
      local[: len(own)] = np.concatenate(list(chunks))
  if process_count > 1:
    every = np.asarray(multihost_utils.process_allgather(local))  # [P, rows, 3]
  else:
    every = local[None]
  sizes = every.transpose(1, 0, 2).reshape(-1, 3)[:n, :2]  # row j of process p is p + P * j
  return sizes, local[:, 2]


def _normalize(images: jax.Array, normalizer: augment_lib.Normalizer | None) -> jax.Array:
  x = images.astype(jnp.float32)
  if normalizer is None:
    return x
  mean = np.asarray(normalizer.mean_for(tuple(images.shape[1:3])), np.float32)
  return (x - mean) / np.asarray(normalizer.std, np.float32)


def _probabilities_fn(
  apply_fn: Callable, normalizer: augment_lib.Normalizer | None, crops: int, mesh: Mesh
) -> Callable:
  """jit: (variables, uint8 [b, H, W, C]) -> softmax [b, classes] (crops=2: with its flip)."""

  def probs(variables, images):
    x = _normalize(images, normalizer)
    if crops == 2:
      x = jnp.concatenate([x, x[:, :, ::-1]])
    p = jax.nn.softmax(apply_fn(variables, x, train=False).astype(jnp.float32))
    return p if crops == 1 else 0.5 * (p[: images.shape[0]] + p[images.shape[0] :])

  sharding = batch_sharding(mesh)
  return jax.jit(probs, in_shardings=(replicated(mesh), sharding), out_shardings=sharding)


@dataclasses.dataclass
class PerExample:
  """This process's examples (i % P == p): index, softmax averaged over scales, label."""

  indices: np.ndarray  # [n_p]
  probs: np.ndarray  # float32 [n_p, classes]
  labels: np.ndarray  # int32 [n_p]


def whole_image_probabilities(
  apply_fn: Callable,
  variables: Any,
  records,
  preprocessor: Any,
  mesh: Mesh,
  config: Any,
  *,
  scales: Sequence[int],
  stride: int,
  global_batch: int,
  normalizer: augment_lib.Normalizer | None = None,
  crops: int = 1,
) -> PerExample:
  """Every example's softmax averaged over `scales` (whole image, shorter side S), on this process.

  `preprocessor`: an `augment.Preprocessor` (its `channels` and `whole_image`); `config`: only
  `data.prefetch` / `data.num_workers` are read. `global_batch` must divide over the devices.
  """
  if crops not in (1, 2):
    raise ValueError(f'whole-image testing takes crops 1 or 2 (image and its flip), not {crops}')
  if not scales or any(int(s) < 1 for s in scales):
    raise ValueError(f'scales must be positive image sizes, got {list(scales)}')
  p, n_proc = jax.process_index(), jax.process_count()
  if global_batch % mesh.devices.size or global_batch < 1:
    raise ValueError(f'global batch {global_batch} does not divide over the devices')
  if not len(records):
    raise ValueError('the split is empty')
  local_batch = global_batch // n_proc
  sizes, labels = gather_sizes(records, preprocessor.channels, config, p, n_proc)
  buckets = plan(sizes, scales, stride, local_batch, p, n_proc)
  slots = np.concatenate(
    [
      np.stack([b.indices.ravel(), *(np.full(b.indices.size, v) for v in b.shape)], axis=1)
      for b in buckets
    ]
  )
  batch_indices = [i for b in buckets for i in b.indices]
  ds = grain.MapDataset.range(len(slots)).map(_Slot(records, preprocessor, slots))
  probs_fn = _probabilities_fn(apply_fn, normalizer, crops, mesh)
  rows = len(labels)
  sums: np.ndarray | None = None
  hits = np.zeros(rows, np.int64)
  pending: list[tuple[np.ndarray, jax.Array]] = []

  def flush() -> None:
    nonlocal sums
    for indices, out in pending:
      local = np.asarray(multihost_utils.global_array_to_host_local_array(out, mesh, P('data')))
      if sums is None:
        sums = np.zeros((rows, local.shape[-1]), np.float64)
      keep = indices >= 0
      np.add.at(sums, indices[keep] // n_proc, local[keep])
      np.add.at(hits, indices[keep] // n_proc, 1)
    pending.clear()

  for scale in scales:
    mine = [b for b in buckets if b.scale == scale]
    logger.info(
      'scale %d: %d shapes, %d batches', scale, len(mine), sum(len(b.indices) for b in mine)
    )
  with contextlib.closing(iter(prefetched(ds.batch(local_batch), config))) as batches:
    for indices, images in zip(batch_indices, batches):
      out = probs_fn(variables, device_batch({'image': images}, mesh, ('image',))['image'])
      flush()  # the previous batch's result, while this one computes
      pending.append((indices, out))
    flush()
  own = np.arange(p, len(records), n_proc)
  if not np.all(hits[: len(own)] == len(scales)) or np.any(hits[len(own) :]):
    raise RuntimeError('multi-scale plan error: an example was not seen once per scale')
  probs = (sums[: len(own)] / len(scales)).astype(np.float32) if sums is not None else None
  return PerExample(own, probs, labels[: len(own)].astype(np.int32))


def metric_totals(per_example: PerExample, mesh: Mesh, num_examples: int) -> dict[str, jax.Array]:
  """`metric_sums` over the examples of every process (one sharded jit: sums span the processes)."""
  n_proc = jax.process_count()
  rows = math.ceil(num_examples / n_proc)
  local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  rows = math.ceil(rows / local) * local
  probs = per_example.probs
  classes = probs.shape[-1] if probs is not None else 1
  padded = {
    'probs': np.full((rows, classes), 1.0 / classes, np.float32),
    'label': np.zeros(rows, np.int32),
    'mask': np.zeros(rows, bool),
  }
  k = len(per_example.indices)
  if k:
    padded['probs'][:k], padded['label'][:k], padded['mask'][:k] = probs, per_example.labels, True
  batch = device_batch(padded, mesh, ('probs', 'label', 'mask'))
  sums_fn = jax.jit(metric_sums, out_shardings=replicated(mesh))
  return sums_fn(batch['probs'], batch['label'], batch['mask'])
