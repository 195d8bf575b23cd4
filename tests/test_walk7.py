"""Last session's features walked as a researcher would (2026-11-25): few-shot linear probes as
evaluators and from `evaluate --fewshot`, configs/bit.py's train_split / validation_size, the
CIFAR ablation sweeps."""

import os
import subprocess
import sys

import pytest
from runner import ROOT, assert_ok, env_with_devices, results

# configs/digits.py's ResNet-8 with a few-shot probe among its evaluators
_PROBE_CONFIG = f"""
from resnet_jax.default_config import load_sibling_config


def get_config(arg=None):
  c = load_sibling_config({os.path.join(ROOT, 'configs', 'x.py')!r}, 'digits').get_config(arg)
  c.evals.fs = dict(shots='1,5', seeds=2, every_steps=0)
  return c
"""


def test_a_run_with_a_few_shot_evaluator_ends_with_its_errors_on_the_done_lines(tmp_path):
  """The `done:` summary lists every extra evaluator's figures; a probe has one per shot count
  and no `top1_error`, and the run ended with a KeyError traceback (exit 1) after writing
  results.json, and again on every rerun of the finished run."""
  config = tmp_path / 'digits_fs.py'
  config.write_text(_PROBE_CONFIG)
  workdir = str(tmp_path / 'run')
  command = [
    sys.executable,
    '-m',
    'resnet_jax.main',
    f'--config={config}:depth=8,steps=2,batch=16',
    f'--workdir={workdir}',
    '--config.progress_bar=false',
  ]
  for attempt in ('trained', 'rerun of the finished run'):
    proc = subprocess.run(
      command, cwd=ROOT, env=env_with_devices(1), capture_output=True, text=True, timeout=600
    )
    assert_ok(proc)
    fs = results(workdir)['evals']['fs']
    line = (
      f'  fs: train -> test few-shot top-1 error 1-shot {100 * fs["top1_error_1shot"]:.2f}%, '
      f'5-shot {100 * fs["top1_error_5shot"]:.2f}% (360 test examples)'
    )
    assert line in proc.stdout.splitlines(), (attempt, proc.stdout)


def _config(name: str, arg: str):
  from resnet_jax.default_config import load_sibling_config

  return load_sibling_config(os.path.join(ROOT, 'configs', 'x.py'), name).get_config(arg)


def test_a_sweeps_table_and_curve_never_read_a_few_shot_probe():
  """summary.md reports the test split's classifier error (`cifar.py:val=5000` selects on the
  held-out images and reports `evals.test`) and plots the fewest-view evaluator of that split. A
  probe on the same split (a fewshot evaluator's default split is the eval split) has no
  `top1_error`: picked as the table's (its name sorts before `test`) or the curve's (1 view,
  beside ImageNet's 10-crop `eval`), `sweep.py` ended with KeyError 'top1_error'."""
  from resnet_jax.analysis import sweep_report

  config = _config('cifar', 'val=5000')
  config.evals.fewshot = dict(shots='1,5', split='test', every_steps=0)
  table, curve = sweep_report.reported_evaluators(config)
  assert (table.name, curve.name) == ('test', 'test')
  config = _config('imagenet', '')
  config.evals.a_probe = dict(shots='5')  # on `validation`, the main split
  table, curve = sweep_report.reported_evaluators(config)
  assert (table.name, table.crops, curve.name, curve.crops) == ('eval', 10, 'center_crop', 1)


def test_an_infinite_ridge_penalty_is_refused_as_evaluate_refuses_it():
  """`evaluate --l2-reg inf` stops with one line; `evals.NAME.l2_reg=float('inf')` trained and
  recorded a meaningless probe (every prediction class 0: 88 % error on digits)."""
  from resnet_jax import evaluators
  from resnet_jax.validation import ConfigError

  config = _config('digits', 'depth=8')
  for bad in (float('inf'), float('nan'), 0.0):
    config.evals.fs = dict(shots='5', l2_reg=bad)
    with pytest.raises(ConfigError, match=r'evals\.fs\.l2_reg must be a positive number'):
      evaluators.from_config(config)
  config.evals.fs = dict(shots='5', l2_reg=1e6)
  assert evaluators.from_config(config)[1].probe.l2_reg == 1e6
