"""Input pipelines: TFDS (ArrayRecord) + Grain, the paper's augmentations, exact-once evaluation.

Importing this package registers the embedded `digits` TFDS dataset.

Public API:
  DatasetInfo, get_dataset_info(config)
  create_train_iterator(config, *, local_batch_size, process_index, process_count, seed)
  create_eval_iterator(config, *, split, local_batch_size, process_index, process_count,
                       crops=1, scale=None)
  num_eval_batches(num_examples, local_batch_size, process_count)
  DatasetNotFoundError (a ValueError with a one-line message: print it, no traceback)
"""

from resnet_jax.data import digits as _digits  # noqa: F401  (registers the `digits` TFDS builder)
from resnet_jax.data.pipeline import (
  DatasetInfo,
  create_eval_iterator,
  create_train_iterator,
  get_dataset_info,
  make_preprocessor,
  num_eval_batches,
)
from resnet_jax.data.sources import DatasetNotFoundError

__all__ = [
  'DatasetInfo',
  'DatasetNotFoundError',
  'create_eval_iterator',
  'create_train_iterator',
  'get_dataset_info',
  'make_preprocessor',
  'num_eval_batches',
]
