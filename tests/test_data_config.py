"""`config.data` values that the pipeline silently reinterpreted or failed on with a message that
names no config key are refused up front (validation.validate_data_sizes), before any file is
written; the held-out split's size is checked against the dataset where it is known."""

import os

import pytest

import resnet_jax.data as data
from resnet_jax import train, validation
from tests.runner import data_config, digits_config

_SYNTHETIC = {'data.name': 'synthetic', 'data.num_train_examples': 64}


@pytest.mark.parametrize(
  'overrides,needle',
  [
    ({'data.validation_size': -5}, 'data.validation_size must be non-negative'),  # was: ignored
    ({'data.prefetch': -1}, 'data.prefetch must be non-negative'),  # was: silently 1
    ({'data.image_size': -4}, "data.image_size must be non-negative (0: the dataset's own"),
    ({**_SYNTHETIC, 'data.image_size': 0}, 'data.image_size must be positive'),  # LinAlgError
    ({**_SYNTHETIC, 'data.channels': 0}, 'data.channels must be positive'),  # 'cannot reshape'
    ({**_SYNTHETIC, 'data.num_classes': 0}, 'data.num_classes must be positive'),  # 'high <= 0'
    ({**_SYNTHETIC, 'data.num_train_examples': -5}, 'data.num_train_examples must be non-neg'),
    ({**_SYNTHETIC, 'data.num_eval_examples': -1}, 'data.num_eval_examples must be non-neg'),
  ],
)
def test_bad_data_values_are_refused_before_anything_is_written(tmp_path, overrides, needle):
  config = digits_config(**overrides)
  with pytest.raises(validation.ConfigError, match=needle.replace('(', r'\(')):
    validation.validate_config(config)
  with pytest.raises(validation.ConfigError):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize(
  'overrides',
  [
    {'data.image_size': 0, 'data.prefetch': 0, 'data.validation_size': 0},
    {**_SYNTHETIC, 'data.image_size': 9, 'data.channels': 2, 'data.num_classes': 1},
    {**_SYNTHETIC, 'data.num_train_examples': 0, 'data.num_eval_examples': 0},
  ],
)
def test_boundary_data_values_are_accepted(overrides):
  validation.validate_config(digits_config(**overrides))


def test_a_validation_split_as_large_as_the_train_split_names_the_key():
  config = data_config(validation_size=1437, eval_split='validation')
  with pytest.raises(ValueError, match=r"data.validation_size=1437 .* split 'train' of digits"):
    data.get_dataset_info(config)
  assert data.get_dataset_info(data_config(validation_size=1436)).num_train_examples == 1


def test_a_missing_validation_split_says_how_to_hold_one_out():
  with pytest.raises(data.DatasetNotFoundError, match=r'available: train, test\), or set config'):
    data.get_dataset_info(data_config(eval_split='validation'))
  info = data.get_dataset_info(data_config(eval_split='validation', validation_size=100))
  assert (info.num_train_examples, info.num_eval_examples) == (1337, 100)


@pytest.mark.parametrize('split', ['test[360:]', 'test[:0]', 'test[:abc]'])
def test_an_empty_or_malformed_slice_of_an_existing_split_is_named_as_such(split):
  """Was "dataset 'digits' has no split 'test[360:]' (available: train, test)"."""
  with pytest.raises(data.DatasetNotFoundError, match='selects no examples or is not a valid'):
    data.get_dataset_info(data_config(eval_split=split))
  assert data.get_dataset_info(data_config(eval_split='test[359:]')).num_eval_examples == 1


def test_a_misspelt_evaluator_split_is_refused_before_training(tmp_path):
  """config.evals splits were first opened at their evaluation: an end-only evaluator with a
  misspelt split failed after the whole run had trained."""
  config = digits_config(num_train_steps=2, progress_bar=False)
  config.evals.extra = dict(split='tset', every_steps=0)
  with pytest.raises(data.DatasetNotFoundError, match="no split 'tset'"):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize(
  'name,sub,needle',
  [
    ('digits', '', 'is a file, not a directory'),  # was: FileExistsError traceback
    ('digits', 'sub', 'Not a directory'),  # was: NotADirectoryError traceback
    ('mnist', '', 'is a file, not a directory'),  # was: "not prepared: prepare it into the file"
  ],
)
def test_a_data_dir_that_is_a_file_is_one_clear_error(tmp_path, name, sub, needle):
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  data_dir = os.path.join(str(blocker), sub) if sub else str(blocker)
  with pytest.raises(data.DatasetNotFoundError, match=needle):
    data.get_dataset_info(data_config(name=name, data_dir=data_dir))


def test_a_data_dir_with_a_tilde_is_the_one_prepare_wrote(tmp_path, monkeypatch):
  """`prepare --data-dir '~/tfds'` expands the '~'; training read '~/tfds' literally (TFDS made a
  directory named '~' in the cwd), so data prepared there was 'not prepared'."""
  from resnet_jax.data import prepare

  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  monkeypatch.chdir(tmp_path)
  assert prepare.main(['digits', '--data-dir', '~/tfds']) == 0
  assert (tmp_path / 'home' / 'tfds' / 'digits' / '1.0.0' / 'dataset_info.json').exists()
  info = data.get_dataset_info(data_config(data_dir='~/tfds'))
  assert info.num_train_examples == 1437 and not (tmp_path / '~').exists()


def test_an_empty_data_dir_is_the_default_one_not_the_cwd(tmp_path, monkeypatch):
  """`--config.data.data_dir=` (empty) prepared the digits into the current directory."""
  monkeypatch.chdir(tmp_path)
  assert data.get_dataset_info(data_config(data_dir='')).num_train_examples == 1437
  assert not (tmp_path / 'digits').exists() and not (tmp_path / '.digits.lock').exists()
