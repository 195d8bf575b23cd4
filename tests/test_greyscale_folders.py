"""Image trees read as greyscale (`data.channels=1`): X-ray or digit trees train 1-channel nets,
and a 1-channel run is tested on a tree. A tree has no channel count of its own (its files may be
greyscale, RGB, CMYK), so it is read in the count asked for: 3 by default, as torchvision's loader
converts every file to RGB."""

import os

import numpy as np
import pytest
from PIL import Image

import resnet_jax.data as data
from resnet_jax.data import pipeline, sources
from tests.test_image_folder import (  # cache, tree: the fixtures (the user cache here, a tree)
  cache,  # noqa: F401
  folder_config,
  tree,  # noqa: F401
)


def test_a_tree_read_as_greyscale(tree):
  """channels=1: the model input has one channel, each file converted as PIL's 'L' does
  (ITU-R 601 luma); the statistics are the greyscale pixels', cached apart from the RGB ones."""
  grey, rgb = folder_config(tree, channels=1), folder_config(tree)
  assert data.get_dataset_info(grey).image_shape == (16, 16, 1)
  assert data.get_dataset_info(rgb).image_shape == (16, 16, 3)
  records = sources.open_split(grey, 'train').records
  path = records[1]['path']  # a 20 x 28 RGB JPEG of the tree
  as_l = np.asarray(Image.open(path).convert('L').resize((16, 16), Image.BILINEAR))[..., None]
  got = data.make_preprocessor(grey).whole_image(records[1]['image'], (16, 16))
  assert got.shape == (16, 16, 1) and np.abs(got.astype(int) - as_l).max() <= 1
  grey_stats = pipeline.make_normalization(grey).normalizer
  rgb_stats = pipeline.make_normalization(rgb).normalizer
  assert np.shape(grey_stats.mean)[-1] == 1 and np.shape(rgb_stats.mean)[-1] == 3
  again = pipeline.make_normalization(grey).normalizer  # from the cache: still greyscale
  np.testing.assert_array_equal(again.mean, grey_stats.mean)


@pytest.mark.parametrize('channels', [2, 4, 0])
def test_other_channel_counts_are_refused_before_anything_is_written(tree, tmp_path, channels):
  from resnet_jax import train

  config = folder_config(tree, channels=channels)
  config.model.name = 'resnet8'
  with pytest.raises(ValueError, match=f'config.data.channels={channels}: image folders are read'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_a_digits_run_is_tested_on_its_test_images_written_as_a_tree(tmp_path):
  """A 1-channel run (digits) on a tree of its own test images as PNGs in numbered folders
  (ImageNet-V2's layout): the tree is read in the run's channel count, so the numbers are those
  of the run's own test split. It was refused: a tree was always read as 3 channels."""
  from resnet_jax import evaluate, train
  from tests.runner import data_config

  config = data_config(name='digits', image_size=8, eval_split='test')
  config.model.name, config.batch_size, config.eval_batch_size = 'resnet8', 16, 40
  config.num_train_steps, config.progress_bar = 2, False
  run = str(tmp_path / 'run')
  train.train_and_evaluate(config, run)
  test = sources.open_split(config, 'test').records
  for i in range(len(test)):
    folder = tmp_path / 'tree' / 'test' / str(test[i]['label'])
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(np.asarray(test[i]['image'])[..., 0]).save(folder / f'{i}.png')
  own = evaluate.evaluate_workdir(run, split='test')
  tree_dir = str(tmp_path / 'tree')
  on_tree = evaluate.evaluate_workdir(run, split='test', dataset='image_folder', data_dir=tree_dir)
  assert on_tree.pop('dataset') == 'image_folder'
  assert np.isclose(on_tree.pop('loss'), own.pop('loss'))  # summed in the tree's file order
  assert on_tree == own
