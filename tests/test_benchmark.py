"""Smoke tests of the benchmarks: scripts/benchmark.py (a tiny net, a few steps, every JSON field
present and sane), benchmark_input.py (old vs new pipelines), benchmark_e2e.py and benchmark_bn.py.

One in-process run (one compile of the train and eval steps) keeps this fast; torch is compared
only when it is installed (it is an optional extra).
"""

import importlib.util
import json
import os

import pytest

_SCRIPT = os.path.join(os.path.dirname(__file__), '..', 'scripts', 'benchmark.py')


def _has_torch():
  return importlib.util.find_spec('torch') is not None


def test_benchmark_smoke_json(capsys):
  spec = importlib.util.spec_from_file_location('benchmark_script', _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  torch = _has_torch()
  module.main(
    [
      '--model',
      'resnet8',
      '--batch-size',
      '8',
      '--image-size',
      '8',
      '--steps',
      '2',
      '--warmup',
      '1',
      '--block',
      '1',
      '--json',
    ]
    + (['--compare-torch'] if torch else [])
  )
  r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  for key in (
    'images_per_sec',
    'compile_s',
    'eval_images_per_sec',
    'eval_compile_s',
    'step_ms_median',
    'macs_per_image',
    'flops_per_image',
    'achieved_tflops',
    'devices',
    'batch_size',
    'image_size',
    'steps_timed',
  ):
    assert r[key] > 0, (key, r[key])
  assert r['model'] == 'resnet8' and r['dtype'] == 'float32' and r['platform'] == 'cpu'
  assert r['devices'] == 4 and r['steps_timed'] == 2  # conftest simulates 4 CPU devices
  assert r['jax_version'] and isinstance(r['loadavg_start'], list)
  if torch:
    for key in ('torch_images_per_sec', 'ratio_jax_over_torch', 'torch_eval_images_per_sec'):
      assert r[key] > 0, (key, r[key])
  else:
    assert 'torch_images_per_sec' not in r


def _script(name):
  path = os.path.join(os.path.dirname(__file__), '..', 'scripts', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'{name}_script', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_benchmark_input_smoke_old_and_new(capsys, tmp_path):
  module = _script('benchmark_input')
  assert (
    module.main(
      [
        '--smoke',
        '--compare-old',
        '--pipelines',
        'imagenet_train,cifar_train',
        '--data_dir',
        str(tmp_path),
        '--json',
      ]
    )
    == 0
  )
  r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  rows = {(x['pipeline'], x['impl']): x for x in r['results']}
  assert set(rows) == {(p, i) for p in ('imagenet_train', 'cifar_train') for i in ('new', 'old')}
  for row in rows.values():
    assert row['workers'] == 0 and row['examples_per_sec'] > 0 and row['cpu_s'] >= 0
    per_core = row['examples_per_core_sec']  # None when the smoke run is below the OS's CPU tick
    assert per_core is None or per_core * row['cores_per_7500_images_per_sec'] == pytest.approx(
      7500, rel=0.01
    )
  # the new pipeline moves uint8: a quarter of the old float32 bytes per example
  for p in ('imagenet_train', 'cifar_train'):
    assert rows[(p, 'old')]['bytes_per_example'] == 4 * rows[(p, 'new')]['bytes_per_example']


def test_benchmark_input_bad_dataset_is_one_line(capsys, tmp_path):
  module = _script('benchmark_input')
  assert (
    module.main(
      [
        '--dataset',
        'no_such_dataset_xyz',
        '--data_dir',
        str(tmp_path),
        '--pipelines',
        'cifar_train',
        '--workers',
        '0',
      ]
    )
    == 1
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error:')


def test_benchmark_e2e_smoke(capsys, tmp_path):
  module = _script('benchmark_e2e')
  assert module.main(['--smoke', '--data_dir', str(tmp_path), '--json']) == 0
  r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert r['images_per_sec'] > 0 and r['step_only_images_per_sec'] > 0
  assert 0 <= r['data_wait_fraction'] <= 1
  assert r['host_cores'] is None or r['host_cores'] > 0  # None: below the OS's CPU tick
  assert r['devices'] == 4 and r['steps'] == 4


def test_benchmark_e2e_without_warmup_runs_and_negative_counts_are_refused(capsys, tmp_path):
  """--warmup 0 ended in UnboundLocalError ('metrics'); --warmup/--prefetch -1 were taken."""
  module = _script('benchmark_e2e')
  for flag in ('--warmup', '--prefetch'):
    with pytest.raises(SystemExit):
      module.parse([flag, '-1'])
    assert 'error:' in capsys.readouterr().err
  tiny = '--generated tiny --arch resnet8 --batch-size 8 --image-size 16 --dtype float32'
  argv = [*tiny.split(), '--workers', '0', '--steps', '2', '--step-only-steps', '1']
  assert module.main([*argv, '--warmup', '0', '--data_dir', str(tmp_path), '--json']) == 0
  r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert r['steps'] == 2 and r['images_per_sec'] > 0


def test_benchmark_bn_collectives_by_scope():
  module = _script('benchmark_bn')
  assert module.scopes(12, 4) == [
    ('whole_batch', None),
    ('per_device', 3),
    ('two_devices', 6),
    ('straddling', 4),
  ]
  hlo = (
    '  %ar = (f32[3,3]{1,0}, /*index=1*/f32[4]{0}) all-reduce(%a, %b), replica_groups={}\n'
    '  %ag = f32[8,2]{1,0} all-gather-start(%c), dimensions={0}\n'
    '  ROOT %x = f32[2]{0} add(%d, %e)\n'
  )
  c = module.collectives(hlo)
  assert c['all-reduce'] == {'count': 1, 'bytes': 4 * 13}
  assert c['all-gather'] == {'count': 1, 'bytes': 4 * 16}
  per_device = module.measure('resnet8', 12, 8, 3, 1, 'float32')
  straddling = module.measure('resnet8', 12, 8, 4, 1, 'float32')
  assert per_device['collectives']['all-gather']['count'] == 0
  assert straddling['collectives']['all-gather']['count'] > 0  # groups straddle devices


@pytest.mark.parametrize(
  'script,args',
  [
    ('benchmark', ['--batch-size', '0']),  # a JAX traceback
    ('benchmark', ['--batch-size', '-2']),  # 'negative dimensions are not allowed' traceback
    ('benchmark', ['--steps', '0']),  # timed 1 step and reported it
    ('benchmark', ['--image-size', '0']),
    ('benchmark', ['--num-classes', '0']),
    ('benchmark', ['--warmup', '-1']),
    ('benchmark_bn', ['--batch-size', '0']),  # a ZeroDivisionError traceback
    ('benchmark_bn', ['--steps', '0']),
    ('benchmark_input', ['--batches', '0']),
    ('benchmark_input', ['--rounds', '0']),
  ],
)
def test_sizes_and_counts_out_of_range_are_one_line(script, args, capsys):
  module = _script(script)
  with pytest.raises(SystemExit) as e:
    module.main([*args, '--json'])
  assert e.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: ') and 'expected' in err[0], err


def test_benchmark_input_reports_no_core_count_below_the_cpu_clock_tick():
  """One 10 ms CPU tick over a 0.26 ms window was printed as 38.99 cores on a 2-core machine."""
  rates = _script('benchmark_input').rates  # host_cpu.rates, the one rule of both benchmarks
  short = rates(64, 0.000256, 0.01)
  assert short['examples_per_sec'] == 250000.0 and short['cpu_s'] == 0.01
  assert short['cores_used'] is None and short['examples_per_core_sec'] is None
  long = rates(640, 0.5, 0.8)
  assert long['cores_used'] == 1.6 and long['examples_per_core_sec'] == 800.0
  assert long['cores_per_7500_images_per_sec'] == 9.38


def test_benchmark_e2e_reports_no_core_count_below_the_cpu_clock_tick():
  """host_cores had the floor benchmark_input's figure had; it now uses that script's one rule."""
  e2e = _script('benchmark_e2e')
  assert e2e.cores.__module__ == 'host_cpu' == _script('benchmark_input').rates.__module__
  assert e2e.cores(0.01, 0.000256) is None and e2e.cores(0.8, 0.5) == 1.6


@pytest.mark.parametrize('workers,least', [('0', 4), ('0,2', 24)])
def test_benchmark_input_refuses_too_few_batches_for_its_buffers(workers, least, capsys):
  """--batches 2 timed batches the prefetch buffers held before the window (249,537 examples/s)."""
  module = _script('benchmark_input')
  assert module.min_timed_batches(2, int(workers.split(',')[-1])) == least
  with pytest.raises(SystemExit) as e:
    module.main(['--batches', str(least - 1), '--workers', workers, '--pipelines', 'cifar_train'])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 1 and len(err) == 1 and err[0].startswith('error: --batches'), err
  assert f'at least {least}' in err[0]


@pytest.mark.parametrize('peak', ['-1', '0', 'nan', 'inf', 'x'])
def test_benchmark_refuses_a_peak_that_makes_no_mfu(peak, capsys):
  """--peak-tflops -1 printed mfu -0.0334 (and 0 was silently no MFU at all)."""
  with pytest.raises(SystemExit) as e:
    _script('benchmark').main(['--model', 'resnet8', '--peak-tflops', peak])
  assert e.value.code != 0 and 'positive number' in capsys.readouterr().err


@pytest.mark.parametrize('flag', ['--workers=-2', '--workers=,', '--workers=a', '--prefetch=-1'])
def test_benchmark_input_bad_counts_are_one_line(flag, capsys):
  """--workers=-2 ran and was reported as 'workers=-2', --workers=, printed no rows and exit 0,
  --prefetch=-1 was taken."""
  with pytest.raises(SystemExit) as e:
    _script('benchmark_input').main(['--smoke', '--pipelines', 'cifar_train', flag])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code != 0 and len(err) == 1 and err[0].startswith('error:'), err
