"""The digits dataset and the pipeline contracts: sharding, determinism, resume, exact-once eval."""

import json

import grain
import jax
import ml_collections
import numpy as np
import pytest

import resnet_jax.data as data
from resnet_jax.data import digits as digits_lib
from resnet_jax.data import sources
from resnet_jax.data.device_preprocess import make_device_preprocess
from tests.runner import data_config


def make_config(**overrides) -> ml_collections.ConfigDict:
  return data_config(**overrides)


def take(it, n):
  return [next(it) for _ in range(n)]


def test_digits_splits_values_and_membership():
  builder = digits_lib.prepare_digits()
  splits = builder.as_data_source()
  assert {k: len(v) for k, v in splits.items()} == {'train': 1437, 'test': 360}
  images, labels = digits_lib.digits_arrays()
  from sklearn.datasets import load_digits

  raw = load_digits().images
  np.testing.assert_array_equal(images[..., 0], np.rint(raw * 255 / 16).astype(np.uint8))
  assert images.dtype == np.uint8 and images.min() == 0 and images.max() == 255
  for split, want in (('test', True), ('train', False)):
    got = sorted(r['image'].tobytes() + bytes([int(r['label'])]) for r in splits[split])
    expected = sorted(
      images[i].tobytes() + bytes([int(labels[i])])
      for i in range(len(labels))
      if (i % 5 == 0) == want
    )
    assert got == expected
    record = splits[split][0]
    assert record['image'].shape == (8, 8, 1) and record['image'].dtype == np.uint8


def test_dataset_info_digits_and_synthetic():
  info = data.get_dataset_info(make_config())
  assert info == data.DatasetInfo('digits', 10, (8, 8, 1), 1437, 360, 'test')
  info = data.get_dataset_info(make_config(name='synthetic', image_size=20, num_classes=7))
  assert (info.num_classes, info.image_shape, info.num_train_examples) == (
    7,
    (20, 20, 3),
    1_281_167,
  )


def test_train_batches_shape_normalisation_and_determinism():
  config = make_config()
  it = data.create_train_iterator(
    config, local_batch_size=16, process_index=0, process_count=1, seed=3
  )
  batches = take(it, 3)
  assert batches[0]['image'].shape == (16, 8, 8, 1) and batches[0]['image'].dtype == np.uint8
  assert batches[0]['label'].shape == (16,) and batches[0]['label'].dtype == np.int32
  again = take(
    data.create_train_iterator(
      config, local_batch_size=16, process_index=0, process_count=1, seed=3
    ),
    3,
  )
  other = next(
    data.create_train_iterator(
      config, local_batch_size=16, process_index=0, process_count=1, seed=4
    )
  )
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  assert not np.array_equal(batches[0]['image'], other['image'])
  # per-pixel mean subtraction (on the device): a whole epoch averages to ~0 at every pixel
  epoch = next(
    data.create_train_iterator(
      config, local_batch_size=1437, process_index=0, process_count=1, seed=0
    )
  )['image']
  epoch = np.asarray(make_device_preprocess(config)(epoch, rng=jax.random.key(0)))
  assert np.abs(epoch.mean(axis=0)).max() < 1e-3
  assert 0.5 < epoch.std() < 2.0


def test_each_normalisation_standardises_the_train_split_as_it_says():
  """data.normalize: 'per_pixel_mean' (paper) subtracts each pixel's train mean and divides by
  one scalar std (the train split then has zero mean at every pixel, unit mean variance);
  'mean_std' uses per-channel mean and std (zero mean, unit std per channel, pixels not
  centred one by one); 'scale' is x / 255."""
  raw, _ = digits_lib.digits_arrays()
  train = raw[np.arange(len(raw)) % 5 != 0]
  assert len(train) == 1437
  for kind in ('per_pixel_mean', 'mean_std', 'scale'):
    x = np.asarray(make_device_preprocess(make_config(normalize=kind))(train, rng=None), np.float64)
    if kind == 'scale':
      np.testing.assert_allclose(x, train / 255.0, rtol=1e-6)
      continue
    pixel_mean = x.mean(axis=0)
    if kind == 'per_pixel_mean':
      assert np.abs(pixel_mean).max() < 1e-3
      assert abs(x.var(axis=0).mean() - 1.0) < 1e-3
    else:
      assert np.abs(pixel_mean).max() > 0.5  # the border pixels stay off-centre
      assert abs(x.mean()) < 1e-3 and abs(x.std() - 1.0) < 1e-3


def test_each_epoch_is_a_new_permutation_of_the_train_split():
  config = make_config(normalize='scale')
  it = data.create_train_iterator(
    config, local_batch_size=479, process_index=0, process_count=1, seed=0
  )
  epochs = [
    np.concatenate([next(it)['image'] for _ in range(3)]) for _ in range(2)
  ]  # 3 * 479 = 1437
  train = digits_lib.prepare_digits().as_data_source(split='train')
  expected = sorted(r['image'].tobytes() for r in train)
  for epoch in epochs:
    assert sorted(x.tobytes() for x in epoch) == expected
  assert not np.array_equal(epochs[0], epochs[1])


@pytest.mark.parametrize('augment', ['none', 'cifar'])
def test_processes_split_the_global_batch(augment):
  config = make_config(augment=augment)
  single = take(
    data.create_train_iterator(
      config, local_batch_size=12, process_index=0, process_count=1, seed=1
    ),
    2,
  )
  shards = [
    take(
      data.create_train_iterator(
        config, local_batch_size=4, process_index=p, process_count=3, seed=1
      ),
      2,
    )
    for p in range(3)
  ]
  for step in range(2):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(
        np.concatenate([s[step][key] for s in shards]), single[step][key]
      )


def test_repeated_augmentation_repeats_each_image_across_the_batch_with_its_own_augmentation():
  """data.repeated_augmentations=4 (torchvision's ra_reps): a global batch of 12 holds 3 images of
  the stream, each 4 times at a stride of 3 (so on 4 devices every copy is on another device);
  the copies are augmented independently; processes still split the global batch."""

  def batches(config, local, p=0, n=1, steps=2):
    it = data.create_train_iterator(
      config, local_batch_size=local, process_index=p, process_count=n, seed=3
    )
    return take(it, steps)

  stream = batches(make_config(augment='none'), 6, steps=1)[0]  # the first 6 of the stream
  repeated = batches(make_config(augment='none', repeated_augmentations=4), 12)
  for t, batch in enumerate(repeated):
    for q in range(12):
      np.testing.assert_array_equal(batch['image'][q], stream['image'][3 * t + q % 3])
      assert batch['label'][q] == stream['label'][3 * t + q % 3]
  config = make_config(augment='inception', repeated_augmentations=4)
  single = batches(config, 12)
  images = single[0]['image']
  assert all(not np.array_equal(images[j], images[j + 3]) for j in range(3))  # own crops
  shards = [batches(config, 4, p, 3) for p in range(3)]
  for step in range(2):
    np.testing.assert_array_equal(
      np.concatenate([s[step]['image'] for s in shards]), single[step]['image']
    )


def test_repeats_that_do_not_divide_the_batch_give_the_last_images_one_copy_fewer():
  """timm's RSB repeats 3 times in batches of 2048: here 3 in a batch of 8 holds ceil(8/3) = 3
  images of the stream, the first two 3 times and the third twice, and the next batch goes on
  with the stream's fourth image."""
  stream = take(
    data.create_train_iterator(
      make_config(augment='none'), local_batch_size=6, process_index=0, process_count=1, seed=3
    ),
    1,
  )[0]
  repeated = take(
    data.create_train_iterator(
      make_config(augment='none', repeated_augmentations=3),
      local_batch_size=8,
      process_index=0,
      process_count=1,
      seed=3,
    ),
    2,
  )
  for t, batch in enumerate(repeated):
    for q in range(8):
      np.testing.assert_array_equal(batch['image'][q], stream['image'][3 * t + q % 3])
  assert [q % 3 for q in range(8)].count(2) == 2


def test_resume_from_state_gives_the_same_batches():
  config = make_config(augment='cifar')
  it = data.create_train_iterator(
    config, local_batch_size=32, process_index=0, process_count=1, seed=5
  )
  take(it, 50)  # crosses the first epoch boundary (1437 / 32 < 45)
  state = it.get_state()
  expected = take(it, 3)
  fresh = data.create_train_iterator(
    config, local_batch_size=32, process_index=0, process_count=1, seed=5
  )
  fresh.set_state(state)
  for a, b in zip(expected, take(fresh, 3)):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


@pytest.mark.parametrize('crops', [1, 10])
@pytest.mark.parametrize('process_count,local_batch_size', [(1, 7), (3, 7), (4, 100)])
def test_eval_counts_every_example_exactly_once(crops, process_count, local_batch_size):
  config = make_config(augment='cifar')
  per_process = [
    list(
      data.create_eval_iterator(
        config,
        split='test',
        local_batch_size=local_batch_size,
        process_index=p,
        process_count=process_count,
        crops=crops,
      )
    )
    for p in range(process_count)
  ]
  num_batches = data.num_eval_batches(360, local_batch_size, process_count)
  assert [len(b) for b in per_process] == [num_batches] * process_count
  shape = (local_batch_size, 8, 8, 1) if crops == 1 else (local_batch_size, 10, 8, 8, 1)
  global_batches = [
    {
      k: np.concatenate([per_process[p][i][k] for p in range(process_count)])
      for k in ('image', 'label', 'mask')
    }
    for i in range(num_batches)
  ]
  assert all(b['image'].shape[1:] == shape[1:] for b in global_batches)
  mask = np.concatenate([b['mask'] for b in global_batches])
  labels = np.concatenate([b['label'] for b in global_batches])
  images = np.concatenate([b['image'] for b in global_batches])
  assert mask.sum() == 360 and mask.dtype == np.bool_
  assert mask[:360].all() and not mask[360:].any()  # real examples first, padding at the end
  assert not images[~mask].any()
  test = digits_lib.prepare_digits().as_data_source(split='test')
  np.testing.assert_array_equal(
    labels[:360], [int(r['label']) for r in test]
  )  # split order, once each


def test_eval_ten_crops_are_padded_corners_and_flips():
  config = make_config(augment='cifar')
  batch = next(
    iter(
      data.create_eval_iterator(
        config, split='test', local_batch_size=2, process_index=0, process_count=1, crops=10
      )
    )
  )
  single = next(
    iter(
      data.create_eval_iterator(
        config, split='test', local_batch_size=2, process_index=0, process_count=1, crops=1
      )
    )
  )
  crops = batch['image'][0]
  np.testing.assert_allclose(crops[4], single['image'][0])  # centre crop == single-crop input
  np.testing.assert_allclose(crops[5:], crops[:5, :, ::-1])  # second five are the flips
  assert (
    not crops[0][0].any() and not crops[3][-1].any()
  )  # corner crops of the 1-pixel zero padding


def test_synthetic_is_deterministic_and_sized():
  config = make_config(
    name='synthetic',
    image_size=16,
    num_classes=5,
    num_train_examples=100,
    num_eval_examples=30,
    normalize='scale',
  )
  info = data.get_dataset_info(config)
  assert (info.num_train_examples, info.num_eval_examples, info.image_shape) == (
    100,
    30,
    (16, 16, 3),
  )
  a = next(
    data.create_train_iterator(config, local_batch_size=8, process_index=0, process_count=1, seed=0)
  )
  b = next(
    data.create_train_iterator(config, local_batch_size=8, process_index=0, process_count=1, seed=0)
  )
  np.testing.assert_array_equal(a['image'], b['image'])
  assert a['image'].dtype == np.uint8 and set(a['label']) <= set(range(5))
  scaled = np.asarray(make_device_preprocess(config)(a['image'], rng=None))
  assert scaled.min() >= 0 and scaled.max() <= 1 and scaled.max() > 0.5
  records = sources.open_split(config, 'train').records
  np.testing.assert_array_equal(records[7]['image'], records[7]['image'])
  assert not np.array_equal(records[7]['image'], records[8]['image'])
  masks = [
    b['mask']
    for b in data.create_eval_iterator(
      config, split=None, local_batch_size=8, process_index=0, process_count=1
    )
  ]
  assert sum(int(m.sum()) for m in masks) == 30


def test_worker_processes_give_the_same_batches_and_a_portable_state():
  config = make_config(
    name='synthetic', image_size=8, num_classes=3, num_train_examples=64, augment='cifar'
  )
  inline = take(
    data.create_train_iterator(
      config, local_batch_size=4, process_index=0, process_count=1, seed=2
    ),
    6,
  )
  config.data.num_workers = 2
  it = data.create_train_iterator(
    config, local_batch_size=4, process_index=0, process_count=1, seed=2
  )
  assert isinstance(it, grain.DatasetIterator)  # Orbax's Grain handler saves its state as JSON
  try:
    workers = take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
  finally:
    it.close()
  config.data.num_workers = 0  # resume on a machine with another worker count
  resumed = data.create_train_iterator(
    config, local_batch_size=4, process_index=0, process_count=1, seed=2
  )
  resumed.set_state(state)
  for a, b in zip(inline, workers + take(resumed, 3)):
    np.testing.assert_array_equal(a['image'], b['image'])


def test_auto_worker_count_is_one_per_usable_core_less_one(monkeypatch):
  """`data.num_workers=-1` (the ImageNet configs): a worker per core this process may use, less
  one for the training loop; explicit counts are kept (the test above: batches do not depend on
  the count)."""
  from resnet_jax.data import pipeline

  monkeypatch.setattr(pipeline.os, 'sched_getaffinity', lambda pid: set(range(16)), raising=False)
  assert pipeline.worker_count(-1) == 15
  monkeypatch.setattr(pipeline.os, 'sched_getaffinity', lambda pid: {0}, raising=False)
  assert pipeline.worker_count(-1) == 0
  assert pipeline.worker_count(3) == 3 and pipeline.worker_count(0) == 0


def test_state_restores_across_process_counts_and_rejects_another_seed():
  config = make_config(augment='cifar')
  single = data.create_train_iterator(
    config, local_batch_size=12, process_index=0, process_count=1, seed=1
  )
  take(single, 4)
  state = single.get_state()
  expected = next(single)
  shards = []
  for p in range(3):
    it = data.create_train_iterator(
      config, local_batch_size=4, process_index=p, process_count=3, seed=1
    )
    it.set_state(state)
    shards.append(next(it)['image'])
  np.testing.assert_array_equal(np.concatenate(shards), expected['image'])
  other = data.create_train_iterator(
    config, local_batch_size=12, process_index=0, process_count=1, seed=2
  )
  with pytest.raises(ValueError, match='seed'):
    other.set_state(state)
  smaller = data.create_train_iterator(
    config, local_batch_size=6, process_index=0, process_count=1, seed=1
  )
  with pytest.raises(ValueError, match='global_batch_size'):
    smaller.set_state(state)


def test_bad_arguments_fail_clearly():
  with pytest.raises(ValueError, match='augment'):
    data.create_train_iterator(
      make_config(augment='mixup'), local_batch_size=4, process_index=0, process_count=1, seed=0
    )
  with pytest.raises(ValueError, match='sharding'):
    data.create_eval_iterator(
      make_config(), split=None, local_batch_size=4, process_index=2, process_count=2
    )
