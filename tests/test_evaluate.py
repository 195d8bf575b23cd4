"""Evaluation (issue 4, DESIGN "Evaluation"): every example exactly once, any devices and batch."""

import json
import os

import jax
import optax
import pytest
import tensorflow_datasets as tfds

from resnet_jax import evaluate, train
from resnet_jax.default_config import load_sibling_config
from resnet_jax.evaluate import run_evaluation, run_multiscale_evaluation
from resnet_jax.models import create_model
from resnet_jax.multiscale import network_stride
from resnet_jax.train_step import create_mesh, init_state, jit_eval_step, model_variables
from tests.runner import ROOT, env_with_devices, results, run_cli, run_evaluate, run_main

CONFIGS = ROOT + '/configs/x.py'


def _digits_state(mesh):
  model = create_model('resnet8', num_classes=10)
  state = init_state(model, optax.sgd(0.1), (8, 8, 1), seed=0, mesh=mesh)
  return model_variables(state), jit_eval_step(mesh, model.apply), model


@pytest.mark.parametrize(
  'num_devices,batch_size,crops', [(1, 7, 1), (1, 50, 10), (4, 64, 1), (4, 1000, 1), (4, 50, 10)]
)
def test_every_example_counted_once(num_devices, batch_size, crops):
  config = load_sibling_config(CONFIGS, 'digits').get_config('depth=8')
  config.eval_batch_size = batch_size
  mesh = create_mesh(jax.devices()[:num_devices])
  variables, eval_step, _ = _digits_state(mesh)
  result = run_evaluation(eval_step, variables, config, mesh, split='test', crops=crops)
  assert result['num_examples'] == 360
  assert 0.0 <= result['top5_error'] <= result['top1_error'] <= 1.0


def test_result_does_not_depend_on_batch_or_devices():
  config = load_sibling_config(CONFIGS, 'digits').get_config('depth=8')
  out = []
  for n, bs in [(1, 360), (4, 52)]:
    config.eval_batch_size = bs
    mesh = create_mesh(jax.devices()[:n])
    variables, eval_step, _ = _digits_state(mesh)
    out.append(run_evaluation(eval_step, variables, config, mesh, split='test'))
  assert out[0]['top1_error'] == out[1]['top1_error']
  assert out[0]['loss'] == pytest.approx(out[1]['loss'], rel=1e-5)


def test_multiscale_averages_over_scales():
  """Table 4 testing through the configured pipeline: the mean of single-scale runs' probs."""
  config = load_sibling_config(CONFIGS, 'digits').get_config('depth=8')
  config.eval_batch_size = 100
  mesh = create_mesh()
  variables, _, model = _digits_state(mesh)
  assert network_stride(model) == 4
  result = run_multiscale_evaluation(
    model.apply, variables, config, mesh, scales=[8, 12], stride=4, split='test', crops=2
  )
  assert result['num_examples'] == 360
  assert 0.0 <= result['top5_error'] <= result['top1_error'] <= 1.0
  with pytest.raises(ValueError, match='crops 1 or 2'):
    run_multiscale_evaluation(
      model.apply, variables, config, mesh, scales=[8], stride=4, split='test', crops=10
    )


def test_cifar_config_trains_and_evaluates_under_mock_data(tmp_path):
  """configs/cifar.py end to end (paper augmentations, per-pixel mean, ghost BN) on mock CIFAR."""
  config = load_sibling_config(CONFIGS, 'cifar').get_config('depth=8,bn_group=8')
  config.batch_size = 16
  config.eval_batch_size = 24
  config.num_train_steps = 3
  config.log_every_steps = 1
  config.progress_bar = False
  config.data.data_dir = str(tmp_path / 'tfds')
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert result['step'] == 3
  assert result['eval']['num_examples'] == 40
  model = create_model('resnet8', num_classes=10)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, 32, 32, 3))))
  assert result['params'] == sum(x.size for x in jax.tree.leaves(shapes['params']))


def test_a_cifar10_run_is_evaluated_on_cifar10_1_and_refused_on_other_label_spaces(tmp_path):
  """CIFAR-10.1 (Recht et al. 2018) is a new test set for CIFAR-10's classifiers: --dataset reads
  it through the run's own eval preprocessing; datasets with other classes or channels are
  refused, not scored (mnist has CIFAR-10's 10 classes, but grey images)."""
  config = load_sibling_config(CONFIGS, 'cifar').get_config('depth=8,bn_group=8,steps=1')
  config.batch_size = 8
  config.progress_bar = False
  config.data.data_dir = str(tmp_path / 'tfds')
  run = str(tmp_path / 'run')
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    train.train_and_evaluate(config, run)
    got = evaluate.evaluate_workdir(run, dataset='cifar10_1', crops=2)
    assert (got['dataset'], got['split'], got['num_examples'], got['step']) == (
      'cifar10_1',
      'test',
      24,
      1,
    )
    assert 'dataset' not in evaluate.evaluate_workdir(run)  # the run's own test split
    with pytest.raises(ValueError, match='cifar100 has 100 classes .* cifar10, which has 10'):
      evaluate.evaluate_workdir(run, dataset='cifar100')
    with pytest.raises(ValueError, match='mnist has 1-channel images'):
      evaluate.evaluate_workdir(run, dataset='mnist')


@pytest.mark.slow
def test_evaluate_cli_matches_the_training_run(tmp_path):
  workdir = str(tmp_path / 'run')
  proc = run_main(
    workdir, '--config.num_train_steps=20', '--config.batch_size=32', '--config.log_every_steps=10'
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  config_path = os.path.join(workdir, 'config.json')  # as written before model.block existed
  with open(config_path) as f:
    config = json.load(f)
  del config['model']['block']
  with open(config_path, 'w') as f:
    json.dump(config, f)
  got = run_evaluate(workdir, '--batch_size=44', devices=4, fast_compile=True)
  assert got['num_examples'] == 360 and got['step'] == 20
  assert got['loss'] == pytest.approx(results(workdir)['eval']['loss'], rel=1e-4)
  ten = run_evaluate(workdir, '--crops=10', devices=4, fast_compile=True)
  # --crops=10 is the paper's 10-crop testing, not the run's 1-crop eval under another name
  assert ten['num_examples'] == 360 and ten['loss'] != pytest.approx(got['loss'], rel=1e-3)
  got = run_evaluate(
    workdir, '--scales=8,12', '--crops=2', '--precise-bn=2', devices=4, fast_compile=True
  )
  assert got['num_examples'] == 360 and got['scales'] == [8, 12] and got['precise_bn_batches'] == 2
  bad = run_cli('resnet_jax.evaluate', f'--workdir={tmp_path}/nothing', env=env_with_devices(4))
  assert bad.returncode == 1 and bad.stderr.strip().startswith('error:')


@pytest.mark.slow
def test_evaluate_reads_a_scanned_run_with_several_blocks_per_stage(tmp_path):
  """The README's demo net (ResNet-14: two blocks a stage, scanned on the CPU) read back by
  `evaluate`: the restored tree is already scanned (it failed with 'stage 1 has 1 blocks')."""
  workdir = str(tmp_path / 'run')
  proc = run_main(
    workdir,
    '--config.num_train_steps=2',
    '--config.batch_size=16',
    '--config.model.scan=true',
    config='configs/digits.py:depth=14',
    devices=1,
    fast_compile=True,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = run_evaluate(workdir, fast_compile=True)
  assert got['num_examples'] == 360 and got['step'] == 2
  assert got['loss'] == pytest.approx(results(workdir)['eval']['loss'], rel=1e-4)


@pytest.mark.parametrize(
  'flag,bad', [(f, b) for f in ('--batch-size', '--precise-bn') for b in ('0', '-2', 'x', '1.5')]
)
def test_bad_counts_are_one_error_line(flag, bad, tmp_path, capsys):
  """--batch-size 0 meant the run's own eval batch size and -1 failed deep in JAX: bad input."""
  with pytest.raises(SystemExit) as e:
    evaluate.main(['--workdir', str(tmp_path), flag, bad])
  assert e.value.code == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith('error:') and len(err.splitlines()) == 1 and flag in err


def test_evaluate_reads_a_moved_dataset_from_data_dir(tmp_path, capsys):
  """config.json keeps the data_dir the run read; --data-dir points evaluate at where it is now."""
  config = load_sibling_config(CONFIGS, 'digits').get_config('depth=8,steps=2,batch=16')
  config.update_from_flattened_dict({'data.data_dir': str(tmp_path / 'a'), 'progress_bar': False})
  trained = train.train_and_evaluate(config, str(tmp_path / 'run'))
  (tmp_path / 'a').rename(tmp_path / 'b')
  evaluate.main(['--workdir', str(tmp_path / 'run'), '--data-dir', str(tmp_path / 'b')])
  got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert got['num_examples'] == 360 and got['step'] == 2
  assert got['loss'] == pytest.approx(trained['eval']['loss'], rel=1e-5)
  assert not (tmp_path / 'a').exists()  # without the flag the digits would be prepared again there
  with pytest.raises(SystemExit):  # a mistyped --data-dir: it made that directory and digits in it
    evaluate.main(['--workdir', str(tmp_path / 'run'), '--data-dir', str(tmp_path / 'c')])
  err = capsys.readouterr().err.strip()
  assert err == f'error: --data-dir {tmp_path / "c"} is not a directory: name where the data is now'
  assert not (tmp_path / 'c').exists()


def test_out_of_device_memory_is_one_line_other_runtime_errors_are_not_hidden(
  tmp_path, capsys, monkeypatch
):
  """`--scales 3000` on digits (a 3000 x 3000 whole image) ended in a JaxRuntimeError traceback
  'RESOURCE_EXHAUSTED: Out of memory allocating 725760001280 bytes' (2026-11-24). Raised here
  without the allocation: really attempting it costs ~30 s of a shared machine."""

  def raising(message):
    def evaluate_workdir(*args, **kwargs):
      raise jax.errors.JaxRuntimeError(message)

    return evaluate_workdir

  oom = 'RESOURCE_EXHAUSTED: Out of memory allocating 725760001280 bytes.'
  monkeypatch.setattr(evaluate, 'evaluate_workdir', raising(oom))
  with pytest.raises(SystemExit) as e:
    evaluate.main(['--workdir', str(tmp_path), '--scales', '3000'])
  assert e.value.code == 1
  err = capsys.readouterr().err.strip()
  hint = 'use a smaller --batch-size or smaller --scales'
  assert err == f'error: out of device memory ({oom}): {hint}'
  monkeypatch.setattr(evaluate, 'evaluate_workdir', raising('INTERNAL: a bug'))
  with pytest.raises(jax.errors.JaxRuntimeError, match='a bug'):  # a bug keeps its traceback
    evaluate.main(['--workdir', str(tmp_path)])


def test_real_accuracy_counts_a_prediction_in_the_label_set_and_skips_empty_sets():
  """ReaL (Beyer et al. 2020): top-1 is right when it is any of the image's reassessed labels;
  images whose set is empty, and padding, are not counted."""
  import numpy as np

  probs = np.array(
    [
      [0.1, 0.7, 0.2],  # predicts 1, set {1, 2}: right
      [0.6, 0.3, 0.1],  # predicts 0, set {2}: wrong
      [0.2, 0.2, 0.6],  # predicts 2, empty set: not counted
      [0.1, 0.1, 0.8],  # predicts 2, set {2}, but padding: not counted
      [0.5, 0.4, 0.1],  # predicts 0, set {0, 1, 2}: right
    ],
    np.float32,
  )
  sets = np.array([[0, 1, 1], [0, 0, 1], [0, 0, 0], [0, 0, 1], [1, 1, 1]], bool)
  mask = np.array([True, True, True, False, True])
  sums = jax.device_get(evaluate.label_set_sums(probs, sets, mask))
  assert (int(sums['set_count']), int(sums['set_top1_right'])) == (3, 2)
  totals = {'loss': 1.0, 'top1_errors': 1.0, 'top5_errors': 0.0, 'count': 4.0, **sums}
  result = evaluate._finish(totals, 'validation', None)
  assert result['real_num_examples'] == 3 and result['real_top1_error'] == pytest.approx(1 / 3)
