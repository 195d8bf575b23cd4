"""What every dataset source returns (`SplitSource`) and the errors a missing or damaged dataset
raises: one home that `sources` (TFDS, digits, synthetic) and `image_folder` (trees) share."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence


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

  def __len__(self) -> int:
    return len(self.records)
