"""What Mixup/CutMix and the weights' EMA cost per train step: the product's step, four variants.

    python scripts/benchmark_recipe.py [--arch resnet8] [--batch-size 128] [--image-size 32]
        [--steps 20] [--rounds 5] [--compile-only] [--json]

Builds `train_step.jit_train_step` for the same model four times: plain, with
`mixing.Mixing(mixup 0.2, cutmix 1.0)`, with `ema.Ema(every step)` (the worst case; torchvision
updates every 32), and with both; then times `--steps` steps of each in turn, `--rounds` times
(interleaved, so a load change on a shared machine hits every variant alike), and prints each
variant's median milliseconds per step, its ratio to the plain step, and XLA's cost analysis of
the compiled step (GFLOP and MB accessed: what a shared machine's noise cannot move). The last
stdout line with `--json` is one JSON object.
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

from resnet_jax import ema, mixing  # noqa: E402
from resnet_jax.models import create_model  # noqa: E402
from resnet_jax.train_step import (  # noqa: E402
  batch_sharding,
  create_mesh,
  init_state,
  jit_train_step,
)

_CLASSES = 10


def _variants() -> dict[str, tuple[mixing.Mixing | None, ema.Ema | None]]:
  mix = mixing.Mixing(_CLASSES, mixup_alpha=0.2, cutmix_alpha=1.0)
  avg = ema.Ema(decay=0.999, every_steps=1)
  return {'plain': (None, None), 'mixing': (mix, None), 'ema': (None, avg), 'both': (mix, avg)}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--arch', default='resnet8')
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--image-size', type=int, default=32)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--json', action='store_true')
  parser.add_argument(
    '--compile-only', action='store_true', help="only XLA's cost analysis (no step is run)"
  )
  args = parser.parse_args(argv)
  mesh = create_mesh()
  model = create_model(args.arch, num_classes=_CLASSES)
  tx = optax.sgd(0.1, momentum=0.9)
  shape = (args.image_size, args.image_size, 3)
  rng = np.random.default_rng(0)
  batch = {
    'image': rng.normal(size=(args.batch_size,) + shape).astype(np.float32),
    'label': rng.integers(0, _CLASSES, size=args.batch_size).astype(np.int32),
  }
  batch = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in batch.items()}
  runs, costs = {}, {}
  for name, (mix, avg) in _variants().items():
    state = init_state(model, tx, shape, seed=0, mesh=mesh, ema=avg is not None)
    sharding = jax.tree.map(lambda x: x.sharding, state)
    step = jit_train_step(mesh, sharding, optax.constant_schedule(0.1), mixing=mix, ema=avg)
    step = step.lower(state, batch).compile()
    cost = step.cost_analysis()  # XLA's own count for the compiled step: noise-free
    cost = cost[0] if isinstance(cost, list) else cost
    costs[name] = (cost.get('flops', 0.0), cost.get('bytes accessed', 0.0))
    if args.compile_only:
      runs[name] = [step, state, [float('nan')]]
      continue
    state, metrics = step(state, batch)  # first run: allocation, not timed
    jax.block_until_ready(metrics)
    runs[name] = [step, state, []]
  for _ in range(0 if args.compile_only else args.rounds):
    for run in runs.values():
      step, state, times = run
      t0 = time.perf_counter()
      for _ in range(args.steps):
        state, metrics = step(state, batch)
      jax.block_until_ready((state, metrics))
      times.append((time.perf_counter() - t0) / args.steps * 1e3)
      run[1] = state
  median = lambda times: None if args.compile_only else round(statistics.median(times), 2)
  ms = {k: median(v[2]) for k, v in runs.items()}
  result = {
    'arch': args.arch,
    'batch_size': args.batch_size,
    'image_size': args.image_size,
    'devices': jax.device_count(),
    'ms_per_step': ms,
    'ratio_to_plain': {k: None if v is None else round(v / ms['plain'], 3) for k, v in ms.items()},
    'xla_gflops': {k: round(v[0] / 1e9, 4) for k, v in costs.items()},
    'xla_mbytes_accessed': {k: round(v[1] / 1e6, 2) for k, v in costs.items()},
  }
  if args.json:
    print(json.dumps(result))
  else:
    for name in runs:
      timed = f'{ms[name]:9.2f} ms/step  x{result["ratio_to_plain"][name]}  ' if ms[name] else ''
      print(
        f'{name:7s} {timed}{result["xla_gflops"][name]} GFLOP  '
        f'{result["xla_mbytes_accessed"][name]} MB accessed'
      )


if __name__ == '__main__':
  main()
