"""The training loop in-process: injected data and writer, logging, profiling, finished reruns."""

import json
import os

import numpy as np
import pytest

from resnet_jax import train, validation
from resnet_jax.default_config import load_sibling_config

_CONFIGS = os.path.join(os.path.dirname(__file__), '..', 'configs', 'x.py')


class ArrayBatches:
  """A resumable iterator of fixed random local batches (what train_and_evaluate may be given)."""

  def __init__(self, batch_size: int):
    self.batch_size, self.step, self.closed = batch_size, 0, False

  def __next__(self):
    rng = np.random.default_rng(self.step)
    self.step += 1
    return {
      'image': rng.integers(0, 17, (self.batch_size, 8, 8, 1)).astype(np.float32),
      'label': rng.integers(0, 10, self.batch_size).astype(np.int32),
    }

  def get_state(self):
    return {'step': self.step}

  def set_state(self, state):
    self.step = state['step']

  def close(self):
    self.closed = True


class ListWriter:
  def __init__(self):
    self.records, self.closed = [], False

  def truncate_after(self, step):
    self.records = [r for r in self.records if r['step'] <= step]

  def write(self, step, split, values):
    self.records.append({'step': step, 'split': split, **values})

  def write_text(self, tag, text):
    pass

  def close(self):
    self.closed = True


def _config(steps=6):
  config = load_sibling_config(_CONFIGS, 'digits').get_config(f'depth=8,steps={steps},batch=16')
  config.update_from_flattened_dict(
    {
      'log_every_steps': 2,
      'eval_every_steps': 4,
      'checkpoint_every_steps': 4,
      'progress_bar': False,
    }
  )
  return config


class FailingBatches(ArrayBatches):
  """Breaks off the run (as a crash would) when batch `at` is asked for."""

  def __init__(self, batch_size, at):
    super().__init__(batch_size)
    self.at = at

  def __next__(self):
    if self.step == self.at:
      raise RuntimeError('the input pipeline broke')
    return super().__next__()


def run_loop(tmp_path, name, steps=4, fail_after=None, **overrides):
  """A digits ResNet-8 run of `steps` on ArrayBatches in tmp_path/name, checkpointed and
  evaluated every 2 steps (`overrides`: flattened config keys), that breaks off at batch
  `fail_after` when given; returns train_and_evaluate's results."""
  config = _config(steps)
  config.update_from_flattened_dict(
    {'checkpoint_every_steps': 2, 'eval_every_steps': 2, **overrides}
  )
  batches = ArrayBatches(16) if fail_after is None else FailingBatches(16, fail_after)
  return train.train_and_evaluate(
    config, str(tmp_path / name), train_iter=batches, writer=ListWriter()
  )


def test_loop_runs_on_injected_batches_and_writer(tmp_path):
  batches, writer = ArrayBatches(16), ListWriter()
  result = train.train_and_evaluate(_config(), str(tmp_path), train_iter=batches, writer=writer)
  assert batches.step == 6 + 1 and batches.closed  # the next batch is prefetched during a step
  assert [r['step'] for r in writer.records if r['split'] == 'train'] == [2, 4, 6]
  assert [r['step'] for r in writer.records if r['split'] == 'eval'] == [4, 6]
  assert all(r['images_per_sec'] > 0 for r in writer.records if r['split'] == 'train')
  assert result['eval_split'] == 'test' and result['eval']['num_examples'] == 360
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved['environment']['platform'] == 'cpu' and saved['environment']['device_count'] == 4
  assert saved['environment']['versions']['jax']

  # Rerunning the finished run returns its results and records nothing new.
  again, recorded = ListWriter(), (tmp_path / 'results.json').read_bytes()
  again.records = list(writer.records)
  rerun = train.train_and_evaluate(
    _config(), str(tmp_path), train_iter=ArrayBatches(16), writer=again
  )
  assert again.records == writer.records
  assert rerun == saved and (tmp_path / 'results.json').read_bytes() == recorded
  # A run that finished its last checkpoint but not its results.json evaluates it and writes it.
  (tmp_path / 'results.json').unlink()
  rerun = train.train_and_evaluate(
    _config(), str(tmp_path), train_iter=ArrayBatches(16), writer=again
  )
  assert again.records == writer.records
  assert rerun['state_fingerprint'] == result['state_fingerprint']
  assert rerun['eval'] == result['eval'] and (tmp_path / 'results.json').exists()


def test_a_rerun_of_a_finished_run_adds_no_tensorboard_file(tmp_path):
  """Without an injected writer: the workdir's own MetricWriter is not even opened."""
  train.train_and_evaluate(_config(steps=2), str(tmp_path), train_iter=ArrayBatches(16))
  before = sorted(p.name for p in (tmp_path / 'tensorboard').iterdir())
  metrics = (tmp_path / 'metrics.jsonl').read_bytes()
  train.train_and_evaluate(_config(steps=2), str(tmp_path), train_iter=ArrayBatches(16))
  assert sorted(p.name for p in (tmp_path / 'tensorboard').iterdir()) == before
  assert (tmp_path / 'metrics.jsonl').read_bytes() == metrics


def test_profile_steps_write_a_trace(tmp_path):
  config = _config(steps=4)
  config.profile_steps = '1,3'
  train.train_and_evaluate(config, str(tmp_path), train_iter=ArrayBatches(16), writer=ListWriter())
  traces = list((tmp_path / 'profile').rglob('*.xplane.pb'))
  assert traces, list((tmp_path).rglob('*'))


@pytest.mark.parametrize('spec', ['5', '3,1', 'a,b'])
def test_bad_profile_steps_are_refused_before_anything_is_written(tmp_path, spec):
  config = _config()
  config.profile_steps = spec
  with pytest.raises(validation.ConfigError, match='profile_steps'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize(
  'classes,match', [(-3, 'must be positive'), (5, 'smaller than the 10 classes of digits')]
)
def test_a_head_too_small_for_the_dataset_is_refused(tmp_path, classes, match):
  """-3 was a TypeError traceback from inside JAX; 5 on the 10 digits trained silently with
  all-zero targets for labels 5-9 (which then always counted as errors)."""
  config = _config()
  config.model.num_classes = classes
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(config, str(tmp_path / 'run'), train_iter=ArrayBatches(16))
  assert not (tmp_path / 'run').exists()


def test_a_run_resumes_across_the_scanned_and_unrolled_layouts(tmp_path):
  """config.model.scan is a detail: a checkpoint of one layout resumes in the other.

  (The same seed initialises the two layouts differently, so both runs start scanned.)"""

  def config(steps, scan):
    c = load_sibling_config(_CONFIGS, 'digits').get_config(f'depth=14,steps={steps},batch=16')
    c.update_from_flattened_dict(
      {
        'log_every_steps': 2,
        'eval_every_steps': 0,
        'checkpoint_every_steps': 2,
        'progress_bar': False,
        'model.scan': scan,
      }
    )
    return c

  straight = train.train_and_evaluate(
    config(4, True), str(tmp_path / 'a'), train_iter=ArrayBatches(16), writer=ListWriter()
  )
  train.train_and_evaluate(
    config(2, True), str(tmp_path / 'b'), train_iter=ArrayBatches(16), writer=ListWriter()
  )
  resumed = train.train_and_evaluate(
    config(4, False), str(tmp_path / 'b'), train_iter=ArrayBatches(16), writer=ListWriter()
  )
  assert resumed['step'] == 4
  assert resumed['eval']['loss'] == pytest.approx(straight['eval']['loss'], rel=1e-4)


def test_a_profile_window_past_the_end_is_written_and_released(tmp_path):
  """'2,10' in a 4-step run started a trace that was never stopped: nothing was written, and
  every later trace in the process failed ('Profile has already been started')."""
  config = _config(steps=4)
  config.profile_steps = '2,10'
  run = lambda name: train.train_and_evaluate(
    config, str(tmp_path / name), train_iter=ArrayBatches(16), writer=ListWriter()
  )
  run('a')
  assert list((tmp_path / 'a' / 'profile').rglob('*.xplane.pb'))
  config.profile_steps = '1,3'
  run('b')
  assert list((tmp_path / 'b' / 'profile').rglob('*.xplane.pb'))


def test_a_run_resumed_inside_its_profile_window_traces_the_rest(tmp_path):
  """Resumed at step 2 of a '1,4' window, the run crashed at step 4 stopping a trace it never
  started (RuntimeError: No profile started)."""
  run = lambda config: train.train_and_evaluate(
    config, str(tmp_path), train_iter=ArrayBatches(16), writer=ListWriter()
  )
  run(_config(steps=2))
  config = _config(steps=6)
  config.profile_steps = '1,4'
  result = run(config)
  assert result['step'] == 6
  assert list((tmp_path / 'profile').rglob('*.xplane.pb'))


def test_a_resume_the_input_pipeline_refuses_leaves_config_json_as_it_was(tmp_path):
  """Resuming with another batch size is refused by the pipeline, but config.json had already
  been rewritten to describe the refused run (batch 32, 4 steps) instead of the one on disk."""
  train.train_and_evaluate(_config(steps=2), str(tmp_path), writer=ListWriter())  # real pipeline
  before = (tmp_path / 'config.json').read_bytes()
  config = _config(steps=4)
  config.batch_size = 32
  with pytest.raises(ValueError, match='global_batch_size=16'):
    train.train_and_evaluate(config, str(tmp_path), writer=ListWriter())
  assert (tmp_path / 'config.json').read_bytes() == before


def test_resuming_with_other_frozen_stages_names_the_field(tmp_path):
  """Unfreezing a fine-tuned run on resume changes the optimizer state's structure: it was
  refused with a list of missing 'opt_state/inner_states/...' keys."""
  config = _config(steps=2)
  config.model.frozen_stages = 1
  train.train_and_evaluate(config, str(tmp_path), train_iter=ArrayBatches(16), writer=ListWriter())
  config = _config(steps=4)
  with pytest.raises(validation.ConfigError, match='model.frozen_stages=1, this config has -1'):
    train.train_and_evaluate(config, str(tmp_path), train_iter=ArrayBatches(16))


def test_a_missing_init_from_is_refused_before_the_workdir_is_made(tmp_path):
  """It was found only after the workdir, its lock and checkpoints/ had been created."""
  config = _config()
  config.init_from = str(tmp_path / 'no_such_weights')
  with pytest.raises(validation.ConfigError, match='init_from .* is not a directory'):
    train.train_and_evaluate(config, str(tmp_path / 'run'), train_iter=ArrayBatches(16))
  assert not (tmp_path / 'run').exists()
