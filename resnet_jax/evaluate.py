"""Evaluation: every example of a split counted exactly once, on any devices/hosts/batch size.

`run_evaluation` is what the training loop calls; `python -m resnet_jax.evaluate --workdir=DIR
[--split=NAME] [--crops=1|10]` restores a run's newest checkpoint and prints one JSON object with
`loss`, `top1_error`, `top5_error`, `num_examples`. The input pipeline pads the last batch and
marks padding with `mask=False`; the eval step sums only masked-in examples, so nothing is dropped
or counted twice.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from typing import Any, Callable, Sequence

import jax
import ml_collections
from jax.sharding import Mesh

from resnet_jax import cli, data, runtime
from resnet_jax.data.device_preprocess import make_device_preprocess
from resnet_jax.train_step import (
  batch_sharding,
  device_batch,
  eval_probabilities,
  jit_eval_step,
  metric_sums,
  replicated,
)


@contextlib.contextmanager
def _eval_iterators(config, split, crops, scales):
  """One batch iterator per scale, closed on exit so no Grain worker outlives a failed eval."""
  n_dev, n_proc = jax.device_count(), jax.process_count()
  global_batch = math.ceil(config.eval_batch_size / n_dev) * n_dev
  with contextlib.ExitStack() as stack:
    yield [
      stack.enter_context(
        contextlib.closing(
          iter(
            data.create_eval_iterator(
              config,
              split=split,
              local_batch_size=global_batch // n_proc,
              process_index=jax.process_index(),
              process_count=n_proc,
              crops=crops,
              scale=scale,
            )
          )
        )
      )
      for scale in scales
    ]


def _finish(totals: Any, split: str | None, config) -> dict[str, float]:
  if totals is None:
    raise ValueError(f'split {split!r} of {config.data.name} is empty')
  totals = jax.device_get(totals)
  count = float(totals['count'])
  return {
    'loss': float(totals['loss']) / count,
    'top1_error': float(totals['top1_errors']) / count,
    'top5_error': float(totals['top5_errors']) / count,
    'num_examples': int(round(count)),
  }


def run_evaluation(
  eval_step: Callable,
  variables: Any,
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  *,
  split: str | None = None,
  crops: int = 1,
) -> dict[str, float]:
  """Mean loss and top-1/top-5 error over the whole split (crops: 1 or 10).

  `eval_step(variables, batch)` is `train_step.jit_eval_step(...)`: it returns metric sums.
  """
  totals = None
  with _eval_iterators(config, split, crops, [None]) as (batches,):
    for local in batches:
      sums = eval_step(variables, device_batch(local, mesh, ('image', 'label', 'mask')))
      totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  return _finish(totals, split, config)


def run_multiscale_evaluation(
  apply_fn: Callable,
  variables: Any,
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  *,
  scales: list[int],
  split: str | None = None,
  crops: int = 1,
  preprocess: Callable | None = None,
) -> dict[str, float]:
  """The paper's fully-convolutional multi-scale testing: softmax averaged over scales.

  Each scale resizes the shorter side to S and takes the centred S x S square (crops=2 adds its
  flip); the iterators of all scales yield the same examples in the same order, so they are
  walked in lockstep and each example's probabilities are averaged before scoring.
  """
  sharding = batch_sharding(mesh)
  preprocess = preprocess or make_device_preprocess(config)  # uint8 batches -> model input
  probs_fn = jax.jit(
    functools.partial(eval_probabilities, apply_fn, preprocess=preprocess), out_shardings=sharding
  )
  sums_fn = jax.jit(metric_sums, out_shardings=replicated(mesh))
  totals = None
  with _eval_iterators(config, split, crops, scales) as per_scale_batches:
    for per_scale in zip(*per_scale_batches):
      batches = [device_batch(b, mesh, ('image', 'label', 'mask')) for b in per_scale]
      probs = sum(probs_fn(variables, b['image']) for b in batches) / len(scales)
      sums = sums_fn(probs, batches[0]['label'], batches[0]['mask'])
      totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  return _finish(totals, split, config)


def evaluate_workdir(
  workdir: str,
  *,
  split: str | None = None,
  crops: int | None = None,
  batch_size: int | None = None,
  scales: list[int] | None = None,
) -> dict[str, Any]:
  """Evaluates the newest good checkpoint of a training run, without writing to its workdir."""
  trained = runtime.load_trained_model(
    workdir, {'eval_batch_size': batch_size} if batch_size else None
  )
  experiment = trained.experiment
  config, mesh = experiment.config, experiment.mesh
  split = split or config.data.eval_split
  variables = jax.device_put(trained.variables, replicated(mesh))
  if scales:
    result = run_multiscale_evaluation(
      experiment.model.apply,
      variables,
      config,
      mesh,
      scales=scales,
      split=split,
      crops=crops or 1,
      preprocess=experiment.preprocess,
    )
    result['scales'] = scales
  else:
    eval_step = jit_eval_step(mesh, experiment.model.apply, preprocess=experiment.preprocess)
    result = run_evaluation(
      eval_step, variables, config, mesh, split=split, crops=crops or config.data.eval_crops
    )
  result['split'] = split
  result['step'] = int(trained.step)
  return result


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.ArgumentParser(
    prog='python -m resnet_jax.evaluate', description=__doc__.split('\n\n')[0]
  )
  parser.add_argument('--workdir', required=True, help='training run directory (read only)')
  parser.add_argument('--split', help="split to evaluate (default: the run's eval split)")
  parser.add_argument(
    '--crops',
    type=int,
    choices=[1, 10],
    help="crops per image: 1, or 10 (the paper's 10-crop testing)",
  )
  parser.add_argument('--batch-size', type=int, help='global eval batch size')
  parser.add_argument(
    '--scales',
    type=lambda text: [int(x) for x in text.split(',') if x],
    help="multi-scale testing, e.g. 224,256,384,480,640 (the paper's ImageNet "
    'setting): softmax averaged over the scales',
  )
  args = parser.parse_args(argv)
  try:
    result = evaluate_workdir(
      args.workdir,
      split=args.split,
      crops=args.crops,
      batch_size=args.batch_size,
      scales=args.scales,
    )
  except (ValueError, FileNotFoundError, PermissionError) as e:  # one clear line, no traceback
    cli.fail(e)
  if jax.process_index() == 0:
    print(json.dumps(result))


if __name__ == '__main__':
  main()
