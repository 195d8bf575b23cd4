"""TFDS datasets this project cannot train on are refused when opened, in one line, from their
metadata alone (nothing is prepared or downloaded): before, a `Tensor` label was an
AttributeError traceback, a multi-label `Sequence` label went on to `int(label)`, float 13-band
images reached PIL, and places365_small (three supervised keys) was 'too many values to unpack'."""

import pytest

import resnet_jax.data as data
from tests.runner import data_config


@pytest.mark.parametrize(
  'name,needle',
  [
    ('imagenet_pi', "label 'annotator_labels' is a Tensor, not a ClassLabel"),
    ('bigearthnet', "label 'labels' is a Sequence, not a ClassLabel"),
    ('eurosat/all', "image 'sentinel2' is a Tensor (64, 64, 13) of float32, expected uint8"),
    ('pet_finder', "image 'attributes' is a FeaturesDict"),
    ('celeb_a', 'not an image classification dataset'),
  ],
)
def test_datasets_that_are_not_single_label_images_are_one_clear_line(tmp_path, name, needle):
  with pytest.raises(
    data.DatasetNotFoundError, match=needle.replace('(', r'\(').replace(')', r'\)')
  ):
    data.get_dataset_info(data_config(name=name, data_dir=str(tmp_path)))


@pytest.mark.parametrize(
  'name', ['places365_small', 'eurosat/rgb', 'emnist', 'imagenette', 'imagenet2012_real']
)
def test_single_label_image_datasets_get_to_the_prepare_hint(tmp_path, name):
  """Not prepared here, so they stop at the `prepare` hint: past every check of their kind.
  (imagenet2012_real's supervised label is a set, ReaL's: its single label, `original_label`, is
  read, and the set beside it for evaluation.)"""
  with pytest.raises(data.DatasetNotFoundError, match='is not prepared in'):
    data.get_dataset_info(data_config(name=name, data_dir=str(tmp_path)))


@pytest.mark.parametrize(
  'name,offline',
  [('cifar10', True), ('imagenette/320px', True), ('imagenet_v2', False), ('eurosat/rgb', False)],
)
def test_the_prepare_hint_offers_from_only_where_prepare_takes_archives(tmp_path, name, offline):
  """`--from ARCHIVE` converts the official archives of a few datasets; for the others (e.g.
  imagenet_v2, any TFDS name) the hint says TFDS downloads them instead of offering a flag that
  `prepare` would refuse."""
  with pytest.raises(data.DatasetNotFoundError) as e:
    data.get_dataset_info(data_config(name=name, data_dir=str(tmp_path)))
  assert ('--from ARCHIVE' in str(e.value)) == offline
  assert ('TFDS downloads it' in str(e.value)) != offline
