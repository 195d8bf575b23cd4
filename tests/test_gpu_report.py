"""scripts/gpu_report.py in its tiny CPU mode: every row runs, both files are written and agree."""

import importlib.util
import json
import os
import sys

import pytest

_SCRIPT = os.path.join(os.path.dirname(__file__), '..', 'scripts', 'gpu_report.py')


def _load():
  spec = importlib.util.spec_from_file_location('gpu_report_script', _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_tiny_report_writes_markdown_and_json(tmp_path, capsys):
  module = _load()
  assert module.main(['--out', str(tmp_path), '--tiny']) == 0
  capsys.readouterr()
  report = json.loads((tmp_path / 'gpu_report.json').read_text())
  md = (tmp_path / 'gpu_report.md').read_text()
  assert report['tiny'] and report['platform'] == 'cpu' and report['devices'] == 4
  assert report['complete']
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


def test_set_overrides_reach_the_config_and_unknown_keys_are_refused():
  module = _load()
  assert module.parse_override('model.scan=false') == ('model.scan', False)
  assert module.parse_override('model.bn_group_size=32') == ('model.bn_group_size', 32)
  assert module.parse_override('dtype=bfloat16') == ('dtype', 'bfloat16')
  row = dict(module.plan(tiny=True)[0], overrides={'model.scan': False, 'dtype': 'float32'})
  config = module.lib.recipe_config(row)
  assert config.model.scan is False and config.dtype == 'float32'
  with pytest.raises(ValueError, match='no key'):
    module.lib.recipe_config(dict(row, overrides={'model.scn': True}))


# The header fields of a gpu_report.json part, for the --merge tests.
_REPORT_HEAD = {
  'date': 'd',
  'tiny': True,
  'platform': 'cpu',
  'device_kind': 'cpu',
  'devices': 1,
  'jax_version': '0',
  'cpu_count': 2,
  'xla_flags': '',
  'end_to_end': None,
}


def test_partial_reports_merge_into_one(tmp_path):
  module = _load()
  base = dict(_REPORT_HEAD, torch_version=None)
  part_rows = (
    [{'name': 'a', 'batch_size': 8, 'error': 'x'}],
    [{'name': 'b', 'batch_size': 8, 'error': 'y'}],
  )
  paths = []
  for i, rows in enumerate(part_rows):
    path = tmp_path / f'{i}.json'
    path.write_text(json.dumps(dict(base, rows=rows, wall_s=1.5, command=f'part {i}')))
    paths.append(str(path))
  assert module.main(['--out', str(tmp_path / 'all'), '--merge', *paths]) == 0
  merged = json.loads((tmp_path / 'all' / 'gpu_report.json').read_text())
  assert [r['name'] for r in merged['rows']] == ['a', 'b'] and merged['wall_s'] == 3.0
  (tmp_path / 'other.json').write_text(
    json.dumps(dict(base, device_kind='gpu', rows=[], wall_s=1, command='c'))
  )
  assert (
    module.main(['--out', str(tmp_path / 'x'), '--merge', paths[0], str(tmp_path / 'other.json')])
    == 1
  )


def test_merge_refuses_what_is_not_a_report_and_keeps_a_cut_off_part_partial(tmp_path, capsys):
  module = _load()
  base = dict(_REPORT_HEAD, wall_s=1.0, command='c')
  ok = tmp_path / 'ok.json'
  ok.write_text(
    json.dumps(
      dict(base, complete=True, rows=[{'name': 'a', 'batch_size': 8, 'images_per_sec': 1}])
    )
  )
  cut = tmp_path / 'cut.json'
  cut.write_text(json.dumps(dict(base, complete=False, rows=[])))
  assert module.main(['--out', str(tmp_path / 'm'), '--merge', str(ok), str(cut)]) == 0
  capsys.readouterr()
  assert json.loads((tmp_path / 'm' / 'gpu_report.json').read_text())['complete'] is False
  assert '(partial' in (tmp_path / 'm' / 'gpu_report.md').read_text()
  for i, text in enumerate(('[]', '{"rows": []}')):  # valid JSON, not a report: one line
    (tmp_path / f'bad{i}.json').write_text(text)
    assert (
      module.main(['--out', str(tmp_path / 'm'), '--merge', str(tmp_path / f'bad{i}.json')]) == 1
    )
    assert 'is not a gpu_report.json' in capsys.readouterr().err
  (tmp_path / 'file').write_text('')  # --out names a file: refused, not a traceback
  assert module.main(['--out', str(tmp_path / 'file'), '--merge', str(ok)]) == 1
  assert capsys.readouterr().err.startswith('error: cannot create --out')
  with pytest.raises(SystemExit):  # 0 steps was silently the default (2 or 30)
    module.main(['--out', str(tmp_path / 'z'), '--steps', '0'])
  assert 'positive' in capsys.readouterr().err and not (tmp_path / 'z').exists()


def test_a_run_cut_off_after_its_rows_leaves_a_partial_report(tmp_path, monkeypatch, capsys):
  """The device tool's calls end at a time limit: what was measured must already be on disk."""
  module = _load()

  def cut_off(tiny):
    raise KeyboardInterrupt

  monkeypatch.setattr(module.lib, 'end_to_end', cut_off)
  with pytest.raises(KeyboardInterrupt):
    module.main(['--out', str(tmp_path), '--tiny', '--rows', 'cifar', '--no-torch', '--no-grow'])
  capsys.readouterr()
  report = json.loads((tmp_path / 'gpu_report.json').read_text())
  assert report['complete'] is False and [r['model'] for r in report['rows']] == ['resnet8']
  assert report['rows'][0]['images_per_sec'] > 0
  assert '(partial' in (tmp_path / 'gpu_report.md').read_text()


def test_peak_lookup():
  module = _load()
  assert module.lib.peak_tflops('NVIDIA H100 80GB HBM3', 'bfloat16') == 989.0
  assert module.lib.peak_tflops('NVIDIA H200', 'float32') == 494.0
  assert module.lib.peak_tflops('cpu', 'bfloat16') is None


def test_profile_names_where_the_device_time_goes():
  """`--profile`: kernel names from an H100 trace of the ResNet-50 step fall into the right
  categories, and a traced tiny step's categories add up to its device time."""
  module = _load()
  category = module.lib.kernel_profile.category
  names = {
    'sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64': (
      'convolutions'
    ),
    'void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop_optimized_bf16>': (
      'convolutions'
    ),
    'nvjet_sm90_tst_256x128_64x4_1x2_h_bx_coopA_bias_TNT': 'matmuls',
    'input_scatter_fusion': 'pooling',
    'loop_reduce_window_fusion': 'pooling',
    'input_reduce_fusion_108': 'reductions',
    'loop_convert_fusion_3': 'elementwise',
    'loop_select_fusion_1': 'elementwise',
    'void nhwcAddPaddingKernel<__nv_bfloat16, __nv_bfloat16, float, true>': (
      'copies, memsets, padding'
    ),
    'Memset 3': 'copies, memsets, padding',
  }
  assert {n: category(n) for n in names} == names
  row = dict(module.plan(tiny=True)[-1], overrides={})  # the CIFAR row: resnet8 at 8x8
  profile = module.lib.jax_row(row, steps=1, profile=True)['profile']
  assert profile['kernels_per_step'] > 0 and profile['device_ms_per_step'] > 0
  assert sum(profile['ms_per_step'].values()) == pytest.approx(
    profile['device_ms_per_step'], abs=0.01
  )
  assert 'Device time per step' in '\n'.join(
    module.lib.kernel_profile.markdown([dict(row, name='r', batch_size=8, profile=profile)])
  )


def test_a_profiler_that_cannot_start_costs_the_row_nothing(monkeypatch):
  module = _load()

  def no_cupti(path):
    raise RuntimeError('CUPTI not found\nmore')

  monkeypatch.setattr(module.lib.kernel_profile.jax.profiler, 'start_trace', no_cupti)
  row = dict(module.plan(tiny=True)[-1], overrides={})
  result = module.lib.jax_row(row, steps=1, profile=True)
  assert result['images_per_sec'] > 0
  assert result['profile'] == {'error': 'RuntimeError: CUPTI not found'}
  assert module.lib.kernel_profile.markdown([dict(result, name='r')]) == []


def test_a_torch_that_does_not_load_leaves_the_jax_rows(tmp_path, monkeypatch, capsys):
  """A torch found on the path whose import fails (a CUDA library missing) failed the whole report
  after its JAX rows, writing nothing; now the rows are written and the table says why."""
  fake = tmp_path / 'site' / 'torch'
  fake.mkdir(parents=True)
  (fake / '__init__.py').write_text("raise ImportError('libcudnn.so.9: cannot open shared object')")
  monkeypatch.syspath_prepend(str(tmp_path / 'site'))
  monkeypatch.delitem(sys.modules, 'torch', raising=False)
  module = _load()
  module.lib.torch_import_error.cache_clear()
  try:
    argv = ['--out', str(tmp_path / 'r'), '--tiny', '--rows', 'cifar', '--no-e2e', '--no-grow']
    assert module.main(argv) == 0
  finally:
    module.lib.torch_import_error.cache_clear()
  capsys.readouterr()
  report = json.loads((tmp_path / 'r' / 'gpu_report.json').read_text())
  assert report['torch_version'] is None and 'libcudnn' in report['torch_error']
  assert report['rows'][0]['images_per_sec'] > 0
  assert 'torch unusable (ImportError: libcudnn' in (tmp_path / 'r' / 'gpu_report.md').read_text()
