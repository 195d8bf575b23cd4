"""What a run's classes are called (a tree's class folders, a TFDS dataset's label names), and
what that protects: a test set is scored by a run only when its classes are the run's, by name
wherever both name them, and `predict` prints the run's names."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import resnet_jax.data as data
from resnet_jax import evaluate, other_datasets, predict, runtime, train
from resnet_jax.data import folder_index, sources
from resnet_jax.data.split import named_classes
from resnet_jax.workdir import CLASS_NAMES_FILE, WorkdirError, read_class_names
from tests.runner import data_config
from tests.test_image_folder import (  # cache, tree: the fixtures (the user cache here, a tree)
  _photos,
  _save,
  cache,  # noqa: F401
  folder_config,
  tiny_run_config,
  tree,  # noqa: F401
)

CIFAR10 = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')


def test_numbers_are_not_names():
  """TFDS names a ClassLabel given only a count '0', '1', ... (digits, MNIST, CIFAR-10-C): that
  says nothing about what the classes are, so such labels are compared by index only."""
  assert named_classes(['0', '1', '2']) is None and named_classes(None) is None
  assert named_classes(['cat', 'dog']) == ('cat', 'dog')
  assert named_classes(['0', '1', '10', '2']) == ('0', '1', '10', '2')  # folders sorted as text


def test_sources_carry_the_names_of_their_labels(tree):
  """A tree's labels are its train split's sorted class folders, in every split (val holds two
  of the three); digits' are numbers, so none (a prepared CIFAR-10's: test_real_datasets.py)."""
  for split in ('train', 'val'):
    source = sources.open_split(folder_config(tree), split)
    assert source.class_names == ('n01', 'n02', 'n10')
  assert data.get_dataset_info(folder_config(tree)).class_names == ('n01', 'n02', 'n10')
  digits = data.get_dataset_info(data_config(name='digits', image_size=8, eval_split='test'))
  assert digits.class_names is None


STL10 = ('airplane', 'bird', 'car', 'cat', 'deer', 'dog', 'horse', 'monkey', 'ship', 'truck')


def _run(class_names):
  """The run's dataset, as `check_class_names` and `class_columns` read it."""
  return data.DatasetInfo('cifar10', 10, (32, 32, 3), 1, 1, 'test', class_names)


@pytest.mark.parametrize(
  'given, run_names, refused',
  [
    (STL10, CIFAR10, "class 1 is 'bird' there and 'automobile' in the run"),
    (CIFAR10[::-1], CIFAR10, "class 0 is 'truck' there and 'airplane' in the run"),  # the order
    (CIFAR10, CIFAR10, None),
    (tuple(map(str, range(10))), CIFAR10, None),  # CIFAR-10-C's labels: indices of the run's
    (CIFAR10, None, None),  # a run on digits or synthetic data: nothing to compare
  ],
)
def test_a_test_set_with_other_class_names_is_refused(given, run_names, refused):
  """STL-10 has CIFAR-10's count and channels but not its classes: scored by a CIFAR-10 run, its
  'bird' images would be judged against the run's 'automobile'. Named classes must match."""
  check = other_datasets.check_class_names
  if refused is None:
    check('stl10', given, _run(run_names))
    return
  with pytest.raises(ValueError) as e:
    check('stl10', given, _run(run_names))
  assert refused in str(e.value) and 'a test set built for the same classes' in str(e.value)


def test_a_tree_run_records_its_names_and_refuses_another_tree_s(tree, tmp_path, capsys):
  """The run writes class_names.json; `evaluate --dataset image_folder` on a tree whose classes
  have the run's count but other names is refused (it scored them by position, silently); the
  same names pass; `predict --checkpoint RUN` prints the folder names, not 'class 1'."""
  config = tiny_run_config(tree)
  run = str(tmp_path / 'run')
  train.train_and_evaluate(config, run)
  assert read_class_names(run) == ['n01', 'n02', 'n10']

  other = tmp_path / 'other'
  for name, folder in (('n01', 'cat'), ('n02', 'dog'), ('n10', 'fox')):
    shutil.copytree(os.path.join(tree, 'train', name), other / 'train' / folder)
  with pytest.raises(ValueError) as e:
    evaluate.evaluate_workdir(run, split='train', dataset='image_folder', data_dir=str(other))
  assert "class 0 is 'cat' there and 'n01' in the run" in str(e.value)
  assert "name its class folders as the run's classes are named, or by class index" in str(e.value)
  for name, folder in (('n01', 'cat'), ('n02', 'dog'), ('n10', 'fox')):
    os.rename(other / 'train' / folder, other / 'train' / name)
  folder_index.MEMORY.clear()
  same = evaluate.evaluate_workdir(run, split='train', dataset='image_folder', data_dir=str(other))
  own = evaluate.evaluate_workdir(run, split='train')
  assert same['top1_error'] == own['top1_error'] and np.isclose(same['loss'], own['loss'])

  photo = tmp_path / 'photo.png'
  _save(str(photo), _photos()[0], 'PNG')
  predict.main(['--arch', 'resnet8', '--checkpoint', run, str(photo)])
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 3 and sorted(line.split()[1] for line in lines) == ['n01', 'n02', 'n10']
  assert {line.split()[2] for line in lines} == {'(0)', '(1)', '(2)'}
  for line in lines:  # each name beside its own index
    assert ['n01', 'n02', 'n10'][int(line.split()[2].strip('()'))] == line.split()[1]


def test_predict_names_come_from_labels_then_the_run_then_imagenet(tmp_path):
  """--labels wins; a run's names next, except ImageNet's WordNet ids, for which torchvision's
  words (same sorted-id order) read better; a damaged class_names.json is one clear error."""
  assert predict.class_names(3, None, ['a', 'b', 'c']) == ['a', 'b', 'c']
  labels = tmp_path / 'labels.txt'
  labels.write_text('x\ny\nz\n')
  assert predict.class_names(3, str(labels), ['a', 'b', 'c']) == ['x', 'y', 'z']
  wnids = [f'n{i:08d}' for i in range(1000)]
  imagenet = predict.class_names(1000, None, wnids)
  torchvision = predict.class_names(1000)
  assert imagenet == (torchvision if torchvision[0] != 'class 0' else wnids)
  assert predict.class_names(2, None, None) == ['class 0', 'class 1']
  (tmp_path / CLASS_NAMES_FILE).write_text('["a", ')
  with pytest.raises(WorkdirError, match='class_names.json is not valid JSON'):
    read_class_names(tmp_path)
  (tmp_path / CLASS_NAMES_FILE).write_text(json.dumps({'a': 1}))
  with pytest.raises(WorkdirError, match='is not a list of names'):
    read_class_names(tmp_path)


def test_a_subset_of_the_run_s_classes_maps_by_name():
  """ImageNet-A/R hold 200 of ImageNet's 1000 classes, named by WordNet id: each maps to the
  run's column of that name. Anything else (other names, as many classes, numbers, a name twice)
  is no subset and stays refused."""
  run = _run(CIFAR10)
  columns = other_datasets.class_columns
  assert columns(('truck', 'bird', 'cat'), run) == (9, 2, 3)
  assert columns(('truck', 'unicorn'), run) is None
  assert columns(CIFAR10, run) is None  # the same count: compared by check_class_names instead
  assert columns(('0', '1'), run) is None and columns(('cat',), _run(None)) is None
  assert columns(('cat', 'cat'), run) is None


def test_scored_on_keeps_the_subset_s_logits():
  """Hendrycks et al.'s protocol: softmax, loss and top-k over the subset's logits only, label k
  of the test set meaning the run's class columns[k]."""
  from resnet_jax.train_step import metric_sums

  logits = np.log(np.asarray([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]], np.float32))
  apply = other_datasets.scored_on(lambda v, x, train: logits, (2, 0))
  np.testing.assert_allclose(apply(None, None, train=False), logits[:, [2, 0]])
  assert other_datasets.scored_on(len, None) is len
  probs = jax.nn.softmax(apply(None, None, train=False))
  sums = metric_sums(probs, np.asarray([0, 0]), np.asarray([True, True]))
  # image 0: 0.3 vs 0.1 -> column 2 (label 0) right; image 1: 0.3 vs 0.5 -> column 0 (label 1)
  assert float(sums['top1_errors']) == 1.0 and float(sums['top5_errors']) == 0.0
  np.testing.assert_allclose(float(sums['loss']), -np.log(0.75) - np.log(0.3 / 0.8), rtol=1e-5)


def test_a_run_is_scored_on_a_tree_of_a_subset_of_its_classes(tree, tmp_path):
  """`evaluate --dataset image_folder --data-dir A --split imagenet-a`: a tree of two of the run's
  three classes, alone, named as the run's: scored on those two classes' logits (was refused:
  another class count). The figures are those of the model's own logits restricted by hand."""
  from resnet_jax.data import views

  config = tiny_run_config(tree, steps=2)
  run = str(tmp_path / 'run')
  train.train_and_evaluate(config, run)
  subset = tmp_path / 'subset'
  for name in ('n10', 'n01'):
    shutil.copytree(os.path.join(tree, 'train', name), subset / 'imagenet-a' / name)
  got = evaluate.evaluate_workdir(
    run, split='imagenet-a', dataset='image_folder', data_dir=str(subset)
  )
  assert got['classes_scored'] == 2 and got['num_examples'] == 14

  trained = runtime.load_trained_model(run)
  prepare = predict.run_preprocess(run)
  wrong, nll, count = 0, 0.0, 0
  for label, name in enumerate(('n01', 'n10')):  # the tree's sorted folders: the run's 0 and 2
    source = sources.open_split(folder_config(str(subset), eval_split='imagenet-a'), 'imagenet-a')
    for i in range(len(source.records)):
      record = source.records[i]
      if record['label'] != label:
        continue
      x = prepare(views.open_image(record['image'], 3))[None]
      logits = trained.experiment.model.apply(trained.variables, x, train=False)[0, [0, 2]]
      probs = jax.nn.softmax(logits.astype(np.float32))
      wrong += int(np.argmax(probs)) != label
      nll -= float(np.log(probs[label]))
      count += 1
  assert count == 14 and got['top1_error'] == wrong / count
  assert np.isclose(got['loss'], nll / count, rtol=1e-4)
  assert got['top5_error'] == 0.0  # two classes: always in the top 5


def test_imagenet_a_is_read_in_the_classes_it_holds_and_scored_on_them(tmp_path):
  """TFDS labels ImageNet-A/R in all 1000 ImageNet classes; they hold 200. They are read in the
  label space of the classes they hold (one pass, cached), so a run is scored on those classes'
  logits, by `evaluate --dataset imagenet_a` and by an evaluator alike (TFDS's own builders,
  mock records)."""
  config = data_config(
    name='imagenet2012', image_size=16, augment='inception', eval_split='validation'
  )
  config.data.data_dir = str(tmp_path / 'tfds')
  config.model.name, config.batch_size, config.eval_batch_size = 'resnet8', 4, 4
  config.num_train_steps, config.progress_bar = 1, False
  config.evals.a = dict(dataset='imagenet_a')
  config.evals.a_scales = dict(dataset='imagenet_a', scales='16,24')
  run = str(tmp_path / 'run')
  with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
    raw = tfds.builder('imagenet_a').as_data_source('test')
    every = tfds.builder('imagenet_a').info.features['label'].names
    source = sources.open_split(data_config(name='imagenet_a', eval_split='test'), 'test')
    held = sorted({every[int(raw[i]['label'])] for i in range(len(raw))})
    assert source.class_names == tuple(held) and source.num_classes == len(held) < 1000
    for i in range(len(raw)):  # each image keeps its class, renumbered among the held ones
      assert source.class_names[source.records[i]['label']] == every[int(raw[i]['label'])]
    result = train.train_and_evaluate(config, run)
    got = evaluate.evaluate_workdir(run, dataset='imagenet_a')
  assert got['classes_scored'] == len(held) and got['num_examples'] == 8
  recorded = result['evals']['a']
  assert recorded['top1_error'] == got['top1_error'] and np.isclose(recorded['loss'], got['loss'])
  for name in ('a', 'a_scales'):  # recorded too (walk8: it was left out of results.json)
    assert result['evals'][name]['classes_scored'] == len(held)
  assert 'classes_scored' not in result['eval']
