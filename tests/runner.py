"""Runs the CLIs (`resnet_jax.main`, `data.prepare`, `evaluate`, ...) in subprocesses, as a user
would, and the assertions and workdir surgery that CLI tests share."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# XLA without LLVM's optimisation of the generated code, and with its older fusion emitters (at
# optimisation level 0 they compile faster than the MLIR ones): programs compile in about half
# the time and run slower. For runs of a few steps of a program no other test compiles (the
# shared ResNet-8 digits steps come from the session's compilation cache at the default level).
# ResNet-14 on digits, 12 steps, 1 device, cold: 10.5 -> 7.2 CPU s (2026-11-24).
FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'


def env_with_devices(n: int, fast_compile: bool = False) -> dict[str, str]:
  """The environment of a CLI run on `n` simulated CPU devices (`fast_compile`: FAST_COMPILE)."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={n}' + (
    f' {FAST_COMPILE}' if fast_compile else ''
  )
  env['JAX_PLATFORMS'] = 'cpu'
  env.pop('RESNET_JAX_TRACEBACK', None)
  return env


def main_args(
  workdir: str, config: str = 'configs/digits.py:depth=8', *overrides: str
) -> list[str]:
  return [
    sys.executable,
    '-m',
    'resnet_jax.main',
    f'--config={os.path.join(ROOT, config)}',
    f'--workdir={workdir}',
    '--config.progress_bar=false',
    *overrides,
  ]


def run_main(
  workdir: str,
  *overrides: str,
  config: str = 'configs/digits.py:depth=8',
  devices: int = 4,
  timeout: float = 600,
  fast_compile: bool = False,
) -> subprocess.CompletedProcess:
  return subprocess.run(
    main_args(workdir, config, *overrides),
    cwd=ROOT,
    env=env_with_devices(devices, fast_compile),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def start_main(
  workdir: str,
  *overrides: str,
  config: str = 'configs/digits.py:depth=8',
  devices: int = 4,
  extra: tuple[str, ...] = (),
  fast_compile: bool = False,
) -> subprocess.Popen:
  return subprocess.Popen(
    main_args(workdir, config, *overrides) + list(extra),
    cwd=ROOT,
    env=env_with_devices(devices, fast_compile),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def run_cli(
  module: str, *args: str, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
  """`python -m MODULE ARGS` from the repository root, as a user runs it (env None: inherited)."""
  return subprocess.run(
    [sys.executable, '-m', module, *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
    env=env,
  )


def run_prepare(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  """`python -m resnet_jax.data.prepare ARGS` as a user runs it."""
  return run_cli('resnet_jax.data.prepare', *args, env=env)


def wait_for(predicate, timeout: float = 300, interval: float = 0.05) -> None:
  deadline = time.time() + timeout
  while not predicate():
    if time.time() > deadline:
      raise TimeoutError('condition not reached')
    time.sleep(interval)


def results(workdir: str) -> dict:
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)


def finished_checkpoints(workdir: str) -> list[int]:
  """Step directories Orbax has finalised (temporary ones carry a non-numeric name)."""
  d = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def digits_config(**overrides):
  """configs/digits.py's ResNet-8 at batch 32; `overrides` are flattened keys ('data.prefetch')."""
  from resnet_jax.default_config import load_sibling_config

  digits = load_sibling_config(os.path.join(ROOT, 'configs', 'x.py'), 'digits')
  config = digits.get_config('depth=8')
  config.update_from_flattened_dict({'batch_size': 32, **overrides})
  return config


def data_config(**overrides):
  """The project's default config with digits data at 8x8; `overrides` set `config.data` fields."""
  from resnet_jax.default_config import base_config

  config = base_config()
  config.data.image_size = 8
  config.data.update(overrides)
  return config


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
  """The bad-input promise: exit status 1, no traceback, a last stderr line `error: ...` that
  names every needle. Returns that line."""
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: '), last
  for needle in needles:
    assert needle in last, last
  return last


def run_evaluate(workdir: str, *args: str, devices: int = 1, fast_compile: bool = False) -> dict:
  """`python -m resnet_jax.evaluate --workdir=DIR ARGS` as a user runs it; its JSON result."""
  proc = run_cli(
    'resnet_jax.evaluate',
    f'--workdir={workdir}',
    *args,
    env=env_with_devices(devices, fast_compile),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def copy_unfinished(workdir: str, dest: str) -> str:
  """A copy of a finished run without its results.json: rerunning it resumes from checkpoints."""
  shutil.copytree(workdir, dest)
  os.remove(os.path.join(dest, 'results.json'))
  return dest


def state_files(checkpoint_dir: str, arrays_only: bool = False) -> list[str]:
  """The files of a checkpoint's `state` item, largest last; `arrays_only`: the array data files
  (under its `d/` directories) only."""
  found = [
    os.path.join(d, n)
    for d, _, files in os.walk(os.path.join(checkpoint_dir, 'state'))
    for n in files
    if not arrays_only or os.path.basename(d) == 'd'
  ]
  return sorted(found, key=os.path.getsize)


def truncate(paths: list[str], fraction: int = 3) -> None:
  """Cuts each file to 1/fraction of its size (a torn write)."""
  assert paths
  for path in paths:
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // fraction)


def one_train_step(
  *,
  accum_steps: int = 1,
  num_devices: int = 1,
  size: int = 8,
  start_step: int = 0,
  compiled_text: bool = False,
  step_kwargs: dict | None = None,
  **model_kwargs,
):
  """One momentum-SGD step (lr 0.1, momentum 0.9) of a ghost-BN (groups of 2), 4-class resnet8
  on a fixed batch of 16 random [size, size, 1] images, on the first `num_devices` devices: the
  harness the train-step tests compare variants on; the state says it is at `start_step` (the
  step's keys fold it in). Returns (new state, metrics, the compiled
  step's HLO text when `compiled_text`, else None); `step_kwargs` go to `jit_train_step`."""
  import jax
  import numpy as np
  import optax

  from resnet_jax.models import create_model
  from resnet_jax.train_step import batch_sharding, create_mesh, init_state, jit_train_step

  mesh = create_mesh(jax.devices()[:num_devices])
  model = create_model('resnet8', num_classes=4, bn_group_size=2, **model_kwargs)
  state = init_state(model, optax.sgd(0.1, momentum=0.9), (size, size, 1), seed=0, mesh=mesh)
  step0 = np.asarray(start_step, state.step.dtype)
  state = state.replace(step=jax.device_put(step0, state.step.sharding))
  sharding = jax.tree.map(lambda x: x.sharding, state)
  step = jit_train_step(
    mesh, sharding, optax.constant_schedule(0.1), accum_steps=accum_steps, **(step_kwargs or {})
  )
  rng = np.random.default_rng(0)
  batch = {
    'image': rng.normal(size=(16, size, size, 1)).astype(np.float32),
    'label': rng.integers(0, 4, size=16).astype(np.int32),
  }
  batch = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in batch.items()}
  hlo = step.lower(state, batch).compile().as_text() if compiled_text else None
  state, metrics = step(state, batch)
  return state, metrics, hlo
