"""Which weights a loaded torch file holds: its state_dict, or the model's (and the EMA's) inside
a training checkpoint, as torchvision's reference trainer and timm's ``train.py`` save them.

``torch_checkpoint.load`` reads any of these files without running code; this picks the weights.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from resnet_jax.torch_checkpoint import CheckpointError

# Where training scripts keep the weights inside their checkpoint dicts: (model, EMA) keys.
# torchvision's references/classification/train.py saves {'model', 'model_ema', 'optimizer',
# 'lr_scheduler', 'epoch', 'args'}, its EMA an AveragedModel's state_dict ('n_averaged' and
# the keys prefixed 'module.'); timm's train.py {'state_dict', 'state_dict_ema', 'optimizer',
# 'epoch', 'arch', 'args', ...}; many others {'state_dict', ...}.
TRAINING_CHECKPOINT_KEYS = (('model', 'model_ema'), ('state_dict', 'state_dict_ema'))


def _is_state_dict(obj: Any) -> bool:
  """A name -> tensor mapping (a training checkpoint holds its tensors one level down)."""
  return isinstance(obj, Mapping) and any(isinstance(v, np.ndarray) for v in obj.values())


def _averaged_model_weights(state: Mapping) -> dict:
  """An ``AveragedModel``'s state_dict as the averaged model's own: without its update counter
  ``n_averaged`` and the ``module.`` prefix (only when every other key has it)."""
  keys = [k for k in state if k != 'n_averaged']
  if keys and all(isinstance(k, str) and k.startswith('module.') for k in keys):
    return {k.removeprefix('module.'): state[k] for k in keys}
  return {k: state[k] for k in keys}


def weight_sets(obj: Any) -> dict[str, dict]:
  """The weights a loaded ``.pth`` holds: ``{'model': state_dict}``, plus ``'ema'`` when it is a
  training checkpoint that also keeps the weights' moving average.

  A state_dict is its own weights. A training checkpoint of torchvision's reference trainer or
  timm's ``train.py`` (``TRAINING_CHECKPOINT_KEYS``) gives the one under ``model`` /
  ``state_dict``; the optimizer, scheduler and arguments beside it are read (never run) and
  dropped. Raises ``CheckpointError`` for anything else.
  """
  if _is_state_dict(obj):
    return {'model': dict(obj)}
  if isinstance(obj, Mapping):
    for model_key, ema_key in TRAINING_CHECKPOINT_KEYS:
      if _is_state_dict(obj.get(model_key)):
        sets = {'model': dict(obj[model_key])}
        if _is_state_dict(obj.get(ema_key)):
          sets['ema'] = _averaged_model_weights(obj[ema_key])
        return sets
    keys = ', '.join(repr(k) for k in list(obj)[:12])
    raise CheckpointError(
      f'a dict of {keys} without tensors: neither a state_dict nor a training checkpoint with '
      "its weights under 'model' (torchvision's reference trainer) or 'state_dict' (timm)"
    )
  raise CheckpointError(f'it holds a {type(obj).__name__}, not a state_dict')
