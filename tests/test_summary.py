"""Analytic MAC counts, per-stage shapes and the `python -m resnet_jax.summary` CLI."""

import json
import subprocess
import sys

import pytest

from resnet_jax.models import create_model
from resnet_jax.summary import analyze, main


def stages(summary):
  return {row['name']: row for row in summary['stages']}


@pytest.mark.parametrize(
  'name,v15,paper_v1',
  [
    ('resnet18', 1.814, 1.8),
    ('resnet34', 3.664, 3.6),
    ('resnet50', 4.089, 3.8),
    ('resnet101', 7.801, 7.6),
    ('resnet152', 11.514, 11.3),
  ],
)
def test_imagenet_macs(name, v15, paper_v1):
  macs = analyze(create_model(name), 224)['macs']
  assert macs / 1e9 == pytest.approx(v15, rel=0.01)
  macs_v1 = analyze(create_model(name, stride_on='1x1'), 224)['macs']
  assert macs_v1 / 1e9 == pytest.approx(paper_v1, rel=0.03)


@pytest.mark.parametrize('n', [1, 3, 9])
def test_cifar_macs_match_hand_count(n):
  """Stem + 2n 3x3 convs per stage (the first of stages 2, 3 strided) + dense, option A."""
  conv = lambda hw, cin, cout: hw * hw * cout * 9 * cin
  expected = conv(32, 3, 16) + 2 * n * conv(32, 16, 16)
  expected += conv(16, 16, 32) + (2 * n - 1) * conv(16, 32, 32)
  expected += conv(8, 32, 64) + (2 * n - 1) * conv(8, 64, 64) + 64 * 10
  assert analyze(create_model(f'resnet{6 * n + 2}'), 32)['macs'] == expected


def test_stage_output_shapes_follow_table_1():
  s = stages(analyze(create_model('resnet50'), 224))
  assert [
    s[k]['output_shape'] for k in ('stem', 'layer1', 'layer2', 'layer3', 'layer4', 'head')
  ] == [[112, 112, 64], [56, 56, 256], [28, 28, 512], [14, 14, 1024], [7, 7, 2048], [1000]]
  s = stages(analyze(create_model('resnet18'), 224))
  assert [s[f'layer{i}']['output_shape'][:2] for i in range(1, 5)] == [
    [56, 56],
    [28, 28],
    [14, 14],
    [7, 7],
  ]
  s = stages(analyze(create_model('resnet20'), 32))
  assert [s[f'layer{i}']['output_shape'] for i in range(1, 4)] == [
    [32, 32, 16],
    [16, 16, 32],
    [8, 8, 64],
  ]


@pytest.mark.parametrize('name,size', [('resnet34', 224), ('resnet56', 32)])
def test_option_a_equals_plain_and_c_gt_b_gt_a(name, size):
  a, b, c = (analyze(create_model(name, shortcut=k), size) for k in 'ABC')
  plain = analyze(create_model(name, residual=False), size)
  assert (plain['params'], plain['macs']) == (a['params'], a['macs'])
  assert c['macs'] > b['macs'] > a['macs'] and c['params'] > b['params'] > a['params']


def test_stage_totals_add_up():
  summary = analyze(create_model('resnet101'), 224)
  assert sum(r['params'] for r in summary['stages']) == summary['params'] == 44_549_160
  assert sum(r['macs'] for r in summary['stages']) == summary['macs']


def test_cli_json(capsys):
  main(['resnet20', '--json'])
  out = json.loads(capsys.readouterr().out)
  assert out['params'] == 269_722 and isinstance(out['macs'], int)
  main(['resnet20', '--plain', '--shortcut', 'C', '--num-classes', '100', '--json'])
  plain = json.loads(capsys.readouterr().out)
  assert plain['params'] == 269_722 + 90 * 65 and plain['residual'] is False
  main(['resnet50', '--stride-on', '1x1', '--image-size', '448', '--json'])
  big = json.loads(capsys.readouterr().out)
  base = analyze(create_model('resnet50', stride_on='1x1'), 224)['macs']
  fc = 2048 * 1000
  assert big['macs'] == 4 * (base - fc) + fc  # every feature map doubles in each direction


def test_cli_table_and_errors():
  proc = subprocess.run(
    [sys.executable, '-m', 'resnet_jax.summary', 'resnet18'],
    capture_output=True,
    text=True,
    check=True,
  )
  lines = proc.stdout.splitlines()
  assert any(l.startswith('layer4') and '7x7x512' in l for l in lines)
  assert any(l.startswith('total') and '11,689,512' in l and '1,814,' in l for l in lines)
  bad = subprocess.run(
    [sys.executable, '-m', 'resnet_jax.summary', 'resnet21'], capture_output=True, text=True
  )
  assert bad.returncode == 1 and 'resnet{6n+2}' in bad.stderr


def test_scanned_model_summary_equals_unrolled():
  """A scan body is traced once; analyze counts the scanned net as its unrolled twin."""
  for kw in [dict(), dict(block='bottleneck', preact=True)]:
    name = 'resnet56' if not kw else 'resnet29'
    assert analyze(create_model(name, scan=True, **kw), 32) == analyze(create_model(name, **kw), 32)


@pytest.mark.parametrize(
  'args',
  [['--image-size', '0'], ['--image-size', '-5'], ['--num-classes', '0'], ['--num-classes', '-1']],
)
def test_sizes_that_are_not_positive_are_refused(args, capsys):
  """0 silently meant the default (224 / 1000 classes), -5 a 0.002 GMAC net, -1 a traceback."""
  with pytest.raises(SystemExit) as e:
    main(['resnet50', *args, '--json'])
  assert e.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'expected a positive integer' in err[0], err
