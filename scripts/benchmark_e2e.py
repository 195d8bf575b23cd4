"""End-to-end training throughput: the real Grain iterator, the device transfer and the train step.

`scripts/benchmark.py` times the step alone on a batch already on the device; this runs what
`resnet_jax.train` runs: `create_train_iterator` with `--workers` Grain processes (uint8 images),
`jax.make_array_from_process_local_data` onto the mesh, and the product's train step with the device
preprocessing (normalisation, PCA lighting) inside the jit, for `--steps` steps. It reports

- `images_per_sec` end to end, and `step_only_images_per_sec` (the same compiled step on one
  device-resident batch) and their ratio: the issue's target is end to end within 10 % of step only;
- `data_wait_fraction`: the share of wall time the loop was blocked waiting for the next host batch
  (`next()` on the iterator + the transfer call) while at most `--in-flight` steps were queued;
- `host_cores`: CPU seconds of the main process plus the Grain workers per wall second
  (`main_cores`, `worker_cores` apart; on a CPU backend the main process also runs the step);
  None where the CPU time is too short to measure (benchmark_input's `cores` rule).

  python scripts/benchmark_e2e.py --model resnet50 --batch-size 256 --dtype bfloat16 --workers 16
  python scripts/benchmark_e2e.py --smoke --json        # tiny, CPU (CI)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time

_SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_SCRIPTS, '..'))
sys.path.insert(0, _SCRIPTS)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from host_cpu import CpuClock, cores  # pylint: disable=g-import-not-at-top,wrong-import-position

import resnet_jax.data as data  # pylint: disable=wrong-import-position
from resnet_jax import cli, default_config, runtime  # pylint: disable=wrong-import-position
from resnet_jax import train_step as ts  # pylint: disable=wrong-import-position
from resnet_jax.data import auto_augment, generated, views  # pylint: disable=wrong-import-position


def experiment_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """The product's base config with this benchmark's data, model, dtype and batch size."""
  config = default_config.base_config()
  config.data.update(
    name=args.dataset or f'generated_jpegs/{args.generated}',
    data_dir=args.data_dir,
    train_split='train',
    eval_split=args.eval_split,
    image_size=args.image_size,
    augment=args.augment,
    normalize='per_pixel_mean',
    num_workers=args.workers,
    prefetch=args.prefetch,
    decoder=args.decoder,
    auto_augment=args.auto_augment,
    interpolation=args.interpolation,
  )
  config.model.name = args.model
  config.dtype = args.dtype
  config.batch_size = args.batch_size
  config.schedule.name = 'constant'
  return config


def run(args: argparse.Namespace) -> dict:
  config = experiment_config(args)
  if not args.dataset:
    generated.prepare(args.generated, args.data_dir)
  n = jax.device_count()
  if args.batch_size % n:
    raise ValueError(f'--batch-size {args.batch_size} must be a multiple of the {n} devices')
  training = runtime.build_training(config)  # the model, optimizer and step that training uses
  experiment = training.experiment
  mesh = experiment.mesh
  state = ts.init_state(
    experiment.model, training.optimizer, experiment.dataset.image_shape, seed=0, mesh=mesh
  )
  step = ts.jit_train_step(
    mesh,
    training.state_sharding,
    training.learning_rate_fn,
    preprocess=experiment.preprocess,
    seed=0,
  )
  sharding = ts.batch_sharding(mesh)
  local = args.batch_size // jax.process_count()
  it = data.create_train_iterator(
    config,
    local_batch_size=local,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    seed=0,
  )
  put = lambda b: {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(b[k]))
    for k in ('image', 'label')
  }
  clock = CpuClock()
  try:
    first = put(next(it))
    t = time.perf_counter()
    compiled = step.lower(state, first).compile()
    compile_s = time.perf_counter() - t
    for _ in range(args.warmup):  # worker start-up, runtime warm-up
      state, _ = compiled(state, put(next(it)))
    jax.block_until_ready(state)  # (--warmup 0: no step has run yet)
    inflight = collections.deque()
    wait_data = wait_step = 0.0
    cpu0, start = clock.read(), time.perf_counter()
    for _ in range(args.steps):
      t0 = time.perf_counter()
      batch = put(next(it))
      t1 = time.perf_counter()
      state, metrics = compiled(state, batch)
      inflight.append(metrics['loss'])
      if len(inflight) > args.in_flight:
        jax.block_until_ready(inflight.popleft())
      wait_data += t1 - t0
      wait_step += time.perf_counter() - t1
    jax.block_until_ready(state.step)
    wall = time.perf_counter() - start
    after = clock.read()
  finally:
    it.close()
  main_pid = os.getpid()
  cpu_main = after.get(main_pid, 0.0) - cpu0.get(main_pid, 0.0)
  cpu_all = CpuClock.spent(cpu0, after)
  # step only: the same compiled step on one device-resident batch
  for _ in range(2):
    state, metrics = compiled(state, first)
  jax.block_until_ready(metrics)
  t = time.perf_counter()
  for _ in range(args.step_only_steps):
    state, metrics = compiled(state, first)
  jax.block_until_ready(metrics)
  step_only = args.step_only_steps * args.batch_size / (time.perf_counter() - t)
  e2e = args.steps * args.batch_size / wall
  return {
    'model': args.model,
    'batch_size': args.batch_size,
    'image_size': args.image_size,
    'dtype': args.dtype,
    'scan': bool(experiment.model.scan),
    'dataset': config.data.name,
    'augment': args.augment,
    'decoder': args.decoder,
    'auto_augment': args.auto_augment,
    'interpolation': args.interpolation,
    'workers': args.workers,
    'steps': args.steps,
    'images_per_sec': round(e2e, 2),
    'step_only_images_per_sec': round(step_only, 2),
    'e2e_over_step_only': round(e2e / step_only, 3),
    'data_wait_fraction': round(wait_data / wall, 3),
    'step_wait_fraction': round(wait_step / wall, 3),
    'host_cores': cores(cpu_all, wall),  # None below the OS's CPU tick, as benchmark_input's
    'main_cores': cores(cpu_main, wall),
    'worker_cores': cores(cpu_all - cpu_main, wall),
    'cpu_includes_workers': clock.includes_workers,
    'compile_s': round(compile_s, 2),
    'wall_s': round(wall, 2),
    'platform': jax.devices()[0].platform,
    'devices': n,
    'device_kind': jax.devices()[0].device_kind,
    'cpu_count': os.cpu_count(),
    'loadavg': [round(x, 2) for x in os.getloadavg()],
  }


def parse(argv: list[str] | None) -> argparse.Namespace:
  p = cli.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--arch', '--model', dest='model', default='resnet50', help='the model name')
  p.add_argument('--batch-size', type=int, default=256)
  p.add_argument('--image-size', type=int, default=224)
  p.add_argument('--dtype', default='bfloat16', choices=('float32', 'bfloat16'))
  p.add_argument(
    '--augment', default='imagenet', choices=('none', 'cifar', 'imagenet', 'inception')
  )
  p.add_argument('--decoder', default='pil', choices=('pil', 'opencv'))
  p.add_argument(
    '--auto-augment',
    default='none',
    type=auto_augment.cli_type,
    help='config.data.auto_augment: trivial_wide, rand_augment, autoaugment_imagenet, '
    'rand-m7-mstd0.5-inc1 (timm), ...',
  )
  p.add_argument(
    '--interpolation',
    default='bilinear',
    choices=views.INTERPOLATIONS,
    help="config.data.interpolation of the training crops (timm's RSB recipe: random)",
  )
  p.add_argument('--workers', type=int, default=os.cpu_count() or 1, help='Grain worker processes')
  p.add_argument('--prefetch', type=cli.non_negative_int, default=2)
  p.add_argument('--steps', type=int, default=200)
  p.add_argument('--warmup', type=cli.non_negative_int, default=10)
  p.add_argument('--step-only-steps', type=int, default=20)
  p.add_argument('--in-flight', type=int, default=2, help='steps queued on the device at most')
  p.add_argument(
    '--generated',
    default='imagenet',
    choices=('imagenet', 'cifar', 'tiny'),
    help='generated_jpegs config to use when no --dataset is given',
  )
  p.add_argument(
    '--dataset', default=None, help='a prepared TFDS dataset instead (e.g. imagenet2012)'
  )
  p.add_argument('--data_dir', default=None)
  p.add_argument(
    '--eval-split',
    '--eval_split',
    default='test',
    help="the dataset's evaluation split, which it must have though this times training only "
    "(an image_folder tree ROOT/<split>/...: e.g. 'val')",
  )
  p.add_argument('--smoke', action='store_true', help='tiny model, images and steps (CPU, CI)')
  p.add_argument('--json', action='store_true', help='print one JSON object as the last line')
  args = p.parse_args(argv)
  if args.data_dir is None and not args.dataset:
    args.data_dir = os.path.join(tempfile.gettempdir(), 'resnet_jax_bench_tfds')
  if args.smoke:
    args.model, args.batch_size, args.image_size, args.dtype = 'resnet8', 8, 16, 'float32'
    args.generated, args.workers, args.steps, args.warmup, args.step_only_steps = 'tiny', 0, 4, 1, 2
  for name in ('batch_size', 'image_size', 'steps', 'step_only_steps', 'in_flight'):
    if getattr(args, name) < 1:
      p.error(f'--{name.replace("_", "-")} must be positive')
  if args.workers < 0:
    p.error('--workers must be >= 0')
  return args


def main(argv: list[str] | None = None) -> int:
  from absl import flags as absl_flags  # pylint: disable=import-outside-toplevel

  absl_flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags: use defaults
  args = parse(argv)
  try:
    result = run(args)
  except (ValueError, data.DatasetNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  if args.json:
    print(json.dumps(result))
  else:
    for k, v in result.items():
      print(f'{k:28s} {v}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
