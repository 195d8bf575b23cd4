"""What BatchNorm's statistics scope costs across devices: whole batch, per device, straddling.

For one global batch split over every device, compiles the product's train step with
`bn_group_size` = None (statistics over the whole global batch: one cross-device all-reduce per BN
layer, forward and backward), = the per-device batch (groups never leave a device: no BN
collective), = twice the per-device batch (groups cover whole devices), and = a size that neither
divides nor is a multiple of the per-device batch (groups straddle devices: XLA all-gathers the
activations). Reports the collectives in the optimised HLO (count and bytes by kind) and the median
step time. Without accelerators, simulate devices:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/benchmark_bn.py --json
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from resnet_jax import cli, default_config, runtime  # pylint: disable=wrong-import-position
from resnet_jax import train_step as ts  # pylint: disable=wrong-import-position

_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
_DTYPE_BYTES = {
  'f32': 4,
  'bf16': 2,
  'f16': 2,
  's32': 4,
  'u32': 4,
  'pred': 1,
  's8': 1,
  'u8': 1,
  'f64': 8,
  's64': 8,
}


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {'count', 'bytes'}} of the collective ops (start ops of async pairs count once)."""
  out = {k: {'count': 0, 'bytes': 0} for k in _COLLECTIVES}
  for line in hlo_text.splitlines():
    line = re.sub(r'/\*.*?\*/', '', line)
    m = re.match(
      r'\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s(all-reduce|all-gather|reduce-scatter|'
      r'all-to-all|collective-permute)(-start)?\(',
      line,
    )
    if not m:
      continue
    kind = m.group(2)
    out[kind]['count'] += 1
    for dtype, dims in re.findall(r'(\w+)\[([\d,]*)\]', m.group(1)):
      if dtype in _DTYPE_BYTES:
        out[kind]['bytes'] += _DTYPE_BYTES[dtype] * int(
          np.prod([int(d) for d in dims.split(',') if d] or [1])
        )
  return out


def scopes(batch: int, devices: int) -> list[tuple[str, int | None]]:
  per = batch // devices
  out = [('whole_batch', None), ('per_device', per)]
  if devices > 1 and batch % (2 * per) == 0:
    out.append(('two_devices', 2 * per))
  straddle = next(
    (g for g in range(per + 1, batch) if batch % g == 0 and g % per and per % g), None
  )
  if straddle:
    out.append(('straddling', straddle))
  return out


def measure(
  model_name: str, batch: int, size: int, group: int | None, steps: int, dtype: str
) -> dict:
  config = default_config.base_config()
  config.data.update(name='synthetic', image_size=size, num_classes=10)
  config.model.update(name=model_name, bn_group_size=group)
  config.dtype = dtype
  config.batch_size = batch
  config.schedule.name = 'constant'
  training = runtime.build_training(config)  # the model and optimizer that training uses
  mesh, shape = training.experiment.mesh, training.experiment.dataset.image_shape
  state = ts.init_state(training.experiment.model, training.optimizer, shape, seed=0, mesh=mesh)
  train_step_fn = ts.jit_train_step(mesh, training.state_sharding, training.learning_rate_fn)
  rng = np.random.default_rng(0)
  put = lambda v: jax.device_put(v, ts.batch_sharding(mesh))
  batch_arrays = {
    'image': put(rng.standard_normal((batch,) + shape, dtype=np.float32)),
    'label': put(rng.integers(0, 10, batch).astype(np.int32)),
  }
  t = time.perf_counter()
  compiled = train_step_fn.lower(state, batch_arrays).compile()
  compile_s = time.perf_counter() - t
  coll = collectives(compiled.as_text())
  state, m = compiled(state, batch_arrays)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, m = compiled(state, batch_arrays)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  return {
    'bn_group_size': group,
    'step_ms_median': round(1e3 * float(np.median(times)), 2),
    'images_per_sec': round(batch / float(np.median(times)), 2),
    'compile_s': round(compile_s, 2),
    'collectives': coll,
  }


def run(model_name: str, batch: int, size: int, steps: int, dtype: str = 'float32') -> dict:
  devices = jax.device_count()
  if batch % devices:
    raise ValueError(f'--batch-size {batch} must be a multiple of the {devices} devices')
  rows = []
  for name, group in scopes(batch, devices):
    rows.append({'scope': name, **measure(model_name, batch, size, group, steps, dtype)})
  return {
    'model': model_name,
    'batch_size': batch,
    'image_size': size,
    'devices': devices,
    'per_device_batch': batch // devices,
    'platform': jax.devices()[0].platform,
    'dtype': dtype,
    'loadavg': [round(x, 2) for x in os.getloadavg()],
    'results': rows,
  }


def main(argv: list[str] | None = None) -> int:
  p = cli.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--arch', '--model', dest='model', default='resnet20', help='the model name')
  p.add_argument('--batch-size', type=cli.positive_int, default=192)
  p.add_argument('--image-size', type=cli.positive_int, default=32)
  p.add_argument('--steps', type=cli.positive_int, default=3)
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument('--json', action='store_true')
  args = p.parse_args(argv)
  try:
    report = run(args.model, args.batch_size, args.image_size, args.steps, args.dtype)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  if args.json:
    print(json.dumps(report))
    return 0
  print(
    f'{report["model"]} batch {report["batch_size"]} on {report["devices"]} '
    f'{report["platform"]} devices ({report["per_device_batch"]} per device)'
  )
  for r in report['results']:
    c = r['collectives']
    print(
      f'{r["scope"]:12s} g={str(r["bn_group_size"]):5s} {r["step_ms_median"]:9.1f} ms/step  '
      f'all-reduce {c["all-reduce"]["count"]:4d} ({c["all-reduce"]["bytes"] / 1e6:8.2f} MB)  '
      f'all-gather {c["all-gather"]["count"]:4d} ({c["all-gather"]["bytes"] / 1e6:8.2f} MB)'
    )
  return 0


if __name__ == '__main__':
  sys.exit(main())
