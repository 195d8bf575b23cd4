"""Random-access sources for one split: TFDS ArrayRecord data, the embedded digits, synthetic ones,
an image-folder tree (`image_folder.py`).

Every source is a picklable sequence (`len`, `[i]`) of `{'image': uint8 array or encoded bytes,
'label': int}` so Grain can read it in worker processes. Splits named `validation` can be carved
from the training split (`config.data.validation_size`, the paper's 45k/5k CIFAR split).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import ml_collections
import numpy as np

from resnet_jax.data import image_folder
from resnet_jax.data import offline as offline_archives
from resnet_jax.data import stats as stats_lib
from resnet_jax.data.split import DatasetDamagedError, DatasetNotFoundError, SplitSource

SYNTHETIC_NUM_TRAIN = 1_281_167  # ImageNet-sized epoch by default, for input/step benchmarks.
SYNTHETIC_NUM_EVAL = 10_000
_HOLDOUT_SEED = 0  # fixed: the held-out examples must not change with the training seed.


# Datasets whose images carry a set of right labels beside their one label: name -> (the single
# label, the set). ReaL (Beyer et al. 2020, "Are we done with ImageNet?") re-annotated ImageNet's
# 50,000 validation images; an image may have several right labels, or none (then it is left out
# of ReaL accuracy).
LABEL_SETS = {'imagenet2012_real': ('original_label', 'real_label')}
# Test sets labelled in ImageNet's 1000 classes that hold 200 of them (Hendrycks et al. 2021):
# read in the label space of the classes they hold, so `evaluate --dataset` scores a run on those
# classes' logits only, their benchmarks' protocol (all 1000 can only count more top-1 errors).
HELD_CLASSES_ONLY = ('imagenet_a', 'imagenet_r')


def _base_name(name: str) -> str:
  return name.split(':')[0].split('/')[0]


class SyntheticRecords:
  """Uniform random uint8 images and labels, a pure function of (split seed, index): no storage."""

  def __init__(
    self, num_examples: int, shape: tuple[int, int, int], num_classes: int, split_seed: int
  ):
    self._n, self._shape, self._classes, self._seed = num_examples, shape, num_classes, split_seed

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < self._n:
      raise IndexError(index)
    rng = np.random.default_rng((self._seed, index))
    label = int(rng.integers(self._classes))
    return {'image': rng.integers(0, 256, self._shape, dtype=np.uint8), 'label': label}


class _Subset:
  """`records[indices[i]]`: a held-out or remaining part of a split, still random access."""

  def __init__(self, records: Sequence[dict[str, Any]], indices: np.ndarray):
    self._records, self._indices = records, indices

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._records[int(self._indices[index])]


class _Renamed:
  """Maps a TFDS record to {'image', 'label'} (datasets differ in their supervised keys); a record
  that cannot be read is a `DatasetDamagedError` naming the directory and the fix."""

  def __init__(
    self,
    records: Sequence[dict[str, Any]],
    image_key: str,
    label_key: str,
    name: str,
    directory: str,
    data_dir: str | None,
    label_set_key: str | None = None,
    label_map: np.ndarray | None = None,
  ):
    self._records, self._image_key, self._label_key = records, image_key, label_key
    self._name, self._directory, self._data_dir = name, directory, data_dir
    self._label_set_key, self._label_map = label_set_key, label_map

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    try:
      record = self._records[index]
    except (RuntimeError, OSError) as e:  # ArrayRecord/Riegeli: missing, truncated, corrupt
      raise DatasetDamagedError(
        _damaged_message(self._name, self._directory, self._data_dir, f'record {index}: {e}')
      ) from e
    label = int(record[self._label_key])
    label = label if self._label_map is None else int(self._label_map[label])
    example = {'image': record[self._image_key], 'label': label}
    if self._label_set_key is not None:
      example['label_set'] = np.asarray(record[self._label_set_key], np.int32).reshape(-1)
    return example


def _prepare_command(name: str, data_dir: str | None, *extra: str) -> str:
  """The `prepare` command line for `name` (the one way this project prepares TFDS data)."""
  flags = ''.join(f' {e}' for e in extra) + (f' --data_dir={data_dir}' if data_dir else '')
  return f'python -m resnet_jax.data.prepare {name.split("/")[0].split(":")[0]}{flags}'


def _is_a_file(data_dir: str | None) -> bool:
  return bool(data_dir) and os.path.exists(data_dir) and not os.path.isdir(data_dir)


def _not_prepared_message(name: str, data_dir: str | None) -> str:
  if _is_a_file(data_dir):
    return f'config.data.data_dir={data_dir} is a file, not a directory'
  where = data_dir or 'the TFDS data dir (TFDS_DATA_DIR or ~/tensorflow_datasets)'
  if name.split(':')[0].split('/')[0] == 'imagenet2012':
    return (
      f"dataset '{name}' is not prepared in {where}: download ILSVRC2012_img_train.tar and "
      f'ILSVRC2012_img_val.tar from image-net.org into a directory DIR, then run '
      f'`{_prepare_command(name, data_dir, "--manual_dir=DIR")}`'
    )
  if name.split(':')[0].split('/')[0] == 'imagenet2012_real':  # the val tar + ReaL's labels
    return (
      f"dataset '{name}' is not prepared in {where}: download ILSVRC2012_img_val.tar from "
      f'image-net.org into a directory DIR, then run '
      f'`{_prepare_command(name, data_dir, "--manual_dir=DIR")}` (add --from real.json on an '
      'offline machine)'
    )
  offline = (
    ' (add --from ARCHIVE on an offline machine)'
    if name.split(':')[0].split('/')[0] in offline_archives.FROM_ARCHIVES
    else ' (TFDS downloads it: online)'
  )
  return (
    f"dataset '{name}' is not prepared in {where}: prepare it once with "
    f'`{_prepare_command(name, data_dir)}`{offline}, or point config.data.data_dir at the '
    'directory that holds it'
  )


def _damaged_message(name: str, directory: str, data_dir: str | None, reason: str) -> str:
  reason = ' '.join(str(reason).split())[:300]
  return (
    f"dataset '{name}' in {directory} is damaged ({reason}): delete {directory} and prepare it "
    f'again with `{_prepare_command(name, data_dir)}`'
  )


def _tfds_builder(name: str, data_dir: str | None):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from google.protobuf import json_format  # pylint: disable=g-import-not-at-top

  from resnet_jax.data import digits  # pylint: disable=g-import-not-at-top

  try:
    if name == 'digits':
      return digits.prepare_digits(data_dir)
    return tfds.builder(name, data_dir=data_dir)
  except OSError as e:  # digits are prepared on first use: the directory must be writable
    if name != 'digits':
      raise
    if _is_a_file(data_dir):
      raise DatasetNotFoundError(_not_prepared_message(name, data_dir)) from e
    raise DatasetNotFoundError(
      f"cannot prepare 'digits' in {data_dir or 'the TFDS data dir'} ({e.strerror or e}: "
      f'{e.filename}): point config.data.data_dir at a writable directory'
    ) from e
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DatasetNotFoundError(
      f"unknown dataset '{name}': not 'digits', 'synthetic', 'image_folder' (a tree "
      'ROOT/<split>/<class>/<image> at data.data_dir) or a TFDS dataset name'
    ) from e
  except json_format.ParseError as e:  # TFDS reads dataset_info.json while making the builder
    root = data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
    directory = os.path.join(root, *name.split(':')[0].split('/'))
    raise DatasetDamagedError(
      _damaged_message(name, directory, data_dir, f'dataset_info.json: {e}')
    ) from e


def image_and_label_keys(name: str, builder: Any) -> tuple[str, str]:
  """The (image, label) feature names of a single-label image classification dataset.

  Why checked here: anything else (a multi-label `Sequence` or `Tensor` label, float or
  13-band images, RGBA) failed later with an AttributeError/TypeError traceback, or trained on
  what `int(label)` made of it. Extra supervised keys (places365_small's filename) are ignored.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  features = builder.info.features
  keys = builder.info.supervised_keys or ('image', 'label')
  if _base_name(name) in LABEL_SETS:  # its supervised label is the set: train/test on the one
    keys = ('image', LABEL_SETS[_base_name(name)][0])
  image_key, label_key = (tuple(keys) + (None, None))[:2] if isinstance(keys, tuple) else (0, 0)
  if not (isinstance(image_key, str) and isinstance(label_key, str)) or not (
    image_key in features and label_key in features
  ):
    raise DatasetNotFoundError(
      f"dataset '{name}' is not an image classification dataset (no image/label keys)"
    )
  label = features[label_key]
  if not isinstance(label, tfds.features.ClassLabel):
    raise DatasetNotFoundError(
      f"dataset '{name}': its label '{label_key}' is a {type(label).__name__}, not a "
      'ClassLabel (one class per image), which is what this project trains on'
    )
  image = features[image_key]
  array = isinstance(image, (tfds.features.Image, tfds.features.Tensor))
  shape = tuple(image.shape) if array else ()
  if not array or len(shape) != 3 or shape[2] not in (1, 3) or image.np_dtype != np.uint8:
    what = (
      f'{type(image).__name__} {shape} of {np.dtype(image.np_dtype).name}'
      if array
      else type(image).__name__
    )
    raise DatasetNotFoundError(
      f"dataset '{name}': its image '{image_key}' is a {what}, expected uint8 (H, W, C) "
      'images with 1 or 3 channels'
    )
  return image_key, label_key


def _tfds_split(name: str, data_dir: str | None, split: str) -> SplitSource:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if _base_name(name) == 'imagenet2012' and split.split('[')[0] == 'test':
    raise DatasetNotFoundError(
      "imagenet2012's 'test' split has no labels (every label is -1): evaluate on 'validation', "
      "as the paper's ImageNet results do"
    )
  builder = _tfds_builder(name, data_dir)
  features = builder.info.features
  image_key, label_key = image_and_label_keys(name, builder)
  image_feature = features[image_key]
  shape = tuple(image_feature.shape)
  # Variable-size images (ImageNet-like) stay encoded: the pipeline decodes them at reduced size.
  skip = isinstance(image_feature, tfds.features.Image) and (shape[0] is None or shape[1] is None)
  try:
    records = builder.as_data_source(
      split=split, decoders={image_key: tfds.decode.SkipDecoding()} if skip else None
    )
    if skip and len(records):
      records[0]  # pylint: disable=pointless-statement  -- surfaces an encoder that cannot run here
      # (tfds.testing.mock_data without TF): then read the images decoded
  except ModuleNotFoundError:
    records, skip = builder.as_data_source(split=split), False
  except (ValueError, NotImplementedError, AssertionError, KeyError, FileNotFoundError) as e:
    if not builder.is_prepared():
      raise DatasetNotFoundError(_not_prepared_message(name, data_dir)) from e
    if isinstance(e, NotImplementedError):
      raise DatasetNotFoundError(
        f"dataset '{name}' in {builder.data_dir} is not in ArrayRecord format (needed for random "
        f'access): rebuild it with `{_prepare_command(name, data_dir, "--overwrite")}`'
      ) from e
    if split.split('[')[0] in builder.info.splits and '[' in split:  # 'test[360:]', 'test[:x]'
      raise DatasetNotFoundError(
        f"split '{split}' of dataset '{name}' selects no examples or is not a valid TFDS slice "
        f'({" ".join(str(e).split())[:200]}; format: https://www.tensorflow.org/datasets/splits)'
      ) from e
    hint = (
      ", or set config.data.validation_size=N to hold out N training examples as 'validation'"
      if split == 'validation'
      else ''
    )
    raise DatasetNotFoundError(
      f"dataset '{name}' has no split '{split}' (available: {', '.join(builder.info.splits)})"
      + hint
    ) from e
  directory = os.fspath(builder.data_dir)
  label_set_key = LABEL_SETS.get(_base_name(name), (None, None))[1]
  names, label_map = tuple(features[label_key].names), None
  if _base_name(name) in HELD_CLASSES_ONLY:
    held = _held_classes(records, label_key, name, split, directory)
    names, label_map = tuple(names[i] for i in held), np.full(len(names), -1, np.int32)
    label_map[held] = np.arange(len(held))
  records = _Renamed(
    records, image_key, label_key, name, directory, data_dir, label_set_key, label_map
  )
  if len(records):  # a deleted, truncated or emptied shard: found now, not hours in
    records[0]  # pylint: disable=pointless-statement
    records[len(records) - 1]  # pylint: disable=pointless-statement
  return SplitSource(
    records,
    len(names),
    (shape[0], shape[1], int(shape[2])),
    encoded=skip,
    cache_dir=directory,
    label_sets=label_set_key is not None,
    class_names=names,
  )


def _held_classes(
  records: Sequence[dict[str, Any]], label_key: str, name: str, split: str, directory: str
) -> np.ndarray:
  """The sorted labels `split` holds (one pass over its records, cached beside the dataset)."""

  def scan() -> dict[str, np.ndarray]:
    labels = {int(records[i][label_key]) for i in range(len(records))}
    return {'held': np.asarray(sorted(labels), np.int64)}

  key = {'held_classes': name, 'split': split, 'examples': len(records), 'dir': directory}
  return stats_lib.cached_stats(key, directory, scan)['held']


def holdout_indices(num_train: int, validation_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(remaining train indices, held-out validation indices), fixed for a given split size."""
  if not 0 < validation_size < num_train:
    raise ValueError(f'validation_size={validation_size} must be in (0, {num_train})')
  perm = np.random.default_rng(_HOLDOUT_SEED).permutation(num_train)
  return np.sort(perm[validation_size:]), np.sort(perm[:validation_size])


def _synthetic_split(config: ml_collections.ConfigDict, split: str) -> SplitSource:
  data = config.data
  size = int(data.image_size)
  shape = (size, size, int(data.channels))
  classes = int(data.num_classes)
  is_train = split == data.train_split
  n = int((data.num_train_examples if is_train else data.num_eval_examples) or 0)
  n = n or (SYNTHETIC_NUM_TRAIN if is_train else SYNTHETIC_NUM_EVAL)
  split_seed = 0 if is_train else (1 + sum(map(ord, split)))  # distinct images per split
  return SplitSource(SyntheticRecords(n, shape, classes, split_seed), classes, shape, encoded=False)


def open_split(config: ml_collections.ConfigDict, split: str) -> SplitSource:
  """The records of `split` for `config.data`, with the held-out validation split applied.

  With `config.data.validation_size = V > 0`, split 'validation' is V examples carved from the train
  split and the train split is the rest (this takes precedence over a TFDS 'validation' split).
  """
  data = config.data
  name = str(data.name)
  train_split = str(data.train_split)
  validation_size = int(data.validation_size or 0)
  if name == 'synthetic':
    return _synthetic_split(config, split)
  # '~' as `prepare` reads it: TFDS itself would make a directory named '~' in the cwd
  data_dir = os.path.expanduser(data.data_dir) if data.data_dir else None
  if name == 'image_folder':  # an extracted tree, ROOT/<split>/<class>/<image>

    def read(which: str) -> SplitSource:
      # the model's class count: a numbered split alone (ImageNet-V2) has its labels in it
      classes = config.model.get('num_classes') if 'model' in config else None
      return image_folder.open_split(
        data_dir,
        which,
        train_split,
        num_classes=classes or None,
        channels=int(data.get('channels', 3)),
      )
  else:

    def read(which: str) -> SplitSource:
      return _tfds_split(name, data_dir, which)

  if validation_size > 0 and split in ('validation', train_split):
    full = read(train_split)
    if validation_size >= len(full):
      raise ValueError(
        f'data.validation_size={validation_size} leaves no training examples: split '
        f"'{train_split}' of {name} has {len(full)}"
      )
    keep, held_out = holdout_indices(len(full), validation_size)
    return dataclasses.replace(
      full, records=_Subset(full.records, keep if split == train_split else held_out)
    )
  return read(split)
