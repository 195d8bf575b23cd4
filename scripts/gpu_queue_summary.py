"""scripts/gpu_queue.py's --collect: several commands' queue.json into one summary.

A module of its own so that running the queue (gpu_queue.py) and reading its results stay each
under one roof. Each item's record is taken from the part where it went best (ok, then failed,
then timed out; the later part on a tie); the gpu_report halves are merged by gpu_report.py's
own --merge, not here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

_SCRIPTS = os.path.dirname(os.path.abspath(__file__))
_RANK = {'ok': 5, 'failed': 4, 'timeout': 3, 'running': 2, 'interrupted': 2, 'done earlier': 1}
_REPORT = 'gpu_report.json'


def load_index(path: str) -> dict:
  """DIR/queue.json of an earlier command; ValueError (one line) if it is not one."""
  name = os.path.join(path, 'queue.json')
  try:
    with open(name) as f:
      index = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'cannot read {name}: {e}') from None
  if not isinstance(index, dict) or not all(k in index for k in ('tiny', 'environment', 'items')):
    raise ValueError(f'{name} is not a gpu_queue index')
  return index


def _choose(parts: list[tuple[str, dict]], names: list[str]) -> list[dict]:
  """One record per item, in the queue's order (names no longer queued at the end)."""
  best: dict[str, dict] = {}
  for folder, index in parts:
    for record in index['items']:
      prev = best.get(record['name'])
      if prev is None or _RANK.get(record['status'], 0) >= _RANK.get(prev['status'], 0):
        best[record['name']] = dict(record, part=folder)
  order = names + sorted(n for n in best if n not in names)
  return [best[n] for n in order if n in best]


def _merge_reports(records: list[dict], out: str) -> dict | None:
  """gpu_report.py --merge of the report items' gpu_report.json, in the queue's order."""
  paths = [
    os.path.join(r['part'], r['name'], _REPORT)
    for r in records
    if r['status'] in _RANK and os.path.isfile(os.path.join(r['part'], r['name'], _REPORT))
  ]
  if not paths:
    return None
  folder = os.path.join(out, 'gpu_report')
  cmd = [sys.executable, os.path.join(_SCRIPTS, 'gpu_report.py'), '--out', folder, '--merge']
  done = subprocess.run(cmd + paths, capture_output=True, text=True)
  merged = {'rc': done.returncode, 'parts': paths}
  if done.returncode:
    merged['error'] = (done.stderr.strip().splitlines() or ['no output'])[-1]
  else:
    merged['markdown'] = os.path.join('gpu_report', 'gpu_report.md')
  return merged


def _device(env: dict) -> str:
  smi = (env.get('nvidia_smi') or '').splitlines()
  if smi:
    return smi[0].split(' (UUID')[0]
  return f'{env.get("device_kind")} ({env.get("platform")})'


def _commit(commit: str | None) -> str:
  if not commit:
    return '?'
  return commit[:10] + (' + changes' if commit.endswith('+changes') else '')


def _figures(record: dict) -> str:
  """The item's headline figures, read as its script writes them."""
  if record['status'] not in ('ok', 'failed', 'timeout'):
    return record.get('reason', '') or (f'in {record["from"]}' if 'from' in record else '')
  if record['status'] != 'ok':
    lines = [ln for ln in record.get('stderr_tail', '').splitlines() if ln.strip()]
    return (lines[-1] if lines else 'no stderr')[:160]
  script = os.path.basename(record['command'].split()[1])
  r = record.get('result') or {}
  try:
    if script == 'gpu_report.py':
      with open(os.path.join(record['part'], record['name'], _REPORT)) as f:
        rows = json.load(f)['rows']
      bad = sum('error' in row for row in rows)
      return f'{len(rows) - bad} of {len(rows)} rows measured (the merged report below)'
    if script == 'benchmark.py':
      return (
        f'{r["images_per_sec"]:,.0f} img/s (median step {r["step_ms_median"]} ms), '
        f'compile {r["compile_s"]} s'
      )
    if script == 'benchmark_recipe.py':
      ms, ratio = r['ms_per_step'], r['ratio_to_plain']
      return 'ms/step: ' + ', '.join(f'{k} {v} (x{ratio[k]})' for k, v in ms.items())
    if script == 'benchmark_e2e.py':
      return (
        f'{r["images_per_sec"]:,.0f} img/s end to end vs {r["step_only_images_per_sec"]:,.0f} '
        f'step only ({r["e2e_over_step_only"]}x); data wait {100 * r["data_wait_fraction"]:.1f} '
        f'%; host cores {r["host_cores"]}; {r["workers"]} workers'
      )
    if script == 'benchmark_optimizers.py':
      ms = lambda key: ', '.join(f'{x["optimizer"]} {1e3 * x[key]:.1f}' for x in r['results'])
      return f'step ms: {ms("step_s")}; update alone ms: {ms("update_s")}'
  except (KeyError, TypeError, ValueError, OSError):
    pass
  scalars = [(k, v) for k, v in r.items() if isinstance(v, (int, float, str))][:4]
  return ', '.join(f'{k} {v}' for k, v in scalars) or (record.get('stdout_tail') or '')[-160:]


def markdown(summary: dict, gpu_report_md: str | None) -> str:
  items = summary['items']
  ok = sum(r['status'] == 'ok' for r in items)
  lines = [
    f'# GPU queue: {ok} of {len(items)} items ran to the end ({summary["date"]})',
    '',
    f'Collected from {", ".join(p["dir"] for p in summary["parts"])}'
    f'{"; tiny CPU variants, not GPU figures" if summary["tiny"] else ""}.',
    '',
    '| part | date | device | jax | torch | XLA_FLAGS | commit | budget s | wall s |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  for p in summary['parts']:
    env = p['environment']
    lines.append(
      f'| {p["dir"]} | {env.get("date")} | {_device(env)} | {env.get("jax_version")} | '
      f'{env.get("torch_version") or env.get("torch_error") or "absent"} | '
      f'{env.get("xla_flags") or "unset"} | {_commit(env.get("commit"))} | '
      f'{p["budget_s"]} | {p.get("wall_s")} |'
    )
  kinds = sorted({str(p['environment'].get('device_kind')) for p in summary['parts']})
  if len(kinds) > 1:
    lines += [
      '',
      f'**The parts ran on different devices ({", ".join(kinds)}): compare timings '
      'only within one device.**',
    ]
  lines += [
    '',
    '| item | status | wall s | expected s | part | figures |',
    '|---|---|---|---|---|---|',
  ]
  for r in items:
    status = 'cut off (the command was killed)' if r['status'] == 'running' else r['status']
    figures = _figures(r).replace('|', '\\|')
    lines.append(
      f'| {r["name"]} | {status} | {r.get("wall_s", "")} | {r.get("expected_s", "")} | '
      f'{r["part"]} | {figures} |'
    )
  lines += ['', "Each item's command, JSON output and stderr tail are in summary.json."]
  merged = summary.get('gpu_report')
  if merged and merged['rc']:
    lines += ['', f'The gpu_report parts did not merge: {merged["error"]}']
  if gpu_report_md:
    body = gpu_report_md[2:] if gpu_report_md.startswith('# ') else gpu_report_md
    lines += ['', f'## {body}']  # its title one level down
  return '\n'.join(lines) + '\n'


def collect(dirs: list[str], out: str, names: list[str]) -> int:
  """ALL/summary.json and ALL/summary.md (and ALL/gpu_report/) from the DIRs' queue.json."""
  from resnet_jax import workdir  # pylint: disable=g-import-not-at-top

  try:
    parts = [(d, load_index(d)) for d in dirs]
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  if len({index['tiny'] for _, index in parts}) > 1:
    print('error: --collect mixes --tiny and GPU queues', file=sys.stderr)
    return 1
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    print(f'error: cannot create --out {out}: {e.strerror}', file=sys.stderr)
    return 1
  records = _choose(parts, names)
  summary = {
    'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
    'tiny': parts[0][1]['tiny'],
    'parts': [
      {'dir': d, **{k: index.get(k) for k in ('environment', 'budget_s', 'wall_s', 'command')}}
      for d, index in parts
    ],
    'items': records,
    'gpu_report': _merge_reports(records, out),
  }
  merged_md = None
  if summary['gpu_report'] and not summary['gpu_report']['rc']:
    with open(os.path.join(out, summary['gpu_report']['markdown'])) as f:
      merged_md = f.read()
  workdir.write_atomic(os.path.join(out, 'summary.json'), json.dumps(summary, indent=1) + '\n')
  text = markdown(summary, merged_md)
  workdir.write_atomic(os.path.join(out, 'summary.md'), text)
  print(text)
  return 0
