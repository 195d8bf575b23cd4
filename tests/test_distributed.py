"""Scale-out (issue 6): one sharded train step, the same result on 1 device, 4 devices, 2 hosts.

The 2-process run uses JAX's own multi-controller runtime (`jax.distributed.initialize`) with
gloo collectives between CPU processes over localhost, exactly as a 2-node cluster would.
"""

import socket

import numpy as np
import pytest

from tests.runner import results, run_main, start_main

pytestmark = pytest.mark.slow

RUN = (
  '--config.num_train_steps=24',
  '--config.batch_size=32',
  '--config.log_every_steps=8',
  '--config.eval_every_steps=0',
  '--config.checkpoint_every_steps=0',
)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def single_device(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('one_device'))
  proc = run_main(workdir, *RUN, devices=1)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return results(workdir)


def test_four_devices_match_one(single_device, tmp_path):
  proc = run_main(str(tmp_path), *RUN, devices=4)
  assert proc.returncode == 0, proc.stderr[-3000:]
  four = results(str(tmp_path))
  assert four['eval']['num_examples'] == single_device['eval']['num_examples'] == 360
  np.testing.assert_allclose(four['eval']['loss'], single_device['eval']['loss'], rtol=1e-3)
  assert (
    abs(four['eval']['top1_error'] - single_device['eval']['top1_error']) <= 1.5 / 360
  )  # at most one borderline example may flip


def test_two_processes_of_two_devices_match_one(single_device, tmp_path):
  workdir = str(tmp_path)
  address = f'localhost:{_free_port()}'
  procs = [
    start_main(
      workdir,
      *RUN,
      devices=2,
      extra=(f'--coordinator_address={address}', '--num_processes=2', f'--process_id={i}'),
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert '2 processes, 4 devices' in outs[0][1]
  two = results(workdir)  # written by process 0 only
  assert two['eval']['num_examples'] == 360
  np.testing.assert_allclose(two['eval']['loss'], single_device['eval']['loss'], rtol=1e-3)
  assert (
    abs(two['eval']['top1_error'] - single_device['eval']['top1_error']) <= 1.5 / 360
  )  # at most one borderline example may flip


def test_batch_not_divisible_by_devices_is_refused(tmp_path):
  proc = run_main(str(tmp_path), '--config.batch_size=30', devices=4)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: batch_size 30 is not divisible by the 4 devices'), last
