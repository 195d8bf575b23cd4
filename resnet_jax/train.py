"""`train_and_evaluate(config, workdir)`: the whole training run, start or resume to results.json.

Read top to bottom: validate the config, build model/optimizer/mesh, restore the newest good
checkpoint (or initialise), then loop over jit-compiled steps, logging, evaluating and
checkpointing at fixed steps. Device work is never synchronised except at those points.
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import signal
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from resnet_jax import checkpointing, data, optim
from resnet_jax.evaluate import run_evaluation
from resnet_jax.metric_writer import MetricWriter, Progress
from resnet_jax.models import create_model
from resnet_jax.train_step import (abstract_state, batch_sharding, compile_steps, count_params,
                                   create_mesh, init_state, replicated, state_fingerprint)

logger = logging.getLogger(__name__)

# Config fields that define the train state's structure: a workdir trained with other values
# cannot be resumed with these (checked against the workdir's config.json).
_SHAPE_FIELDS = ('model.name', 'model.residual', 'model.shortcut', 'model.stride_on',
                 'model.preact', 'model.block', 'data.name', 'data.image_size')


class ConfigError(ValueError):
  """A config or command-line value that cannot give a correct run."""


class NonFiniteLossError(RuntimeError):
  """The loss or gradients became NaN/inf (the update was not applied)."""


def validate_config(config: ml_collections.ConfigDict) -> None:
  if config.batch_size <= 0:
    raise ConfigError(f'batch_size must be positive, got {config.batch_size}')
  n_dev, n_proc = jax.device_count(), jax.process_count()
  if config.batch_size % n_dev:
    raise ConfigError(f'batch_size {config.batch_size} is not divisible by the {n_dev} devices: '
                      f'use a multiple of {n_dev} (per-device batch must be whole)')
  if config.batch_size % n_proc:
    raise ConfigError(f'batch_size {config.batch_size} is not divisible by {n_proc} processes')
  if config.dtype not in ('float32', 'bfloat16'):
    raise ConfigError(f"dtype must be 'float32' or 'bfloat16', got {config.dtype!r}")
  if config.on_nonfinite not in ('error', 'skip'):
    raise ConfigError(f"on_nonfinite must be 'error' or 'skip', got {config.on_nonfinite!r}")
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ConfigError('set num_train_steps > 0 or num_epochs > 0')


def _prepare_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Creates the workdir, proves it writable and refuses one holding a differently shaped run."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test_{jax.process_index()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f'workdir {workdir} is not writable: {e.strerror or e}') from None
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    for field in _SHAPE_FIELDS:
      section, key = field.split('.')
      before, now = old.get(section, {}).get(key), config[section][key]
      if before != now:
        raise ConfigError(f'workdir {workdir} holds a run with {field}={before!r}, this config has '
                          f'{now!r}: use another --workdir')
  if jax.process_index() == 0:
    with open(path + '.tmp', 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(path + '.tmp', path)


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


def _device_batches(iterator, sharding) -> Iterator[tuple[Any, dict[str, jax.Array]]]:
  """Yields (iterator position just after the batch, global batch), two batches in flight.

  The position is what a checkpoint taken after consuming the batch must store: restoring it
  makes the iterator continue with the following batch.
  """
  queue = collections.deque()

  def enqueue():
    local = next(iterator)
    position = iterator.get_state()
    batch = {k: jax.make_array_from_process_local_data(sharding, np.asarray(local[k]))
             for k in ('image', 'label')}
    queue.append((position, batch))

  for _ in range(2):
    enqueue()
  while True:
    yield queue.popleft()
    enqueue()


def _build(config: ml_collections.ConfigDict, num_classes: int):
  return create_model(
      config.model.name, num_classes=num_classes, residual=config.model.residual,
      shortcut=config.model.shortcut, stride_on=config.model.stride_on,
      preact=config.model.preact, block=config.model.get('block'),  # absent in older workdirs
      zero_init_last_bn=config.model.zero_init_last_bn,
      bn_group_size=config.model.bn_group_size, bn_momentum=config.model.bn_momentum,
      bn_epsilon=config.model.bn_epsilon,
      dtype=jnp.bfloat16 if config.dtype == 'bfloat16' else jnp.float32)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run described by `config` in `workdir`; returns results.json's dict."""
  start_time = time.time()
  validate_config(config)
  workdir = os.path.abspath(workdir)
  _build(config, num_classes=config.model.num_classes or 1)  # a bad model name fails first
  _prepare_workdir(workdir, config)
  info = data.get_dataset_info(config)
  model = _build(config, config.model.num_classes or info.num_classes)
  mesh = create_mesh()
  steps_per_epoch = math.ceil(info.num_train_examples / config.batch_size)
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else int(math.ceil(config.num_epochs * steps_per_epoch)))
  lr_fn = optim.create_learning_rate_fn(config, steps_per_epoch, total_steps)
  tx = optim.create_optimizer(config, lr_fn)
  abstract = abstract_state(model, tx, info.image_shape, mesh)
  state_sharding = jax.tree.map(lambda s: s.sharding, abstract)

  ckpt = checkpointing.Checkpointer(workdir, max_to_keep=config.max_to_keep,
                                    keep_best=config.keep_best)
  restored = ckpt.restore(abstract)
  if restored is not None:
    state, saved, start_step = restored
    # The data item holds the iterator position and the wall time spent before this checkpoint.
    position = checkpointing.IteratorState(saved.state['iterator'])
    start_time -= saved.state['wall_time_s']
    logger.info('resuming from %s/%d', ckpt.directory, start_step)
  else:
    variables = None
    if config.init_from:
      fresh = jax.device_get(jax.jit(lambda r: model.init(
          r, jnp.zeros((1,) + info.image_shape), train=False))(jax.random.key(config.seed)))
      variables, reinit = checkpointing.merge_pretrained(
          fresh, checkpointing.load_model_variables(config.init_from))
      logger.info('initialised from %s (re-initialised: %s)', config.init_from, reinit or 'none')
    state = init_state(model, tx, info.image_shape, config.seed, mesh, variables)
    position, start_step = checkpointing.IteratorState(), 0

  train_iter = data.create_train_iterator(
      config, local_batch_size=config.batch_size // jax.process_count(),
      process_index=jax.process_index(), process_count=jax.process_count(), seed=config.seed)
  if position.state is not None:
    train_iter.set_state(position.state)
  writer = MetricWriter(workdir)
  writer.truncate_after(start_step)
  if start_step == 0:
    writer.write_text('config', config.to_json_best_effort(indent=2))
  p_train, p_eval = compile_steps(mesh, state_sharding, lr_fn, config.label_smoothing)
  num_params = count_params(state.params)
  logger.info('%s: %s parameters, %d steps (%d per epoch), %d devices, %d processes',
              config.model.name, f'{num_params:,}', total_steps, steps_per_epoch,
              jax.device_count(), jax.process_count())

  def evaluate(step: int) -> dict[str, float]:
    result = run_evaluation(p_eval, state, config, mesh, split=config.data.eval_split,
                            crops=config.data.eval_crops)
    writer.write(step, 'eval', {k: result[k] for k in ('loss', 'top1_error', 'top5_error',
                                                        'num_examples')})
    logger.info('eval at step %d: %s', step, result)
    return result

  progress = Progress(total_steps, start_step, enabled=config.progress_bar and jax.process_index() == 0)
  batches = _device_batches(train_iter, batch_sharding(mesh))
  pending, window_start, step = [], time.time(), start_step
  eval_result = None
  # closing(): a failed or stopped run must not leave Grain worker processes and shared memory behind.
  with _StopRequest() as stop, contextlib.closing(train_iter):
    while step < total_steps:
      position.state, batch = next(batches)
      state, metrics = p_train(state, batch)
      pending.append(metrics)
      step += 1
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
      elapsed = time.time() - window_start
      pending, window_start = [], time.time()
      _check_finite(window, config.on_nonfinite, ckpt.latest_step())
      summary = {k: float(np.mean([m[k] for m in window])) for k in ('loss', 'top1_error')}
      summary['learning_rate'] = float(window[-1]['learning_rate'])
      summary['images_per_sec'] = len(window) * config.batch_size / max(elapsed, 1e-9)
      writer.write(step, 'train', summary)
      progress.update(step, summary['loss'], summary['top1_error'], summary['images_per_sec'])
      if do_eval:
        eval_result = evaluate(step)
      if do_ckpt or stopping:
        ckpt.save(step, state, checkpointing.IteratorState(
                      {'iterator': position.state, 'wall_time_s': time.time() - start_time}),
                  metrics={'top1_error': eval_result['top1_error']} if do_eval else None)
      if stopping and not at_end:
        ckpt.close()
        writer.close()
        logger.warning('stopped at step %d on request; rerun the same command to resume', step)
        return {'step': step, 'stopped': True}

  if eval_result is None:  # resumed at the very end: the run was already complete
    eval_result = evaluate(step)
  ckpt.close()
  results = {
      'step': int(step),
      'eval': {k: eval_result[k] for k in ('loss', 'top1_error', 'top5_error', 'num_examples')},
      'params': num_params,
      'state_fingerprint': state_fingerprint(state),
      'wall_time_s': time.time() - start_time,  # summed over resumes (up to the checkpoint)
      'config': json.loads(config.to_json_best_effort()),
  }
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'results.json.tmp'), 'w') as f:
      json.dump(results, f, indent=2)
    os.replace(os.path.join(workdir, 'results.json.tmp'), os.path.join(workdir, 'results.json'))
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
        f'non-finite loss or gradients at step {first + 1}; the update was not applied and '
        f'{saved}. Lower the learning rate, or set '
        '--config.on_nonfinite=skip to skip such steps')
  logger.warning('skipped %d non-finite update(s), first at step %d', len(bad), first + 1)
