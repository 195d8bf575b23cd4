"""TFDS datasets: mocked CIFAR-10, on-disk JPEGs (SkipDecoding), held-out splits, clear errors."""

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

import resnet_jax.data as data
from resnet_jax.data import augment as augment_lib
from resnet_jax.data import generated, sources
from resnet_jax.data.device_preprocess import make_device_preprocess
from tests.runner import data_config


def make_config(**overrides) -> ml_collections.ConfigDict:
  return data_config(**overrides)


@pytest.fixture(scope='module')
def jpeg_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('jpeg_tfds'))
  generated.prepare('tiny', root)
  return root


def test_cifar10_under_mock_data_trains_and_evaluates_exactly_once():
  config = make_config(
    name='cifar10', image_size=32, augment='cifar', validation_size=30, eval_split='validation'
  )
  with tfds.testing.mock_data(num_examples=100, policy=tfds.testing.MockPolicy.USE_CODE):
    info = data.get_dataset_info(config)
    assert info == data.DatasetInfo('cifar10', 10, (32, 32, 3), 70, 30, 'validation')
    it = data.create_train_iterator(
      config, local_batch_size=16, process_index=1, process_count=2, seed=0
    )
    batch = next(it)
    assert batch['image'].shape == (16, 32, 32, 3) and batch['image'].dtype == np.uint8
    assert batch['label'].dtype == np.int32 and batch['label'].max() < 10
    normalised = make_device_preprocess(config)(batch['image'], rng=jax.random.key(0))  # on device
    assert abs(float(normalised.mean())) < 0.5
    state = it.get_state()
    expected = next(it)
    again = data.create_train_iterator(
      config, local_batch_size=16, process_index=1, process_count=2, seed=0
    )
    again.set_state(state)
    np.testing.assert_array_equal(next(again)['image'], expected['image'])
    count = sum(
      int(b['mask'].sum())
      for p in range(2)
      for b in data.create_eval_iterator(
        config, split=None, local_batch_size=4, process_index=p, process_count=2, crops=10
      )
    )
    assert count == 30


def test_validation_split_is_carved_from_train():
  train, held_out = sources.holdout_indices(1437, 100)
  assert len(train) == 1337 and len(held_out) == 100 and not set(train) & set(held_out)
  config = make_config(validation_size=100)
  info = data.get_dataset_info(config)
  assert info.num_train_examples == 1337
  full = sources.open_split(make_config(), 'train').records
  validation = sources.open_split(config, 'validation').records
  assert [int(validation[i]['label']) for i in range(100)] == [
    int(full[int(j)]['label']) for j in held_out
  ]
  masks = [
    b['mask']
    for b in data.create_eval_iterator(
      config, split='validation', local_batch_size=32, process_index=0, process_count=1
    )
  ]
  assert sum(int(m.sum()) for m in masks) == 100


class TestGeneratedJpegDataset:
  """The tests of the one generated JPEG dataset: one class, which pytest-xdist runs in one worker
  (see `pytest_xdist_make_scheduler` in conftest.py), so the module fixture `jpeg_dir` is built
  once."""

  def test_real_jpeg_dataset_uses_encoded_bytes_and_all_augmentations(self, jpeg_dir):
    config = make_config(
      name='generated_jpegs/tiny', data_dir=jpeg_dir, image_size=24, augment='imagenet'
    )
    source = sources.open_split(config, 'train')
    assert source.encoded and isinstance(source.records[0]['image'], bytes)
    assert source.native_shape == (None, None, 3)
    assert data.get_dataset_info(config) == data.DatasetInfo(
      'generated_jpegs/tiny', 5, (24, 24, 3), 24, 10, 'test'
    )
    for augment, normalize in (('imagenet', 'per_pixel_mean'), ('inception', 'mean_std')):
      config.data.augment, config.data.normalize = augment, normalize
      batch = next(
        data.create_train_iterator(
          config, local_batch_size=6, process_index=0, process_count=1, seed=0
        )
      )
      assert batch['image'].shape == (6, 24, 24, 3) and np.isfinite(batch['image']).all()
    for crops, scale, shape in (
      (1, None, (24, 24, 3)),
      (10, None, (10, 24, 24, 3)),
      (1, 40, (40, 40, 3)),
    ):
      batches = list(
        data.create_eval_iterator(
          config,
          split='test',
          local_batch_size=4,
          process_index=0,
          process_count=1,
          crops=crops,
          scale=scale,
        )
      )
      assert len(batches) == 3 and batches[0]['image'].shape == (4, *shape)
      assert sum(int(b['mask'].sum()) for b in batches) == 10

  def test_a_run_trained_at_one_resolution_is_tested_at_another(self, jpeg_dir, tmp_path):
    """FixRes / torchvision's new recipe: train crops at image_size, eval crops at
    eval_image_size cut from the shorter side resized to eval_resize; the statistics and the
    training input keep the training size, and the fully convolutional net takes both."""
    from resnet_jax import evaluate, train

    config = make_config(
      name='generated_jpegs/tiny',
      data_dir=jpeg_dir,
      image_size=16,
      augment='inception',
      normalize='per_pixel_mean',
      eval_image_size=24,
      eval_resize=28,
    )
    config.model.name, config.batch_size, config.eval_batch_size = 'resnet8', 8, 4
    config.num_train_steps, config.progress_bar = 2, False
    train_batch = next(
      data.create_train_iterator(
        config, local_batch_size=4, process_index=0, process_count=1, seed=0
      )
    )
    assert train_batch['image'].shape == (4, 16, 16, 3)
    for crops, shape in ((1, (24, 24, 3)), (10, (10, 24, 24, 3))):
      first = next(
        iter(
          data.create_eval_iterator(
            config, split='test', local_batch_size=4, process_index=0, process_count=1, crops=crops
          )
        )
      )
      assert first['image'].shape == (4, *shape)
    record = sources.open_split(config, 'test').records[0]
    pre = data.make_preprocessor(config)
    expected = augment_lib.center_crop(pre.base_uint8(record['image'], 28), 24)
    np.testing.assert_array_equal(first['image'][0, 4], expected)  # the 10 crops' centre view
    result = train.train_and_evaluate(config, str(tmp_path / 'run'))
    assert result['eval']['num_examples'] == 10 and np.isfinite(result['eval']['loss'])
    again = evaluate.evaluate_workdir(str(tmp_path / 'run'))
    assert again['top1_error'] == result['eval']['top1_error']

  def test_missing_split_names_the_available_ones(self, jpeg_dir):
    config = make_config(
      name='generated_jpegs/tiny', data_dir=jpeg_dir, image_size=24, augment='imagenet'
    )
    with pytest.raises(data.DatasetNotFoundError, match="no split 'dev'.*train"):
      data.create_eval_iterator(
        config, split='dev', local_batch_size=4, process_index=0, process_count=1
      )


@pytest.mark.parametrize(
  'name,expected',
  [
    ('cifar10', '`python -m resnet_jax.data.prepare cifar10 --data_dir='),
    ('fashion_mnist', '`python -m resnet_jax.data.prepare fashion_mnist --data_dir='),
    (
      'imagenet2012',
      '`python -m resnet_jax.data.prepare imagenet2012 --manual_dir=DIR --data_dir=',
    ),
    ('no_such_dataset_xyz', 'unknown dataset'),
  ],
)
def test_missing_dataset_is_one_clear_line(tmp_path, name, expected):
  config = make_config(name=name, data_dir=str(tmp_path), image_size=32)
  with pytest.raises(data.DatasetNotFoundError) as excinfo:
    data.create_train_iterator(config, local_batch_size=4, process_index=0, process_count=1, seed=0)
  message = str(excinfo.value)
  assert '\n' not in message and name in message and expected in message
  assert 'tfds build' not in message and 'pip install resnet_jax' not in message
  assert isinstance(excinfo.value, ValueError)


@pytest.mark.parametrize('split', ['test', 'test[:50]'])
def test_imagenet2012_test_split_is_refused_it_has_no_labels(tmp_path, split):
  # TFDS writes label -1 for every image of ILSVRC2012_img_test.tar: top-1 error would read 100%.
  config = make_config(name='imagenet2012', data_dir=str(tmp_path), image_size=32)
  with pytest.raises(data.DatasetNotFoundError, match="no labels.*'validation'") as excinfo:
    data.create_eval_iterator(
      config, split=split, local_batch_size=4, process_index=0, process_count=1
    )
  assert '\n' not in str(excinfo.value)


def test_dataset_not_in_array_record_format_points_to_prepare_overwrite(tmp_path):
  pytest.importorskip('tensorflow')  # TFDS writes TFRecord files with TensorFlow
  from resnet_jax.data import offline
  from tests import official_archives

  archive = str(tmp_path / 'cifar-10-binary.tar.gz')
  official_archives.write_cifar10_binary(archive, per_batch=2, test=2)
  builder = tfds.builder('cifar10', data_dir=str(tmp_path))  # TFDS's default format: TFRecord
  with offline.offline_download_manager(
    builder, {offline.CIFAR10_URL: archive}, report=lambda _: None
  ):
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(extract_dir=str(tmp_path / 'x'))
    )
  config = make_config(name='cifar10', data_dir=str(tmp_path))
  with pytest.raises(data.DatasetNotFoundError, match='not in ArrayRecord') as excinfo:
    sources.open_split(config, 'train')
  message = str(excinfo.value)
  assert f'`python -m resnet_jax.data.prepare cifar10 --overwrite --data_dir={tmp_path}`' in message
  assert 'tfds build' not in message and '\n' not in message
