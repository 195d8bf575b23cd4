"""Workdirs and launches that go wrong outside the config: distributed flags, a workdir entry of
the wrong kind, init_from sources. Each ends in one `error:` line, never a traceback."""

import re

import numpy as np
import pytest

from resnet_jax import pretrained
from tests.runner import assert_one_line_error, run_main

TINY = ('--config.num_train_steps=2', '--config.batch_size=16', '--config.eval_every_steps=0')


@pytest.mark.slow
@pytest.mark.parametrize(
  'flags, needle',
  [
    (('--num_processes=2',), 'coordinator_address'),
    (
      ('--coordinator_address=localhost:1', '--num_processes=2', '--process_id=5'),
      'process_id < num_processes',
    ),
  ],
)
def test_bad_distributed_flags_are_one_line(tmp_path, flags, needle):
  """jax.distributed.initialize's refusal was a traceback (it ran outside main's error handling)."""
  proc = run_main(str(tmp_path / 'run'), *TINY, *flags, devices=1, timeout=120)
  assert_one_line_error(proc, 'multi-process', needle)


@pytest.mark.slow
def test_tensorboard_path_that_is_a_file_is_one_line(tmp_path):
  """An OSError met mid-run (here NotADirectoryError; ENOSPC or EROFS alike) was a traceback."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'tensorboard').write_text('not a directory')
  proc = run_main(str(workdir), *TINY, devices=1, timeout=300)
  assert_one_line_error(proc, 'Not a directory', 'tensorboard')


def test_init_from_a_run_s_checkpoints_dir_or_step_names_what_to_give(tmp_path):
  """`init_from=run/checkpoints` (or a step in it) failed with Orbax's 'Metadata file (named
  _METADATA) does not exist', which says nothing of the workdir or converted weights expected."""
  run = tmp_path / 'run'
  weights = {'params': {'w': np.ones((2,), np.float32)}, 'batch_stats': {}}
  pretrained.save_model_variables(run / 'checkpoints' / '4' / 'state', weights)
  for given in (run / 'checkpoints', run / 'checkpoints' / '4'):
    hint = f'neither a run workdir.*give the run workdir {re.escape(str(run))}'
    with pytest.raises(FileNotFoundError, match=hint):
      pretrained.load_model_variables(given)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='neither a run workdir .* nor converted weights'):
    pretrained.load_model_variables(tmp_path / 'empty')
  loaded = pretrained.load_model_variables(run / 'checkpoints' / '4' / 'state')  # converted
  np.testing.assert_array_equal(loaded['params']['w'], weights['params']['w'])
