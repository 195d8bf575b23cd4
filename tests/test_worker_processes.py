"""A run killed outright leaves no Grain worker behind (resnet_jax.data.workers)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from resnet_jax.data import workers

_RUN_A_PIPELINE = """
import multiprocessing, sys, time
from absl import flags
flags.FLAGS.mark_as_parsed()
from resnet_jax import data
from tests.runner import digits_config
config = digits_config(**{'data.num_workers': 2})
it = data.create_train_iterator(
  config, local_batch_size=8, process_index=0, process_count=1, seed=0
)
next(it)
print(' '.join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
  """Whether `pid` runs (a zombie, dead but not yet reaped by its new parent, does not)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except FileNotFoundError:
    return False


@pytest.mark.skipif(not os.path.isdir('/proc'), reason='reads /proc')
def test_workers_exit_when_the_run_is_killed_with_sigkill():
  """SIGKILL (the OOM killer, a scheduler's hard kill) gives the run no chance to stop its
  workers: they must notice by themselves, within a few polls, instead of running on."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = subprocess.Popen(
    [sys.executable, '-c', _RUN_A_PIPELINE],
    cwd=root,
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
  )
  try:
    pids = [int(p) for p in run.stdout.readline().split()]
  finally:
    run.kill()
    run.wait()
  grain_workers = [p for p in pids if _alive(p)]
  assert grain_workers, f'the run started no worker process alive at its kill: {pids}'
  deadline = time.monotonic() + 20 * workers.POLL_S + 10
  while any(map(_alive, grain_workers)) and time.monotonic() < deadline:
    time.sleep(0.2)
  left = [p for p in grain_workers if _alive(p)]
  for pid in left:  # do not leave them to the next test either
    os.kill(pid, signal.SIGKILL)
  assert not left, f'Grain workers {left} outlived their killed run'


def test_a_worker_watches_the_process_that_built_its_pipeline():
  """The init function Grain pickles into each worker carries this process's id."""
  init = workers.worker_init_fn()
  assert init.func is workers.exit_with_parent and init.args == (os.getpid(),)
