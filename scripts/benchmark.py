"""Train-step and inference throughput of the real product step, optionally against PyTorch eager.

    python scripts/benchmark.py --model resnet20 --batch-size 128 --image-size 32 --steps 20
    python scripts/benchmark.py --model resnet50 --batch-size 16 --image-size 224 --steps 10 \
        --compare-torch --json
    python scripts/benchmark.py --model resnet50 --batch-size 256 --image-size 224 --steps 50 \
        --dtype bfloat16 --peak-tflops 989 --json          # one H100 (bf16 dense peak)

What is timed is exactly what `resnet_jax.train` runs: the step returned by
`resnet_jax.train_step.jit_train_step` (forward, backward, SGD momentum + coupled weight decay from
`resnet_jax.optim.create_optimizer`, BatchNorm statistics update, non-finite guard, state donated),
on a synthetic batch already sharded over every device (the loop prefetches to the device, so the
input pipeline is not part of the step; `scripts/benchmark_input.py` measures that side).

- Compile time is reported separately (`.lower(...).compile()`); the timed steps call the compiled
  executable, each step ended by `jax.block_until_ready`, after `--warmup` untimed steps.
- `images_per_sec` is batch / median step time. Inference (`eval_images_per_sec`) times the real
  `eval_step` (forward with running statistics + metric sums).
- `--compare-torch` builds the same architecture in plain `torch.nn` (no torchvision needed) and
  times it in eager mode with the same batch, optimizer and BN momentum. JAX and torch are run in
  alternating blocks of `--block` steps in this one process, so load from other processes hits both
  equally; the JSON reports the ratio of medians. torch is only imported under that flag.
- FLOPs: `flops_per_image` = 2 x multiply-accumulates of one forward pass (`resnet_jax.summary`);
  a train step is counted as 3x forward (forward + two backward matmuls per conv), the usual MFU
  convention. `xla_flops_per_step` is XLA's own cost analysis of the compiled train step, and
  `train_temp_bytes` its memory analysis (the activations' and gradients' buffers).
- `--bn-group G --grad-accum-steps N`: ghost BN and gradient accumulation as in training;
  `--compile-only` reports the compile-time figures without running a step (e.g. how much memory
  accumulation saves, docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # torch_twin.py

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from torch_twin import TorchBench  # noqa: E402  (scripts/torch_twin.py, beside this file)

from resnet_jax import (  # pylint: disable=wrong-import-position
  cli,
  default_config,
  optim,
  runtime,
  summary,
  validation,
)
from resnet_jax.models import parse_name  # pylint: disable=wrong-import-position
from resnet_jax.train_step import (  # pylint: disable=wrong-import-position
  batch_sharding,
  create_mesh,
  init_state,
  jit_eval_step,
  jit_train_step,
  model_variables,
)


def _loadavg() -> list[float]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:  # not available on this platform
    return []


def _config(args):
  c = default_config.base_config()
  c.model.name = args.model
  c.model.num_classes = args.num_classes
  c.model.block = args.block_kind
  c.model.preact = args.preact
  c.model.scan = args.scan
  c.model.remat = args.remat
  c.model.bn_group_size = args.bn_group
  c.grad_accum_steps = args.grad_accum_steps
  c.dtype = args.dtype
  c.batch_size = args.batch_size
  c.schedule.name = 'constant'
  c.schedule.base_lr = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 1e-4
  return c


class JaxBench:
  """The product's compiled train and eval steps on one synthetic device-resident batch."""

  def __init__(self, args):
    self.args = args
    self.batch_size = args.batch_size
    config = _config(args)
    self.model = runtime.build_model(config)
    lr_fn = optim.create_learning_rate_fn(config, steps_per_epoch=1000, total_steps=10**6)
    tx = optim.create_optimizer(config, lr_fn)
    self.mesh = create_mesh()
    n = jax.device_count()
    if args.batch_size % n:
      raise SystemExit(f'--batch-size {args.batch_size} must be a multiple of the {n} devices')
    shape = (args.image_size, args.image_size, 3)
    self.state = init_state(self.model, tx, shape, seed=0, mesh=self.mesh)
    state_sharding = jax.tree.map(lambda x: x.sharding, self.state)
    train_step = jit_train_step(self.mesh, state_sharding, lr_fn, accum_steps=args.grad_accum_steps)
    eval_step = jit_eval_step(self.mesh, self.model.apply)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch_size,) + shape, dtype=np.float32)
    labels = rng.integers(0, self.model.num_classes, args.batch_size).astype(np.int32)
    put = lambda v: jax.device_put(v, batch_sharding(self.mesh))
    self.batch = {'image': put(images), 'label': put(labels)}
    self.eval_batch = dict(self.batch, mask=put(np.ones(args.batch_size, bool)))
    self.images, self.labels = images, labels  # the same data for torch

    t = time.perf_counter()
    self.train = train_step.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - t
    t = time.perf_counter()
    self.eval = (
      eval_step.lower(model_variables(self.state), self.eval_batch).compile()
      if args.inference
      else None
    )
    self.eval_compile_s = time.perf_counter() - t if args.inference else None
    try:
      cost = self.train.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      self.xla_flops = float(cost.get('flops', 0.0)) or None
    except Exception:  # pylint: disable=broad-except
      self.xla_flops = None
    try:  # XLA's buffer assignment: the activations' and gradients' memory
      self.temp_bytes = int(self.train.memory_analysis().temp_size_in_bytes)
    except Exception:  # pylint: disable=broad-except  -- a backend without the analysis
      self.temp_bytes = None
    if not args.compile_only:
      self.first_step_s = self.train_steps(1)[0]  # runtime warm-up of the fresh program

  def train_steps(self, k: int) -> list[float]:
    times = []
    for _ in range(k):
      t = time.perf_counter()
      self.state, metrics = self.train(self.state, self.batch)
      jax.block_until_ready((self.state, metrics))
      times.append(time.perf_counter() - t)
    return times

  def eval_steps(self, k: int) -> list[float]:
    times = []
    for _ in range(k):
      t = time.perf_counter()
      jax.block_until_ready(self.eval(model_variables(self.state), self.eval_batch))
      times.append(time.perf_counter() - t)
    return times


def _interleaved(benches, method, rounds, block, warmup):
  """Warm up each, then alternate blocks of `block` steps: per-bench list of step times."""
  for b in benches:
    getattr(b, method)(warmup)
  times = [[] for _ in benches]
  for _ in range(rounds):
    for i, b in enumerate(benches):
      times[i] += getattr(b, method)(block)
  return times


def _rate(batch, times):
  return batch / statistics.median(times)


def _description(args, spec, jb: JaxBench, macs: int) -> dict:
  """What was compiled, where, and XLA's figures for it (the part of the JSON without timings)."""
  dev = jax.devices()[0]
  return {
    'model': args.model,
    'batch_size': args.batch_size,
    'image_size': args.image_size,
    'dtype': args.dtype,
    'block': spec.block,
    'preact': args.preact,
    'scan': jb.model.scan,
    'remat': args.remat,
    'bn_group_size': args.bn_group,
    'grad_accum_steps': args.grad_accum_steps,
    'platform': dev.platform,
    'device_kind': dev.device_kind,
    'devices': jax.device_count(),
    'jax_version': jax.__version__,
    'host_cpus': os.cpu_count(),
    'python': platform.python_version(),
    'compile_s': round(jb.compile_s, 3),
    'macs_per_image': int(macs),
    'flops_per_image': int(2 * macs),
    'train_flops_per_image': int(6 * macs),
    'xla_flops_per_step': jb.xla_flops,
    'train_temp_bytes': jb.temp_bytes,
  }


def _print(result: dict, as_json: bool) -> None:
  """One JSON object, or a `key: value` line each."""
  print(json.dumps(result) if as_json else '\n'.join(f'{k:>28}: {v}' for k, v in result.items()))


def main(argv=None):
  p = cli.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--arch', '--model', dest='model', default='resnet20', help='the model name')
  p.add_argument('--batch-size', type=cli.positive_int, default=128)
  p.add_argument(
    '--image-size', type=cli.positive_int, default=None, help='default 224 (ImageNet) / 32 (CIFAR)'
  )
  p.add_argument('--num-classes', type=cli.positive_int, default=None)
  p.add_argument(
    '--steps', type=cli.positive_int, default=20, help='timed train steps (per framework)'
  )
  p.add_argument(
    '--warmup', type=cli.non_negative_int, default=2, help='untimed steps after the first call'
  )
  p.add_argument(
    '--block',
    type=cli.non_negative_int,
    default=0,
    help='steps per interleaved block with --compare-torch (default: steps // 4)',
  )
  p.add_argument('--dtype', choices=['float32', 'bfloat16'], default='float32')
  p.add_argument(
    '--block-kind',
    choices=['basic', 'bottleneck'],
    default=None,
    help='CIFAR block kind (bottleneck: resnet164, resnet1001)',
  )
  p.add_argument('--preact', action='store_true', help='pre-activation blocks (He et al. 2016)')
  p.add_argument(
    '--scan',
    action=argparse.BooleanOptionalAction,
    default=default_config.base_config().model.scan,
    help='identical blocks as one scan (default: config.model.scan: scanned on the CPU only)',
  )
  p.add_argument(
    '--remat',
    action=argparse.BooleanOptionalAction,
    default=False,
    help='rematerialise each block in the backward pass',
  )
  p.add_argument(
    '--inference',
    action=argparse.BooleanOptionalAction,
    default=True,
    help='also time the eval step (default on)',
  )
  p.add_argument(
    '--bn-group',
    type=cli.positive_int,
    default=None,
    help='ghost-BN group size (default: whole-batch statistics)',
  )
  p.add_argument(
    '--grad-accum-steps',
    type=cli.positive_int,
    default=1,
    help='micro-batches per step (config.grad_accum_steps; needs --bn-group dividing them)',
  )
  p.add_argument(
    '--compile-only',
    action='store_true',
    help='compile and report compile time, XLA flops and temporary memory; run no step',
  )
  p.add_argument('--compare-torch', action='store_true')
  p.add_argument(
    '--torch-channels-last',
    action='store_true',
    help='torch in channels_last memory format (default: the eager default, NCHW)',
  )
  p.add_argument(
    '--torch-threads',
    type=cli.non_negative_int,
    default=0,
    help='torch intra-op threads (default: torch default = physical cores); for a '
    'single-thread comparison pair 1 with XLA_FLAGS=--xla_cpu_multi_thread_eigen=false',
  )
  p.add_argument(
    '--peak-tflops',
    type=cli.positive_float,
    default=None,
    help='device peak (e.g. 989 for H100 SXM bf16 dense) to report model FLOP utilisation',
  )
  p.add_argument('--json', action='store_true', help='print one JSON object')
  args = p.parse_args(argv)
  try:
    spec = parse_name(args.model, args.block_kind)
  except ValueError as e:
    p.error(str(e))
  if args.compare_torch and (args.preact or (spec.family == 'cifar' and spec.block != 'basic')):
    p.error('--compare-torch builds post-activation basic-block CIFAR and ImageNet nets only')
  if args.compare_torch and (args.grad_accum_steps > 1 or args.bn_group or args.compile_only):
    p.error('--compare-torch times one-pass whole-batch-BN steps of both frameworks only')
  try:
    validation.validate_bn_groups(args.bn_group, args.batch_size, jax.device_count())
    validation.validate_grad_accum(
      args.grad_accum_steps, args.bn_group, args.batch_size, jax.device_count()
    )
  except validation.ConfigError as e:
    p.error(str(e))
  args.image_size = args.image_size or (224 if spec.family == 'imagenet' else 32)

  load_start = _loadavg()
  jb = JaxBench(args)
  macs = summary.analyze(jb.model, args.image_size)['macs']
  if args.compile_only:
    _print(_description(args, spec, jb, macs), args.json)
    return
  benches = [jb]
  tb = None
  if args.compare_torch:
    tb = TorchBench(args, jb.images, jb.labels, jb.model.num_classes)
    benches.append(tb)
  block = args.block or max(1, args.steps // 4)
  rounds = max(1, math.ceil(args.steps / block))
  train_times = _interleaved(benches, 'train_steps', rounds, block, args.warmup)
  eval_times = None
  if args.inference:
    eval_times = _interleaved(benches, 'eval_steps', rounds, block, args.warmup)

  step_s = statistics.median(train_times[0])
  flops_image = 2 * macs
  result = _description(args, spec, jb, macs)
  result.update(
    {
      'first_step_s': round(jb.first_step_s, 4),
      'steps_timed': len(train_times[0]),
      'step_ms_median': round(1e3 * step_s, 3),
      'step_ms_min': round(1e3 * min(train_times[0]), 3),
      'images_per_sec': round(args.batch_size / step_s, 2),
      'achieved_tflops': round(3 * flops_image * args.batch_size / step_s / 1e12, 4),
    }
  )
  if args.peak_tflops:
    result['peak_tflops'] = args.peak_tflops
    result['mfu'] = round(result['achieved_tflops'] / args.peak_tflops, 4)
  if eval_times is not None:
    result['eval_compile_s'] = round(jb.eval_compile_s, 3)
    result['eval_images_per_sec'] = round(_rate(args.batch_size, eval_times[0]), 2)
  if tb is not None:
    result['torch_version'] = tb.version
    result['torch_threads'] = tb.num_threads
    result['torch_channels_last'] = args.torch_channels_last
    result['torch_images_per_sec'] = round(_rate(args.batch_size, train_times[1]), 2)
    result['ratio_jax_over_torch'] = round(
      result['images_per_sec'] / result['torch_images_per_sec'], 3
    )
    if eval_times is not None:
      result['torch_eval_images_per_sec'] = round(_rate(args.batch_size, eval_times[1]), 2)
      result['eval_ratio_jax_over_torch'] = round(
        result['eval_images_per_sec'] / result['torch_eval_images_per_sec'], 3
      )
  result['loadavg_start'] = load_start
  result['loadavg_end'] = _loadavg()
  result['xla_flags'] = os.environ.get('XLA_FLAGS', '')

  _print(result, args.json)


if __name__ == '__main__':
  main()
