"""Checkpoints and faults (issue 5): a crash costs minutes, never the run, never changes it.

Every scenario must end in exactly the state of one uninterrupted run (same state_fingerprint).
Runs are tiny (ResNet-8 on digits, 4 simulated devices) but go through the real CLI.
"""

import json
import os
import signal

import pytest

from tests.runner import (
  assert_ok,
  assert_one_line_error,
  copy_unfinished,
  finished_checkpoints,
  results,
  run_main,
  start_main,
  state_files,
  truncate,
  wait_for,
)

pytestmark = pytest.mark.slow

RUN = (
  '--config.num_train_steps=160',
  '--config.checkpoint_every_steps=40',
  '--config.eval_every_steps=80',
  '--config.log_every_steps=20',
  '--config.batch_size=32',
)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """One uninterrupted run: the fingerprint every interrupted run must reproduce."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  assert_ok(run_main(workdir, *RUN))
  return workdir, results(workdir)['state_fingerprint']


class TestFromOneReferenceRun:
  """The tests that need the uninterrupted reference run: one class, which pytest-xdist runs in one
  worker (see `pytest_xdist_make_scheduler` in conftest.py), so the module fixture `reference` is
  built once."""

  def test_uninterrupted_run_writes_the_contract_outputs(self, reference):
    workdir, _ = reference
    r = results(workdir)
    assert r['step'] == 160 and r['eval']['num_examples'] == 360
    assert set(r) >= {'step', 'eval', 'params', 'state_fingerprint', 'wall_time_s', 'config'}
    assert len(r['state_fingerprint']) == 64
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      records = [json.loads(l) for l in f]
    train = [x for x in records if x['split'] == 'train']
    assert [x['step'] for x in train] == list(range(20, 161, 20))
    assert all({'loss', 'top1_error', 'learning_rate', 'images_per_sec'} <= set(x) for x in train)
    assert [x['step'] for x in records if x['split'] == 'eval'] == [80, 160]
    assert any(n.startswith('events') for n in os.listdir(os.path.join(workdir, 'tensorboard')))
    assert finished_checkpoints(workdir) == [80, 120, 160]  # max_to_keep=3

  def test_kill_9_mid_run_then_rerun_matches(self, reference, tmp_path):
    workdir = str(tmp_path / 'killed')
    proc = start_main(workdir, *RUN)
    wait_for(lambda: finished_checkpoints(workdir) or proc.poll() is not None)
    proc.kill()
    proc.wait()
    assert finished_checkpoints(workdir) and not os.path.exists(
      os.path.join(workdir, 'results.json')
    )
    assert_ok(run_main(workdir, *RUN))
    assert results(workdir)['state_fingerprint'] == reference[1]
    assert _steps_logged(workdir) == list(range(20, 161, 20))  # no duplicated or lost points

  def test_sigterm_saves_exits_0_and_rerun_matches(self, reference, tmp_path):
    workdir = str(tmp_path / 'preempted')
    proc = start_main(workdir, *RUN)
    wait_for(lambda: finished_checkpoints(workdir) or proc.poll() is not None)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert 'stopped at step' in err
    stopped_at = max(finished_checkpoints(workdir))
    assert stopped_at < 160, 'the run finished before the signal: test did not preempt'
    rerun = assert_ok(run_main(workdir, *RUN))
    assert 'resuming from' in rerun.stderr
    assert results(workdir)['state_fingerprint'] == reference[1]

  def test_truncated_newest_checkpoint_falls_back_to_previous(self, reference, tmp_path):
    workdir = copy_unfinished(reference[0], str(tmp_path / 'corrupt'))
    truncate(state_files(os.path.join(workdir, 'checkpoints', '160')))
    rerun = assert_ok(run_main(workdir, *RUN))
    assert 'checkpoints/160' in rerun.stderr and 'corrupt' in rerun.stderr
    assert 'resuming from' in rerun.stderr and 'checkpoints/120' in rerun.stderr
    assert results(workdir)['state_fingerprint'] == reference[1]

  def test_workdir_of_another_model_is_refused(self, reference):
    proc = run_main(reference[0], *RUN, config='configs/digits.py:depth=14')
    assert_one_line_error(proc, 'resnet8', 'resnet14', 'another --workdir')

  def test_init_from_another_run_loads_its_weights(self, reference, tmp_path):
    assert_ok(
      run_main(
        str(tmp_path / 'ft'),
        '--config.num_train_steps=2',
        '--config.batch_size=32',
        '--config.log_every_steps=1',
        f'--config.init_from={reference[0]}',
        '--config.schedule.base_lr=0.0',
        '--config.schedule.warmup_steps=0',
        '--config.optimizer.weight_decay=0.0',
      )
    )
    # With lr 0 the weights are the reference's; only BN running stats move on 2 batches.
    ref_err = results(reference[0])['eval']['top1_error']
    assert results(str(tmp_path / 'ft'))['eval']['top1_error'] <= ref_err + 0.05


def _steps_logged(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l)['step'] for l in f if '"train"' in l]


def test_nonfinite_loss_stops_naming_the_step(tmp_path):
  proc = run_main(
    str(tmp_path / 'nan'),
    '--config.num_train_steps=20',
    '--config.batch_size=32',
    '--config.log_every_steps=5',
    '--config.schedule.base_lr=1e12',
    '--config.schedule.warmup_steps=0',
  )
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: non-finite loss') and 'at step' in last, last
  assert 'no checkpoint was saved yet' in last, last  # it fails at step 5, the first log point


def test_a_run_that_ends_skipping_every_step_does_not_report_success(tmp_path):
  """lr 1e12: the first update is finite, every later one is not (the run diverged)."""
  workdir = str(tmp_path / 'skip')
  proc = run_main(
    workdir,
    '--config.num_train_steps=10',
    '--config.batch_size=32',
    '--config.log_every_steps=5',
    '--config.schedule.base_lr=1e12',
    '--config.schedule.warmup_steps=0',
    '--config.on_nonfinite=skip',
  )
  assert 'skipped' in proc.stderr
  assert_one_line_error(proc, 'last 5 steps (to step 10)', 'skipped', 'diverged')
  assert not os.path.exists(os.path.join(workdir, 'results.json'))
  assert 10 not in finished_checkpoints(workdir)  # no final checkpoint of an untrained state


@pytest.mark.parametrize(
  'overrides,needles',
  [
    (('--config.model.name=resnet21',), ('resnet21', 'valid forms')),
    (('--config.model.name=resnet19',), ('resnet19',)),
    (('--config.batch_size=0',), ('batch_size', 'positive')),
    # batch_size not divisible by the devices: test_distributed.py
    (('--config.data.name=no_such_dataset',), ('no_such_dataset',)),
    (('--config.batch_sise=8',), ('batch_sise', 'batch_size')),
  ],
)
def test_bad_input_is_one_clear_line(tmp_path, overrides, needles):
  assert_one_line_error(run_main(str(tmp_path / 'w'), *overrides), *needles)
  assert not (tmp_path / 'w').exists()  # not even the lock file of a run that never started


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  assert_one_line_error(run_main(str(blocker / 'run')), 'not writable')
  assert_one_line_error(run_main(str(blocker)), 'is a file, not a directory')
  assert blocker.read_text() == 'x'


def test_failed_run_stops_its_data_workers(tmp_path):
  """train_and_evaluate called in-process (a notebook, a sweep driver) must not leave Grain
  worker processes running after it raises."""
  import multiprocessing

  from resnet_jax import train
  from resnet_jax.default_config import load_sibling_config

  config = load_sibling_config(
    os.path.join(os.path.dirname(__file__), '..', 'configs', 'x.py'), 'digits'
  ).get_config('depth=8')
  config.update_from_flattened_dict(
    {
      'num_train_steps': 10,
      'batch_size': 32,
      'log_every_steps': 5,
      'data.num_workers': 2,
      'schedule.base_lr': 1e12,
      'schedule.warmup_steps': 0,
      'progress_bar': False,
    }
  )
  with pytest.raises(train.NonFiniteLossError) as failure:
    train.train_and_evaluate(config, str(tmp_path))
  # The traceback keeps the run's frames alive (as a notebook's last traceback does), so the
  # workers are gone only if the run stopped them itself, not through garbage collection.
  assert failure.traceback and multiprocessing.active_children() == []


def test_workdirs_from_before_model_block_resume_but_not_as_bottleneck(tmp_path):
  """config.json written before `model.block` existed has no such key: a basic-block config may
  continue it, a bottleneck one (another architecture) may not."""
  from resnet_jax import train, validation
  from resnet_jax.default_config import load_sibling_config

  digits = load_sibling_config(
    os.path.join(os.path.dirname(__file__), '..', 'configs', 'x.py'), 'digits'
  )
  old = json.loads(digits.get_config('depth=20').to_json())
  del old['model']['block']
  (tmp_path / 'config.json').write_text(json.dumps(old))
  train._prepare_workdir(tmp_path, digits.get_config('depth=20'))
  with pytest.raises(validation.ConfigError, match=r"model.block=None.*'bottleneck'"):
    train._prepare_workdir(tmp_path, digits.get_config('depth=20,block=bottleneck,shortcut=A'))


@pytest.mark.parametrize('failing', [False, True], ids=['finished', 'failed'])
def test_data_workers_leave_no_shared_memory_behind(tmp_path, failing):
  """Grain's worker processes hand batches over in shared memory; one not unlinked by exit made
  Python's resource_tracker warn 'There appear to be N leaked shared_memory objects' after the
  run's last line (after the `error:` line of a failed run)."""
  steps = ('--config.num_train_steps=3', '--config.log_every_steps=1') if failing else ()
  diverge = ('--config.schedule.base_lr=1e12', '--config.schedule.warmup_steps=0')
  proc = run_main(
    str(tmp_path / 'run'),
    '--config.num_train_steps=2',
    '--config.batch_size=32',
    '--config.data.num_workers=2',
    *(steps + diverge if failing else ()),
  )
  assert 'leaked shared_memory' not in proc.stderr, proc.stderr[-2000:]
  if failing:
    assert_one_line_error(proc, 'non-finite loss')
  else:
    assert_ok(proc)
