"""A prepared dataset that was damaged afterwards (an interrupted copy, a deleted or truncated
shard, a broken dataset_info.json) is one clear ValueError naming the directory and the fix, not
a RuntimeError/ParseError traceback from ArrayRecord or protobuf (hours in, from a Grain worker)."""

import glob
import os
import shutil

import pytest

import resnet_jax.data as data
from resnet_jax.data import digits, sources
from tests.runner import data_config


@pytest.fixture(scope='module')
def prepared(tmp_path_factory) -> str:
  root = str(tmp_path_factory.mktemp('digits_prepared'))
  digits.prepare_digits(root)
  return root


def _copy(prepared: str, tmp_path) -> tuple[str, str]:
  root = str(tmp_path / 'data')
  shutil.copytree(prepared, root)
  version_dir = os.path.join(root, 'digits', '1.0.0')
  for stats in glob.glob(os.path.join(version_dir, 'resnet_jax_stats_*')):
    os.remove(stats)
  return root, version_dir


def _train_shard(version_dir: str) -> str:
  (path,) = glob.glob(os.path.join(version_dir, 'digits-train.array_record-*'))
  return path


def _delete(path: str) -> None:
  os.remove(path)


def _truncate(path: str) -> None:
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _empty(path: str) -> None:
  open(path, 'wb').close()


def _overwrite_middle(path: str) -> None:
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    f.seek(100)
    f.write(bytes(range(256)) * ((size - 200) // 256))


@pytest.mark.parametrize('damage', [_delete, _truncate, _empty, _overwrite_middle])
def test_damaged_records_are_one_clear_error(prepared, tmp_path, damage):
  root, version_dir = _copy(prepared, tmp_path)
  damage(_train_shard(version_dir))
  config = data_config(data_dir=root)
  with pytest.raises(sources.DatasetDamagedError) as e:
    data.get_dataset_info(config)
  message = str(e.value)
  assert isinstance(e.value, ValueError) and '\n' not in message
  assert "dataset 'digits'" in message and version_dir in message and 'delete' in message
  assert 'python -m resnet_jax.data.prepare digits' in message


def test_damaged_metadata_is_one_clear_error(prepared, tmp_path):
  root, version_dir = _copy(prepared, tmp_path)
  with open(os.path.join(version_dir, 'dataset_info.json'), 'w') as f:
    f.write('{')
  with pytest.raises(sources.DatasetDamagedError, match='dataset_info.json') as e:
    data.get_dataset_info(data_config(data_dir=root))
  assert f'delete {os.path.join(root, "digits")} ' in str(e.value)


class _Failing:
  """A split whose record 3 cannot be read (damage past the records checked when opening)."""

  def __len__(self) -> int:
    return 5

  def __getitem__(self, index: int) -> dict:
    if index == 3:
      raise RuntimeError('Corrupted Riegeli/records file: chunk header hash mismatch')
    return {'image': b'', 'label': 0}


def test_a_damaged_record_found_while_training_is_one_clear_error():
  records = sources._Renamed(_Failing(), 'image', 'label', 'cifar10', '/data/cifar10/3.0.2', None)
  assert records[2]['label'] == 0
  with pytest.raises(sources.DatasetDamagedError, match=r'record 3: .*hash mismatch.*delete'):
    records[3]


@pytest.mark.parametrize('keep_bytes', [0, 10, 200])
def test_a_truncated_statistics_cache_is_recomputed(tmp_path, keep_bytes):
  """The stats .npz beside the data, cut short (a partial copy of the data dir): NumPy raises
  EOFError / zipfile.BadZipFile, which the cache let through as a traceback."""
  import numpy as np

  from resnet_jax.data import stats

  calls = []

  def compute():
    calls.append(1)
    return {'pixel_mean': np.full((4, 4, 1), len(calls), np.float32)}

  key = {'test': 'truncated', 'dir': str(tmp_path)}
  stats.cached_stats(key, str(tmp_path), compute)
  (path,) = tmp_path.glob('resnet_jax_stats_*.npz')
  with open(path, 'r+b') as f:
    f.truncate(keep_bytes)
  stats._MEMORY.clear()  # pylint: disable=protected-access
  again = stats.cached_stats(key, str(tmp_path), compute)
  assert len(calls) == 2 and float(again['pixel_mean'][0, 0, 0]) == 2.0
  stats._MEMORY.clear()  # pylint: disable=protected-access
  assert float(stats.cached_stats(key, str(tmp_path), compute)['pixel_mean'][0, 0, 0]) == 2.0
  assert len(calls) == 2  # the rewritten cache is read back
