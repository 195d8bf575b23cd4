"""The embedded `digits` TFDS dataset: scikit-learn's 1,797 8x8 handwritten digits.

It needs no download and no TensorFlow: images are stored as a uint8 `Tensor` feature (an `Image`
feature would need TF to PNG-encode) in ArrayRecord files, so `tfds.data_source` can read them.
"""

from __future__ import annotations

import contextlib
import os
import shutil

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

NUM_EXAMPLES = 1797
TEST_EVERY = 5  # example i goes to `test` iff i % TEST_EVERY == 0 (360 test, 1,437 train)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """All 1,797 digits as (uint8 [N, 8, 8, 1] in 0-255, int64 [N]) in sklearn's order."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  data = load_digits()
  # sklearn stores 0..16 intensities (float); rescale so the images look like ordinary 8-bit images.
  images = (
    np.rint(np.asarray(data.images, np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
  )
  return images[..., None], np.asarray(data.target, np.int64)


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 digits with a fixed train/test split (test = every 5th example)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's default probes `importlib_resources` (not installed here) for packages not installed
    # via pip; this file is the dataset's code, so say so directly.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        'The 1,797 8x8 handwritten digits shipped with scikit-learn, 0-16 scaled to 0-255.'
      ),
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
          'label': tfds.features.ClassLabel(num_classes=10),
        }
      ),
      supervised_keys=('image', 'label'),
      homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset',
    )

  def _split_generators(self, dl_manager):  # pylint: disable=unused-argument
    return {
      'train': self._generate_examples(test=False),
      'test': self._generate_examples(test=True),
    }

  def _generate_examples(self, test: bool):
    images, labels = digits_arrays()
    for i in range(NUM_EXAMPLES):
      if (i % TEST_EVERY == 0) == test:
        yield i, {'image': images[i], 'label': int(labels[i])}


def prepare_digits(data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Returns the digits builder, preparing it (ArrayRecord, no download) on first use."""
  builder = tfds.builder('digits', data_dir=data_dir, file_format='array_record')
  if builder.is_prepared():
    return builder
  # Several processes (hosts sharing a filesystem, parallel tests) may prepare at once: serialise.
  root = os.fspath(builder.data_dir_root)
  os.makedirs(root, exist_ok=True)
  with _exclusive(os.path.join(root, '.digits.lock')):
    builder = tfds.builder('digits', data_dir=data_dir, file_format='array_record')
    if not builder.is_prepared():
      builder.download_and_prepare(file_format='array_record')
  return builder


def remove_prepared(data_dir: str | None = None) -> str | None:
  """Deletes the prepared digits (`prepare digits --overwrite`), damaged or not; returns the
  directory it removed. Computed, not asked of TFDS: a damaged dataset_info.json breaks the
  builder."""
  root = os.path.expanduser(data_dir) if data_dir else tfds.core.constants.DATA_DIR
  directory = os.path.join(root, 'digits', str(Digits.VERSION))
  if not os.path.isdir(directory):
    return None
  shutil.rmtree(directory)
  return directory


@contextlib.contextmanager
def _exclusive(path: str):
  """An advisory inter-process lock on `path` (POSIX flock; without fcntl, e.g. Windows, none)."""
  try:
    import fcntl  # pylint: disable=import-outside-toplevel
  except ImportError:
    yield
    return
  with open(path, 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
