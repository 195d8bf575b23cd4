"""Planning and launching a sweep: one `python -m resnet_jax.main` subprocess per grid point.

Why subprocesses and not a loop over `train_and_evaluate`: each run gets a fresh JAX runtime (no
compilation cache or device memory carried between models), its own device set via
`CUDA_VISIBLE_DEVICES`, and a crash in one run cannot take the sweep down. Runs go into
`DIR/<variant><depth>[_<shortcut>][_s<seed>]/`; a run with `results.json` is finished and skipped,
any other run directory is resumed by `resnet_jax.main` from its newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
import time
from typing import Iterable, Sequence

from resnet_jax.workdir import read_results

# Config-string keys the sweep sets (removed from the user's base args; shortcut only if swept).
_SWEPT_ARG_KEYS = ('depth', 'plain', 'shortcut')
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One grid point of a sweep and where it lives."""

  name: str  # the run directory's name under the sweep directory
  depth: int
  variant: str  # 'residual' | 'plain'
  shortcut: str | None  # None: the config's default
  seed: int | None  # None: the config's default

  def config_arg(self, base_config: str) -> str:
    """`configs/X.py:a=1,depth=N[,plain][,shortcut=S]`: the user's args, the swept ones replaced."""
    path, _, args = base_config.partition(':')
    swept = _SWEPT_ARG_KEYS if self.shortcut is not None else ('depth', 'plain')
    kept = [a for a in args.split(',') if a.strip() and a.split('=', 1)[0].strip() not in swept]
    kept.append(f'depth={self.depth}')
    if self.variant == 'plain':
      kept.append('plain')
    if self.shortcut is not None:
      kept.append(f'shortcut={self.shortcut}')
    return f'{path}:{",".join(kept)}'


def _csv(text: str | None, cast=str) -> list:
  return [cast(x.strip()) for x in (text or '').split(',') if x.strip()]


def plan_runs(
  depths: Sequence[int],
  variants: Sequence[str],
  shortcuts: Sequence[str] | None = None,
  seeds: Sequence[int] | None = None,
) -> list[RunSpec]:
  """The grid, in the order it runs (depth-major so a partial sweep has complete depth pairs).

  A plain net has no shortcuts, so it runs once per (depth, seed) whatever `shortcuts` lists.
  Suffixes appear only for swept axes: `residual34_B`, `plain56_s1`.
  """
  for v in variants:
    if v not in ('residual', 'plain'):
      raise ValueError(f"variants must be 'residual' and/or 'plain', got {v!r}")
  for s in shortcuts or ():
    if s not in ('A', 'B', 'C'):
      raise ValueError(f'shortcuts must be among A, B, C, got {s!r}')
  runs = []
  for depth in depths:
    for variant in variants:
      options = [None] if variant == 'plain' or not shortcuts else list(shortcuts)
      for shortcut in options:
        for seed in list(seeds) if seeds else [None]:
          name = f'{variant}{depth}'
          if shortcut is not None:
            name += f'_{shortcut}'
          if seed is not None:
            name += f'_s{seed}'
          runs.append(RunSpec(name, int(depth), variant, shortcut, seed))
  return runs


def is_finished(run_dir: str) -> bool:
  """Whether the run wrote a readable results.json (a damaged one is trained again, as the report
  and train.py treat it as missing)."""
  return read_results(run_dir) is not None


def run_command(
  spec: RunSpec, base_config: str, sweep_dir: str, overrides: Sequence[str]
) -> list[str]:
  """The `python -m resnet_jax.main ...` command line of one run."""
  cmd = [
    sys.executable,
    '-m',
    'resnet_jax.main',
    f'--config={spec.config_arg(base_config)}',
    f'--workdir={os.path.join(sweep_dir, spec.name)}',
  ]
  if not any(o.startswith('--config.progress_bar') for o in overrides):
    cmd.append('--config.progress_bar=False')  # the log file is not a terminal
  if spec.seed is not None:
    cmd.append(f'--config.seed={spec.seed}')
  return cmd + list(overrides)


@dataclasses.dataclass
class _Running:
  spec: RunSpec
  proc: subprocess.Popen
  slot: int
  log: object
  started: float


def _tail(path: str, n: int = 8) -> str:
  try:
    with open(path, errors='replace') as f:
      return ''.join(f.readlines()[-n:])
  except OSError:
    return ''


def run_sweep(
  runs: Iterable[RunSpec],
  base_config: str,
  sweep_dir: str,
  overrides: Sequence[str] = (),
  *,
  parallel: int = 1,
  devices: Sequence[str] | None = None,
  rerun_finished: bool = False,
  echo=functools.partial(print, flush=True),
) -> dict[str, int]:
  """Runs every spec not yet finished, `parallel` at a time; returns {run name: exit status}.

  `devices[i]` (e.g. '0' or '0,1') is exported as CUDA_VISIBLE_DEVICES to the run in slot i, so
  `--parallel=4 --devices=0,1,2,3` trains four runs at once, one per GPU. Output of each run goes
  to `<run>/sweep.log`; a failure is reported with the log's tail and the sweep goes on.
  """
  os.makedirs(sweep_dir, exist_ok=True)
  parallel = max(1, parallel)
  if devices and len(devices) < parallel:
    raise ValueError(f'--devices lists {len(devices)} device groups for --parallel={parallel}')
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(p for p in (_REPO_ROOT, env.get('PYTHONPATH')) if p)
  pending = []
  status: dict[str, int] = {}
  for spec in runs:
    if is_finished(os.path.join(sweep_dir, spec.name)) and not rerun_finished:
      echo(f'[sweep] {spec.name}: finished, skipped')
      status[spec.name] = 0
    else:
      pending.append(spec)
  running: list[_Running] = []
  free_slots = list(range(parallel))
  total = len(pending)
  try:
    _loop(
      pending,
      running,
      free_slots,
      base_config,
      sweep_dir,
      overrides,
      devices,
      env,
      status,
      total,
      echo,
    )
  except KeyboardInterrupt:  # the runs got the same SIGINT: let them checkpoint and exit
    echo('[sweep] interrupted: waiting for running runs to save a checkpoint')
    for r in running:
      r.proc.wait()
    raise
  return status


def _loop(
  pending, running, free_slots, base_config, sweep_dir, overrides, devices, env, status, total, echo
) -> None:
  while pending or running:
    while pending and free_slots:
      spec, slot = pending.pop(0), free_slots.pop(0)
      run_dir = os.path.join(sweep_dir, spec.name)
      os.makedirs(run_dir, exist_ok=True)
      cmd = run_command(spec, base_config, sweep_dir, overrides)
      run_env = dict(env)
      if devices:
        run_env['CUDA_VISIBLE_DEVICES'] = devices[slot]
      log = open(os.path.join(run_dir, 'sweep.log'), 'a')
      log.write(f'$ {" ".join(cmd)}\n')
      log.flush()
      resumed = ' (resuming)' if os.path.isdir(os.path.join(run_dir, 'checkpoints')) else ''
      echo(
        f'[sweep] {spec.name}: started{resumed} [{total - len(pending)}/{total}]'
        + (f' on devices {devices[slot]}' if devices else '')
      )
      proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=run_env)
      running.append(_Running(spec, proc, slot, log, time.time()))
    time.sleep(0.2)
    for r in [r for r in running if r.proc.poll() is not None]:
      running.remove(r)
      free_slots.append(r.slot)
      r.log.close()
      rc = r.proc.returncode
      status[r.spec.name] = rc
      took = time.time() - r.started
      log_path = os.path.join(sweep_dir, r.spec.name, 'sweep.log')
      if rc == 0 and is_finished(os.path.join(sweep_dir, r.spec.name)):
        echo(f'[sweep] {r.spec.name}: done in {took:.0f}s')
      elif rc == 0:  # stopped on request (SIGTERM): resumable, but not finished
        status[r.spec.name] = 1
        echo(f'[sweep] {r.spec.name}: stopped before the end after {took:.0f}s; rerun to resume')
      else:
        echo(
          f'[sweep] {r.spec.name}: FAILED (exit {rc}) after {took:.0f}s; log {log_path}:\n'
          + _tail(log_path)
        )
