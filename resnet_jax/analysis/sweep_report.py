"""Reads a sweep directory back into summary.json, summary.md and curves.png.

Everything is derived from the run directories themselves (config.json, metrics.jsonl,
results.json), not from the sweep's command line, so a report can be rebuilt at any time, for a
sweep still running, or for run directories gathered from several machines.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from typing import Any, Sequence

from resnet_jax.analysis.paper_numbers import paper_error, wrn_paper_error
from resnet_jax.workdir import CONFIG_FILE, WorkdirError, read_results, read_run_config

Record = dict[str, Any]


def read_metrics(path: str) -> list[Record]:
  """metrics.jsonl records, skipping a line torn by a crash mid-write."""
  out = []
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out


def _spec(model: dict[str, Any]):
  """What the run's model name means (models.names.parse_name; no regex of our own)."""
  from resnet_jax.models.names import parse_name  # pylint: disable=import-outside-toplevel

  return parse_name(model['name'], model['block'])


def reported_evaluators(config) -> tuple[Any, Any]:
  """(the evaluator whose error the table reports, the one whose curve is plotted).

  The table reports the main evaluator, except that a run which selects on images held out of
  the training set reports its evaluator on `test` where it has one: that is the figure the
  paper's tables give. The curve is the same split with the fewest views, as the paper's
  Fig. 4 plots centre-crop error during training while its tables report 10-crop. Few-shot
  probes (`shots`) measure the features, not the classifier, and have no `top1_error`: never these.
  """
  from resnet_jax import evaluators  # pylint: disable=import-outside-toplevel

  declared = [e for e in evaluators.from_config(config) if e.probe is None]
  table = declared[0]
  on_test = [e for e in declared if e.split == 'test' and not e.scales]
  if config.data.validation_size > 0 and table.split != 'test' and on_test:
    table = on_test[0]
  same_split = [e for e in declared if e.split == table.split and not e.scales]
  return table, min(same_split, key=lambda e: (e.crops, e is not table))


def load_run(run_dir: str, train_window: int = 5) -> Record | None:
  """One summary record for a run directory (None if it holds no run).

  `train_top1_error`/`train_loss`: mean of the last `train_window` logged train points (each is
  itself a mean over `log_every_steps` steps), which smooths the batch-to-batch noise the way the
  paper's curves do. Test error (of `reported_evaluators`): results.json when finished, else the
  newest point that evaluator logged.
  """
  if not os.path.exists(os.path.join(run_dir, CONFIG_FILE)):
    return None
  config = read_run_config(run_dir)  # older runs: later fields take today's defaults
  cfg = config.to_dict()
  table, curve = reported_evaluators(config)
  metrics = read_metrics(os.path.join(run_dir, 'metrics.jsonl'))
  train = sorted((m for m in metrics if m.get('split') == 'train'), key=lambda m: m['step'])
  evals = sorted((m for m in metrics if m.get('split') == table.name), key=lambda m: m['step'])
  results = read_results(run_dir)
  final = None
  if results:
    final = results['eval'] if table.name == 'eval' else results.get('evals', {}).get(table.name)
  model = cfg['model']
  spec = _spec(model)
  variant = 'residual' if model['residual'] and spec.residual else 'plain'
  last = train[-train_window:] if train_window > 0 else train
  rec: Record = {
    'run': os.path.basename(os.path.normpath(run_dir)),
    'dataset': cfg['data']['name'],
    'model': model['name'],
    'depth': spec.depth,
    'variant': variant,
    'shortcut': model['shortcut'] if variant == 'residual' else None,
    'preact': bool(model['preact']),  # None: the name's own, pre-activation only for wrn*
    'block': model['block'] or 'basic',  # CIFAR: basic (6n+2) or bottleneck (9n+2)
    'arch': spec.variant,  # 'resnet', or 'wrn' / 'resnext' / 'wide_resnet': other nets, own rows
    'widen': spec.widen if spec.variant == 'wrn' else None,
    'dropout_rate': float(model.get('dropout_rate') or 0.0),
    'seed': cfg['seed'],
    'finished': results is not None,
    'steps': results['step'] if results else (train[-1]['step'] if train else 0),
    'params': results.get('params') if results else None,
    'train_top1_error': _mean([m['top1_error'] for m in last]),
    'train_loss': _mean([m['loss'] for m in last]),
    'test_top1_error': (
      final['top1_error'] if final else (evals[-1]['top1_error'] if evals else None)
    ),
    'test_loss': final['loss'] if final else (evals[-1]['loss'] if evals else None),
    'test_split': table.split,
    'eval_crops': table.crops,
    'curve': curve.name,  # the metrics.jsonl records of the test-error curve
    'curve_split': curve.split,
    'curve_crops': curve.crops,
    'wall_time_s': results.get('wall_time_s') if results else None,
  }
  if spec.variant == 'wrn':
    paper = wrn_paper_error(rec['dataset'], rec['depth'], rec['widen'], rec['dropout_rate'])
  elif spec.variant == 'resnet':
    paper = paper_error(
      rec['dataset'], variant, rec['depth'], rec['shortcut'], rec['preact'], rec['block']
    )
  else:  # a ResNeXt is not the paper's ResNet of its depth
    paper = None
  rec['paper_top1_error_pct'], rec['paper_source'] = paper if paper else (None, None)
  return rec


def _mean(xs: Sequence[float]) -> float | None:
  return float(sum(xs) / len(xs)) if xs else None


def _sort_key(rec: Record) -> tuple:
  return (
    rec['dataset'],
    rec.get('arch', 'resnet') != 'resnet',
    rec['preact'],
    rec['block'],
    rec['variant'] != 'plain',
    rec['depth'],
    rec.get('widen') or 0,
    rec['model'],
    rec.get('dropout_rate', 0.0),
    rec['shortcut'] or '',
    rec['seed'] if rec['seed'] is not None else -1,
  )


def collect_runs(sweep_dir: str, train_window: int = 5) -> list[Record]:
  """Records of every run directory directly under `sweep_dir`, plain before residual, by depth."""
  records = []
  for name in sorted(os.listdir(sweep_dir)) if os.path.isdir(sweep_dir) else []:
    path = os.path.join(sweep_dir, name)
    if os.path.isdir(path):
      try:
        rec = load_run(path, train_window)
      except WorkdirError as e:  # an unreadable config.json: report the other runs
        print(f'[sweep] skipped {path}: {e}', file=sys.stderr)
        continue
      if rec is not None:
        records.append(rec)
  return sorted(records, key=_sort_key)


def _group_key(rec: Record) -> tuple:
  """What a row is: runs of two widths (wrn16_4, wrn16_8) or dropouts are never 'seeds'."""
  return (
    rec['dataset'],
    rec['model'],
    rec.get('dropout_rate', 0.0),
    rec['preact'],
    rec['block'],
    rec['variant'],
    rec['depth'],
    rec['shortcut'],
  )


def group_runs(records: Sequence[Record]) -> list[list[Record]]:
  """Runs that differ only in seed, in table order."""
  groups: dict[tuple, list[Record]] = {}
  for rec in sorted(records, key=_sort_key):
    groups.setdefault(_group_key(rec), []).append(rec)
  return list(groups.values())


def label(rec: Record, with_dataset: bool = False) -> str:
  """'plain-20', 'ResNet-110 (pre-act)', 'ResNet-164 (pre-act, bottleneck)': the papers' names.

  `with_dataset` adds the dataset ('ResNet-20 (svhn)'), for a report over runs of several
  datasets, whose rows and curves are otherwise told apart by nothing.
  """
  arch = rec.get('arch', 'resnet')
  if arch == 'wrn':  # always pre-activation: 'WRN-28-10 (dropout 0.3)', as Zagoruyko & Komodakis
    text, notes = f'WRN-{rec["depth"]}-{rec["widen"]}', []
  else:
    text = rec['model'] if arch != 'resnet' else f'ResNet-{rec["depth"]}'
    text = text if rec['variant'] == 'residual' else f'plain-{rec["depth"]}'
    notes = [
      n
      for n, on in (('pre-act', rec['preact']), ('bottleneck', rec['block'] == 'bottleneck'))
      if on
    ]
  notes += [f'dropout {rec["dropout_rate"]:g}'] if rec.get('dropout_rate') else []
  notes += [rec['dataset']] if with_dataset else []
  return text + (f' ({", ".join(notes)})' if notes else '')


def mean_std(values: Sequence[float | None], scale: float = 1.0, digits: int = 2) -> str:
  """'8.12' for one value, '8.12 ± 0.20' (sample std) for several, '—' for none."""
  xs = [v * scale for v in values if v is not None and math.isfinite(v)]
  if not xs:
    return '—'
  if len(xs) == 1:
    return f'{xs[0]:.{digits}f}'
  return f'{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}'


def markdown_table(records: Sequence[Record], train_window: int = 5) -> str:
  """The summary table: ours beside the paper's test error where the paper has that net."""
  if not records:
    return '_No runs found._\n'
  datasets = sorted({r['dataset'] for r in records})
  crops = sorted({r['eval_crops'] for r in records})
  lines = [
    f'Dataset: {", ".join(datasets)}. Errors in %; test error: the '
    f'{"/".join(sorted({r.get("test_split", "test") for r in records}))} split with '
    f'{"/".join(map(str, crops))} crop(s); final train error/loss = mean of the last '
    f'{train_window} logged training points (train-mode BN, on the batches as trained). '
    'Several seeds: mean ± sample std.',
    '',
    '| model | shortcut | params | seeds | steps | train top-1 err | train loss '
    '| test top-1 err | paper test err | wall time (s) |',
    '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  unfinished = False
  for group in group_runs(records):
    first = group[0]
    done = all(r['finished'] for r in group)
    unfinished |= not done
    params = first['params']
    paper = first['paper_top1_error_pct']
    lines.append(
      '| '
      + ' | '.join(
        [
          label(first, len(datasets) > 1) + ('' if done else ' *'),
          first['shortcut'] or '—',
          f'{params:,}' if params else '—',
          str(len(group)),
          '/'.join(sorted({str(r['steps']) for r in group})),
          mean_std([r['train_top1_error'] for r in group], 100),
          mean_std([r['train_loss'] for r in group], 1, 4),
          mean_std([r['test_top1_error'] for r in group], 100),
          f'{paper:.2f} ({first["paper_source"]})' if paper is not None else '—',
          mean_std([r['wall_time_s'] for r in group], 1, 0),
        ]
      )
      + ' |'
    )
  if unfinished:
    lines += ['', '\\* not finished: newest logged numbers, not final ones.']
  return '\n'.join(lines) + '\n'


def _mean_curve(
  group: Sequence[Record], curves: dict[str, list[Record]], key: str
) -> tuple[list, list]:
  """Mean over the group's seeds at the steps every seed logged."""
  per_run = [{m['step']: m[key] for m in curves[r['run']] if m.get(key) is not None} for r in group]
  steps = sorted(set.intersection(*(set(c) for c in per_run))) if per_run else []
  return steps, [sum(c[s] for c in per_run) / len(per_run) for s in steps]


def plot_curves(sweep_dir: str, records: Sequence[Record], out_path: str) -> str:
  """Training error, loss and test error vs step: plain dashed, residual solid (Figs. 4, 6)."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  metrics = {
    r['run']: read_metrics(os.path.join(sweep_dir, r['run'], 'metrics.jsonl')) for r in records
  }
  train = {k: [m for m in v if m.get('split') == 'train'] for k, v in metrics.items()}
  curve_of = {r['run']: r.get('curve', 'eval') for r in records}
  evals = {k: [m for m in v if m.get('split') == curve_of[k]] for k, v in metrics.items()}
  shortcuts_vary = len({r['shortcut'] for r in records if r['variant'] == 'residual'}) > 1
  several = len({r['dataset'] for r in records}) > 1
  colour_keys = sorted(
    {_colour_key(r, several, shortcuts_vary) for r in records},
    key=lambda k: (k[0], k[1], k[2], k[3] or ''),
  )
  cmap = plt.get_cmap('tab10')
  colours = {k: cmap(i % 10) for i, k in enumerate(colour_keys)}
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
  panels = [
    (axes[0], train, 'top1_error', 100, 'training top-1 error (%)'),
    (axes[1], train, 'loss', 1, 'training loss (log scale)'),
    (axes[2], evals, 'top1_error', 100, _curve_title(records)),
  ]
  tops = {id(ax): 0.0 for ax in axes}
  for group in group_runs(records):
    first = group[0]
    colour = colours[_colour_key(first, several, shortcuts_vary)]
    name = label(first, several)
    name += f' {first["shortcut"]}' if shortcuts_vary and first['shortcut'] else ''
    style = '-' if first['variant'] == 'residual' else '--'
    for ax, curves, key, scale, _ in panels:
      steps, ys = _mean_curve(group, curves, key)
      if steps:
        ys = [y * scale for y in ys]
        ax.plot(
          steps,
          ys,
          style,
          color=colour,
          lw=1.4,
          # a lone point (a run shorter than log_every_steps) is invisible as a line
          marker='o' if len(steps) == 1 or (curves is evals and len(steps) < 30) else None,
          ms=3,
          label=name,
        )
        late = [y for s, y in zip(steps, ys) if s >= 0.1 * steps[-1]] or ys
        tops[id(ax)] = max(tops[id(ax)], max(late))
  for ax, _, _, _, title in panels:
    ax.set_xlabel('iteration')
    ax.set_title(title)
    ax.grid(alpha=0.3)
  for ax in (axes[0], axes[2]):  # like Figs. 4/6: zoom past the first 10% of training
    if tops[id(ax)] > 0:
      ax.set_ylim(0, min(100.0, 1.15 * tops[id(ax)]))
  axes[1].set_yscale('log')
  axes[0].legend(fontsize=8, ncol=2)
  datasets = ', '.join(sorted({r['dataset'] for r in records}))
  fig.suptitle(f'{datasets}: plain (dashed) vs residual (solid)')
  fig.tight_layout()
  fig.savefig(out_path, dpi=110)
  plt.close(fig)
  return out_path


def _colour_key(rec: Record, several: bool, shortcuts_vary: bool) -> tuple:
  """One colour per net (a plain net shares its residual twin's: dashed vs solid)."""
  net = (rec['model'], rec.get('dropout_rate', 0.0))
  shortcut = rec['shortcut'] if shortcuts_vary else None
  return (rec['dataset'] if several else '', rec['depth'], net, shortcut)


def _curve_title(records: Sequence[Record]) -> str:
  """'test top-1 error (%)', or 'validation top-1 error (%), 1 crop', as the runs evaluated."""
  splits = sorted({r.get('curve_split', 'test') for r in records})
  crops = sorted({r.get('curve_crops', 1) for r in records})
  views = f', {"/".join(map(str, crops))} crop{"s" if crops != [1] else ""}' if crops != [1] else ''
  return f'{"/".join(splits)} top-1 error (%){views}'


def write_report(sweep_dir: str, train_window: int = 5) -> list[str]:
  """Writes summary.json (one record per run), summary.md and curves.png; returns their paths."""
  records = collect_runs(sweep_dir, train_window)
  os.makedirs(sweep_dir, exist_ok=True)
  paths = [os.path.join(sweep_dir, n) for n in ('summary.json', 'summary.md', 'curves.png')]
  with open(paths[0], 'w') as f:
    json.dump(records, f, indent=2)
  with open(paths[1], 'w') as f:
    f.write(f'# Sweep {os.path.basename(os.path.abspath(sweep_dir))}\n\n')
    f.write(markdown_table(records, train_window))
    if records:
      f.write('\n![curves](curves.png)\n')
  if records:
    plot_curves(sweep_dir, records, paths[2])
  else:
    paths.pop()
  return paths
