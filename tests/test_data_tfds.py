"""TFDS datasets: mocked CIFAR-10, real on-disk JPEGs (SkipDecoding + PIL), held-out splits, clear errors."""

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

import resnet_jax.data as data
from resnet_jax.data import generated
from resnet_jax.data import sources
from resnet_jax.data.device_preprocess import make_device_preprocess
from tests.runner import data_config


def make_config(**overrides) -> ml_collections.ConfigDict:
  return data_config(**overrides)


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("jpeg_tfds"))
  generated.prepare("tiny", root)
  return root


def test_cifar10_under_mock_data_trains_and_evaluates_exactly_once():
  config = make_config(name="cifar10", image_size=32, augment="cifar", validation_size=30,
                       eval_split="validation")
  with tfds.testing.mock_data(num_examples=100, policy=tfds.testing.MockPolicy.USE_CODE):
    info = data.get_dataset_info(config)
    assert info == data.DatasetInfo("cifar10", 10, (32, 32, 3), 70, 30, "validation")
    it = data.create_train_iterator(config, local_batch_size=16, process_index=1, process_count=2, seed=0)
    batch = next(it)
    assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and batch["label"].max() < 10
    normalised = make_device_preprocess(config)(batch["image"], rng=jax.random.key(0))  # on device
    assert abs(float(normalised.mean())) < 0.5
    state = it.get_state()
    expected = next(it)
    again = data.create_train_iterator(config, local_batch_size=16, process_index=1, process_count=2, seed=0)
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["image"], expected["image"])
    count = sum(int(b["mask"].sum()) for p in range(2) for b in data.create_eval_iterator(
        config, split=None, local_batch_size=4, process_index=p, process_count=2, crops=10))
    assert count == 30


def test_validation_split_is_carved_from_train():
  train, held_out = sources.holdout_indices(1437, 100)
  assert len(train) == 1337 and len(held_out) == 100 and not set(train) & set(held_out)
  config = make_config(validation_size=100)
  info = data.get_dataset_info(config)
  assert info.num_train_examples == 1337
  full = sources.open_split(make_config(), "train").records
  validation = sources.open_split(config, "validation").records
  assert [int(validation[i]["label"]) for i in range(100)] == [int(full[int(j)]["label"]) for j in held_out]
  masks = [b["mask"] for b in data.create_eval_iterator(config, split="validation", local_batch_size=32,
                                                         process_index=0, process_count=1)]
  assert sum(int(m.sum()) for m in masks) == 100


def test_real_jpeg_dataset_uses_encoded_bytes_and_all_augmentations(jpeg_dir):
  config = make_config(name="generated_jpegs/tiny", data_dir=jpeg_dir, image_size=24, augment="imagenet")
  source = sources.open_split(config, "train")
  assert source.encoded and isinstance(source.records[0]["image"], bytes)
  assert source.native_shape == (None, None, 3)
  assert data.get_dataset_info(config) == data.DatasetInfo("generated_jpegs/tiny", 5, (24, 24, 3), 24, 10, "test")
  for augment, normalize in (("imagenet", "per_pixel_mean"), ("inception", "mean_std")):
    config.data.augment, config.data.normalize = augment, normalize
    batch = next(data.create_train_iterator(config, local_batch_size=6, process_index=0, process_count=1,
                                            seed=0))
    assert batch["image"].shape == (6, 24, 24, 3) and np.isfinite(batch["image"]).all()
  for crops, scale, shape in ((1, None, (24, 24, 3)), (10, None, (10, 24, 24, 3)), (1, 40, (40, 40, 3))):
    batches = list(data.create_eval_iterator(config, split="test", local_batch_size=4, process_index=0,
                                             process_count=1, crops=crops, scale=scale))
    assert len(batches) == 3 and batches[0]["image"].shape == (4, *shape)
    assert sum(int(b["mask"].sum()) for b in batches) == 10


@pytest.mark.parametrize("name,expected", [
    ("cifar10", "tfds build cifar10"),
    ("imagenet2012", "downloads/manual"),
    ("no_such_dataset_xyz", "unknown dataset"),
])
def test_missing_dataset_is_one_clear_line(tmp_path, name, expected):
  config = make_config(name=name, data_dir=str(tmp_path), image_size=32)
  with pytest.raises(data.DatasetNotFoundError) as excinfo:
    data.create_train_iterator(config, local_batch_size=4, process_index=0, process_count=1, seed=0)
  message = str(excinfo.value)
  assert "\n" not in message and name in message and expected in message
  assert isinstance(excinfo.value, ValueError)


def test_missing_split_names_the_available_ones(jpeg_dir):
  config = make_config(name="generated_jpegs/tiny", data_dir=jpeg_dir, image_size=24, augment="imagenet")
  with pytest.raises(data.DatasetNotFoundError, match="no split 'dev'.*train"):
    data.create_eval_iterator(config, split="dev", local_batch_size=4, process_index=0, process_count=1)
