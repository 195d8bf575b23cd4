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
import os
import time
from typing import Any, Iterator, Sequence

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from resnet_jax import checkpointing, data, ema, evaluators, losses, mixing, runtime
from resnet_jax.metric_writer import MetricWriter, Progress, environment
from resnet_jax.preemption import StopRequest
from resnet_jax.profiling import StepTracer
from resnet_jax.train_step import (
  count_params,
  device_batch,
  jit_train_step,
  state_fingerprint,
)
from resnet_jax.validation import ConfigError, profile_window, validate_config
from resnet_jax.workdir import (
  CONFIG_FILE,
  RESULTS_FILE,
  WorkdirLock,
  as_path,
  check_recorded_class_names,
  read_results,
  read_run_config,
  write_json,
  write_run_record,
)

logger = logging.getLogger(__name__)

# Config fields that define the train state's structure: a workdir trained with other values
# cannot be resumed with these (checked against the workdir's config.json).
_SHAPE_FIELDS = (
  'model.name',
  'model.residual',
  'model.shortcut',
  'model.stride_on',
  'model.preact',
  'model.block',
  'model.stem',  # ResNet-C / ResNet-D (models.stems, layers.avg_pool_down)
  'model.avg_down',
  'model.attention',  # squeeze-and-excitation parameters (models.attention)
  'model.frozen_stages',  # which leaves the optimizer state covers
  'model.frozen_bn_affine',
  'optimizer.name',  # the optimizer state's tree
  'data.name',
  'data.image_size',
)


class NonFiniteLossError(RuntimeError):
  """The loss, gradients or update became NaN/inf (the update was not applied)."""


def _prepare_workdir(
  workdir: epath.Path,
  config: ml_collections.ConfigDict,
  lock: WorkdirLock | None = None,
  class_names: Sequence[str] | None = None,
) -> None:
  """Creates the workdir, takes its `lock` (a second run stops here), proves it and its
  checkpoints/ writable, and refuses one holding a differently shaped run, or one whose recorded
  `class_names` differ (a tree's folders renamed: its labels would mean other classes). Writes
  nothing that stays: config.json comes once the run is accepted."""
  if workdir.exists() and not workdir.is_dir():
    raise ConfigError(f'workdir {workdir} is a file, not a directory: use another --workdir')
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    if lock is not None:
      lock.acquire()
  except OSError as e:
    raise ConfigError(f'workdir {workdir} is not writable: {e.strerror or e}') from None
  for directory in (workdir, workdir / checkpointing.CHECKPOINT_DIR):
    if not directory.exists():
      continue
    try:
      probe = directory / f'.write_test_{jax.process_index()}_{os.getpid()}'
      probe.write_text('ok')
      probe.unlink()
    except OSError as e:
      raise ConfigError(f'{directory} is not writable: {e.strerror or e}') from None
  if (workdir / CONFIG_FILE).exists():
    old = read_run_config(workdir)
    ema.check_resume(old, config, workdir)
    for field in _SHAPE_FIELDS:
      section, key = field.split('.')
      before, now = old[section][key], config[section][key]
      if before != now:
        raise ConfigError(
          f'workdir {workdir} holds a run with {field}={before!r}, this config has '
          f'{now!r}: use another --workdir (--config.init_from={workdir} starts from its weights)'
        )
    check_recorded_class_names(workdir, class_names)


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


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  train_iter: Any = None,
  writer: Any = None,
  stop: StopRequest | None = None,
) -> dict[str, Any]:
  """Trains (or resumes) the run described by `config` in `workdir`; returns results.json's dict.

  `train_iter` (an iterator of local batches with `get_state`/`set_state`/`close`) and `writer`
  (a `MetricWriter`-like object) replace the configured input pipeline and the workdir's writer.
  `stop` is a `StopRequest` installed by the caller (main installs one before JAX starts);
  without one, the run installs its own for its duration. A stop request returns
  `{'step', 'stopped': True}` after saving. The workdir is locked for the whole run.
  """
  invocation_start = time.time()
  validate_config(config)
  mixing.validate(config, jax.device_count())
  ema.validate(config)
  schedule = evaluators.from_config(config)  # a bad evaluator is refused before anything is written
  profile = profile_window(config.profile_steps)
  workdir = as_path(workdir)
  own_stop = stop is None
  stop = stop or StopRequest().install()
  lock = WorkdirLock(workdir)
  ckpt = None
  try:
    if stop.requested:  # a signal during start-up: stop before anything is written
      return {'step': None, 'stopped': True}
    # Before the workdir is made: a model name that is wrong, or a dataset that is unknown or not
    # prepared, leaves no trace. build_training opens the train and main eval splits; the other
    # evaluators' splits are opened here, so a misspelt one fails now, not at the run's end.
    training = runtime.build_training(config)
    evaluators.check_sources(schedule, training.experiment)
    fresh = not (workdir / checkpointing.CHECKPOINT_DIR).exists()
    if config.init_from and fresh and not as_path(config.init_from).is_dir():
      raise ConfigError(
        f'init_from {config.init_from} is not a directory (a run workdir or converted weights)'
      )
    initial = runtime.initial_variables(training) if fresh else None  # a misfit: no trace
    _prepare_workdir(
      workdir,
      config,
      lock if jax.process_index() == 0 else None,
      training.experiment.dataset.class_names,
    )
    ckpt = checkpointing.Checkpointer(
      workdir, max_to_keep=config.max_to_keep, keep_best=config.keep_best
    )
    start = runtime.starting_point(training, ckpt, initial)
    if train_iter is None:
      train_iter = data.create_train_iterator(
        config,
        local_batch_size=config.batch_size // jax.process_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        seed=config.seed,
      )
    # closing(): a failed or stopped run must not leave Grain workers and shared memory behind.
    with contextlib.closing(train_iter):
      if start.iterator_state is not None:  # the pipeline refuses another batch size or seed
        train_iter.set_state(start.iterator_state)
      # only now: a refused run leaves the workdir as it was
      if jax.process_index() == 0:
        write_run_record(workdir, config, training.experiment.dataset.class_names)
      return _train(
        config, workdir, training, ckpt, start, train_iter, writer, stop, profile, invocation_start
      )
  except BaseException:
    if ckpt is not None:  # an error exit still finishes the saves it started, deliberately
      try:
        ckpt.close()
      except Exception as e:  # noqa: BLE001 -- the original error is the one to report
        logger.warning('could not finish the last checkpoint save: %s', e)
      ckpt = None
    raise
  finally:
    if ckpt is not None:
      ckpt.close()
    if own_stop:
      stop.uninstall()
    lock.release()


def _train(
  config, workdir, training, ckpt, start, train_iter, writer, stop, profile, invocation_start
) -> dict[str, Any]:
  """The loop of `train_and_evaluate`, once the run is accepted and its state restored."""
  experiment = training.experiment
  mesh, total_steps = experiment.mesh, training.total_steps
  state, step = start.state, start.step
  recorded = read_results(workdir) if step >= total_steps else None
  if recorded is not None and recorded['step'] == step:
    logger.info('the run finished at step %d: its results are in %s', step, RESULTS_FILE)
    return recorded  # a rerun of a finished run records nothing: no evaluation, no new files
  writer = writer or MetricWriter(workdir)
  train_step = jit_train_step(
    mesh,
    training.state_sharding,
    training.learning_rate_fn,
    loss=losses.from_config(config),
    seed=config.seed,
    preprocess=experiment.preprocess,
    accum_steps=config.grad_accum_steps,
    mixing=mixing.from_config(config, config.model.num_classes or experiment.dataset.num_classes),
    ema=ema.from_config(config, training.steps_per_epoch),
  )
  schedule, runner = evaluators.from_config(config), evaluators.EvalRunner(experiment)
  num_params = count_params(state.params)
  logger.info(
    '%s: %s parameters, %d steps (%d per epoch), %d devices, %d processes',
    config.model.name,
    f'{num_params:,}',
    total_steps,
    training.steps_per_epoch,
    jax.device_count(),
    jax.process_count(),
  )

  def evaluate(due: list[evaluators.Evaluator], at_step: int, record: bool = True) -> None:
    for evaluator in due:  # with EMA, each also on the average, recorded as NAME_ema
      for name, variables in evaluators.weights_of(state, evaluator.name):
        result = runner.run(evaluator, variables)
        if record:
          writer.write(at_step, name, evaluators.record_of(result))
        evaluators.log_result(evaluator, at_step, result, name)
        final[name] = evaluator.summary(result)

  def stopped() -> dict[str, Any]:
    writer.close()
    logger.warning('stopped at step %d on request; rerun the same command to resume', step)
    return {'step': step, 'stopped': True}

  tracer = None
  try:
    if stop.requested:  # during start-up: nothing was trained, nothing needs saving
      return stopped()
    writer.truncate_after(step)
    if step == 0:
      writer.write_text('config', config.to_json_best_effort(indent=2))
    progress = Progress(
      total_steps,
      step,
      batch_size=config.batch_size,
      enabled=config.progress_bar and jax.process_index() == 0,
    )
    final: dict[str, dict[str, Any]] = {}  # each evaluator's newest result
    first_step, skipped = step, 0
    batches = _device_batches(train_iter, mesh)
    if step < total_steps:
      position, batch = next(batches)
      logger.info('compiling the train step ...')
      t0 = time.time()
      train_step = train_step.lower(state, batch).compile()
      logger.info('compiled the train step in %.1f s', time.time() - t0)
      pending_batch = (position, batch)
      if stop.requested:
        return stopped()
    pending, busy_s, window_start = [], 0.0, time.time()
    tracer = StepTracer(profile, workdir / 'profile')
    while step < total_steps:
      position, batch = pending_batch if pending_batch else next(batches)
      pending_batch = None
      tracer.before(step)
      state, metrics = train_step(state, batch)
      pending.append(metrics)
      step += 1
      tracer.after(step, state)
      at_end = step == total_steps
      due = [e for e in schedule if e.due(step, at_end)]
      do_eval = bool(due)
      main_due = any(e.name == evaluators.MAIN for e in due)
      # keep_best ranks checkpoints by the main evaluator's error: each evaluated state is saved
      # (with its own error; a checkpoint between evaluations has none to be ranked by).
      do_ckpt = (
        at_end
        or (config.checkpoint_every_steps > 0 and step % config.checkpoint_every_steps == 0)
        or (config.keep_best and main_due)
      )
      do_log = do_eval or do_ckpt or step % config.log_every_steps == 0
      stopping = stop.requested if jax.process_count() == 1 else False
      if not (do_log or stopping):
        continue
      if jax.process_count() > 1:
        stopping = bool(multihost_utils.process_allgather(np.asarray(stop.requested)).any())
      window = jax.device_get(pending)
      train_s = time.time() - window_start - busy_s  # excludes the evals and saves in between
      pending, busy_s, window_start = [], 0.0, time.time()
      skipped_now = _check_finite(window, config.on_nonfinite, ckpt)
      skipped += skipped_now
      if at_end and skipped_now == len(window):  # ended stuck: not a result to report
        raise NonFiniteLossError(
          f'the last {len(window)} steps (to step {step}) were all non-finite and skipped '
          f'({skipped} of the {step - first_step} steps of this run): the run diverged, so no '
          'final checkpoint or results were written. Lower the learning rate'
        )
      summary = {k: float(np.mean([m[k] for m in window])) for k in ('loss', 'top1_error')}
      summary['learning_rate'] = float(window[-1]['learning_rate'])
      summary['images_per_sec'] = len(window) * config.batch_size / max(train_s, 1e-9)
      writer.write(step, 'train', summary)
      progress.update(step, summary['loss'], summary['top1_error'], len(window), train_s)
      busy_start = time.time()
      if do_eval:
        final.clear()
        evaluate(due, step)
      if do_ckpt or stopping:
        ckpt.save(
          step,
          state,
          {
            'iterator': position,
            'wall_time_s': start.wall_time_before_s + time.time() - invocation_start,
          },
          metrics={'top1_error': final[evaluators.MAIN]['top1_error']} if main_due else None,
        )
      busy_s += time.time() - busy_start
      if stopping and not at_end:
        ckpt.wait()
        return stopped()

    if not final:  # resumed at the very end, before its results.json was written
      evaluate(schedule, step, record=False)
    ckpt.wait()
    main = final.pop(evaluators.MAIN)
    main_ema = final.pop(evaluators.MAIN + ema.SUFFIX, None)
    results = {
      'step': int(step),
      'eval': {k: main[k] for k in evaluators.RESULT_KEYS},
      **({'eval_ema': {k: main_ema[k] for k in evaluators.RESULT_KEYS}} if main_ema else {}),
      'eval_split': config.data.eval_split,
      **({'evals': final} if final else {}),
      'params': num_params,
      'state_fingerprint': state_fingerprint(state),
      'wall_time_s': start.wall_time_before_s + time.time() - invocation_start,
      'environment': environment(),
      'config': json.loads(config.to_json_best_effort()),
    }
    if jax.process_index() == 0:
      write_json(workdir / RESULTS_FILE, results)
    return results
  finally:
    if tracer is not None:
      tracer.stop(step, state)
    writer.close()


def _check_finite(window: list[dict[str, Any]], mode: str, ckpt: checkpointing.Checkpointer) -> int:
  """How many steps of `window` were skipped as non-finite; raises in mode 'error'."""
  bad = [m for m in window if int(m['nonfinite'])]
  if not bad:
    return 0
  first = min(int(m['nonfinite_step']) for m in bad)
  if mode == 'error':
    ckpt.wait()  # name a checkpoint only once it is complete on disk
    last_good = ckpt.latest_step()
    saved = (
      'no checkpoint was saved yet'
      if last_good is None
      else f'the last good checkpoint is step {last_good}'
    )
    raise NonFiniteLossError(
      f'non-finite loss, gradients or update at step {first + 1}; the update was not applied '
      f'and {saved}. Lower the learning rate, or set '
      '--config.on_nonfinite=skip to skip such steps'
    )
  logger.warning('skipped %d non-finite update(s), first at step %d', len(bad), first + 1)
  return len(bad)
