"""scripts/gpu_report.py's files: gpu_report.json and gpu_report.md, and merging partial runs.

A module of its own so that the report's rows (gpu_report.py) and how they are written down stay
each under one roof; `python scripts/gpu_report.py --merge` and every run end here.
"""

from __future__ import annotations

import json
import os
import sys

import kernel_profile
import numpy as np
from etils import epath

from resnet_jax import workdir

_MERGED_KEYS = ('date', 'device_kind', 'rows', 'wall_s', 'command', 'xla_flags')


def merge_reports(paths: list[str], out: str) -> int:
  """One report from partial runs of the same machine (the device tool's calls are 10 minutes)."""
  parts = []
  for path in paths:
    try:
      with open(path) as f:
        parts.append(json.load(f))
    except (OSError, ValueError) as e:
      print(f'error: cannot read report {path}: {e}', file=sys.stderr)
      return 1
    missing = [k for k in _MERGED_KEYS if not isinstance(parts[-1], dict) or k not in parts[-1]]
    if missing:
      print(f'error: {path} is not a gpu_report.json (no {", ".join(missing)})', file=sys.stderr)
      return 1
  kinds = {p['device_kind'] for p in parts}
  if len(kinds) != 1:
    print(f'error: the reports come from different devices: {sorted(kinds)}', file=sys.stderr)
    return 1
  report = dict(parts[0])
  report['rows'] = [r for p in parts for r in p['rows']]
  report['complete'] = all(p.get('complete', True) for p in parts)  # one part cut off: partial
  report['end_to_end'] = next((p['end_to_end'] for p in parts if p.get('end_to_end')), None)
  report['wall_s'] = round(sum(p['wall_s'] for p in parts), 1)
  report['command'] = ' ; '.join(p['command'] for p in parts)
  report['parts'] = [{k: p[k] for k in ('date', 'xla_flags', 'wall_s', 'command')} for p in parts]
  write_report(report, out)
  return 0


def write_report(report: dict, out: str, quiet: bool = False) -> None:
  """gpu_report.json and gpu_report.md in `out`, each replaced atomically (a run cut off between
  rows leaves the last complete pair)."""
  os.makedirs(out, exist_ok=True)
  text = json.dumps(
    report, indent=1, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)
  )
  workdir.write_atomic(epath.Path(out) / 'gpu_report.json', text)
  workdir.write_atomic(epath.Path(out) / 'gpu_report.md', markdown(report))
  if not quiet:
    print(markdown(report))


def markdown(report: dict) -> str:
  torch_error = report.get('torch_error')
  torch = report.get('torch_version') or (
    f'unusable ({torch_error})' if torch_error and torch_error != 'not installed' else 'absent'
  )
  lines = [
    f'# GPU report ({report["date"]})'
    f'{"" if report.get("complete", True) else " (partial: written after a row)"}',
    '',
    f'Device: {report["device_kind"]} x{report["devices"]} ({report["platform"]}); '
    f'jax {report["jax_version"]}, torch {torch}; '
    f'{report["cpu_count"]} CPU cores; '
    f'XLA_FLAGS: {report["xla_flags"] or "unset"}'
    f'{" (tiny CPU mode)" if report["tiny"] else ""}'
    f'{"; config overrides: " + str(report["overrides"]) if report.get("overrides") else ""}.',
    '',
    '| row | batch | JAX img/s | compile s | MFU | torch eager | torch compile | '
    'JAX / best torch |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for r in report['rows']:
    if 'error' in r:
      lines.append(f'| {r["name"]} | {r["batch_size"]} | did not run: {r["error"]} | | | | | |')
      continue
    f = lambda k: '' if r.get(k) is None else (f'{r[k]:.3f}' if k == 'mfu' else f'{r[k]:,.1f}')
    lines.append(
      f'| {r["name"]} | {r["batch_size"]} | {f("images_per_sec")} | {f("compile_s")} | '
      f'{f("mfu")} | {f("torch_eager_images_per_sec") or r.get("torch_error", "")[:60]} | '
      f'{f("torch_compile_images_per_sec")} | {f("ratio_jax_over_best_torch")} |'
    )
  e = report.get('end_to_end')
  if e and 'error' not in e:
    lines += [
      '',
      f'End to end ({e["model"]}, batch {e["batch_size"]}, {e["dtype"]}, '
      f'{e["workers"]} Grain workers, {e.get("decoder", "pil")} decoder, '
      f'{e["dataset"]}): {e["images_per_sec"]:,.1f} img/s vs step only '
      f'{e["step_only_images_per_sec"]:,.1f} ({e["e2e_over_step_only"]:.2f}x); data wait '
      f'{100 * e["data_wait_fraction"]:.1f} % of wall time; host cores '
      + (f'{e["host_cores"]}.' if e['host_cores'] is not None else 'not measurable (too short).'),
    ]
  elif e:
    lines += ['', f'End to end: did not run: {e["error"]}']
  lines += kernel_profile.markdown(report['rows'])
  lines += [
    '',
    'MFU = achieved (3 x forward FLOPs x img/s) / dense peak (bf16 rows: bf16 peak; '
    'f32 rows: TF32 peak).',
    f'Command: `{report["command"]}` ({report["wall_s"]} s)',
    '',
  ]
  return '\n'.join(lines)
