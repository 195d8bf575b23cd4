"""Evaluation: every example of a split counted exactly once, on any devices/hosts/batch size.

`run_evaluation` is what the training loop calls; `python -m resnet_jax.evaluate --workdir=DIR
[--split=NAME] [--crops=1|10]` restores a run's newest checkpoint and prints one JSON object with
`loss`, `top1_error`, `top5_error`, `num_examples`. The input pipeline pads the last batch and
marks padding with `mask=False`; the eval step sums only masked-in examples, so nothing is dropped
or counted twice.
"""
from __future__ import annotations

import contextlib
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
from resnet_jax.train_step import batch_sharding, eval_probabilities, metric_sums


@contextlib.contextmanager
def _eval_iterators(config, split, crops, scales):
  """One batch iterator per scale, closed on exit so no Grain worker outlives a failed eval."""
  n_dev, n_proc = jax.device_count(), jax.process_count()
  global_batch = math.ceil(config.eval_batch_size / n_dev) * n_dev
  with contextlib.ExitStack() as stack:
    yield [stack.enter_context(contextlib.closing(iter(data.create_eval_iterator(
        config, split=split, local_batch_size=global_batch // n_proc,
        process_index=jax.process_index(), process_count=n_proc, crops=crops, scale=scale))))
        for scale in scales]


def _finish(totals: Any, split: str | None, config) -> dict[str, float]:
  if totals is None:
    raise ValueError(f'split {split!r} of {config.data.name} is empty')
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {'loss': float(totals['loss']) / count,
          'top1_error': float(totals['top1_errors']) / count,
          'top5_error': float(totals['top5_errors']) / count,
          'num_examples': int(round(count))}


def run_evaluation(eval_step: Callable, state: Any, config: ml_collections.ConfigDict, mesh: Mesh,
                   *, split: str | None = None, crops: int = 1) -> dict[str, float]:
  """Mean loss and top-1/top-5 error over the whole split (crops: 1 or 10)."""
  sharding = batch_sharding(mesh)
  totals = None
  with _eval_iterators(config, split, crops, [None]) as (batches,):
    for local in batches:
      batch = {k: jax.make_array_from_process_local_data(sharding, np.asarray(local[k]))
               for k in ('image', 'label', 'mask')}
      sums = eval_step(state, batch)
      totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  return _finish(totals, split, config)


def run_multiscale_evaluation(state: Any, config: ml_collections.ConfigDict, mesh: Mesh, *,
                              scales: list[int], split: str | None = None,
                              crops: int = 1) -> dict[str, float]:
  """The paper's fully-convolutional multi-scale testing: softmax averaged over scales.

  Each scale resizes the shorter side to S and takes the centred S x S square (crops=2 adds its
  flip); the iterators of all scales yield the same examples in the same order, so they are
  walked in lockstep and each example's probabilities are averaged before scoring.
  """
  sharding = batch_sharding(mesh)
  probs_fn = jax.jit(eval_probabilities, out_shardings=sharding)
  sums_fn = jax.jit(metric_sums, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  put = lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x))
  totals = None
  with _eval_iterators(config, split, crops, scales) as per_scale_batches:
    for per_scale in zip(*per_scale_batches):
      probs = sum(probs_fn(state, put(b['image'])) for b in per_scale) / len(scales)
      sums = sums_fn(probs, put(per_scale[0]['label']), put(per_scale[0]['mask']))
      totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  return _finish(totals, split, config)


def evaluate_workdir(workdir: str, *, split: str | None = None, crops: int | None = None,
                     batch_size: int | None = None,
                     scales: list[int] | None = None) -> dict[str, float]:
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
  split = split or config.data.eval_split
  if scales:
    result = run_multiscale_evaluation(state, config, mesh, scales=scales, split=split,
                                       crops=crops or 1)
    result['scales'] = scales
  else:
    result = run_evaluation(p_eval, state, config, mesh, split=split,
                            crops=crops or config.data.eval_crops)
  result['step'] = int(step)
  return result


def main(argv: list[str]) -> None:
  del argv
  from absl import flags

  f = flags.FLAGS
  try:
    scales = [int(x) for x in f.scales] if f.scales else None
    result = evaluate_workdir(f.workdir, split=f.split, crops=f.crops, batch_size=f.batch_size,
                              scales=scales)
  except (ValueError, FileNotFoundError) as e:  # one clear line, no traceback
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
  flags.DEFINE_list('scales', None, 'Multi-scale fully-convolutional testing, e.g. '
                    '224,256,384,480,640 (the paper\'s ImageNet setting); softmax averaged.')
  app.run(main)
