"""Walk 8's findings: the defects found by using this session's features (class names, subsets
of a run's classes, greyscale trees) as a researcher would, each pinned by a test that fails on
the code before its fix."""

import os

import pytest

from resnet_jax import evaluate, train
from resnet_jax.data import folder_index
from resnet_jax.workdir import (
  CLASS_NAMES_FILE,
  WorkdirError,
  check_recorded_class_names,
  read_class_names,
)
from tests.runner import finished_checkpoints
from tests.test_image_folder import (  # noqa: F401  (cache, tree: fixtures)
  cache,
  tiny_run_config,
  tree,
)


def test_a_run_does_not_resume_on_a_tree_whose_classes_were_renamed(tree, tmp_path):
  """A tree's labels are its sorted class folders: renaming one (n02 -> n99) moves every class's
  label, so resuming would go on training the checkpoint's classifier on other classes, silently,
  and class_names.json was rewritten to the new names. Refused before anything is written."""
  config = tiny_run_config(tree)
  run = str(tmp_path / 'run')
  train.train_and_evaluate(config, run)
  assert read_class_names(run) == ['n01', 'n02', 'n10']
  for split in ('train', 'val'):
    if os.path.isdir(os.path.join(tree, split, 'n02')):
      os.rename(os.path.join(tree, split, 'n02'), os.path.join(tree, split, 'n99'))
  folder_index.MEMORY.clear()
  config.num_train_steps = 2
  with pytest.raises(WorkdirError) as e:
    train.train_and_evaluate(config, run)
  assert "class 1 is 'n02' (class_names.json); the data names it 'n10'" in str(e.value)
  assert read_class_names(run) == ['n01', 'n02', 'n10'] and finished_checkpoints(run) == [1]
  with pytest.raises(WorkdirError, match="class 1 is 'n02'"):  # evaluate scored it shifted
    evaluate.evaluate_workdir(run)
  for split in ('train', 'val'):  # the folders restored, the run resumes
    if os.path.isdir(os.path.join(tree, split, 'n99')):
      os.rename(os.path.join(tree, split, 'n99'), os.path.join(tree, split, 'n02'))
  folder_index.MEMORY.clear()
  assert train.train_and_evaluate(config, run)['step'] == 2


@pytest.mark.parametrize(
  'names, refused',
  [
    (['a', 'b', 'c'], None),  # the same classes resume
    (None, None),  # numbered or synthetic labels: nothing to compare
    (['a', 'b', 'c', 'd'], "class 3 is '(none)' (class_names.json); the data names it 'd'"),
    (['a', 'b'], "class 2 is 'c' (class_names.json); the data names it '(none)'"),
    (['a', 'c', 'b'], "class 1 is 'b' (class_names.json); the data names it 'c'"),
  ],
)
def test_recorded_class_names_must_match_the_data_s(tmp_path, names, refused):
  """A folder added, removed or reordered changes what the labels mean; a workdir without the
  file (a run from before it was written) resumes as before."""
  check_recorded_class_names(tmp_path, ['x'])  # no class_names.json: an older workdir
  (tmp_path / CLASS_NAMES_FILE).write_text('["a", "b", "c"]')
  if refused is None:
    check_recorded_class_names(tmp_path, names)
    return
  with pytest.raises(WorkdirError, match='Restore the class folders') as e:
    check_recorded_class_names(tmp_path, names)
  assert refused in str(e.value)
