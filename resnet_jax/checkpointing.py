"""Checkpoints: Orbax `CheckpointManager` over the train state and the input pipeline's position.

Guarantees (see README, "Checkpoints and faults"):
- Saves are atomic: Orbax writes into a temporary directory and renames it when complete, so a
  process killed mid-save leaves the previous checkpoints intact and the partial one invisible.
- Restores are strict: the newest checkpoint is checked against the abstract train state first; a
  different model/config shape is an error naming the mismatched keys, never a silent partial load.
- A corrupt or truncated newest checkpoint is reported (naming it) and the previous one is used.
- The data iterator's state is saved per process beside the train state, so a resumed run sees
  exactly the batches an uninterrupted one would have seen.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

logger = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
  """The workdir holds a run whose train state has a different structure or shapes."""


class IteratorState:
  """Adapts our host-side position record to grain's Orbax handler (bytes in, bytes out).

  The training loop prefetches batches, so the live iterator runs ahead of the step being saved;
  this object holds the state that matches the next batch the train step will consume.
  """

  def __init__(self, state: Any = None):
    self.state = state

  def get_state(self) -> bytes:
    return json.dumps(self.state).encode()

  def set_state(self, state: bytes) -> None:
    self.state = json.loads(state)

  def start_prefetch(self) -> None:  # called by grain's handler after restore
    pass


def _paths_and_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  out = {}
  for path, leaf in flat:
    key = jax.tree_util.keystr(path, simple=True, separator='/')
    shape = getattr(leaf, 'shape', None)
    out[key] = (tuple(shape) if shape is not None else (), str(getattr(leaf, 'dtype', '')))
  return out


def describe_mismatch(expected: Any, found: Any, limit: int = 6) -> str:
  """A one-line description of how two trees' keys and shapes differ ('' when they agree)."""
  exp, got = _paths_and_shapes(expected), _paths_and_shapes(found)
  missing = sorted(set(exp) - set(got))
  unexpected = sorted(set(got) - set(exp))
  reshaped = sorted(k for k in set(exp) & set(got) if exp[k][0] != got[k][0])
  parts = []
  if missing:
    parts.append(f'missing {missing[:limit]}' + (' ...' if len(missing) > limit else ''))
  if unexpected:
    parts.append(f'unexpected {unexpected[:limit]}' + (' ...' if len(unexpected) > limit else ''))
  if reshaped:
    parts.append('shape differs for ' + ', '.join(
        f'{k} {got[k][0]} vs {exp[k][0]}' for k in reshaped[:limit]))
  return '; '.join(parts)


class Checkpointer:
  """Saves and restores {'state': train state, 'data': iterator position} under `workdir/checkpoints`."""

  def __init__(self, workdir: str, *, max_to_keep: int = 3, keep_best: bool = False,
               async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    preservation = policies.LatestN(n=max_to_keep)
    if keep_best:
      preservation = policies.AnyPreservationPolicy([
          preservation,
          policies.BestN(get_metric_fn=lambda m: m['top1_error'], reverse=True, n=1,
                         keep_checkpoints_without_metrics=False),
      ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: IteratorState,
           metrics: dict[str, float] | None = None) -> None:
    """Starts an (async) save of the state and the data position at `step`."""
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_state)),
        metrics=metrics, force=True)

  def restore(self, abstract_state: Any) -> tuple[Any, IteratorState, int] | None:
    """Restores the newest good checkpoint into the shardings of `abstract_state`.

    Returns None when there is no checkpoint. Falls back to older checkpoints when the newest
    cannot be read; raises CheckpointMismatchError when a readable one has another structure.
    """
    skipped = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      skipped.append(step)
      try:
        found = self.manager.item_metadata(step)['state']
        if found is None:
          raise ValueError('no state metadata')
      except Exception as e:  # noqa: BLE001 -- any unreadable metadata means a damaged checkpoint
        logger.warning('checkpoint %s/%d is unreadable (%s); trying the previous one',
                       self.directory, step, _short(e))
        continue
      mismatch = describe_mismatch(abstract_state, found)
      if mismatch:
        raise CheckpointMismatchError(
            f'{self.directory}/{step} holds a run of a different model/config: {mismatch}; '
            'use another --workdir')
      skipped.pop()
      data_state = IteratorState()
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_state)))
      except Exception as e:  # noqa: BLE001 -- truncated/corrupt files: fall back, loudly
        logger.warning('checkpoint %s/%d is corrupt or incomplete (%s); trying the previous one',
                       self.directory, step, _short(e))
        skipped.append(step)
        continue
      self._set_aside(skipped)
      return restored['state'], data_state, step
    if skipped:
      logger.warning('no readable checkpoint in %s: starting from scratch', self.directory)
      self._set_aside(skipped)
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Moves unreadable checkpoints to `corrupt_checkpoints/` so the resumed run can save those
    steps again (nothing is deleted: they stay for inspection)."""
    if not steps:
      return
    if jax.process_index() == 0:
      aside = os.path.join(os.path.dirname(self.directory), 'corrupt_checkpoints')
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        target = os.path.join(aside, f'{step}_{int(time.time())}')
        os.replace(os.path.join(self.directory, str(step)), target)
        logger.warning('moved unreadable checkpoint %d to %s', step, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('resnet_jax_set_aside_corrupt_checkpoints')
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _short(e: Exception) -> str:
  text = f'{type(e).__name__}: {e}'.splitlines()[0]
  return text[:300]


def save_model_variables(path: str, variables: dict[str, Any]) -> None:
  """Writes {'params', 'batch_stats'} as an Orbax checkpoint (used by convert and init_from)."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(path), jax.device_get(dict(variables)), force=True)
  checkpointer.wait_until_finished()


def load_model_variables(path: str) -> dict[str, Any]:
  """Reads model weights from a converted checkpoint or from another run's workdir (newest step)."""
  path = os.path.abspath(path)
  ckpt_dir = os.path.join(path, 'checkpoints')
  if os.path.isdir(ckpt_dir):
    manager = ocp.CheckpointManager(ckpt_dir, item_handlers={'state': ocp.StandardCheckpointHandler()})
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {ckpt_dir}')
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
    manager.close()
  elif os.path.isdir(path):
    state = ocp.StandardCheckpointer().restore(path)
  else:
    raise FileNotFoundError(f'init_from: {path} is neither a run workdir nor a checkpoint directory')
  return {'params': state['params'], 'batch_stats': state.get('batch_stats', {})}


def merge_pretrained(variables: dict[str, Any], pretrained: dict[str, Any],
                     reinit_prefixes: tuple[str, ...] = ('params/fc', 'batch_stats/fc')) -> tuple[dict, list[str]]:
  """Copies pretrained weights into freshly initialised `variables`.

  Leaves under `reinit_prefixes` (the classifier head) keep their fresh values when their shape
  differs (fine-tuning to another number of classes). Any other missing, unused or reshaped key is
  an error naming it. Returns the merged tree and the keys that were re-initialised.
  """
  fresh = {k: v for k, v in _flat(variables).items()}
  given = _flat({k: pretrained.get(k, {}) for k in variables})
  reinitialised = []
  problems = []
  for key, value in fresh.items():
    if key not in given:
      problems.append(f'missing {key}')
    elif tuple(np.shape(given[key])) != tuple(np.shape(value)):
      if key.startswith(reinit_prefixes):
        reinitialised.append(key)
      else:
        problems.append(f'{key} has shape {np.shape(given[key])}, model wants {np.shape(value)}')
  problems += [f'unused {k}' for k in given if k not in fresh]
  if problems:
    raise CheckpointMismatchError('init_from does not fit this model: ' + '; '.join(problems[:8]))
  merged = {k: (fresh[k] if k in reinitialised else np.asarray(given[k], dtype=np.asarray(fresh[k]).dtype))
            for k in fresh}
  return _unflat(merged), reinitialised


def _flat(tree: Any) -> dict[str, Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(p, simple=True, separator='/'): v for p, v in flat}


def _unflat(flat: dict[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for key, value in flat.items():
    node = out
    *parents, leaf = key.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out
