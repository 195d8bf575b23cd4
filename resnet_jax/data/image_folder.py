"""`data.name='image_folder'`: an extracted tree ROOT/<split>/<class>/**/<image>, read in place.

The layout torchvision's `ImageFolder` reads (and how clusters keep ImageNet): classes are the
sorted names of the train split's subdirectories (`ImageFolder.find_classes`; for ImageNet the
sorted WordNet ids, TFDS imagenet2012's and torchvision's/timm's class order), images are the files
with torchvision's image extensions found under each class directory (recursively, symlinks
followed, sorted). Another split's class directories are mapped to the train split's by name,
or, when they are all numbers and train's are not (ImageNet-V2's folders 0..999), by index into
train's sorted classes (`open_split`).

The tree is only read. Its file index (`folder_index`) and the dataset statistics are cached in
the user cache directory (`folder_index.cache_root()`), keyed by the tree's real path and file
list.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Any

import numpy as np
from PIL import Image

from resnet_jax.data.folder_index import (
  CACHE_DIR_NAME,
  IMG_EXTENSIONS,
  MEMORY,
  cache_root,
  cached_scan,
  digest,
  subdirectories,
)
from resnet_jax.data.split import (
  IMAGE_ERRORS,
  DatasetNotFoundError,
  SplitSource,
  damaged_image,
)

NAME = 'image_folder'


class FolderRecords:
  """Random access to `{'image': the file's bytes, 'label': int}` of one split.

  Picklable and small (Grain sends it to every worker): the paths are one byte array with end
  offsets, not a list of strings. A file that cannot be read, or whose bytes are not a whole
  image, is a `DatasetDamagedError` naming it; so is one that fails to decode later
  (`split.damage_named`, with the record's 'path').
  """

  def __init__(self, split_dir: str, classes: list[str], index: dict[str, np.ndarray], labels):
    self._split_dir, self._classes = split_dir, list(classes)
    self._blob, self._ends = index['blob'], index['ends']
    self._labels = np.asarray(labels, np.int32)  # the train split's class of each image
    self._dirs = np.asarray(index['labels'], np.int32)  # its class directory here

  def __len__(self) -> int:
    return len(self._ends)

  def path(self, index: int) -> str:
    start = int(self._ends[index - 1]) if index > 0 else 0
    name = self._blob[start : int(self._ends[index])].tobytes().decode('utf-8', 'surrogateescape')
    return os.path.join(self._split_dir, self._classes[int(self._dirs[index])], name)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(index)
    path = self.path(index)
    try:
      with open(path, 'rb') as f:
        data = f.read()
      _check_whole_image(data)
    except IMAGE_ERRORS as e:
      raise damaged_image(path, e) from e
    # 'path': the pipeline names the file when decoding finds what the check above cannot
    return {'image': data, 'label': int(self._labels[index]), 'path': path}


def _check_whole_image(data: bytes) -> None:
  """Raises what decoding would raise later, for the damage a cheap look can see: no image at
  all (an empty file, an HTML error page) or a truncated one (an interrupted copy). A JPEG not
  ending in its EOI marker, or a PNG not in IEND, is decoded once here (trailing bytes after a
  whole image decode; a cut one raises); anything else only pays for its header."""
  if not data:
    raise ValueError('the file is empty')
  try:
    img = Image.open(io.BytesIO(data))
  except Image.UnidentifiedImageError:  # its message names a BytesIO object, not the file
    raise ValueError(f'no image format PIL reads; it begins {data[:16]!r}') from None
  tail = data[-32:].rstrip(b'\0')
  if (img.format == 'JPEG' and not tail.endswith(b'\xff\xd9')) or (
    img.format == 'PNG' and b'IEND' not in tail
  ):
    img.load()


def _not_found(message: str) -> DatasetNotFoundError:
  return DatasetNotFoundError(message)


def _split_dir(root: str, split: str, hint_flag: str, train_split: str) -> str:
  directory = os.path.join(root, split)
  if os.path.isdir(directory):
    return directory
  existing = subdirectories(root)
  if not existing:
    raise _not_found(
      f"image folder {root} has no split '{split}' and no subdirectories at all: it must hold "
      f'one directory per split, ROOT/{split}/<class>/<image>'
    )
  others = [s for s in existing if s not in (split, train_split)] or existing
  also = f', or evaluate --split={others[0]}' if split != train_split else ''
  example = f' (e.g. {hint_flag}={others[0]}{also})' if others else ''
  raise _not_found(
    f"image folder {root} has no split '{split}' (its subdirectories: {', '.join(existing)}): "
    f'name one of them as the split{example}'
  )


def _check_classes(index: dict[str, np.ndarray], split_dir: str, split: str, root: str) -> None:
  classes = [str(c) for c in index['classes']]
  if not classes:
    raise _not_found(
      f"split '{split}' of image folder {root} has no class directories: images go in "
      f'{split_dir}/<class>/<image>'
    )
  counts = np.bincount(index['labels'], minlength=len(classes))
  empty = [os.path.join(split_dir, c) for c, n in zip(classes, counts) if n == 0]
  if empty:
    more = f' and {len(empty) - 1} more' if len(empty) > 1 else ''
    raise _not_found(
      f'class directory {empty[0]}{more} has no image files ({", ".join(IMG_EXTENSIONS)}, any '
      'case): add its images or remove it'
    )


def is_numeral(name: str) -> bool:
  """A class directory named by its class index, as str(k) writes it ('7', not '07')."""
  return name.isascii() and name.isdigit() and str(int(name)) == name


def _listed(numbers: list[int]) -> str:
  return f'{", ".join(map(str, numbers[:5]))}{", ..." if len(numbers) > 5 else ""}'


def _numeral_labels(
  classes: list[str], num_classes: int | None, split: str, root: str, of_what: str
) -> tuple[np.ndarray, int]:
  """(int(name) of each numbered class directory, the class count). Each must be below
  `num_classes` (a split may hold fewer classes, as with names; a count from 1 ends at
  `num_classes` and is refused); `num_classes` None (no train split, no model): the directories
  must be exactly 0..N-1, N the count."""
  numbers = [int(c) for c in classes]
  where = (
    f"split '{split}' of image folder {root} has numbered class directories, read as class "
    "indices (ImageNet-V2's layout)"
  )
  if num_classes is None:
    n = len(numbers)
    missing = sorted(set(range(n)) - set(numbers))
    if missing:
      raise _not_found(
        f'{where}; with no train split beside it and no model to give the number of classes, '
        f'they must be exactly 0..{n - 1} (missing {_listed(missing)}; {len(missing)} in all): '
        'restore them, or put the train split beside it'
      )
    return np.asarray(numbers, np.int32), n
  beyond = sorted(n for n in numbers if n >= num_classes)
  if beyond:
    raise _not_found(
      f'{where} {of_what}, so they must be below {num_classes} ({_listed(beyond)}: '
      f'{len(beyond)} in all): number them from 0, as ImageNet-V2 does'
    )
  if len(numbers) < num_classes:
    logging.info('%s: %d of the %d classes', where, len(numbers), num_classes)
  return np.asarray(numbers, np.int32), num_classes


def _split_only(
  root: str, split: str, train_split: str, num_classes: int | None, channels: int
) -> SplitSource | None:
  """A split with no train split beside it (a test set extracted alone, to evaluate a run trained
  elsewhere). Numbered class directories (ImageNet-V2's): directory k is class k of the
  `num_classes` the model has (None: of 0..N-1, all N present). Named ones (ImageNet-A's and
  -R's WordNet-id folders): the sorted names are the classes, which `evaluate` matches to the
  run's by name."""
  split_dir = os.path.join(root, split)
  if split == train_split or os.path.isdir(os.path.join(root, train_split)):
    return None
  if not os.path.isdir(split_dir):
    return None
  index = cached_scan(split_dir)
  classes = [str(c) for c in index['classes']]
  _check_classes(index, split_dir, split, root)
  if all(is_numeral(c) for c in classes):
    of_what = f"of the model's {num_classes} classes"
    numbers, n = _numeral_labels(classes, num_classes, split, root, of_what)
    labels, names = numbers[index['labels']], None
  else:  # named: its own sorted classes
    labels, n, names = index['labels'], len(classes), tuple(classes)
  records = FolderRecords(split_dir, classes, index, labels)
  shape = (None, None, channels)
  return SplitSource(records, n, shape, encoded=True, cache_dir=None, class_names=names)


def open_split(
  data_dir: str | None,
  split: str,
  train_split: str,
  hint_flag: str = '--config.data.eval_split',
  num_classes: int | None = None,
  channels: int = 3,
) -> SplitSource:
  """One split of the tree at `data_dir`, labelled by the train split's classes.

  Another split's class directories are matched to the train split's by name, except when they
  are all numbered ('0', '1', ... as ImageNet-V2 is distributed) and the train split's are not:
  then directory k is the train split's k-th class in sorted order (ImageNet's sorted WordNet
  ids), k below the K train classes. (torchvision's ImageFolder sorts such names as strings,
  '0', '1', '10', '100', ..., and mislabels them.) A split whose train split is absent (a test
  set extracted alone) has numbered directories, directory k being class k of the model's
  `num_classes` (`config.model.num_classes`, which `evaluate --dataset` sets to the run's) or,
  unknown, of 0..N-1 with all N present; or named ones, its sorted names being its classes
  (`evaluate --dataset` matches them to the run's by name). Every file is read as `channels`
  channels: 3 (RGB, as torchvision's loader converts greyscale, CMYK and RGBA files) or 1
  (greyscale, for trees of X-rays or digits).
  """
  if not data_dir:
    raise _not_found(
      "data.name='image_folder' reads the tree at config.data.data_dir (ROOT/<split>/<class>/"
      '<image>): set --config.data.data_dir=ROOT'
    )
  root = os.path.abspath(os.path.expanduser(data_dir))
  if not os.path.isdir(root):
    what = 'is not a directory' if os.path.exists(root) else 'does not exist'
    raise _not_found(
      f'config.data.data_dir={data_dir} {what}: image_folder reads ROOT/<split>/<class>/<image>'
    )
  is_train = split == train_split
  if not is_train:  # the split asked for first: `evaluate --split` may name a split alone
    _split_dir(root, split, hint_flag, train_split)
  if channels not in (1, 3):
    raise ValueError(f'config.data.channels={channels}: image folders are read as 1 or 3 channels')
  alone = _split_only(root, split, train_split, num_classes, channels)
  if alone is not None:
    return alone
  train_dir = _split_dir(root, train_split, '--config.data.train_split', train_split)
  split_dir = train_dir if is_train else os.path.join(root, split)
  train_classes = subdirectories(train_dir)
  index = cached_scan(split_dir)
  _check_classes(index, split_dir, split, root)
  classes = [str(c) for c in index['classes']]
  if is_train:
    labels = index['labels']
  elif all(is_numeral(c) for c in classes) and not any(is_numeral(c) for c in train_classes):
    of_what = f"of the {len(train_classes)} classes of train split '{train_split}'"
    numbers, _ = _numeral_labels(classes, len(train_classes), split, root, of_what)
    labels = numbers[index['labels']]
  else:
    position = {name: i for i, name in enumerate(train_classes)}
    unknown = [c for c in classes if c not in position]
    if unknown:
      raise _not_found(
        f"split '{split}' of image folder {root} has class directories the train split "
        f"'{train_split}' does not ({', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}"
        f'; {len(unknown)} in all): classes are matched by name, so each must also be a class '
        f"directory of '{train_split}'"
      )
    labels = np.asarray([position[c] for c in classes], np.int32)[index['labels']]
  records = FolderRecords(split_dir, classes, index, labels)
  return SplitSource(
    records,
    len(train_classes),
    (None, None, channels),  # every file converted, as torchvision's loader does to RGB
    encoded=True,
    cache_dir=_stats_dir(root, train_split, channels),
    class_names=tuple(train_classes),
  )


def _stats_dir(root: str, train_split: str, channels: int = 3) -> str | None:
  """A cache directory for the statistics of this tree's train split, keyed by the tree's real
  path and its file list (so a changed tree gets new statistics) and, read as greyscale, by that;
  None if it cannot be made."""
  real = os.path.realpath(os.path.join(root, train_split))
  index = MEMORY.get(real) or cached_scan(real)
  key = digest(real, index['files'], *(() if channels == 3 else (f'channels={channels}',)))
  directory = os.path.join(cache_root(), CACHE_DIR_NAME, f'stats-{key}')
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    logging.info('could not make a statistics cache directory %s: %s', directory, e)
    return None
  return directory
