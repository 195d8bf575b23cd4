"""Smoke test of scripts/benchmark.py: a tiny net, a few steps, every JSON field present and sane.

One in-process run (one compile of the train and eval steps) keeps this fast; torch is compared
only when it is installed (it is an optional extra).
"""
import importlib.util
import json
import os

_SCRIPT = os.path.join(os.path.dirname(__file__), '..', 'scripts', 'benchmark.py')


def _has_torch():
  return importlib.util.find_spec('torch') is not None


def test_benchmark_smoke_json(capsys):
  spec = importlib.util.spec_from_file_location('benchmark_script', _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  torch = _has_torch()
  module.main(['--model', 'resnet8', '--batch-size', '8', '--image-size', '8', '--steps', '2',
               '--warmup', '1', '--block', '1', '--json'] + (['--compare-torch'] if torch else []))
  r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  for key in ('images_per_sec', 'compile_s', 'eval_images_per_sec', 'eval_compile_s',
              'step_ms_median', 'macs_per_image', 'flops_per_image', 'achieved_tflops',
              'devices', 'batch_size', 'image_size', 'steps_timed'):
    assert r[key] > 0, (key, r[key])
  assert r['model'] == 'resnet8' and r['dtype'] == 'float32' and r['platform'] == 'cpu'
  assert r['devices'] == 4 and r['steps_timed'] == 2  # conftest simulates 4 CPU devices
  assert r['jax_version'] and isinstance(r['loadavg_start'], list)
  if torch:
    for key in ('torch_images_per_sec', 'ratio_jax_over_torch', 'torch_eval_images_per_sec'):
      assert r[key] > 0, (key, r[key])
  else:
    assert 'torch_images_per_sec' not in r
