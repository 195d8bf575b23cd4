"""scripts/gpu_report.py in its tiny CPU mode: every row runs, both files are written and agree."""

import importlib.util
import json
import os

_SCRIPT = os.path.join(os.path.dirname(__file__), '..', 'scripts', 'gpu_report.py')


def _load():
  spec = importlib.util.spec_from_file_location('gpu_report_script', _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_tiny_report_writes_markdown_and_json(tmp_path, capsys):
  module = _load()
  assert module.main(['--out', str(tmp_path), '--tiny']) == 0
  capsys.readouterr()
  report = json.loads((tmp_path / 'gpu_report.json').read_text())
  md = (tmp_path / 'gpu_report.md').read_text()
  assert report['tiny'] and report['platform'] == 'cpu' and report['devices'] == 4
  names = [r['name'] for r in report['rows']]
  assert len(names) == 5, names  # modern train, its larger batch, paper f32, eval, CIFAR
  for r in report['rows']:
    assert 'error' not in r, r
    assert r['images_per_sec'] > 0 and r['compile_s'] > 0 and r['tflops'] > 0
    assert r['name'] in md
  kinds = {(r['kind'], r['dtype']) for r in report['rows']}
  assert kinds == {('train', 'bfloat16'), ('train', 'float32'), ('eval', 'bfloat16')}
  e2e = report['end_to_end']
  assert e2e['images_per_sec'] > 0 and 0 <= e2e['data_wait_fraction'] <= 1
  assert e2e['host_cores'] > 0 and 'End to end' in md
  if report['torch_version']:  # every row but the larger-batch one has its torch twin
    assert all(
      r['torch_eager_images_per_sec'] > 0 and r['ratio_jax_over_best_torch'] > 0
      for r in report['rows']
      if ', batch ' not in r['name']
    ), report['rows']


def test_gpu_flags_only_without_user_flags(monkeypatch):
  module = _load()
  env = {'XLA_FLAGS': '--xla_dump_to=/tmp/x'}
  assert module.apply_gpu_xla_flags(env) == [] and env['XLA_FLAGS'] == '--xla_dump_to=/tmp/x'
  monkeypatch.setattr(module.os.path, 'exists', lambda p: p == '/dev/nvidiactl')
  env = {}
  assert module.apply_gpu_xla_flags(env) == list(module.GPU_XLA_FLAGS)
  assert 'latency_hiding_scheduler=true' in env['XLA_FLAGS']
  monkeypatch.setattr(module.os.path, 'exists', lambda p: False)
  monkeypatch.setattr(module.shutil, 'which', lambda name: None)
  env = {}
  assert module.apply_gpu_xla_flags(env) == [] and 'XLA_FLAGS' not in env


def test_peak_lookup():
  module = _load()
  assert module.peak_tflops('NVIDIA H100 80GB HBM3', 'bfloat16') == 989.0
  assert module.peak_tflops('NVIDIA H200', 'float32') == 494.0
  assert module.peak_tflops('cpu', 'bfloat16') is None
