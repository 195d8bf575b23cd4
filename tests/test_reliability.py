"""A workdir is never lost, never silently corrupted, never shared by two runs (issue 13).

Through the real CLI where the defect showed there; runs are tiny (ResNet-8 on digits, 4
simulated devices) and share one trained workdir, copied by the tests that damage it.
"""

import asyncio
import gc
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.runner import (
  ROOT,
  assert_ok,
  assert_one_line_error,
  copy_unfinished,
  env_with_devices,
  finished_checkpoints,
  main_args,
  results,
  run_cli,
  run_main,
  start_main,
  state_files,
  truncate,
  wait_for,
)

pytestmark = pytest.mark.slow

RUN = (
  '--config.num_train_steps=40',
  '--config.checkpoint_every_steps=20',
  '--config.eval_every_steps=40',
  '--config.log_every_steps=10',
  '--config.batch_size=32',
)
# A run long enough to be interrupted at leisure (it never gets near its end).
LONG = (
  '--config.num_train_steps=5000',
  '--config.checkpoint_every_steps=10',
  '--config.eval_every_steps=0',
  '--config.log_every_steps=10',
  '--config.batch_size=32',
)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A finished run with checkpoints 20 and 40 (do not modify: copy it)."""
  workdir = str(tmp_path_factory.mktemp('trained') / 'run')
  assert_ok(run_main(workdir, *RUN))
  assert finished_checkpoints(workdir) == [20, 40]
  return workdir


def _copy(trained, tmp_path, name='copy'):
  return copy_unfinished(trained, str(tmp_path / name))


def _snapshot(root):
  """Every path under `root` with its size and mtime: equal snapshots = nothing was written."""
  out = {}
  for d, dirs, files in os.walk(root):
    for name in dirs + files:
      path = os.path.join(d, name)
      st = os.lstat(path)
      # Directories: presence only (a writability probe touches a directory's mtime, not its
      # content); files: size and mtime.
      out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns) if name in files else 'dir'
  return out


def _array_files(checkpoint_dir):
  return state_files(checkpoint_dir, arrays_only=True)


def _read_only_mount_works(tmp_path):
  probe = tmp_path / 'ro_probe'
  probe.mkdir(exist_ok=True)
  cmd = f'mount --bind -o ro {probe} {probe} && ! touch {probe}/x 2>/dev/null'
  try:
    return (
      subprocess.run(['unshare', '-m', 'sh', '-c', cmd], capture_output=True, timeout=30).returncode
      == 0
    )
  except (OSError, subprocess.SubprocessError):
    return False


def _run_read_only(paths, args, tmp_path, timeout=300):
  """Runs `args` with every path in `paths` bind-mounted read-only (a private mount namespace:
  the test runs as root, which chmod cannot stop)."""
  if not _read_only_mount_works(tmp_path):
    pytest.skip('needs unshare -m and bind mounts (root in a Linux container)')
  mounts = ' && '.join(f'mount --bind -o ro {p} {p}' for p in paths)
  quoted = ' '.join("'" + a.replace("'", "'\\''") + "'" for a in args)
  return subprocess.run(
    ['unshare', '-m', 'sh', '-c', f'{mounts} && exec {quoted}'],
    cwd=ROOT,
    env=env_with_devices(4),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


# ---- on the one trained workdir: silent corruption (items 5, 6, 9), readers (item 4), signals
# at the end of a run (item 10), read-only checkpoints (item 11) ---------------------------------


class TestOnOneTrainedWorkdir:
  """The tests that read or copy the one trained workdir: one class, which pytest-xdist runs in one
  worker (see `pytest_xdist_make_scheduler` in conftest.py), so the module fixture `trained` is
  built once."""

  def test_flipped_byte_in_an_array_file_falls_back_to_the_previous_checkpoint(
    self, trained, tmp_path
  ):
    workdir = _copy(trained, tmp_path)
    largest = _array_files(os.path.join(workdir, 'checkpoints', '40'))[-1]
    data = bytearray(open(largest, 'rb').read())
    data[len(data) // 2] ^= 0x01  # still a valid compressed stream: only a value changes
    open(largest, 'wb').write(bytes(data))
    rerun = assert_ok(run_main(workdir, *RUN))
    assert 'checkpoints/40' in rerun.stderr and 'checksum mismatch' in rerun.stderr
    assert 'resuming from' in rerun.stderr and 'checkpoints/20' in rerun.stderr
    assert results(workdir)['state_fingerprint'] == results(trained)['state_fingerprint']

  def test_every_checkpoint_unreadable_is_refused_not_restarted(self, trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    for step in (20, 40):
      truncate(_array_files(os.path.join(workdir, 'checkpoints', str(step))))
    before = _snapshot(workdir)
    proc = run_main(workdir, *RUN)
    assert_one_line_error(proc, 'every checkpoint', 'unreadable', 'new --workdir')
    after = _snapshot(workdir)
    assert {k: v for k, v in after.items() if k != '.lock'} == {
      k: v for k, v in before.items() if k != '.lock'
    }  # metrics.jsonl kept, nothing moved

  def test_a_damaged_checkpoint_is_reported_once_not_again_by_its_abandoned_reads(
    self, trained, tmp_path, caplog
  ):
    # Orbax abandons the other reads of a damaged checkpoint; now and then one of their asyncio
    # tasks fails unretrieved and asyncio logs its traceback when the garbage collector meets it,
    # even after the `error:` line (seen once in CI). Such a task is made here on purpose.
    workdir = _copy(trained, tmp_path)
    for step in (20, 40):
      truncate(_array_files(os.path.join(workdir, 'checkpoints', str(step))))
    from resnet_jax.checkpointing import restore_model_variables

    with pytest.raises(FileNotFoundError, match='no readable checkpoint'):
      restore_model_variables(workdir)
    assert caplog.text.count('is unreadable') == 2

    def abandoned_read(path):
      async def read():
        raise ValueError(f'OUT_OF_RANGE: Error reading local file "{path}"')

      loop = asyncio.new_event_loop()
      task = loop.create_task(read())
      loop.run_until_complete(asyncio.sleep(0))  # the task runs and fails; nobody asks why
      loop.close()
      del task
      gc.collect()

    abandoned_read(os.path.join(workdir, 'checkpoints', '40', 'state', 'd', 'x'))
    assert 'never retrieved' not in caplog.text and 'Traceback' not in caplog.text
    abandoned_read(os.path.join(str(tmp_path), 'elsewhere'))  # other failures still show
    assert 'never retrieved' in caplog.text

  def test_refused_resume_leaves_config_json_and_the_run_usable(self, trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    config_before = open(os.path.join(workdir, 'config.json')).read()
    proc = run_main(workdir, *RUN, '--config.model.num_classes=12')
    assert_one_line_error(proc, 'different model/config', 'fc')
    assert open(os.path.join(workdir, 'config.json')).read() == config_before
    from resnet_jax.evaluate import evaluate_workdir

    assert evaluate_workdir(workdir)['step'] == 40  # the untouched run still evaluates

  def test_reader_reports_a_corrupt_newest_checkpoint_without_moving_it(
    self, trained, tmp_path, caplog
  ):
    workdir = _copy(trained, tmp_path)
    truncate(_array_files(os.path.join(workdir, 'checkpoints', '40')))
    before = _snapshot(workdir)
    from resnet_jax.evaluate import evaluate_workdir

    assert evaluate_workdir(workdir)['step'] == 20
    assert 'checkpoints/40 is unreadable' in caplog.text
    assert _snapshot(workdir) == before

  def test_readers_work_on_a_read_only_workdir(self, trained, tmp_path):
    before = _snapshot(trained)
    out = tmp_path / 'fig7.png'
    evaluate = _run_read_only(
      [trained], [sys.executable, '-m', 'resnet_jax.evaluate', f'--workdir={trained}'], tmp_path
    )
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert json.loads(evaluate.stdout.strip().splitlines()[-1])['step'] == 40
    fig7 = _run_read_only(
      [trained],
      [
        sys.executable,
        '-m',
        'resnet_jax.analysis.responses',
        f'--workdir={trained}',
        f'--out={out}',
      ],
      tmp_path,
    )
    assert fig7.returncode == 0, fig7.stderr[-3000:]
    assert out.exists()
    assert _snapshot(trained) == before

  def test_sigterm_while_the_final_save_finishes_exits_0_with_results(self, trained, tmp_path):
    """SIGTERM just after the last step, while the final async save is being finished."""
    workdir = str(tmp_path / 'end')
    args = main_args(workdir, 'configs/digits.py:depth=8', *RUN)
    proc = subprocess.run(
      [sys.executable, '-c', _SIGNAL_AT_THE_END] + args[2:],
      cwd=ROOT,
      env=env_with_devices(4),
      capture_output=True,
      text=True,
      timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'received signal 15' in proc.stderr
    assert finished_checkpoints(workdir) == [20, 40]
    assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['20', '40']  # no tmp dir
    assert results(workdir)['state_fingerprint'] == results(trained)['state_fingerprint']

  def test_read_only_checkpoints_fail_fast_with_one_line(self, trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    os.remove(os.path.join(workdir, 'metrics.jsonl'))
    checkpoints = os.path.join(workdir, 'checkpoints')
    start = time.time()
    proc = _run_read_only(
      [checkpoints],
      main_args(workdir, 'configs/digits.py:depth=8', *RUN[1:], '--config.num_train_steps=60'),
      tmp_path,
    )
    assert time.time() - start < 120
    assert_one_line_error(proc, 'checkpoints is not writable')


# ---- non-finite updates (item 7; item 8 is in test_train_step.py and test_faults.py) ------


def test_nonfinite_error_names_only_a_finished_restorable_checkpoint(tmp_path):
  workdir = str(tmp_path / 'diverge')
  proc = run_main(
    workdir,
    '--config.num_train_steps=200',
    '--config.checkpoint_every_steps=5',
    '--config.log_every_steps=5',
    '--config.batch_size=32',
    '--config.schedule.name=constant',
    '--config.schedule.warmup_steps=0',
    '--config.schedule.base_lr=30',
  )
  last = assert_one_line_error(proc, 'non-finite', 'last good checkpoint is step')
  named = int(re.search(r'last good checkpoint is step (\d+)', last).group(1))
  assert named == max(finished_checkpoints(workdir))
  assert not [n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if not n.isdigit()]
  from resnet_jax.checkpointing import restore_model_variables

  assert restore_model_variables(workdir)[1] == named


# ---- one live run per workdir; readers beside it (items 3, 4, 10) -------------------------------


def test_lock_live_reader_and_kill_9(tmp_path):
  workdir = str(tmp_path / 'live')
  first = start_main(workdir, *LONG)
  try:
    wait_for(lambda: len(finished_checkpoints(workdir)) >= 2 or first.poll() is not None)
    assert first.poll() is None, first.communicate()[1][-3000:]
    second = run_main(workdir, *LONG)
    assert_one_line_error(second, 'in use by a live run', f'pid {first.pid}', 'another --workdir')
    reader = run_cli(
      'resnet_jax.evaluate', f'--workdir={workdir}', env=env_with_devices(4), timeout=300
    )
    assert reader.returncode == 0, reader.stderr[-3000:]
    assert first.poll() is None, 'the trainer died while being evaluated'
  finally:
    first.kill()  # kill -9: the lock must not outlive it
    first.wait()
  reached = max(finished_checkpoints(workdir))
  final = assert_ok(run_main(workdir, *LONG[1:], f'--config.num_train_steps={reached + 10}'))
  assert f'resuming from {os.path.realpath(workdir)}/checkpoints/{reached}' in final.stderr
  assert results(workdir)['step'] == reached + 10


# ---- signals at any moment (item 10) -----------------------------------------------------------


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_signal_during_start_up_exits_0(tmp_path, sig):
  workdir = str(tmp_path / 'startup')
  proc = start_main(workdir, *RUN)
  time.sleep(1.0)  # importing JAX
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert 'Traceback' not in err and 'Segmentation' not in err
  assert 'stopped ' in err and 'rerun the same command to resume' in err
  assert finished_checkpoints(workdir) == []


def test_a_second_interrupt_exits_130_and_the_rerun_resumes(tmp_path):
  workdir = str(tmp_path / 'impatient')
  proc = start_main(workdir, *LONG)
  try:
    wait_for(lambda: finished_checkpoints(workdir) or proc.poll() is not None)
    proc.send_signal(signal.SIGTERM)  # a stop request (preemption) ...
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # ... then an impatient Ctrl-C: exit now
    _, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 130, err[-3000:]
  assert 'Traceback' not in err and 'interrupted twice' in err
  reached = max(finished_checkpoints(workdir))
  rerun = assert_ok(run_main(workdir, *LONG[1:], f'--config.num_train_steps={reached + 5}'))
  assert 'resuming from' in rerun.stderr


_SIGNAL_AT_THE_END = r"""
import os, runpy, signal, sys
from resnet_jax import checkpointing
sent = []
def hook(name):
  original = getattr(checkpointing.Checkpointer, name)
  def wrapped(self):
    if not sent and self.manager.latest_step() == 40:
      sent.append(name)
      os.kill(os.getpid(), signal.SIGTERM)
    return original(self)
  setattr(checkpointing.Checkpointer, name, wrapped)
hook('wait'); hook('close')
sys.argv = sys.argv[1:]
runpy.run_module('resnet_jax.main', run_name='__main__')
"""


# ---- bad input through the CLI ------------------------------------------------------------------


@pytest.mark.parametrize(
  'override,needle',
  [('--config.log_every_steps=0', 'log_every_steps'), ('--config.max_to_keep=0', 'max_to_keep')],
)
def test_bad_values_are_refused_before_anything_is_written(tmp_path, override, needle):
  workdir = tmp_path / 'w'
  assert_one_line_error(run_main(str(workdir), override), needle)
  assert not workdir.exists()


def test_config_file_errors_are_one_line(tmp_path):
  broken = tmp_path / 'broken.py'
  broken.write_text('def get_config(:\n')
  for config, needle in ((str(tmp_path / 'missing.py'), 'No such file'), (str(broken), 'line 1')):
    proc = run_cli(
      'resnet_jax.main',
      f'--config={config}',
      f'--workdir={tmp_path / "w"}',
      env=env_with_devices(1),
      timeout=300,
    )
    assert_one_line_error(proc, 'cannot load', needle)
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize(
  'args,needles',
  [
    (('--config=configs/digits.py',), ('--workdir is required', 'usage:')),
    (('--workdir=W',), ('--config is required', 'usage:')),
    (('--config=configs/digits.py', '--workdir=W', 'extra'), ('unexpected arguments: extra',)),
    (('--config=configs/digits.py', '--workdir=W', '--config.seed=abc'), ("'abc'", 'seed')),
    (('--config=configs/digits.py:depth=abc', '--workdir=W'), ("depth='abc'", 'an integer')),
    (('--config=configs/finetune.py:lr=x', '--workdir=W'), ("lr='x'", 'a number')),
  ],
)
def test_command_line_mistakes_are_one_line_not_a_page_of_flags(tmp_path, args, needles):
  args = [a.replace('=W', f'={tmp_path / "w"}') for a in args]
  proc = run_cli('resnet_jax.main', *args, env=env_with_devices(1), timeout=300)
  assert_one_line_error(proc, *needles)
  assert not (tmp_path / 'w').exists()
