"""Runs `python -m resnet_jax.main` in a subprocess, as a user would (helpers for CLI tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env_with_devices(n: int) -> dict[str, str]:
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={n}'
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
) -> subprocess.CompletedProcess:
  return subprocess.run(
    main_args(workdir, config, *overrides),
    cwd=ROOT,
    env=env_with_devices(devices),
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
) -> subprocess.Popen:
  return subprocess.Popen(
    main_args(workdir, config, *overrides) + list(extra),
    cwd=ROOT,
    env=env_with_devices(devices),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


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


def data_config(**overrides):
  """The project's default config with digits data at 8x8; `overrides` set `config.data` fields."""
  from resnet_jax.default_config import base_config

  config = base_config()
  config.data.image_size = 8
  config.data.update(overrides)
  return config
