"""Workdirs and launches that go wrong outside the config: distributed flags, a workdir entry of
the wrong kind, init_from sources. Each ends in one `error:` line, never a traceback."""

import os
import re
import socket

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import pretrained, runtime, train
from resnet_jax.default_config import load_sibling_config
from tests.runner import ROOT, assert_one_line_error, run_main, start_main

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


@pytest.mark.slow
def test_a_process_that_fails_at_start_up_does_not_leave_the_other_hanging(tmp_path):
  """Process 1 refuses its flags after the rendezvous; process 0 waits in its first collective.
  It gave up after gloo's 30 s timeout with a JaxRuntimeError traceback; now one line that
  points at the other process (measured 37 s for both, 2-core CPU VM, 2026-11-24)."""
  address = f'localhost:{_free_port()}'
  flags = (f'--coordinator_address={address}', '--num_processes=2')
  procs = [
    start_main(
      str(tmp_path / 'run'),
      *TINY,
      *(('--config.model.name=bogus',) if i else ()),
      devices=1,
      fast_compile=True,
      extra=(*flags, f'--process_id={i}'),
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=300) for p in procs]  # a hang fails here, not forever
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 1 and 'Traceback' not in err, err[-3000:]
  assert outs[1][1].strip().splitlines()[-1].startswith("error: unknown model name 'bogus'")
  last = outs[0][1].strip().splitlines()[-1]
  assert last.startswith('error: process 0 of 2: another process did not take part'), last


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_init_from_weights_of_another_depth_names_init_from(tmp_path):
  """ResNet-8 weights into a ResNet-14 run failed with 'stage 1 has 1 blocks in the tree but the
  model has stage sizes (2, 2, 2)': nothing said that init_from was the problem. The refusal
  leaves no trace: the new workdir was left with a `.lock` and an empty checkpoints/."""
  small = runtime.build_model(_digits_config(8), num_classes=10)
  variables = jax.device_get(small.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False))
  pretrained.save_model_variables(tmp_path / 'r8', variables)
  config = _digits_config(14)
  config.init_from = str(tmp_path / 'r8')
  with pytest.raises(ValueError, match=r'init_from .*r8 does not fit this model: stage 1 has 1'):
    train.train_and_evaluate(config, str(tmp_path / 'ft'))
  assert not (tmp_path / 'ft').exists()
  (tmp_path / 'kept').mkdir()  # a workdir made by hand beforehand stays as it was: empty
  with pytest.raises(ValueError, match=r'init_from .*r8 does not fit this model'):
    train.train_and_evaluate(config, str(tmp_path / 'kept'))
  assert os.listdir(tmp_path / 'kept') == []


def _digits_config(depth: int):
  digits = load_sibling_config(os.path.join(ROOT, 'configs', 'x.py'), 'digits')
  config = digits.get_config(f'depth={depth}')
  config.update_from_flattened_dict({'batch_size': 16, 'num_train_steps': 2})
  return config


# What process 0 reported, verbatim up to the addresses (2 CPU processes, 2026-11-24).
_PEER_FAILED_AT_START_UP = (
  'UNKNOWN: Gloo context initialization failed: DEADLINE_EXCEEDED: GetKeyValue() timed out with '
  'key: cpu:gloo/0,2048/1 and duration: 29.99999995s [type.googleapis.com/tensorflow.'
  "CoordinationServiceError='']"
)
_PEER_KILLED_MID_RUN = (
  'UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:538] Read error '
  '[127.0.0.1]:26336: Connection reset by peer'
)


def test_peer_failures_are_told_apart_from_bugs():
  """A peer killed mid-run (kill -9 of process 1 after 12 s) left process 0 with a traceback,
  then ~90 s in JAX's shutdown barrier and a fatal abort (exit 134, at 101 s); main now prints
  one line and leaves at once when the peer's connection is gone (checked by hand: see the
  commit). A peer that failed at start-up waits at its own exit for this one: no early exit."""
  from resnet_jax import main  # pylint: disable=import-outside-toplevel

  assert main._is_peer_failure(_PEER_FAILED_AT_START_UP)
  assert not main._peer_is_gone(_PEER_FAILED_AT_START_UP)
  assert main._is_peer_failure(_PEER_KILLED_MID_RUN) and main._peer_is_gone(_PEER_KILLED_MID_RUN)
  for other in (
    'INVALID_ARGUMENT: Executable expected parameter 0 of size 64 but got buffer of size 32',
    'UNAVAILABLE: Error writing to gs://bucket/run/checkpoints/40: Connection reset by peer',
  ):
    assert not main._is_peer_failure(other) and not main._peer_is_gone(other)
