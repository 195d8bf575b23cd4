"""Model weights outside a run: converted checkpoints and `init_from` (fine-tuning).

A converted checkpoint (`python -m resnet_jax.convert --out DIR`) is an Orbax checkpoint of
`{'params', 'batch_stats'}`; `init_from` also accepts another run's workdir, whose newest good
checkpoint is read without modifying that workdir.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from resnet_jax import checkpointing
from resnet_jax.workdir import as_path

_ORBAX_METADATA = '_METADATA'  # in every checkpoint `save_model_variables` writes


def save_model_variables(path: str | epath.Path, variables: dict[str, Any]) -> None:
  """Writes {'params', 'batch_stats'} as an Orbax checkpoint at `path` (which must not exist)."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(as_path(path), jax.device_get(dict(variables)))
  checkpointer.wait_until_finished()


def load_model_variables(path: str | epath.Path) -> dict[str, Any]:
  """Model weights from a converted checkpoint or from a run's workdir (newest good step)."""
  path = as_path(path)
  if (path / checkpointing.CHECKPOINT_DIR).is_dir():
    return checkpointing.restore_model_variables(path)[0]
  if (path / _ORBAX_METADATA).is_file():
    state = ocp.StandardCheckpointer().restore(path)
    return {'params': state['params'], 'batch_stats': state.get('batch_stats', {})}
  hint = ''
  if path.name == checkpointing.CHECKPOINT_DIR or path.parent.name == checkpointing.CHECKPOINT_DIR:
    # checkpoints/ or checkpoints/<step>/: Orbax's own error named a missing _METADATA file.
    run = path.parent if path.name == checkpointing.CHECKPOINT_DIR else path.parent.parent
    hint = f' (give the run workdir {run}: its newest good checkpoint is read)'
  raise FileNotFoundError(
    f'{path} is neither a run workdir (with {checkpointing.CHECKPOINT_DIR}/) nor converted '
    f'weights (python -m resnet_jax.convert --out DIR){hint}'
  )


def merge_pretrained(
  variables: dict[str, Any],
  pretrained: dict[str, Any],
  reinit_prefixes: tuple[str, ...] = ('params/fc', 'batch_stats/fc'),
) -> tuple[dict[str, Any], list[str]]:
  """Copies pretrained weights into freshly initialised `variables`.

  Leaves under `reinit_prefixes` (the classifier head) keep their fresh values when their shape
  differs (fine-tuning to another number of classes). Any other missing, unused or reshaped key is
  an error naming it. Returns the merged tree and the keys that were re-initialised.
  """
  fresh = checkpointing.flatten(variables)
  given = checkpointing.flatten({k: pretrained.get(k, {}) for k in variables})
  reinitialised, problems = [], []
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
    raise checkpointing.CheckpointMismatchError(
      'init_from does not fit this model: ' + '; '.join(problems[:8])
    )
  merged = {
    k: (fresh[k] if k in reinitialised else np.asarray(given[k], dtype=np.asarray(fresh[k]).dtype))
    for k in fresh
  }
  return checkpointing.unflatten(merged), reinitialised
