"""What Mixup/CutMix and the weights' EMA cost per train step: the product's step, four variants.

    python scripts/benchmark_recipe.py [--arch resnet8] [--batch-size 128] [--image-size 32]
        [--steps 20] [--rounds 5] [--json]

Builds `train_step.jit_train_step` for the same model four times: plain, with
`mixing.Mixing(mixup 0.2, cutmix 1.0)`, with `ema.Ema(every step)` (the worst case; torchvision
updates every 32), and with both; then times `--steps` steps of each in turn, `--rounds` times
(interleaved, so a load change on a shared machine hits every variant alike), and prints each
variant's median milliseconds per step and its ratio to the plain step. The last stdout line with
`--json` is one JSON object.
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
  runs = {}
  for name, (mix, avg) in _variants().items():
    state = init_state(model, tx, shape, seed=0, mesh=mesh, ema=avg is not None)
    sharding = jax.tree.map(lambda x: x.sharding, state)
    step = jit_train_step(mesh, sharding, optax.constant_schedule(0.1), mixing=mix, ema=avg)
    step = step.lower(state, batch).compile()
    state, metrics = step(state, batch)  # first run: allocation, not timed
    jax.block_until_ready(metrics)
    runs[name] = [step, state, []]
  for _ in range(args.rounds):
    for run in runs.values():
      step, state, times = run
      t0 = time.perf_counter()
      for _ in range(args.steps):
        state, metrics = step(state, batch)
      jax.block_until_ready((state, metrics))
      times.append((time.perf_counter() - t0) / args.steps * 1e3)
      run[1] = state
  plain = statistics.median(runs['plain'][2])
  result = {
    'arch': args.arch,
    'batch_size': args.batch_size,
    'image_size': args.image_size,
    'devices': jax.device_count(),
    'ms_per_step': {k: round(statistics.median(v[2]), 2) for k, v in runs.items()},
    'ratio_to_plain': {k: round(statistics.median(v[2]) / plain, 3) for k, v in runs.items()},
  }
  if args.json:
    print(json.dumps(result))
  else:
    for name in runs:
      print(
        f'{name:7s} {result["ms_per_step"][name]:9.2f} ms/step  x{result["ratio_to_plain"][name]}'
      )


if __name__ == '__main__':
  main()
