"""`train_and_evaluate(config, workdir)`: the whole training run, start or resume to results.json.

Read top to bottom: validate the config, build everything through `runtime` (model, data,
optimizer, the restored or fresh state), then loop over jit-compiled steps, logging, evaluating
and checkpointing at fixed steps. Device work is never synchronised except at those points. The
input iterator and the metric writer can be passed in, so the loop is testable in-process.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import signal
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from resnet_jax import checkpointing, data, runtime
from resnet_jax.evaluate import run_evaluation
from resnet_jax.metric_writer import MetricWriter, Progress, environment
from resnet_jax.train_step import (count_params, device_batch, jit_eval_step, jit_train_step,
                                   model_variables, state_fingerprint)
from resnet_jax.workdir import CONFIG_FILE, RESULTS_FILE, as_path, read_run_config, write_json

logger = logging.getLogger(__name__)

# Config fields that define the train state's structure: a workdir trained with other values
# cannot be resumed with these (checked against the workdir's config.json).
_SHAPE_FIELDS = ('model.name', 'model.residual', 'model.shortcut', 'model.stride_on',
                 'model.preact', 'model.block', 'data.name', 'data.image_size')


class ConfigError(ValueError):
  """A config or command-line value that cannot give a correct run."""


class NonFiniteLossError(RuntimeError):
  """The loss, gradients or update became NaN/inf (the update was not applied)."""


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Refuses, before anything is written, values that cannot give a correct run."""
  if config.batch_size <= 0:
    raise ConfigError(f'batch_size must be positive, got {config.batch_size}')
  n_dev, n_proc = jax.device_count(), jax.process_count()
  if config.batch_size % n_dev:
    raise ConfigError(f'batch_size {config.batch_size} is not divisible by the {n_dev} devices: '
                      f'use a multiple of {n_dev} (per-device batch must be whole)')
  if config.batch_size % n_proc:
    raise ConfigError(f'batch_size {config.batch_size} is not divisible by {n_proc} processes')
  if config.dtype not in runtime.COMPUTE_DTYPES:
    raise ConfigError(f"dtype must be one of {sorted(runtime.COMPUTE_DTYPES)}, got {config.dtype!r}")
  if config.on_nonfinite not in ('error', 'skip'):
    raise ConfigError(f"on_nonfinite must be 'error' or 'skip', got {config.on_nonfinite!r}")
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ConfigError('set num_train_steps > 0 or num_epochs > 0')


def _prepare_workdir(workdir: epath.Path, config: ml_collections.ConfigDict) -> None:
  """Creates the workdir, proves it writable and refuses one holding a differently shaped run."""
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f'.write_test_{jax.process_index()}'
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise ConfigError(f'workdir {workdir} is not writable: {e.strerror or e}') from None
  if (workdir / CONFIG_FILE).exists():
    old = read_run_config(workdir)
    for field in _SHAPE_FIELDS:
      section, key = field.split('.')
      before, now = old[section][key], config[section][key]
      if before != now:
        raise ConfigError(f'workdir {workdir} holds a run with {field}={before!r}, this config has '
                          f'{now!r}: use another --workdir')
  if jax.process_index() == 0:
    write_json(workdir / CONFIG_FILE, json.loads(config.to_json_best_effort()))


class _StopRequest:
  """Turns SIGTERM/SIGINT (preemption, Ctrl-C) into 'finish this step, save, exit 0'."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    logger.warning('received signal %d: saving a checkpoint after this step', signum)
    self.requested = True
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts hard

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _device_batches(iterator, mesh) -> Iterator[tuple[Any, dict[str, jax.Array]]]:
  """Yields (iterator position just after the batch, global batch), two batches in flight.

  The position is what a checkpoint taken after consuming the batch must store: restoring it
  makes the iterator continue with the following batch.
  """
  queue = collections.deque()

  def enqueue():
    local = next(iterator)
    queue.append((iterator.get_state(), device_batch(local, mesh, ('image', 'label'))))

  for _ in range(2):
    enqueue()
  while True:
    yield queue.popleft()
    enqueue()


def _profile_window(spec: str) -> tuple[int, int] | None:
  """'START,STOP' (steps) -> the window to trace with jax.profiler, or None."""
  if not spec:
    return None
  try:
    start, stop = (int(x) for x in spec.split(','))
  except ValueError:
    raise ConfigError(f"profile_steps must be 'START,STOP' (e.g. '10,20'), got {spec!r}") from None
  if not 0 <= start < stop:
    raise ConfigError(f'profile_steps needs 0 <= START < STOP, got {spec!r}')
  return start, stop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       train_iter: Any = None, writer: Any = None) -> dict[str, Any]:
  """Trains (or resumes) the run described by `config` in `workdir`; returns results.json's dict.

  `train_iter` (an iterator of local batches with `get_state`/`set_state`/`close`) and `writer`
  (a `MetricWriter`-like object) replace the configured input pipeline and the workdir's writer.
  """
  invocation_start = time.time()
  validate_config(config)
  profile = _profile_window(config.profile_steps)
  workdir = as_path(workdir)
  runtime.build_model(config, num_classes=config.model.num_classes or 1)  # bad names fail first
  _prepare_workdir(workdir, config)
  training = runtime.build_training(config)
  experiment = training.experiment
  mesh, total_steps = experiment.mesh, training.total_steps

  ckpt = checkpointing.Checkpointer(workdir, max_to_keep=config.max_to_keep,
                                    keep_best=config.keep_best)
  start = runtime.starting_point(training, ckpt)
  state, step = start.state, start.step

  if train_iter is None:
    train_iter = data.create_train_iterator(
        config, local_batch_size=config.batch_size // jax.process_count(),
        process_index=jax.process_index(), process_count=jax.process_count(), seed=config.seed)
  if start.iterator_state is not None:
    train_iter.set_state(start.iterator_state)
  writer = writer or MetricWriter(workdir)
  writer.truncate_after(step)
  if step == 0:
    writer.write_text('config', config.to_json_best_effort(indent=2))
  train_step = jit_train_step(mesh, training.state_sharding, training.learning_rate_fn,
                              label_smoothing=config.label_smoothing, seed=config.seed,
                              preprocess=experiment.preprocess)
  eval_step = jit_eval_step(mesh, experiment.model.apply, preprocess=experiment.preprocess)
  num_params = count_params(state.params)
  logger.info('%s: %s parameters, %d steps (%d per epoch), %d devices, %d processes',
              config.model.name, f'{num_params:,}', total_steps, training.steps_per_epoch,
              jax.device_count(), jax.process_count())

  def evaluate(at_step: int, record: bool = True) -> dict[str, Any]:
    result = run_evaluation(eval_step, model_variables(state), config, mesh,
                            split=config.data.eval_split, crops=config.data.eval_crops)
    if record:
      writer.write(at_step, 'eval', {k: result[k] for k in ('loss', 'top1_error', 'top5_error',
                                                             'num_examples')})
    logger.info('eval at step %d on %s (%d examples): top-1 error %.2f%%, top-5 error %.2f%%, '
                'loss %.4f', at_step, config.data.eval_split, result['num_examples'],
                100 * result['top1_error'], 100 * result['top5_error'], result['loss'])
    return result

  progress = Progress(total_steps, step, enabled=config.progress_bar and jax.process_index() == 0,
                      batch_size=config.batch_size)
  eval_result = None
  # closing(): a failed or stopped run must not leave Grain worker processes and shared memory behind.
  with _StopRequest() as stop, contextlib.closing(train_iter):
    batches = _device_batches(train_iter, mesh)
    if step < total_steps:
      position, batch = next(batches)
      logger.info('compiling the train step ...')
      t0 = time.time()
      train_step = train_step.lower(state, batch).compile()
      logger.info('compiled the train step in %.1f s', time.time() - t0)
      pending_batch = (position, batch)
    pending, busy_s, window_start = [], 0.0, time.time()
    while step < total_steps:
      position, batch = pending_batch if pending_batch else next(batches)
      pending_batch = None
      if profile and step == profile[0]:
        jax.profiler.start_trace(str(workdir / 'profile'))
      state, metrics = train_step(state, batch)
      pending.append(metrics)
      step += 1
      if profile and step == profile[1]:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        logger.info('wrote a profiler trace of steps %d-%d to %s', *profile, workdir / 'profile')
      at_end = step == total_steps
      do_eval = at_end or (config.eval_every_steps > 0 and step % config.eval_every_steps == 0)
      do_ckpt = at_end or (config.checkpoint_every_steps > 0
                           and step % config.checkpoint_every_steps == 0)
      do_log = do_eval or do_ckpt or step % config.log_every_steps == 0
      stopping = stop.requested if jax.process_count() == 1 else False
      if not (do_log or stopping):
        continue
      if jax.process_count() > 1:
        stopping = bool(multihost_utils.process_allgather(np.asarray(stop.requested)).any())
      window = jax.device_get(pending)
      train_s = time.time() - window_start - busy_s  # excludes the evals and saves in between
      pending, busy_s, window_start = [], 0.0, time.time()
      _check_finite(window, config.on_nonfinite, ckpt.latest_step())
      summary = {k: float(np.mean([m[k] for m in window])) for k in ('loss', 'top1_error')}
      summary['learning_rate'] = float(window[-1]['learning_rate'])
      summary['images_per_sec'] = len(window) * config.batch_size / max(train_s, 1e-9)
      writer.write(step, 'train', summary)
      progress.update(step, summary['loss'], summary['top1_error'], len(window), train_s)
      busy_start = time.time()
      if do_eval:
        eval_result = evaluate(step)
      if do_ckpt or stopping:
        ckpt.save(step, state, {'iterator': position,
                                'wall_time_s': start.wall_time_before_s + time.time()
                                - invocation_start},
                  metrics={'top1_error': eval_result['top1_error']} if do_eval else None)
      busy_s += time.time() - busy_start
      if stopping and not at_end:
        ckpt.close()
        writer.close()
        logger.warning('stopped at step %d on request; rerun the same command to resume', step)
        return {'step': step, 'stopped': True}

  if eval_result is None:  # resumed at the very end: the run was already complete
    eval_result = evaluate(step, record=False)
  ckpt.close()
  results = {
      'step': int(step),
      'eval': {k: eval_result[k] for k in ('loss', 'top1_error', 'top5_error', 'num_examples')},
      'eval_split': config.data.eval_split,
      'params': num_params,
      'state_fingerprint': state_fingerprint(state),
      'wall_time_s': start.wall_time_before_s + time.time() - invocation_start,
      'environment': environment(),
      'config': json.loads(config.to_json_best_effort()),
  }
  if jax.process_index() == 0:
    write_json(workdir / RESULTS_FILE, results)
  writer.close()
  return results


def _check_finite(window: list[dict[str, Any]], mode: str, last_good: int | None) -> None:
  bad = [m for m in window if int(m['nonfinite'])]
  if not bad:
    return
  first = min(int(m['nonfinite_step']) for m in bad)
  if mode == 'error':
    saved = ('no checkpoint was saved yet' if last_good is None
             else f'the last good checkpoint is step {last_good}')
    raise NonFiniteLossError(
        f'non-finite loss, gradients or update at step {first + 1}; the update was not applied '
        f'and {saved}. Lower the learning rate, or set '
        '--config.on_nonfinite=skip to skip such steps')
  logger.warning('skipped %d non-finite update(s), first at step %d', len(bad), first + 1)
