"""Rules of this session's code (testing a run on another dataset: ImageNet-A/R's subsets scored
on their classes, class names of trees and TFDS datasets, greyscale trees, the tree's file index,
init_from checked before a workdir is made) that mutation audit 7 (a one-line change to each, one
at a time; docs/mutation-audit-7.md) found no test for: each test below fails on that change and
passes on the code."""

import os
import shutil

import pytest

from resnet_jax import other_datasets, runtime
from resnet_jax.data import folder_index, sources
from tests.test_image_folder import (  # cache, tree: the fixtures (the user cache here, a tree)
  cache,  # noqa: F401
  folder_config,
  tree,  # noqa: F401
)


def _alone(tree, root, split, folders):
  """A test set extracted alone: `root/split/<new>` holding the images of the tree's `old`."""
  for new, old in folders.items():
    shutil.copytree(os.path.join(tree, 'train', old), os.path.join(root, split, new))
  return str(root)


# ----------------------------------------------------------------------------- other_datasets.py


def test_the_default_split_of_a_versioned_test_set_is_its_own():
  """ReaL's labels are ImageNet's validation images' ('validation'), also when the version is
  named as TFDS allows ('imagenet2012_real:1.0.0'); CIFAR-10.1's and ImageNet-V2's only split is
  'test'."""
  assert other_datasets.default_split('imagenet2012_real:1.0.0') == 'validation'
  assert other_datasets.default_split('imagenet2012_real') == 'validation'
  assert other_datasets.default_split('imagenet_v2') == 'test'
  assert other_datasets.default_split('cifar10_1') == 'test'


def test_a_numbered_tree_alone_indexes_the_run_s_classes_even_with_some_missing(tree, tmp_path):
  """ImageNet-V2's layout: folder k is the run's class k, of the run's count, whichever folders
  the extracted test set holds (here 0 and 2 of the run's three)."""
  experiment = runtime.build_experiment(folder_config(tree))
  root = _alone(tree, tmp_path / 'v2', 'test', {'0': 'n01', '2': 'n10'})
  config, columns = other_datasets.on_other_dataset(experiment, 'image_folder', None, root)
  assert columns is None and config.data.eval_split == 'test'
  source = sources.open_split(config, 'test')
  assert source.num_classes == 3
  labels = {source.records[i]['label'] for i in range(len(source.records))}
  assert labels == {0, 2}


# ------------------------------------------------------------------------------------ sources.py


def test_the_classes_a_subset_holds_are_sorted_and_found_again_when_the_data_changes(tmp_path):
  """ImageNet-A's labels are renumbered in the sorted order of the ImageNet classes it holds (its
  label k: the k-th held class); the scan is cached beside the dataset, per dataset, split and
  size, so another split or a re-prepared, larger split is scanned anew."""
  records = [{'label': 999}, {'label': 3}, {'label': 600}, {'label': 3}]
  held = sources._held_classes(records, 'label', 'imagenet_a', 'test', str(tmp_path))
  assert held.tolist() == [3, 600, 999]
  more = records + [{'label': 42}]
  again = sources._held_classes(more, 'label', 'imagenet_a', 'test', str(tmp_path))
  assert again.tolist() == [3, 42, 600, 999]
  other = [{'label': 7}] * 5  # another split of the same size
  assert sources._held_classes(other, 'label', 'imagenet_a', 'x', str(tmp_path)).tolist() == [7]


# ---------------------------------------------------------------- runtime.py, workdir.py, predict


def test_another_dataset_is_read_whole_at_its_own_place(tree, tmp_path):
  """`config_reading`: the run's held-out images are carved from its own data, so another
  dataset is read whole (validation_size 0), from `data_dir` when given, and a tree in the run's
  channels."""
  experiment = runtime.build_experiment(folder_config(tree, validation_size=2, channels=1))
  config = experiment.config_reading('image_folder', str(tmp_path / 'other'))
  assert config.data.validation_size == 0 and config.data.data_dir == str(tmp_path / 'other')
  assert config.data.channels == 1 and config.data.name == 'image_folder'
  assert experiment.config.data.validation_size == 2  # the run's own config is left as it was
  assert experiment.config.data.data_dir == tree


def test_a_run_without_class_names_has_none(tmp_path):
  """Runs on numbered or synthetic classes, and runs from before class_names.json, have no file:
  no names, and no error."""
  from resnet_jax.workdir import read_class_names

  assert read_class_names(tmp_path) is None


def test_predict_takes_a_run_s_names_only_for_as_many_classes_and_wnids_without_torchvision(
  tmp_path, monkeypatch
):
  """A run's names name the model's classes only when they are as many (weights given with
  another head); ImageNet's WordNet ids are the run's names when torchvision's words are not
  installed."""
  from resnet_jax import predict

  assert predict.class_names(3, None, ['a', 'b']) == ['class 0', 'class 1', 'class 2']
  wnids = [f'n{i:08d}' for i in range(1000)]
  monkeypatch.setattr(predict.importlib.util, 'find_spec', lambda name: None)
  assert predict.class_names(1000, None, wnids) == wnids


def test_data_dir_may_name_a_remote_store(tmp_path):
  """`evaluate --data-dir gs://...` (TFDS reads buckets): not a local directory, and not refused
  as one (the missing workdir is what fails here)."""
  from resnet_jax import evaluate
  from resnet_jax.workdir import WorkdirError

  with pytest.raises(WorkdirError, match='is not a training run'):
    evaluate.evaluate_workdir(str(tmp_path / 'no_run'), data_dir='gs://bucket/tensorflow_datasets')


# ------------------------------------------------------------------------------------- train.py


def test_init_from_is_read_once_and_only_for_a_fresh_run(tmp_path, monkeypatch):
  """A fine-tune reads its init_from weights once (checked before the workdir is made, then
  used); once checkpoints exist it resumes from them, so init_from is neither read nor needed:
  the pretrained weights may have been moved away meanwhile."""
  from resnet_jax import pretrained, train
  from tests.test_train_loop import ArrayBatches, _config

  base = _config(steps=2)
  train.train_and_evaluate(base, str(tmp_path / 'pre'), train_iter=ArrayBatches(16))
  reads = []
  load = pretrained.load_model_variables
  monkeypatch.setattr(pretrained, 'load_model_variables', lambda p: reads.append(p) or load(p))
  config = _config(steps=2)
  config.init_from = str(tmp_path / 'pre')
  train.train_and_evaluate(config, str(tmp_path / 'ft'), train_iter=ArrayBatches(16))
  assert reads == [str(tmp_path / 'pre')]
  shutil.rmtree(tmp_path / 'pre')
  config.num_train_steps = 4
  result = train.train_and_evaluate(config, str(tmp_path / 'ft'), train_iter=ArrayBatches(16))
  assert result['step'] == 4 and reads == [str(tmp_path / 'pre')]


def test_a_tree_of_other_classes_and_another_count_is_refused(tree, tmp_path):
  """Fewer classes, not all among the run's by name: no subset to score on, so refused as
  another label space (it would score every image against unrelated logits)."""
  experiment = runtime.build_experiment(folder_config(tree))
  root = _alone(tree, tmp_path / 'pets', 'test', {'cat': 'n01', 'dog': 'n02'})
  with pytest.raises(ValueError) as e:
    other_datasets.on_other_dataset(experiment, 'image_folder', None, root)
  assert 'image_folder has 2 classes and the run was trained on image_folder, which has 3' in str(
    e.value
  )
  assert "or named as the run's classes" in str(e.value)


def test_a_subset_maps_by_the_run_s_names_even_when_they_are_digits():
  """A run's recorded names are matched as they are: MNIST's TFDS names are '0'..'9', so a test
  set naming two of them '3' and '7' holds the run's classes 3 and 7."""
  from resnet_jax import data

  mnist = data.DatasetInfo('mnist', 10, (28, 28, 1), 1, 1, 'test', tuple(map(str, range(10))))
  assert other_datasets.class_columns(('3', '7'), mnist) == (3, 7)


def test_a_subset_maps_to_the_run_s_columns_in_the_run_s_own_order():
  """The run's label order is its dataset's (TFDS's ClassLabel order, not always sorted): a
  subset's class maps to the column of its name in that order."""
  from resnet_jax import data

  run = data.DatasetInfo('pets', 3, (32, 32, 3), 1, 1, 'test', ('truck', 'bird', 'cat'))
  assert other_datasets.class_columns(('cat', 'truck'), run) == (2, 0)


def test_class_names_json_keeps_the_label_order_and_refuses_a_list_of_other_things(tmp_path):
  """class_names.json: entry k names label k, in the dataset's own order (unsorted here), and a
  file that is a list of anything but names is one clear error."""
  from resnet_jax.default_config import base_config
  from resnet_jax.workdir import (
    CLASS_NAMES_FILE,
    WorkdirError,
    as_path,
    read_class_names,
    write_run_record,
  )

  write_run_record(as_path(tmp_path), base_config(), ('truck', 'bird', 'cat'))
  assert read_class_names(tmp_path) == ['truck', 'bird', 'cat']
  (tmp_path / CLASS_NAMES_FILE).write_text('["a", 1]')
  with pytest.raises(WorkdirError, match='is not a list of names'):
    read_class_names(tmp_path)


@pytest.mark.parametrize('augment', ['none', 'cifar', 'translate', 'bit'])
def test_the_opencv_decoder_goes_with_the_crop_augments_only(augment):
  """data.decoder='opencv' decodes the random crops of 'imagenet' and 'inception'; the other
  augments decode with PIL, so there it would be ignored: refused."""
  from resnet_jax import validation
  from tests.runner import digits_config

  for crop in ('imagenet', 'inception'):
    validation.validate_config(digits_config(**{'data.augment': crop, 'data.decoder': 'opencv'}))
  config = digits_config(**{'data.augment': augment, 'data.decoder': 'opencv'})
  with pytest.raises(validation.ConfigError, match=f'augment {augment!r} decodes with PIL'):
    validation.validate_config(config)


@pytest.mark.parametrize('name', ['imagenet_a', 'imagenet_r'])
def test_imagenet_a_and_r_are_read_in_the_classes_they_hold(name, tmp_path):
  """Hendrycks et al.'s ImageNet-A and ImageNet-R both hold 200 of ImageNet's classes and are
  scored on those: each is read in the label space of the classes it holds (TFDS's builder, mock
  records), label k naming the k-th held class."""
  import tensorflow_datasets as tfds

  from tests.runner import data_config

  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    raw = tfds.builder(name).as_data_source('test')
    every = tfds.builder(name).info.features['label'].names
    source = sources.open_split(data_config(name=name, eval_split='test'), 'test')
    held = sorted({every[int(raw[i]['label'])] for i in range(len(raw))})
    assert len(every) == 1000 and source.class_names == tuple(held)
    assert source.num_classes == len(held)
    for i in range(len(raw)):
      assert source.class_names[source.records[i]['label']] == every[int(raw[i]['label'])]
    versioned = f'{name}:{tfds.builder(name).version}'  # TFDS's name:version, as pinned runs say
    again = sources.open_split(data_config(name=versioned, eval_split='test'), 'test')
    assert again.class_names == tuple(held)


@pytest.mark.parametrize(
  'names',
  [
    [f'n{i:07d}' for i in range(1000)],  # 8 characters
    [f'x{i:08d}' for i in range(1000)],
    [f'n{i:04d}abcd' for i in range(1000)],
  ],
)
def test_a_run_s_own_1000_names_are_kept_unless_they_are_wordnet_ids(names):
  """Only ImageNet's WordNet ids (n + 8 digits) give way to torchvision's words; a run's other
  1000 names, however alike, are its own."""
  from resnet_jax import predict

  assert predict.class_names(1000, None, names) == names


def test_data_dir_may_start_with_a_tilde(tmp_path, monkeypatch):
  """`--data-dir ~/tensorflow_datasets` as the shell leaves it quoted: the home directory's."""
  from resnet_jax import evaluate
  from resnet_jax.workdir import WorkdirError

  monkeypatch.setenv('HOME', str(tmp_path))
  (tmp_path / 'tfds').mkdir()
  with pytest.raises(WorkdirError, match='is not a training run'):
    evaluate.evaluate_workdir(str(tmp_path / 'no_run'), data_dir='~/tfds')


def test_imagenet_r_ends_with_the_evaluate_command():
  from resnet_jax.data import prepare

  assert prepare.evaluate_command('imagenet_r', None) == (
    'python -m resnet_jax.evaluate --workdir=runs/r50 --dataset=imagenet_r'
  )


def test_a_test_set_of_the_run_s_count_in_other_channels_is_refused(tmp_path):
  """A digits run (1-channel images, numbered classes) on SVHN (10 numbered classes, RGB): the
  labels pass, the channels do not, so no number comes out (TFDS's builder, mock records)."""
  import tensorflow_datasets as tfds

  from resnet_jax.default_config import load_sibling_config

  configs = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs', 'x.py')
  config = load_sibling_config(configs, 'digits').get_config('depth=8,steps=2,batch=16')
  experiment = runtime.build_experiment(config)
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(ValueError, match='svhn_cropped has 3-channel images and the run was'):
      other_datasets.on_other_dataset(experiment, 'svhn_cropped', None)


def test_a_fine_tune_stopped_before_its_first_checkpoint_starts_again_from_init_from(
  tmp_path, monkeypatch
):
  """A run stopped before it saved anything leaves an empty checkpoints/: started again, it has
  nothing to resume, so it starts as it did, from the init_from weights (not a random init)."""
  from resnet_jax import pretrained, train
  from tests.test_train_loop import ArrayBatches, _config

  train.train_and_evaluate(_config(steps=2), str(tmp_path / 'pre'), train_iter=ArrayBatches(16))
  reads = []
  load = pretrained.load_model_variables
  monkeypatch.setattr(pretrained, 'load_model_variables', lambda p: reads.append(p) or load(p))
  (tmp_path / 'ft' / 'checkpoints').mkdir(parents=True)
  config = _config(steps=2)
  config.init_from = str(tmp_path / 'pre')
  result = train.train_and_evaluate(config, str(tmp_path / 'ft'), train_iter=ArrayBatches(16))
  assert result['step'] == 2 and reads == [str(tmp_path / 'pre')]


def test_a_subset_is_scored_on_its_classes_at_several_scales_too(tmp_path, monkeypatch):
  """Whole-image testing at several scales (`--scales`, an evaluator's `scales`) of ImageNet-A
  is scored on the logits of the classes it holds, as its one-view evaluation is (TFDS's
  builders, mock records): the network seen by the multi-scale evaluation gives those only."""
  import jax
  import jax.numpy as jnp
  import tensorflow_datasets as tfds

  from resnet_jax import evaluate, evaluators, train
  from tests.runner import data_config

  widths = []

  def spy(module):
    original = module.run_multiscale_evaluation

    def run(apply_fn, variables, *args, **kwargs):
      x = jnp.zeros((1, 16, 16, 3))
      widths.append(jax.eval_shape(lambda v: apply_fn(v, x, train=False), variables).shape[-1])
      return original(apply_fn, variables, *args, **kwargs)

    monkeypatch.setattr(module, 'run_multiscale_evaluation', run)

  spy(evaluate)
  spy(evaluators)
  config = data_config(
    name='imagenet2012', image_size=16, augment='inception', eval_split='validation'
  )
  config.data.data_dir = str(tmp_path / 'tfds')
  config.model.name, config.batch_size, config.eval_batch_size = 'resnet8', 4, 4
  config.num_train_steps, config.progress_bar = 1, False
  config.evals.a = dict(dataset='imagenet_a', scales='16')
  run = str(tmp_path / 'run')
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    raw = tfds.builder('imagenet_a').as_data_source('test')
    held = len({int(raw[i]['label']) for i in range(len(raw))})
    train.train_and_evaluate(config, run)
    got = evaluate.evaluate_workdir(run, dataset='imagenet_a', scales=[16])
  assert got['classes_scored'] == held < 1000
  assert widths == [held, held]  # the evaluator's, then evaluate's


def test_an_rgb_tree_s_statistics_are_found_where_they_were_cached_before_greyscale_trees(tree):
  """Reading a tree as greyscale (data.channels=1) keys its statistics apart; an RGB tree's
  cache key is what it was before, the tree's real path and file list, so statistics already
  computed for a large tree (a pass over every image) are found again, not computed anew."""
  from resnet_jax.data import image_folder

  real = os.path.realpath(os.path.join(tree, 'train'))
  files = folder_index.cached_scan(real)['files']
  before = os.path.join(
    folder_index.cache_root(), 'image_folder', f'stats-{folder_index.digest(real, files)}'
  )
  assert image_folder._stats_dir(tree, 'train') == before
  assert image_folder._stats_dir(tree, 'train', channels=3) == before
  assert image_folder._stats_dir(tree, 'train', channels=1) != before


def test_a_tree_alone_is_named_unless_every_folder_is_a_number(tmp_path):
  """A test set extracted alone with named class folders, one of which happens to be a number
  ('3' beside 'n01'), is named (its sorted folder names are its classes), not numbered: only
  ImageNet-V2's all-number layout indexes the run's classes."""
  from PIL import Image

  for folder in ('n01', '3'):
    os.makedirs(tmp_path / 'only' / 'test' / folder)
    Image.new('RGB', (8, 8)).save(tmp_path / 'only' / 'test' / folder / 'a.png')
  config = folder_config(str(tmp_path / 'only'), eval_split='test')
  source = sources.open_split(config, 'test')
  assert source.class_names == ('3', 'n01') and source.num_classes == 2


@pytest.mark.parametrize('folders', [('n01', 'n10'), ('0', '2')])
def test_a_tree_alone_is_read_in_the_channels_asked_for(folders, tmp_path):
  """A test set extracted alone (named as ImageNet-A's, numbered as ImageNet-V2's) is read in
  the run's channels like any tree: greyscale for a greyscale run, whatever its files hold."""
  from PIL import Image

  for folder in folders:
    os.makedirs(tmp_path / 'only' / 'test' / folder)
    Image.new('RGB', (8, 8), (200, 10, 10)).save(tmp_path / 'only' / 'test' / folder / 'a.png')
  config = folder_config(str(tmp_path / 'only'), eval_split='test', channels=1)
  config.model.num_classes = 3
  assert sources.open_split(config, 'test').native_shape[2] == 1


def test_a_probe_on_a_numbered_tree_reads_its_own_classes(tree, tmp_path):
  """A few-shot probe learns its own classifier: a tree it reads is not taken as the run's
  classes (model.num_classes is cleared), so a numbered tree alone has its own count."""
  from resnet_jax import fewshot

  config = folder_config(tree)
  config.model.num_classes = 3
  experiment = runtime.build_experiment(config)
  probe = fewshot.probe_config(experiment, 'image_folder', str(tmp_path / 'other'))
  assert probe.model.num_classes is None and experiment.config.model.num_classes == 3
