"""Workdirs and launches that go wrong outside the config: distributed flags, a workdir entry of
the wrong kind, init_from sources. Each ends in one `error:` line, never a traceback."""

import pytest

from tests.runner import assert_one_line_error, run_main

pytestmark = pytest.mark.slow

TINY = ('--config.num_train_steps=2', '--config.batch_size=16', '--config.eval_every_steps=0')


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


def test_tensorboard_path_that_is_a_file_is_one_line(tmp_path):
  """An OSError met mid-run (here NotADirectoryError; ENOSPC or EROFS alike) was a traceback."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'tensorboard').write_text('not a directory')
  proc = run_main(str(workdir), *TINY, devices=1, timeout=300)
  assert_one_line_error(proc, 'Not a directory', 'tensorboard')
