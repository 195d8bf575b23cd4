"""Evaluation: every example of a split counted exactly once, on any devices/hosts/batch size.

`run_evaluation` is what the training loop calls; `python -m resnet_jax.evaluate --workdir=DIR
[--split=NAME] [--crops=1|10]` restores a run's newest checkpoint and prints one JSON object with
`loss`, `top1_error`, `top5_error`, `num_examples`. The input pipeline pads the last batch and
marks padding with `mask=False`; the eval step sums only masked-in examples, so nothing is dropped
or counted twice.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from resnet_jax import data
from resnet_jax.train_step import batch_sharding


def run_evaluation(eval_step: Callable, state: Any, config: ml_collections.ConfigDict, mesh: Mesh,
                   *, split: str | None = None, crops: int = 1) -> dict[str, float]:
  """Mean loss and top-1/top-5 error over the whole split (crops: 1 or 10)."""
  n_dev, n_proc = jax.device_count(), jax.process_count()
  global_batch = math.ceil(config.eval_batch_size / n_dev) * n_dev
  batches = data.create_eval_iterator(
      config, split=split, local_batch_size=global_batch // n_proc,
      process_index=jax.process_index(), process_count=n_proc, crops=crops)
  sharding = batch_sharding(mesh)
  totals = None
  for local in batches:
    batch = {k: jax.make_array_from_process_local_data(sharding, np.asarray(local[k]))
             for k in ('image', 'label', 'mask')}
    sums = eval_step(state, batch)
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  if totals is None:
    raise ValueError(f'split {split!r} of {config.data.name} is empty')
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {'loss': float(totals['loss']) / count,
          'top1_error': float(totals['top1_errors']) / count,
          'top5_error': float(totals['top5_errors']) / count,
          'num_examples': int(round(count))}


def evaluate_workdir(workdir: str, *, split: str | None = None, crops: int | None = None,
                     batch_size: int | None = None) -> dict[str, float]:
  """Restores the newest good checkpoint of a training run and evaluates it."""
  from resnet_jax import checkpointing, optim, train
  from resnet_jax.train_step import abstract_state, compile_steps, create_mesh

  config_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(config_path):
    raise FileNotFoundError(f'{workdir} is not a training run (no config.json)')
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if batch_size:
    config.eval_batch_size = batch_size
  info = data.get_dataset_info(config)
  model = train._build(config, config.model.num_classes or info.num_classes)  # pylint: disable=protected-access
  mesh = create_mesh()
  lr_fn = optim.create_learning_rate_fn(config, 1, max(config.num_train_steps, 1))
  tx = optim.create_optimizer(config, lr_fn)
  abstract = abstract_state(model, tx, info.image_shape, mesh)
  ckpt = checkpointing.Checkpointer(workdir, async_save=False)
  restored = ckpt.restore(abstract)
  if restored is None:
    raise FileNotFoundError(f'no checkpoint in {ckpt.directory}')
  state, _, step = restored
  ckpt.close()
  _, p_eval = compile_steps(mesh, jax.tree.map(lambda s: s.sharding, abstract), lr_fn, 0.0)
  result = run_evaluation(p_eval, state, config, mesh, split=split or config.data.eval_split,
                          crops=crops or config.data.eval_crops)
  result['step'] = int(step)
  return result


def main(argv: list[str]) -> None:
  del argv
  from absl import flags

  f = flags.FLAGS
  try:
    result = evaluate_workdir(f.workdir, split=f.split, crops=f.crops, batch_size=f.batch_size)
  except (ValueError, FileNotFoundError) as e:
    print(f'resnet_jax.evaluate: error: {e}', file=sys.stderr)
    sys.exit(1)
  if jax.process_index() == 0:
    print(json.dumps(result))


if __name__ == '__main__':
  from absl import app, flags

  flags.DEFINE_string('workdir', None, 'Training run directory.', required=True)
  flags.DEFINE_string('split', None, 'Split to evaluate (default: the config\'s eval split).')
  flags.DEFINE_integer('crops', None, 'Crops per image: 1, or 10 (the paper\'s 10-crop testing).')
  flags.register_validator('crops', lambda c: c in (None, 1, 10), message='--crops must be 1 or 10')
  flags.DEFINE_integer('batch_size', None, 'Global eval batch size.')
  app.run(main)
