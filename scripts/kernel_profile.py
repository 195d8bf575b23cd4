"""Where a jitted step's device time goes: trace a few steps with `jax.profiler` and sum the
kernels' durations by what they do (gpu_report.py `--profile`). Why: an MFU of 0.15 says little;
this says whether the time is in convolutions or in the BN/ReLU passes around them."""

from __future__ import annotations

import collections
import os
import re
import tempfile

import jax

PROFILED_STEPS = 3


def profiled(fn, state, batch) -> dict:
  """`breakdown` of PROFILED_STEPS calls of the compiled step `fn` (already warm), or `error`: a
  profiler that cannot start (e.g. no CUPTI) must not cost the row its timing."""
  try:
    return _traced(fn, state, batch)
  except Exception as e:  # pylint: disable=broad-except
    return {'error': f'{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}'}


def _traced(fn, state, batch) -> dict:
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for _ in range(PROFILED_STEPS):
      state, out = fn(state, batch)
    jax.block_until_ready((state, out))
    jax.profiler.stop_trace()
    (path,) = [
      os.path.join(d, f) for d, _, fs in os.walk(trace_dir) for f in fs if f.endswith('.xplane.pb')
    ]
    return breakdown(path, PROFILED_STEPS)


def category(name: str) -> str:
  """What an XLA GPU kernel (or XLA:CPU op) does, from its name: where a step's time goes."""
  if 'Padding' in name or 'init_device_work' in name or re.match(r'(?i)memset|memcpy', name):
    return 'copies, memsets, padding'
  if re.search(r'xmma|cutlass|cudnn|\bconvolution', name, re.I):
    return 'convolutions'
  if re.search(r'nvjet|gemm|splitK|dot', name, re.I):
    return 'matmuls'
  if 'scatter' in name or 'reduce_window' in name:
    return 'pooling'
  if 'reduce' in name:
    return 'reductions'
  return 'elementwise'


def breakdown(xplane_path: str, steps: int) -> dict:
  """Milliseconds of device time per step by `category`, kernel counts, and how much went
  to kernels under 5 us (launch-bound work). Reads the GPU plane of a `jax.profiler` trace; on the
  CPU, XLA's op events."""
  data = jax.profiler.ProfileData.from_file(xplane_path)
  planes = [p for p in data.planes if p.name.startswith('/device:')]
  if planes:
    events = [e for p in planes for line in p.lines for e in line.events]
  else:
    events = [
      e
      for p in data.planes
      for line in p.lines
      if line.name.startswith('tf_XLA')
      for e in line.events
      if not e.name.startswith('ThunkExecutor')
    ]
  ms = collections.Counter()
  for e in events:
    ms[category(e.name)] += e.duration_ns / 1e6 / steps
  tiny = [e for e in events if e.duration_ns < 5000]
  return {
    'device_ms_per_step': round(sum(ms.values()), 3),
    'kernels_per_step': len(events) // steps,
    'under_5us_kernels_per_step': len(tiny) // steps,
    'under_5us_ms_per_step': round(sum(e.duration_ns for e in tiny) / 1e6 / steps, 3),
    'ms_per_step': {k: round(v, 3) for k, v in ms.most_common()},
  }


def markdown(rows: list[dict]) -> list[str]:
  """A table of the profiled rows' device time per step by kernel category."""
  traced = [r for r in rows if r.get('profile') and 'error' not in r['profile']]
  if not traced:
    return []
  cats = sorted({c for r in traced for c in r['profile']['ms_per_step']})
  lines = [
    '',
    f'Device time per step (ms) by kernel category (`--profile`: {PROFILED_STEPS} traced steps):',
    '',
    '| row | batch | ' + ' | '.join(cats) + ' | total | kernels | under 5 us (ms) |',
    '|---|---|' + '---|' * (len(cats) + 3),
  ]
  for r in traced:
    p = r['profile']
    cells = [f'{p["ms_per_step"].get(c, 0):.2f}' for c in cats]
    lines.append(
      f'| {r["name"]} | {r["batch_size"]} | ' + ' | '.join(cells) + f' | '
      f'{p["device_ms_per_step"]:.2f} | {p["kernels_per_step"]} | '
      f'{p["under_5us_kernels_per_step"]} ({p["under_5us_ms_per_step"]:.2f}) |'
    )
  return lines
