"""What each optimizer (config.optimizer.name) costs: the compiled train step's time and XLA cost
analysis, and the optimizer update alone, on one synthetic batch.

    python scripts/benchmark_optimizers.py --arch resnet50 --batch-size 8 --image-size 64 --steps 5

Prints one line per optimizer (and with --json one JSON object last): the train step's median
wall time over --steps runs after one warm-up run, its XLA flops and bytes accessed, and the
median time of `tx.update` + `apply_updates` alone, jitted, on the model's parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from resnet_jax import cli, optim  # noqa: E402
from resnet_jax.default_config import base_config  # noqa: E402
from resnet_jax.models import create_model  # noqa: E402
from resnet_jax.train_step import batch_sharding, create_mesh, init_state, jit_train_step  # noqa: E402


def _median_s(fn, steps: int) -> float:
  jax.block_until_ready(fn())  # warm-up
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def measure(name: str, args) -> dict:
  config = base_config()
  config.optimizer.name = name
  config.optimizer.weight_decay_mask = 'kernels'
  schedule = optax.constant_schedule(0.1)
  tx = optim.create_optimizer(config, schedule)
  mesh = create_mesh(jax.devices()[:1])
  model = create_model(args.arch, num_classes=args.num_classes)
  shape = (args.image_size, args.image_size, 3)
  state = init_state(model, tx, shape, seed=0, mesh=mesh)
  step = jit_train_step(mesh, jax.tree.map(lambda x: x.sharding, state), schedule)
  rng = np.random.default_rng(0)
  batch = {
    'image': rng.standard_normal((args.batch_size,) + shape, dtype=np.float32),
    'label': rng.integers(0, args.num_classes, args.batch_size).astype(np.int32),
  }
  batch = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in batch.items()}
  compiled = step.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  holder = {'state': state}

  def train():
    holder['state'], metrics = compiled(holder['state'], batch)
    return metrics['loss']

  step_s = _median_s(train, args.steps)
  params, opt_state = holder['state'].params, holder['state'].opt_state
  grads = jax.tree.map(lambda p: np.full(p.shape, 1e-3, p.dtype), params)

  @jax.jit
  def update(grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  update_s = _median_s(lambda: update(grads, opt_state, params), args.steps)
  leaves = jax.tree.leaves(opt_state)
  return {
    'optimizer': name,
    'step_s': step_s,
    'update_s': update_s,
    'flops': float(cost.get('flops', 0.0)),
    'bytes_accessed': float(cost.get('bytes accessed', 0.0)),
    'opt_state_floats': int(sum(np.size(x) for x in leaves)),
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--arch', default='resnet50')
  p.add_argument('--batch-size', type=cli.positive_int, default=8)
  p.add_argument('--image-size', type=cli.positive_int, default=64)
  p.add_argument('--num-classes', type=cli.positive_int, default=1000)
  p.add_argument('--steps', type=cli.positive_int, default=5)
  p.add_argument('--optimizers', default=','.join(optim.OPTIMIZERS))
  p.add_argument('--json', action='store_true')
  args = p.parse_args(argv)
  names = [n for n in args.optimizers.split(',') if n]
  unknown = sorted(set(names) - set(optim.OPTIMIZERS))
  if unknown:
    print(
      f'error: unknown optimizer {unknown[0]!r}; known: {", ".join(optim.OPTIMIZERS)}',
      file=sys.stderr,
    )
    return 1
  rows = []
  for name in names:
    row = measure(name, args)
    rows.append(row)
    print(
      f'{name:6s} step {row["step_s"] * 1e3:8.1f} ms  update alone {row["update_s"] * 1e3:7.1f} ms'
      f'  step GFLOP {row["flops"] / 1e9:7.3f}  GB accessed {row["bytes_accessed"] / 1e9:6.3f}'
      f'  optimizer state {row["opt_state_floats"]:,} floats',
      flush=True,
    )
  if args.json:
    print(
      json.dumps(
        {
          'arch': args.arch,
          'batch_size': args.batch_size,
          'image_size': args.image_size,
          'results': rows,
        }
      )
    )
  return 0


if __name__ == '__main__':
  sys.exit(main())
