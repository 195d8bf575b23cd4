"""What every dataset source returns (`SplitSource`) and the errors a missing or damaged dataset
raises: one home that `sources` (TFDS, digits, synthetic) and `image_folder` (trees) share."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Sequence

from PIL import Image


class DatasetNotFoundError(ValueError):
  """A dataset (or split) is unknown or not prepared; the message is one line saying what to do."""


class DatasetDamagedError(DatasetNotFoundError):
  """Prepared files that cannot be read (a deleted or truncated shard, broken metadata): without
  this, ArrayRecord's RuntimeError surfaces as a traceback, possibly hours in from a worker."""


@dataclasses.dataclass(frozen=True)
class SplitSource:
  """One split: the records plus what the pipeline needs to know about them."""

  records: Sequence[dict[str, Any]]
  num_classes: int
  native_shape: tuple[int | None, int | None, int]  # H, W may be None (variable-size images)
  encoded: bool  # True when `image` is encoded bytes (JPEG/PNG) to be decoded by the pipeline
  cache_dir: str | None = None  # where derived data (normalisation statistics) may be cached
  # Records also hold 'label_set': every label judged right for the image (ReaL, below)
  label_sets: bool = False
  # The name of each label (TFDS's ClassLabel names, a tree's class folders); None when the
  # labels are bare indices (numbered folders, synthetic data): see `named_classes`
  class_names: tuple[str, ...] | None = None

  def __len__(self) -> int:
    return len(self.records)


def named_classes(names: Sequence[str] | None) -> tuple[str, ...] | None:
  """`names` when they name the classes; None when they only number them ('0', '1', ... as TFDS
  writes for a ClassLabel given a count, e.g. digits, MNIST, CIFAR-10-C): numbers say nothing
  about what a class is, so two label spaces can only be compared by name when both have names."""
  if names is None or list(names) == [str(i) for i in range(len(names))]:
    return None
  return tuple(names)


# What reading or decoding a damaged image file raises (PIL: OSError 'broken data stream',
# 'image file is truncated'; SyntaxError for a bad PNG; ValueError; OpenCV's decoder: ValueError).
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def damaged_image(path: str, error: BaseException) -> DatasetDamagedError:
  """The one-line error for an image file that cannot be read or decoded, naming the file."""
  reason = ' '.join(str(error).split())[:200] or type(error).__name__
  return DatasetDamagedError(
    f'image file {path} cannot be read as an image ({reason}): replace it with a good copy '
    '(removing it changes the file list: a resumed run then sees other batches)'
  )


@contextlib.contextmanager
def damage_named(record: dict[str, Any]) -> Iterator[None]:
  """Decoding `record['image']` inside this block: an error becomes `damaged_image` naming the
  file when the record came from one (its 'path': image-folder trees). Why: damage in the middle
  of a JPEG's compressed data passes the cheap check of `image_folder` and is found only when a
  Grain worker decodes the image, maybe hours in; PIL's 'broken data stream when reading image
  file' says nothing of which of a million files it was."""
  try:
    yield
  except DatasetNotFoundError:
    raise
  except IMAGE_ERRORS as e:
    path = record.get('path')
    if path is None:
      raise
    raise damaged_image(path, e) from e
