"""What scripts/gpu_report.py measures: a JAX row, its PyTorch twin, the end-to-end run."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import time

import jax
import numpy as np

_SCRIPTS = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.join(_SCRIPTS, '..')

import kernel_profile  # pylint: disable=wrong-import-position

from resnet_jax import optim, runtime, summary  # pylint: disable=wrong-import-position
from resnet_jax import train_step as ts  # pylint: disable=wrong-import-position
from resnet_jax.data import (
  augment,  # pylint: disable=wrong-import-position
  device_preprocess,  # pylint: disable=wrong-import-position
)

# Dense peak TFLOP/s by device kind substring: (bf16, tf32). H100/H200 SXM datasheet figures.
PEAKS = {
  'H200': (989.0, 494.0),
  'H100': (989.0, 494.0),
  'A100': (312.0, 156.0),
  'L4': (121.0, 60.0),
  'L40S': (362.0, 183.0),
}


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  for key, (bf16, tf32) in PEAKS.items():
    if key.lower() in device_kind.lower():
      return bf16 if dtype == 'bfloat16' else tf32
  return None


def _config_module(name: str):
  spec = importlib.util.spec_from_file_location(
    f'_cfg_{name}', os.path.join(_ROOT, 'configs', f'{name}.py')
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def recipe_config(row: dict):
  """The product's config of the row's recipe, with the row's model and batch, and the report's
  `--set` overrides (`row['overrides']`: dotted key -> value)."""
  c = _recipe_config(row)
  for key, value in row.get('overrides', {}).items():
    parent, _, leaf = key.rpartition('.')
    node = c
    for part in filter(None, parent.split('.')):
      node = node.get(part)
      if node is None:
        break
    if node is None or leaf not in node:
      raise ValueError(f'--set: the config has no key {key!r}')
    node[leaf] = value
  return c


def _recipe_config(row: dict):
  if row['recipe'] == 'cifar':
    c = _config_module('cifar').get_config('depth=20')
  else:
    arg = f'depth=50,recipe={row["recipe"]},batch={row["batch"]}'
    c = _config_module('imagenet').get_config(arg)
  c.model.name = row['model']
  c.batch_size = row['batch']
  return c


def _preprocess(row: dict, size: int) -> device_preprocess.DevicePreprocess:
  """Device preprocessing with statistics of the right shapes (values do not change the cost)."""
  rng = np.random.default_rng(0)
  kind = 'cifar' if row['recipe'] == 'cifar' else 'imagenet'
  norm = augment.Normalizer(
    rng.uniform(100, 150, (size, size, 3)).astype(np.float32), np.float32(60.0)
  )
  vecs = np.linalg.qr(rng.standard_normal((3, 3)))[0].astype(np.float32)
  eigvals = np.array([0.2, 0.02, 0.005], np.float32)
  return device_preprocess.DevicePreprocess(kind, size, norm, eigvals, vecs)


def _timed(fn, state, batch, steps: int):
  """(state, seconds per step) over `steps` dispatches, blocked once at the end."""
  for _ in range(2):
    state, out = fn(state, batch)
  jax.block_until_ready(out)
  t = time.perf_counter()
  for _ in range(steps):
    state, out = fn(state, batch)
  jax.block_until_ready((state, out))
  return state, (time.perf_counter() - t) / steps


def jax_row(row: dict, steps: int, profile: bool = False) -> dict:
  """Compile time and images/s of the product's train (or eval) step, uint8 input, device
  preprocessing inside the jit, batch sharded over every device. `profile`: also trace 3 more
  steps and add where their device time went (`kernel_profile.breakdown`) as `profile`."""
  config = recipe_config(row)
  num_classes = 10 if row['recipe'] == 'cifar' else 1000
  model = runtime.build_model(config, num_classes)
  mesh = ts.create_mesh()
  size, b = row['size'], row['batch']
  lr_fn = optim.create_learning_rate_fn(config, steps_per_epoch=1000, total_steps=10**6)
  tx = optim.create_optimizer(config, lr_fn)
  state = ts.init_state(model, tx, (size, size, 3), seed=0, mesh=mesh)
  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  pre = _preprocess(row, size)
  data = ts.batch_sharding(mesh)
  rng = np.random.default_rng(0)
  put = lambda v: jax.device_put(v, data)
  batch = {
    'image': put(rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)),
    'label': put(rng.integers(0, num_classes, b).astype(np.int32)),
  }
  if row['kind'] == 'train':
    jitted = ts.jit_train_step(
      mesh,
      state_sharding,
      lr_fn,
      preprocess=pre,
      label_smoothing=float(config.label_smoothing),
    )
  else:
    batch['mask'] = put(np.ones(b, bool))
    evaluate = ts.jit_eval_step(mesh, model.apply, preprocess=pre)
    jitted = jax.jit(lambda s, x: (s, evaluate(ts.model_variables(s), x)))
  t = time.perf_counter()
  compiled = jitted.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  state, per_step = _timed(compiled, state, batch, steps)
  breakdown = kernel_profile.profiled(compiled, state, batch) if profile else None
  macs = summary.analyze(model, size)['macs']
  flops = 2 * macs * (3 if row['kind'] == 'train' else 1)
  rate = b / per_step
  del state, batch, compiled
  return {
    'model': row['model'],
    'kind': row['kind'],
    'recipe': row['recipe'],
    'batch_size': b,
    'image_size': size,
    'dtype': config.dtype,
    'images_per_sec': round(rate, 2),
    'step_ms': round(1e3 * per_step, 3),
    'compile_s': round(compile_s, 2),
    'tflops': round(flops * rate / 1e12, 4),
    'flops_per_image': flops,
    'device_kind': jax.devices()[0].device_kind,
    'devices': jax.device_count(),
    **({'profile': breakdown} if profile else {}),
  }


def release_torch_memory() -> None:
  """Returns PyTorch's cached GPU memory so that JAX can take it."""
  if torch_available() and 'torch' in sys.modules:
    import torch  # pylint: disable=g-import-not-at-top

    if torch.cuda.is_available():
      torch.cuda.synchronize()
      torch.cuda.empty_cache()


@functools.cache
def torch_import_error() -> str | None:
  """None when PyTorch imports, else why not. Tried, not looked up: a torch that is installed but
  does not load (built for another CUDA) failed the whole report after its JAX rows."""
  if importlib.util.find_spec('torch') is None:
    return 'not installed'
  try:
    import torch  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  except Exception as e:  # pylint: disable=broad-except  # ImportError, OSError of a CUDA library
    return f'{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}'
  return None


def torch_available() -> bool:
  return torch_import_error() is None


def torch_version() -> str | None:
  if not torch_available():
    return None
  import torch  # pylint: disable=g-import-not-at-top

  return torch.__version__


def _torch_model(torch, row: dict, num_classes: int):
  """torchvision's model for ImageNet names when available, else the product benchmark's twin."""
  from resnet_jax.models import parse_name  # pylint: disable=g-import-not-at-top

  spec = parse_name(row['model'])
  if row['recipe'] != 'cifar' and importlib.util.find_spec('torchvision') is not None:
    try:
      import torchvision  # pylint: disable=g-import-not-at-top
    except Exception:  # pylint: disable=broad-except  # a torchvision built for another torch
      torchvision = None
    if torchvision is not None and hasattr(torchvision.models, row['model']):
      return getattr(torchvision.models, row['model'])(num_classes=num_classes)
  sys.path.insert(0, _SCRIPTS)
  import torch_twin  # pylint: disable=g-import-not-at-top

  return torch_twin.torch_resnet(torch, spec, num_classes)


def torch_row(row: dict, steps: int) -> dict:
  """PyTorch on the same device: channels_last, same batch, SGD momentum 0.9 + weight decay 1e-4
  (Nesterov and label smoothing as the recipe), bf16 autocast for bf16 recipes; eager and
  torch.compile (compile only on CUDA: on CPU it needs a C++ toolchain and minutes)."""
  import torch  # pylint: disable=g-import-not-at-top

  config = recipe_config(row)
  cuda = torch.cuda.is_available()
  dev = 'cuda' if cuda else 'cpu'
  num_classes = 10 if row['recipe'] == 'cifar' else 1000
  b, size = row['batch'], row['size']
  x = torch.randn(b, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)
  y = torch.randint(0, num_classes, (b,), device=dev)
  bf16 = config.dtype == 'bfloat16'
  out = {}
  for mode in ('eager', 'compile') if cuda else ('eager',):
    model = _torch_model(torch, row, num_classes).to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(
      model.parameters(),
      lr=0.1,
      momentum=0.9,
      weight_decay=1e-4,
      nesterov=bool(config.optimizer.nesterov),
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=float(config.label_smoothing))
    run = torch.compile(model) if mode == 'compile' else model

    def step():
      with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
        if row['kind'] == 'eval':
          with torch.no_grad():
            return run(x)
        loss = loss_fn(run(x).float(), y)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      return loss

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model.train(row['kind'] == 'train')
    t = time.perf_counter()
    for _ in range(3):
      step()
    sync()
    out[f'torch_{mode}_warmup_s'] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    for _ in range(steps):
      step()
    sync()
    out[f'torch_{mode}_images_per_sec'] = round(steps * b / (time.perf_counter() - t), 2)
    model = opt = run = None  # free the GPU memory before the next mode
    if cuda:
      torch.cuda.empty_cache()
  return out


def end_to_end(tiny: bool) -> dict:
  """benchmark_e2e with this machine's cores as Grain workers (tiny: its smoke settings); the
  JPEG decoder is OpenCV where it is installed (the row records which)."""
  sys.path.insert(0, _SCRIPTS)
  import benchmark_e2e  # pylint: disable=g-import-not-at-top

  if tiny:
    argv = ['--smoke']
  else:
    argv = [
      '--model',
      'resnet50',
      '--batch-size',
      '256',
      '--dtype',
      'bfloat16',
      '--workers',
      str(max(1, (os.cpu_count() or 2) - 1)),
      '--steps',
      '150',
      '--warmup',
      '15',
      '--decoder',
      'opencv' if importlib.util.find_spec('cv2') else 'pil',  # the faster one installed
    ]
  return benchmark_e2e.run(benchmark_e2e.parse(argv))
