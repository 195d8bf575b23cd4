"""Grain train/eval pipelines: deterministic, per-process sharded, resumable, exact-once evaluation.

Layout shared by train and eval: the global stream of examples is cut into global batches of
`local_batch_size * process_count`; process p takes the p-th contiguous `local_batch_size` slice of
each, so concatenating the processes' batches in process order gives the same global batch for any
process count. Batching happens inside the `MapDataset` (before `mp_prefetch`), so worker processes
produce whole local batches and the iterator state is one index: `get_state()` / `set_state()`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags

from resnet_jax.data import augment as augment_lib
from resnet_jax.data import shared_memory, sources
from resnet_jax.data import stats as stats_lib
from resnet_jax.data import workers as worker_processes
from resnet_jax.data.split import damage_named, named_classes

NORMALIZATIONS = ('per_pixel_mean', 'mean_std', 'scale', 'inception')
_SYNTHETIC_STATS_EXAMPLES = 256


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and training loop need to know about the configured dataset."""

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]  # model input H, W, C after preprocessing
  num_train_examples: int
  num_eval_examples: int
  eval_split: str
  # what each label names (`split.named_classes`): descriptive, so not part of equality
  class_names: tuple[str, ...] | None = dataclasses.field(default=None, compare=False)


def _image_size(config: ml_collections.ConfigDict, source: sources.SplitSource) -> int:
  size = config.data.image_size
  if size:
    return int(size)
  if source.native_shape[0] is None:
    raise ValueError(
      f'config.data.image_size must be set for {config.data.name} (variable-size images)'
    )
  return int(source.native_shape[0])


def get_dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
  """Sizes, classes and model input shape (prepares `digits` on first use; DatasetNotFoundError)."""
  train = sources.open_split(config, str(config.data.train_split))
  eval_split = str(config.data.eval_split)
  evaluation = sources.open_split(config, eval_split)
  size = _image_size(config, train)
  return DatasetInfo(
    str(config.data.name),
    train.num_classes,
    (size, size, train.native_shape[2]),
    len(train),
    len(evaluation),
    eval_split,
    named_classes(train.class_names),
  )


def _normalizer(kind: str, stats: dict[str, np.ndarray]) -> augment_lib.Normalizer:
  if kind == 'per_pixel_mean':  # the paper; a scalar std keeps the input at unit scale
    return augment_lib.Normalizer(stats['pixel_mean'], np.asarray(stats['pixel_std'], np.float32))
  if kind == 'mean_std':
    return augment_lib.Normalizer(stats['channel_mean'], stats['channel_std'])
  if kind in ('scale', 'inception'):  # [0, 1]; inception: [-1, 1] (BiT's, timm's mean=std=0.5)
    mean, std = (127.5, 127.5) if kind == 'inception' else (0.0, 255.0)
    return augment_lib.Normalizer(np.asarray(mean, np.float32), np.asarray(std, np.float32))
  raise ValueError(f'config.data.normalize={kind!r} is not one of {NORMALIZATIONS}')


def make_preprocessor(config: ml_collections.ConfigDict) -> augment_lib.Preprocessor:
  """The configured host augmentation (geometry only: it emits uint8)."""
  train = sources.open_split(config, str(config.data.train_split))
  return augment_lib.Preprocessor(
    str(config.data.augment),
    _image_size(config, train),
    train.native_shape[2],
    str(config.data.decoder),
    str(config.data.auto_augment),
    int(config.data.eval_image_size or 0),
    int(config.data.eval_resize or 0),
    # read with defaults: configs and saved runs from before these fields lack them
    str(config.data.get('interpolation', 'bilinear')),
    float(config.data.get('eval_crop_pct', 0.0) or 0.0),
    int(config.data.get('train_resize', 0) or 0),
  )


@dataclasses.dataclass(frozen=True)
class Normalization:
  """What the device applies to the host's uint8 images: (x - mean) / std, PCA lighting."""

  normalizer: augment_lib.Normalizer
  pca_eigvals: np.ndarray | None  # (C,) eigenvalues of the RGB covariance (pixels in [0, 1])
  pca_eigvecs: np.ndarray | None  # (C, C) columns = eigenvectors


def make_normalization(config: ml_collections.ConfigDict) -> Normalization:
  """Normalisation and PCA statistics of the train split (computed once, cached beside the data)."""
  data = config.data
  train_split = str(data.train_split)
  train = sources.open_split(config, train_split)
  base = make_preprocessor(config)
  kind = str(data.normalize)
  if kind not in NORMALIZATIONS:
    raise ValueError(f'config.data.normalize={kind!r} is not one of {NORMALIZATIONS}')
  if kind in ('scale', 'inception') and base.augment != 'imagenet':
    return Normalization(_normalizer(kind, {}), None, None)
  h, w = train.native_shape[:2]
  small = h is not None and h * w <= 64 * 64
  if data.name == 'synthetic':
    limit = _SYNTHETIC_STATS_EXAMPLES
  else:
    limit = stats_lib.MAX_EXAMPLES_SMALL if small else stats_lib.MAX_EXAMPLES_LARGE
  key = {
    'v': stats_lib.VERSION,
    'name': data.name,
    'cache_dir': train.cache_dir,
    'split': train_split,
    'n': len(train),
    'validation_size': int(data.validation_size or 0),
    'size': base.image_size,
    'resize': base.centre_resize,
    'limit': limit,
    'synthetic': ([data.channels, data.num_classes] if data.name == 'synthetic' else None),
  }
  stats = stats_lib.cached_stats(
    key,
    None if data.name == 'synthetic' else train.cache_dir,
    lambda: stats_lib.compute_stats(_Decoded(train.records, base.eval_uint8), np.asarray, limit),
  )
  return Normalization(_normalizer(kind, stats), stats['pca_eigvals'], stats['pca_eigvecs'])


class _Decoded:
  """`records` with each image through `to_uint8`, an image that fails to decode named
  (`damage_named`): what the statistics read."""

  def __init__(self, records, to_uint8):
    self._records, self._to_uint8 = records, to_uint8

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    record = self._records[index]
    with damage_named(record):
      return {'image': self._to_uint8(record['image'])}


class _TrainTransform:
  """grain random_map: record -> {'image': uint8 HWC, 'label': int32}; rng per (seed, position)."""

  def __init__(self, preprocessor: Any):
    self._pre = preprocessor

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    with damage_named(record):
      image = self._pre.train(record['image'], rng)
    return {'image': image, 'label': np.int32(record['label'])}


class _EvalExample:
  """grain map over padded positions: real examples below `len(records)`, masked zeros beyond.

  `num_classes` (datasets with label sets only): each example's set as a multi-hot 'label_set'.
  """

  def __init__(
    self, records, preprocessor: Any, crops: int, scale: int | None, num_classes: int = 0
  ):
    self._records, self._pre, self._crops, self._scale = records, preprocessor, crops, scale
    self._num_classes = num_classes
    self._dtype = getattr(preprocessor, 'output_dtype', np.uint8)
    # the frozen pre-uint8 preprocessor of scripts/benchmark_input.py has one size for both
    size = (
      int(scale) if scale else getattr(preprocessor, 'eval_image_size', preprocessor.image_size)
    )
    shape = (size, size, preprocessor.channels)
    self._pad_shape = shape if crops == 1 else (crops, *shape)

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    if index >= len(self._records):
      example = {
        'image': np.zeros(self._pad_shape, self._dtype),
        'label': np.int32(0),
        'mask': np.bool_(False),
      }
      record = {'label_set': ()}
    else:
      record = self._records[index]
      with damage_named(record):
        image = self._pre.eval(record['image'], crops=self._crops, scale=self._scale)
      example = {
        'image': np.ascontiguousarray(image, self._dtype),
        'label': np.int32(record['label']),
        'mask': np.bool_(True),
      }
    if self._num_classes:
      example['label_set'] = np.zeros(self._num_classes, np.bool_)
      example['label_set'][np.asarray(record['label_set'], np.int64)] = True
    return example


def worker_count(num_workers: int | None) -> int:
  """`data.num_workers`, with -1 resolved on this host: one Grain worker per core this process may
  use, less one for the training loop. Why: a fixed count starves a GPU on a big host and
  oversubscribes a small one; the batches do not depend on the count, so resuming elsewhere is
  exact."""
  n = int(num_workers or 0)
  if n != -1:
    return n
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return max(0, (cores or 1) - 1)


def prefetched(ds: grain.MapDataset, config: ml_collections.ConfigDict) -> grain.IterDataset:
  """Threads (and `config.data.num_workers` processes) that compute whole local batches ahead."""
  prefetch = max(1, int(config.data.prefetch or 1))
  workers = worker_count(config.data.num_workers)
  threads = max(1, min(prefetch, os.cpu_count() or 1)) if workers == 0 else 1
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch))
  if workers > 0:
    if not flags.FLAGS.is_parsed():
      raise RuntimeError(
        "data.num_workers > 0 needs absl flags parsed (Grain's worker processes "
        'read them): run under absl.app, or call '
        'absl.flags.FLAGS.mark_as_parsed() first to use the defaults'
      )
    options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch)
    it = it.mp_prefetch(options, worker_init_fn=worker_processes.worker_init_fn())
    it = shared_memory.Released(it)
  return it


def _check_sharding(local_batch_size: int, process_index: int, process_count: int) -> None:
  if local_batch_size < 1 or process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
      f'bad sharding: local_batch_size={local_batch_size}, '
      f'process_index={process_index}, process_count={process_count}'
    )


class TrainIterator(grain.DatasetIterator):
  """This process's infinite stream of local batches; the state is the global step (JSON-able).

  Grain's own state records per-worker positions, so restoring it with another worker count would
  silently yield different batches. Here the batches form a random-access `MapDataset`, so
  resuming at step k simply starts a fresh Grain pipeline on `batches[k:]`: exact for any worker
  count and any process count with the same global batch size. Workers start lazily, at the first
  `next()`.
  """

  def __init__(
    self,
    batches: grain.MapDataset,
    config: ml_collections.ConfigDict,
    seed: int,
    global_batch_size: int,
  ):
    super().__init__()
    self._batches, self._config = batches, config
    self._seed, self._global_batch_size = seed, global_batch_size
    self._step = 0
    self._it: grain.DatasetIterator | None = None

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    if self._it is None:
      self._it = iter(prefetched(self._batches[self._step :], self._config))
    batch = next(self._it)
    self._step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {'step': self._step, 'seed': self._seed, 'global_batch_size': self._global_batch_size}

  def set_state(self, state: dict[str, Any]) -> None:
    for key in ('seed', 'global_batch_size'):
      if int(state[key]) != getattr(self, f'_{key}'):
        raise ValueError(
          f'input pipeline state was saved with {key}={state[key]}, but this run uses '
          f'{getattr(self, f"_{key}")}: the resumed batches would differ'
        )
    self._stop()
    self._step = int(state['step'])

  def _stop(self) -> None:
    if self._it is not None:
      self._it.close()
      self._it = None

  def close(self) -> None:
    self._stop()
    super().close()


class _RepeatedAugmentation(grain.MapDataset):
  """Repeated augmentation (Hoffer et al. 2019; torchvision's `--ra-sampler --ra-reps`): each
  global batch of `batch` holds u = ceil(batch / reps) examples of the stream, each `reps` times at
  a stride of u, so the copies land on different devices as torchvision's sampler puts them on
  different GPUs; each copy is augmented by its own position's randomness. When reps does not
  divide the batch (timm's RSB: 3 copies in batches of 2048), the last examples of a batch get
  one copy fewer. An epoch still counts `len(train)` examples, of which about `1 / reps` are
  distinct (as torchvision's and timm's samplers)."""

  def __init__(self, parent: grain.MapDataset, batch: int, reps: int):
    super().__init__(parent)
    self._batch, self._unique = batch, -(-batch // reps)

  def __len__(self) -> int:
    return len(self._parent)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    step, offset = divmod(index, self._batch)
    return self._parent[step * self._unique + offset % self._unique]


def create_train_iterator(
  config: ml_collections.ConfigDict,
  *,
  local_batch_size: int,
  process_index: int,
  process_count: int,
  seed: int,
  preprocessor: Any = None,
) -> TrainIterator:
  """Infinite iterator of {'image': uint8 [b, H, W, C], 'label': int32 [b]} for this process.

  Normalise (and, in training, colour-augment) on the device with
  `resnet_jax.data.device_preprocess.make_device_preprocess(config)`. `preprocessor` replaces the
  configured host preprocessing (an object with `.train(image, rng)`; benchmarks use it).

  Epoch e is the train split shuffled by (seed, e) (Grain's index shuffle); augmentation
  randomness is a function of (seed, position in the global stream), so batches do not depend on
  process or worker count. Save `it.get_state()` (a small JSON-able dict) in the checkpoint and
  `it.set_state(state)` on a fresh iterator to resume at exactly the next batch, even with another
  worker or process count.
  """
  _check_sharding(local_batch_size, process_index, process_count)
  train = sources.open_split(config, str(config.data.train_split))
  preprocessor = preprocessor or make_preprocessor(config)
  seed = int(seed) % 2**32
  ds = grain.MapDataset.source(train.records).shuffle(seed=seed).repeat()
  reps = int(config.data.repeated_augmentations or 1)
  if reps > 1:
    ds = _RepeatedAugmentation(ds, local_batch_size * process_count, reps)
  ds = ds.random_map(_TrainTransform(preprocessor), seed=(seed + 0x5EED) % 2**32)
  ds = ds.batch(local_batch_size, drop_remainder=True)[process_index::process_count]
  return TrainIterator(ds, config, seed, local_batch_size * process_count)


def num_eval_batches(num_examples: int, local_batch_size: int, process_count: int) -> int:
  """Batches every process yields for a split: ceil(N / global batch)."""
  return max(1, math.ceil(num_examples / (local_batch_size * process_count)))


def create_eval_iterator(
  config: ml_collections.ConfigDict,
  *,
  split: str | None,
  local_batch_size: int,
  process_index: int,
  process_count: int,
  crops: int = 1,
  scale: int | None = None,
  preprocessor: Any = None,
) -> grain.IterDataset:
  """Re-iterable batches covering every example of `split` (default eval_split) exactly once.

  Yields {'image': uint8 [b, H, W, C] (crops == 1) or [b, crops, H, W, C], 'label': int32 [b],
  'mask': bool [b]} (and for a dataset with label sets, such as ReaL, 'label_set': bool
  [b, classes]); positions past the end of the split are zero images with mask False, and every
  process yields `num_eval_batches(...)` batches. crops: 1 (centre), 2 (centre + flip), 10 (paper).
  `scale=S`: the paper's fully-convolutional multi-scale testing input (shorter side S, centred
  S x S, so H = W = S); average the softmax over S in {224, 256, 384, 480, 640} for the paper's
  number.
  """
  _check_sharding(local_batch_size, process_index, process_count)
  split = split or str(config.data.eval_split)
  evaluation = sources.open_split(config, split)
  preprocessor = preprocessor or make_preprocessor(config)
  batches = num_eval_batches(len(evaluation), local_batch_size, process_count)
  ds = grain.MapDataset.range(batches * local_batch_size * process_count)
  sets = evaluation.num_classes if evaluation.label_sets else 0
  ds = ds.map(_EvalExample(evaluation.records, preprocessor, crops, scale, sets))
  ds = ds.batch(local_batch_size)[process_index::process_count]
  return prefetched(ds, config)
