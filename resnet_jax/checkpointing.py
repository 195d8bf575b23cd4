"""Run checkpoints: Orbax `CheckpointManager` over the train state and the run's progress record.

Each step directory `checkpoints/<step>/` holds two items:
- `state`: the full train state (params, BN statistics, optimizer state, step);
- `progress`: a JSON object with the input pipeline's position (`iterator`), the wall time spent so
  far (`wall_time_s`) and the state's content checksum (`state_fingerprint`).

Guarantees (see README, "Checkpoints and faults"):
- Saves are atomic: Orbax writes into a temporary directory and renames it when complete, so a
  process killed mid-save leaves the previous checkpoints intact and the partial one invisible.
- Restores are strict: the newest checkpoint is checked against the abstract train state first; a
  different model/config shape is an error naming the mismatched keys, never a silent partial load.
- A corrupt, truncated or checksum-failing newest checkpoint is reported (naming it) and the
  previous one is used; the trainer moves it to `corrupt_checkpoints/`, readers never write.
  When checkpoints exist but none restores, the trainer refuses to start (it never silently
  starts over).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from resnet_jax import orbax_logs
from resnet_jax.train_step import state_fingerprint
from resnet_jax.workdir import as_path

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = 'checkpoints'
CORRUPT_DIR = 'corrupt_checkpoints'
_LEGACY_DATA_ITEM = 'data'  # written by grain's handler before the `progress` item existed


class CheckpointMismatchError(ValueError):
  """The workdir holds a run whose train state has a different structure or shapes."""


class NoReadableCheckpointError(ValueError):
  """Checkpoints exist but none restores: refusing to start over on top of them."""


class Restored(NamedTuple):
  state: Any
  progress: dict[str, Any]  # {'iterator': ..., 'wall_time_s': float, 'state_fingerprint': str}
  step: int


def flatten(tree: Any) -> dict[str, Any]:
  """{'a/b/c': leaf} for a nested tree (the key spelling error messages use)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p, simple=True, separator='/'): v for p, v in flat}


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for key, value in flat.items():
    node = out
    *parents, leaf = key.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def describe_mismatch(expected: Any, found: Any, limit: int = 6) -> str:
  """A one-line description of how two trees' keys and shapes differ ('' when they agree)."""
  shape = lambda leaf: tuple(getattr(leaf, 'shape', ()) or ())
  exp = {k: shape(v) for k, v in flatten(expected).items()}
  got = {k: shape(v) for k, v in flatten(found).items()}
  missing = sorted(set(exp) - set(got))
  unexpected = sorted(set(got) - set(exp))
  reshaped = sorted(k for k in set(exp) & set(got) if exp[k] != got[k])
  parts = []
  if missing:
    parts.append(f'missing {missing[:limit]}' + (' ...' if len(missing) > limit else ''))
  if unexpected:
    parts.append(f'unexpected {unexpected[:limit]}' + (' ...' if len(unexpected) > limit else ''))
  if reshaped:
    parts.append(
      'shape differs for ' + ', '.join(f'{k} {got[k]} vs {exp[k]}' for k in reshaped[:limit])
    )
  return '; '.join(parts)


def _top1_error(metrics: dict[str, float]) -> float:
  return metrics['top1_error']


def _manager(
  directory: epath.Path,
  *,
  read_only: bool,
  max_to_keep: int = 3,
  keep_best: bool = False,
  async_save: bool = True,
) -> ocp.CheckpointManager:
  preservation = policies.LatestN(n=max_to_keep)
  if keep_best:
    preservation = policies.AnyPreservationPolicy(
      [
        preservation,
        policies.BestN(
          get_metric_fn=_top1_error,
          reverse=True,
          n=1,
          keep_checkpoints_without_metrics=False,
        ),
      ]
    )
  options = ocp.CheckpointManagerOptions(
    preservation_policy=None if read_only else preservation,
    # Orbax writes a save's metrics to disk (and reads them back on a resume) only when it
    # tracks a best_fn: without it a resumed run's checkpoints had no metrics, so BestN deleted
    # the best one at the next save.
    best_fn=_top1_error if keep_best and not read_only else None,
    best_mode='min',
    enable_async_checkpointing=async_save and not read_only,
    cleanup_tmp_directories=not read_only,  # a reader must not delete a live run's save
    read_only=read_only,
    create=not read_only,
  )
  return ocp.CheckpointManager(
    directory,
    options=options,
    item_handlers={
      'state': ocp.StandardCheckpointHandler(),
      'progress': ocp.JsonCheckpointHandler(),
    },
  )


class Checkpointer:
  """Saves and restores a run's checkpoints under `workdir/checkpoints` (the trainer's view)."""

  def __init__(
    self,
    workdir: str | epath.Path,
    *,
    max_to_keep: int = 3,
    keep_best: bool = False,
    async_save: bool = True,
  ):
    self.directory = as_path(workdir) / CHECKPOINT_DIR
    self.manager = _manager(
      self.directory,
      read_only=False,
      max_to_keep=max_to_keep,
      keep_best=keep_best,
      async_save=async_save,
    )
    # Orbax's own tracebacks of a failed save: the failure is raised to us, reported as one line.
    self._save_errors = orbax_logs.SaveErrors()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(
    self, step: int, state: Any, progress: dict[str, Any], metrics: dict[str, float] | None = None
  ) -> None:
    """Starts an (async) save of the state and its progress record at `step`."""
    if step in self.manager.all_steps():
      return
    progress = dict(progress, state_fingerprint=state_fingerprint(state))
    self._save_errors.install()  # until close(): the save goes on in the background
    absl_logger = logging.getLogger(orbax_logs.ABSL)
    absl_logger.addFilter(orbax_logs.drop_untracked_metric_notice)
    try:
      with self._save_errors.reporting():  # raises an earlier save's failure
        self.manager.save(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)
          ),
          metrics=metrics,
          force=True,
        )
    finally:
      absl_logger.removeFilter(orbax_logs.drop_untracked_metric_notice)

  def restore(self, abstract_state: Any) -> Restored | None:
    """Restores the newest good checkpoint into the shardings of `abstract_state`.

    Returns None when there is no checkpoint. Falls back to older checkpoints when the newest
    cannot be read; raises CheckpointMismatchError when a readable one has another structure.
    """
    restored, bad = _restore_newest(self.manager, self.directory, abstract_state)
    if restored is None and bad:
      # Starting over here would silently throw the run away: leave everything as it is.
      raise NoReadableCheckpointError(
        f'every checkpoint in {self.directory} is unreadable (steps '
        f'{", ".join(map(str, bad))}; see the warnings above); nothing was changed. To start '
        f'over deliberately, use a new --workdir or move {self.directory} away'
      )
    self._set_aside(bad)
    return restored

  def _set_aside(self, steps: list[int]) -> None:
    """Moves unreadable checkpoints to `corrupt_checkpoints/` so the resumed run can save those
    steps again (nothing is deleted: they stay for inspection)."""
    if not steps:
      return
    if jax.process_index() == 0:
      aside = self.directory.parent / CORRUPT_DIR
      aside.mkdir(parents=True, exist_ok=True)
      for step in steps:
        target = aside / f'{step}_{int(time.time())}'
        (self.directory / str(step)).rename(target)
        logger.warning('moved unreadable checkpoint %d to %s', step, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('resnet_jax_set_aside_corrupt_checkpoints')
    self.manager.reload()

  def wait(self) -> None:
    with self._save_errors.reporting():
      self.manager.wait_until_finished()

  def close(self) -> None:
    """Finishes in-flight saves, then releases the manager (also on error exits)."""
    try:
      with self._save_errors.reporting():
        self.manager.wait_until_finished()
    finally:
      try:
        self.manager.close()
      finally:
        self._save_errors.release()


def _read_progress(manager: ocp.CheckpointManager, directory: epath.Path, step: int) -> dict:
  legacy = directory / str(step) / _LEGACY_DATA_ITEM
  if legacy.is_dir() and not (directory / str(step) / 'progress').exists():
    files = sorted(legacy.glob('process_0-of-*.json'))
    if not files:
      raise ValueError(f'no progress record in {legacy}')
    return json.loads(files[0].read_text())
  return manager.restore(step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))['progress']


def _restore_newest(
  manager: ocp.CheckpointManager, directory: epath.Path, abstract: Any
) -> tuple[Restored | None, list[int]]:
  """(the newest checkpoint that restores and verifies, the newer steps that did not)."""
  orbax_logs.quiet_abandoned_reads(directory)
  bad = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      found = manager.item_metadata(step)['state']
      if found is None:
        raise ValueError('no state metadata')
    except Exception as e:  # noqa: BLE001 -- any unreadable metadata means a damaged checkpoint
      logger.warning(
        'checkpoint %s/%d is unreadable (%s); trying the previous one', directory, step, _short(e)
      )
      bad.append(step)
      continue
    mismatch = describe_mismatch(abstract, found)
    if mismatch:
      raise CheckpointMismatchError(
        f'{directory}/{step} holds a run of a different model/config: {mismatch}; '
        'use another --workdir'
      )
    try:
      progress = _read_progress(manager, directory, step)
      state = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
      )['state']
      expected = progress.get('state_fingerprint')
      if expected is not None and state_fingerprint(state) != expected:
        raise ValueError('content checksum mismatch: an array file was modified after saving')
    except Exception as e:  # noqa: BLE001 -- truncated/corrupt files: fall back, loudly
      logger.warning(
        'checkpoint %s/%d is corrupt or incomplete (%s); trying the previous one',
        directory,
        step,
        _short(e),
      )
      bad.append(step)
      continue
    return Restored(state, progress, step), bad
  return None, bad


def restore_model_variables(
  workdir: str | epath.Path, weights: str = 'model'
) -> tuple[dict[str, Any], int]:
  """({'params', 'batch_stats'}, step) of a run's newest readable checkpoint, read-only.

  For readers (evaluate, predict, Fig. 7, init_from): nothing in the workdir is created, cleaned
  or moved, so a live run is never disturbed, and a read-only workdir works. `weights`: 'model'
  (the trained weights: what init_from and predict take) or 'ema' (their average, saved by a run
  with `ema_decay` > 0; a run without one is a ValueError).
  """
  if weights not in ('model', 'ema'):
    raise ValueError(f"weights must be 'model' or 'ema', got {weights!r}")
  directory = as_path(workdir) / CHECKPOINT_DIR
  if not directory.is_dir():
    raise FileNotFoundError(f'no checkpoint in {directory}')
  orbax_logs.quiet_abandoned_reads(directory)
  absl_logger = logging.getLogger('absl')
  absl_logger.addFilter(orbax_logs.drop_expected_reader_notices)
  try:
    return _restore_newest_readable(directory, weights)
  finally:
    absl_logger.removeFilter(orbax_logs.drop_expected_reader_notices)


class NoEmaError(ValueError):
  """`weights='ema'` of a run that kept no average of its weights."""


def _restore_newest_readable(
  directory: epath.Path, weights: str = 'model'
) -> tuple[dict[str, Any], int]:
  manager = ocp.CheckpointManager(
    directory,
    options=ocp.CheckpointManagerOptions(
      read_only=True, create=False, cleanup_tmp_directories=False
    ),
    item_handlers={'state': ocp.PyTreeCheckpointHandler()},
  )
  try:
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        found = manager.item_metadata(step)['state']
        if weights == 'ema':
          if 'ema' not in found:
            raise NoEmaError(
              f'{directory}/{step} holds no EMA weights (the run trained with ema_decay=0): '
              'evaluate its model weights (--weights model), or train with --config.ema_decay'
            )
          wanted = {'ema': {k: found['ema'][k] for k in ('params', 'batch_stats')}}
        else:
          wanted = {k: found[k] for k in ('params', 'batch_stats') if k in found}
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), wanted)
        restore_args = jax.tree.map(
          lambda _: ocp.ArrayRestoreArgs(restore_type=np.ndarray), abstract
        )
        state = manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
              item=abstract, restore_args=restore_args, partial_restore=True
            )
          ),
        )['state']
        state = state['ema'] if weights == 'ema' else state
      except NoEmaError:
        raise
      except Exception as e:  # noqa: BLE001 -- report and try the previous one; never move it
        logger.warning(
          'checkpoint %s/%d is unreadable (%s); trying the previous one', directory, step, _short(e)
        )
        continue
      return {'params': state['params'], 'batch_stats': state.get('batch_stats', {})}, step
  finally:
    manager.close()
  raise FileNotFoundError(f'no readable checkpoint in {directory}')


def _short(e: Exception) -> str:
  text = f'{type(e).__name__}: {e}'.splitlines()[0] if str(e) else type(e).__name__
  return text[:300]
