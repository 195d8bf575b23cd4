"""Sweeps: grid planning, the runner's skip/failure handling, aggregation, table and plot.

Most tests write synthetic run directories (config.json / metrics.jsonl / results.json) in
tmp_path; one end-to-end test runs a real tiny digits sweep and the Fig. 7 analysis on it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

from resnet_jax.analysis import sweep, sweep_report
from tests.runner import FAST_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script():
  spec = importlib.util.spec_from_file_location(
    'sweep_script', os.path.join(ROOT, 'scripts', 'sweep.py')
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def write_run(
  sweep_dir,
  name,
  *,
  depth,
  residual=True,
  dataset='cifar10',
  shortcut='A',
  seed=0,
  train_errors=(0.5, 0.3, 0.2, 0.1),
  test_error=0.09,
  finished=True,
  params=1000,
  **model_fields,
):
  """A synthetic run directory with the files train.py writes."""
  d = sweep_dir / name
  d.mkdir(parents=True)
  config = {
    'seed': seed,
    'model': {
      'name': f'resnet{depth}',
      'residual': residual,
      'shortcut': shortcut,
      'preact': False,
      **model_fields,
    },
    'data': {'name': dataset, 'eval_crops': 1},
  }
  (d / 'config.json').write_text(json.dumps(config))
  lines = []
  for i, e in enumerate(train_errors):
    lines.append({'step': 10 * (i + 1), 'split': 'train', 'loss': 2 * e, 'top1_error': e})
  lines.append(
    {
      'step': 10 * len(train_errors),
      'split': 'eval',
      'loss': 1.0,
      'top1_error': test_error,
      'top5_error': 0.0,
      'num_examples': 100,
    }
  )
  (d / 'metrics.jsonl').write_text(''.join(json.dumps(l) + '\n' for l in lines) + '{"torn')
  if finished:
    (d / 'results.json').write_text(
      json.dumps(
        {
          'step': 10 * len(train_errors),
          'params': params,
          'wall_time_s': 12.0,
          'eval': {'loss': 1.0, 'top1_error': test_error, 'top5_error': 0.0, 'num_examples': 100},
        }
      )
    )
  return d


def test_plan_runs_names_and_grid():
  runs = sweep.plan_runs([20, 56], ['residual', 'plain'])
  assert [r.name for r in runs] == ['residual20', 'plain20', 'residual56', 'plain56']
  runs = sweep.plan_runs([34], ['residual', 'plain'], shortcuts=['A', 'B', 'C'], seeds=[0, 1])
  names = [r.name for r in runs]
  assert names[:2] == ['residual34_A_s0', 'residual34_A_s1']
  assert 'plain34_s0' in names and len(names) == 8  # a plain net has no shortcut to sweep
  with pytest.raises(ValueError):
    sweep.plan_runs([20], ['resnet'])


def test_config_arg_replaces_swept_keys():
  spec = sweep.RunSpec('plain56', 56, 'plain', None, None)
  assert (
    spec.config_arg('configs/cifar.py:depth=20,val=5000,shortcut=B')
    == 'configs/cifar.py:val=5000,shortcut=B,depth=56,plain'
  )
  spec = sweep.RunSpec('residual34_C', 34, 'residual', 'C', 1)
  assert (
    spec.config_arg('configs/imagenet.py:plain,shortcut=A')
    == 'configs/imagenet.py:depth=34,shortcut=C'
  )
  cmd = sweep.run_command(spec, 'configs/imagenet.py', '/tmp/x', ['--config.batch_size=8'])
  assert cmd[-2:] == ['--config.seed=1', '--config.batch_size=8']
  assert '--workdir=/tmp/x/residual34_C' in cmd


def test_run_sweep_skips_finished_and_reports_failures(tmp_path, monkeypatch):
  write_run(tmp_path, 'residual8', depth=8)
  launched = []

  def fake_command(spec, base, sweep_dir, overrides):
    launched.append(spec.name)
    return [sys.executable, '-c', 'import sys; sys.exit(3)']

  monkeypatch.setattr(sweep, 'run_command', fake_command)
  messages = []
  status = sweep.run_sweep(
    sweep.plan_runs([8], ['residual', 'plain']),
    'configs/digits.py',
    str(tmp_path),
    parallel=2,
    echo=messages.append,
  )
  assert launched == ['plain8']
  assert status == {'residual8': 0, 'plain8': 3}
  assert any('FAILED (exit 3)' in m for m in messages)


def test_aggregation_table_and_plot(tmp_path):
  write_run(tmp_path, 'residual20_s0', depth=20, seed=0, test_error=0.08)
  write_run(tmp_path, 'residual20_s1', depth=20, seed=1, test_error=0.10)
  write_run(tmp_path, 'plain20_s0', depth=20, residual=False, train_errors=(0.6, 0.5, 0.4, 0.4))
  write_run(tmp_path, 'plain56_s0', depth=56, residual=False, finished=False, test_error=0.3)
  (tmp_path / 'not_a_run').mkdir()

  records = sweep_report.collect_runs(str(tmp_path), train_window=2)
  assert [r['run'] for r in records] == [
    'plain20_s0',
    'plain56_s0',
    'residual20_s0',
    'residual20_s1',
  ]
  plain20 = records[0]
  assert plain20['variant'] == 'plain' and plain20['shortcut'] is None
  assert plain20['train_top1_error'] == pytest.approx(0.4)  # mean of the last 2 train points
  assert plain20['train_loss'] == pytest.approx(0.8)
  assert records[1]['finished'] is False and records[1]['test_top1_error'] == 0.3
  assert records[2]['paper_top1_error_pct'] == 8.75 and plain20['paper_top1_error_pct'] is None

  md = sweep_report.markdown_table(records, train_window=2)
  row = next(l for l in md.splitlines() if l.startswith('| ResNet-20'))
  assert '9.00 ± 1.41' in row and '8.75 (Table 6)' in row and '| 2 |' in row
  assert 'plain-56 *' in md and 'not finished' in md

  paths = sweep_report.write_report(str(tmp_path), train_window=2)
  assert [os.path.basename(p) for p in paths] == ['summary.json', 'summary.md', 'curves.png']
  assert len(json.loads((tmp_path / 'summary.json').read_text())) == 4
  assert (tmp_path / 'curves.png').read_bytes()[:4] == b'\x89PNG'


def test_a_run_selecting_on_held_out_images_reports_its_test_error(tmp_path):
  """cifar.py:val=N: the main eval is the held-out validation split; Table 6 is test error."""
  d = write_run(tmp_path, 'residual20', depth=20, test_error=0.12)  # the validation figure
  config = json.loads((d / 'config.json').read_text())
  config['data'].update(eval_split='validation', validation_size=5000)
  config['evals'] = {'test': {'split': 'test'}}
  (d / 'config.json').write_text(json.dumps(config))
  results = json.loads((d / 'results.json').read_text())
  test = {'loss': 0.5, 'top1_error': 0.07, 'top5_error': 0.0, 'num_examples': 10000}
  results['evals'] = {'test': {**test, 'split': 'test', 'crops': 1}}
  (d / 'results.json').write_text(json.dumps(results))
  with open(d / 'metrics.jsonl', 'a') as f:
    f.write('\n' + json.dumps({'step': 40, 'split': 'test', **test}) + '\n')

  (record,) = sweep_report.collect_runs(str(tmp_path))
  assert (record['test_top1_error'], record['test_split'], record['curve']) == (
    0.07,
    'test',
    'test',
  )
  assert '| 7.00 | 8.75 (Table 6) |' in sweep_report.markdown_table([record])
  (d / 'results.json').unlink()  # unfinished: the newest logged test point
  (record,) = sweep_report.collect_runs(str(tmp_path))
  assert record['test_top1_error'] == 0.07 and not record['finished']


def test_imagenet_curves_are_centre_crop_as_in_fig_4_while_the_table_is_10_crop():
  from resnet_jax.default_config import load_sibling_config

  config = load_sibling_config(os.path.join(ROOT, 'configs', 'x.py'), 'imagenet').get_config('')
  table, curve = sweep_report.reported_evaluators(config)
  assert (table.name, table.split, table.crops) == ('eval', 'validation', 10)
  assert (curve.name, curve.split, curve.crops) == ('center_crop', 'validation', 1)
  config = load_sibling_config(os.path.join(ROOT, 'configs', 'x.py'), 'cifar').get_config('')
  assert [e.name for e in sweep_report.reported_evaluators(config)] == ['eval', 'eval']


def test_a_run_with_one_logged_point_is_visible_in_the_plot(tmp_path, monkeypatch):
  """A short sweep (steps < log_every_steps) logs one train point per run: drawn as a line
  alone it was invisible, and the training panels came out empty."""
  import matplotlib.pyplot as plt

  write_run(tmp_path, 'residual8', depth=8, train_errors=(0.5,))
  write_run(tmp_path, 'plain8', depth=8, residual=False, train_errors=(0.6,))
  figures = []
  close = plt.close
  monkeypatch.setattr(plt, 'close', lambda fig=None: (figures.append(fig), close(fig)))
  sweep_report.write_report(str(tmp_path))
  (fig,) = figures
  for ax in fig.axes:
    lines = ax.get_lines()
    assert len(lines) == 2 and all(l.get_marker() not in (None, 'None', '') for l in lines)


def test_imagenet_paper_numbers_match_configuration():
  from resnet_jax.analysis.paper_numbers import paper_error

  assert paper_error('imagenet2012', 'residual', 34, 'C') == (24.19, 'Table 3')
  assert paper_error('imagenet2012', 'plain', 18, 'B') == (27.94, 'Table 2')
  assert paper_error('imagenet2012', 'residual', 18, 'B') is None  # Table 2 used option A
  assert paper_error('digits', 'residual', 20, 'A') is None


def test_preact_runs_get_he_2016_numbers_and_their_own_rows(tmp_path):
  from resnet_jax.analysis.paper_numbers import paper_error

  assert paper_error('cifar10', 'residual', 1001, 'B', True, 'bottleneck') == (
    4.92,
    'He et al. 2016, Table 3',
  )
  assert paper_error('cifar10', 'residual', 164, 'B', True, 'basic') is None  # not that net
  assert paper_error('cifar10', 'residual', 164, 'A', True, 'bottleneck') is None
  assert paper_error('cifar10', 'residual', 164, 'B', False, 'bottleneck') is None
  write_run(tmp_path, 'bottleneck164', depth=164, shortcut='B', preact=True, block='bottleneck')
  write_run(tmp_path, 'basic164', depth=164, preact=True)
  records = sweep_report.collect_runs(str(tmp_path))
  assert [r['block'] for r in records] == ['basic', 'bottleneck']
  assert [r['paper_top1_error_pct'] for r in records] == [None, 5.46]
  assert len(sweep_report.group_runs(records)) == 2
  assert [sweep_report.label(r) for r in records] == [
    'ResNet-164 (pre-act)',
    'ResNet-164 (pre-act, bottleneck)',
  ]


def test_preact_bottleneck_experiment_builds_the_papers_net():
  """The registry entry's config string gives He et al. 2016's ResNet-164 (1.7M weights)."""
  import jax
  import jax.numpy as jnp

  from resnet_jax import runtime
  from resnet_jax.default_config import load_sibling_config
  from resnet_jax.train_step import count_params

  experiment = _load_script().load_registry().get('preact_bottleneck')
  assert experiment.depths == '164,1001' and experiment.variants == 'residual'
  path, _, arg = experiment.config.partition(':')
  assert path == 'configs/cifar.py'
  cifar = load_sibling_config(os.path.join(ROOT, path), 'cifar')
  config = cifar.get_config(f'{arg},depth=164')
  assert (config.model.block, config.model.shortcut, config.schedule.warmup_steps) == (
    'bottleneck',
    'B',
    400,
  )
  model = runtime.build_model(config, num_classes=10)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  assert count_params(variables['params']) == 1_703_258


def test_experiment_registry_fills_the_grid():
  script = _load_script()
  args, overrides = script.parse_args(
    ['--experiment=table3_34', '--workdir=/tmp/x', '--config.batch_size=64']
  )
  assert (args.config, args.depths, args.variants, args.shortcuts) == (
    'configs/imagenet.py:recipe=paper',
    '34',
    'residual',
    'A,B,C',
  )
  assert overrides == ['--config.batch_size=64']
  with pytest.raises(SystemExit):
    script.parse_args(['--workdir=/tmp/x', '--config=configs/digits.py', '--depths=8', '--oops'])


def test_bad_grid_is_one_line_before_anything_runs_or_is_written(tmp_path, capsys):
  """Bad depths/seeds/variants/experiment were tracebacks; a bad --config, config arg or depth
  launched every run to fail alone (and still wrote summary files); a file as --workdir, and
  --report-only on a missing directory (which it created), are refused too."""
  script = _load_script()
  (tmp_path / 'afile').write_text('')
  (tmp_path / 'broken.py').write_text('x = (\n')
  sweep_dir = tmp_path / 'sweep'
  digits = f'{ROOT}/configs/digits.py'
  cases = [
    ([f'--config={digits}', '--depths=abc'], '--depths takes'),
    ([f'--config={digits}', '--depths=-8'], '--depths takes'),
    ([f'--config={digits}', '--depths=8', '--seeds=a'], '--seeds takes'),
    ([f'--config={digits}', '--depths=8', '--variants=foo'], 'variants must be'),
    ([f'--config={digits}', '--depths=15'], "unknown model name 'resnet15'"),
    ([f'--config={digits}:depht=3', '--depths=8'], "unknown config argument 'depht'"),
    ([f'--config={tmp_path}/missing.py', '--depths=8'], 'does not exist'),
    ([f'--config={tmp_path}/broken.py', '--depths=8'], 'SyntaxError'),
    ([f'--config={digits}', '--depths=8', '--parallel=0'], 'positive integer'),
    ([f'--config={digits}', '--depths=8', '--parallel=2', '--devices=0'], '1 device groups'),
    (['--experiment=nope'], "unknown experiment 'nope'"),
    (['--report-only'], 'no sweep directory'),
  ]
  for extra, needle in cases:
    with pytest.raises(SystemExit) as e:
      script.main([f'--workdir={sweep_dir}', *extra])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and needle in err[0], (extra, err)
    assert not sweep_dir.exists(), extra
  with pytest.raises(SystemExit):
    script.main([f'--workdir={tmp_path}/afile', f'--config={digits}', '--depths=8'])
  assert 'is a file' in capsys.readouterr().err
  run = write_run(tmp_path, 'residual20', depth=20)  # one run given for its sweep: was a
  for extra in (['--report-only'], [f'--config={digits}', '--depths=8']):  # 'no runs' report
    with pytest.raises(SystemExit):  # written into the run, or runs nested inside it
      script.main([f'--workdir={run}', *extra])
    assert 'is a training run, not a sweep directory' in capsys.readouterr().err
  assert sorted(os.listdir(run)) == ['config.json', 'metrics.jsonl', 'results.json']


@pytest.mark.slow
def test_end_to_end_digits_sweep_and_responses(tmp_path, monkeypatch):
  """One command: 2 depths x {residual, plain} on digits, then the three outputs and Fig. 7."""
  # One CPU device per run (less to compile), XLA's fast compilation (4 models, 3 steps each).
  monkeypatch.setenv('XLA_FLAGS', FAST_COMPILE)
  sweep_dir = tmp_path / 'sweep'
  rc = _load_script().main(
    [
      f'--config={ROOT}/configs/digits.py',
      f'--workdir={sweep_dir}',
      '--depths=8,14',
      '--variants=residual,plain',
      '--parallel=4',
      '--config.num_train_steps=3',
      '--config.log_every_steps=1',
      '--config.eval_every_steps=0',
      '--config.checkpoint_every_steps=0',
    ]
  )
  assert rc == 0
  for name in ('summary.json', 'summary.md', 'curves.png'):
    assert (sweep_dir / name).exists()
  records = json.loads((sweep_dir / 'summary.json').read_text())
  assert sorted(r['run'] for r in records) == ['plain14', 'plain8', 'residual14', 'residual8']
  assert all(r['finished'] and r['steps'] == 3 for r in records)

  from resnet_jax.analysis import responses

  out = tmp_path / 'fig7.png'
  assert (
    responses.main(
      [
        f'--workdir={sweep_dir / "plain8"}',
        f'--workdir={sweep_dir / "residual8"}',
        f'--out={out}',
        '--max_examples=100',
      ]
    )
    == 0
  )
  values = json.loads((tmp_path / 'fig7.json').read_text())
  assert [v['label'] for v in values] == ['plain-8', 'ResNet-8']
  assert all(len(v['std']) == 7 and v['num_examples'] == 100 for v in values)  # stem + 6 convs
  assert out.read_bytes()[:4] == b'\x89PNG'


def test_runs_of_several_datasets_are_told_apart_in_table_and_plot(tmp_path, monkeypatch):
  write_run(tmp_path, 'residual20', depth=20)
  write_run(tmp_path, 'residual20_svhn', depth=20, dataset='svhn')
  table = sweep_report.markdown_table(sweep_report.collect_runs(str(tmp_path)))
  assert '| ResNet-20 (cifar10) |' in table and '| ResNet-20 (svhn) |' in table, table
  labels = []
  import matplotlib.axes  # noqa: PLC0415

  real_plot = matplotlib.axes.Axes.plot
  monkeypatch.setattr(
    matplotlib.axes.Axes,
    'plot',
    lambda self, *a, **k: labels.append((k['label'], k['color'])) or real_plot(self, *a, **k),
  )
  sweep_report.plot_curves(
    str(tmp_path), sweep_report.collect_runs(str(tmp_path)), str(tmp_path / 'c.png')
  )
  names = {n for n, _ in labels}
  assert names == {'ResNet-20 (cifar10)', 'ResNet-20 (svhn)'}, names
  assert len({c for _, c in labels}) == 2  # not one colour for two datasets' curves


def test_one_damaged_run_does_not_stop_the_report(tmp_path, capsys):
  write_run(tmp_path, 'residual20', depth=20)
  torn = write_run(tmp_path, 'residual32', depth=32)
  (torn / 'results.json').write_text('{"step": 4')  # e.g. copied off a machine mid-transfer
  (write_run(tmp_path, 'residual56', depth=56) / 'results.json').write_text('{"step": 4}')
  bad = write_run(tmp_path, 'residual44', depth=44)
  (bad / 'config.json').write_text('{')
  paths = sweep_report.write_report(str(tmp_path))
  records = json.loads(open(paths[0]).read())
  assert [(r['run'], r['finished']) for r in records] == [
    ('residual20', True),
    ('residual32', False),  # newest logged numbers, marked unfinished; the sweep trains it again
    ('residual56', False),  # a results.json without its 'eval' figures: the same
  ]
  assert not sweep.is_finished(str(torn)) and sweep.is_finished(str(tmp_path / 'residual20'))
  err = capsys.readouterr().err
  assert 'skipped' in err and 'residual44' in err, err


def test_wide_resnets_of_two_widths_are_two_rows_with_their_paper_numbers(tmp_path):
  """wrn16_4 and wrn16_8 were averaged as two 'seeds' of 'ResNet-16 (pre-act)', and WRN-28-10
  never got Zagoruyko & Komodakis's number; a ResNeXt got the paper's ResNet-50 number."""
  for name, depth, test_error, dropout in (
    ('wrn16_4', 16, 0.09, 0.0),
    ('wrn16_8', 16, 0.13, 0.0),
    ('wrn28_10', 28, 0.05, 0.3),
  ):
    d = write_run(
      tmp_path,
      name,
      depth=depth,
      shortcut='B',
      preact=True,
      test_error=test_error,
      dropout_rate=dropout,
    )
    cfg = json.loads((d / 'config.json').read_text())
    cfg['model']['name'] = name
    (d / 'config.json').write_text(json.dumps(cfg))
  records = sweep_report.collect_runs(str(tmp_path))
  rows = {
    line.split(' | ')[0].lstrip('| '): line.split(' | ')
    for line in sweep_report.markdown_table(records).splitlines()
    if line.startswith('| ') and not line.startswith('| model')
  }
  assert set(rows) == {'WRN-16-4', 'WRN-16-8', 'WRN-28-10 (dropout 0.3)'}, rows
  assert rows['WRN-16-4'][3] == '1' and rows['WRN-16-4'][7] == '9.00'  # one seed, its own error
  assert rows['WRN-28-10 (dropout 0.3)'][8].startswith('3.89 (Zagoruyko')
  d = write_run(tmp_path / 'x', 'x50', depth=50, shortcut='B', dataset='imagenet2012')
  cfg = json.loads((d / 'config.json').read_text())
  cfg['model']['name'] = 'resnext50_32x4d'
  (d / 'config.json').write_text(json.dumps(cfg))
  (rec,) = sweep_report.collect_runs(str(tmp_path / 'x'))
  assert sweep_report.label(rec) == 'resnext50_32x4d' and rec['paper_top1_error_pct'] is None
