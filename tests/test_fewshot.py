"""Few-shot linear probes (BiT, Kolesnikov et al. 2020; big_vision's fewshot_lsr): k images per
class drawn per seed, a closed-form ridge classifier on the features before the classifier,
its test error; during training (`config.evals`) and from `evaluate --fewshot`."""

import json
import os

import jax
import numpy as np
import pytest

from resnet_jax import evaluators, fewshot, train, validation
from resnet_jax.default_config import load_sibling_config
from resnet_jax.evaluate import evaluate_workdir
from tests import runner
from tests.test_train_loop import ArrayBatches, ListWriter

_CONFIGS = os.path.join(os.path.dirname(__file__), '..', 'configs', 'x.py')


def test_the_ridge_probe_is_least_squares_on_standardised_features_with_a_bias_feature():
  """Equal to scikit-learn's Ridge (no intercept) on [standardised x, 100] with +-1 targets, in
  both the primal (more images than features) and the dual (fewer) forms."""
  from sklearn.linear_model import Ridge

  rng = np.random.default_rng(0)
  for n, d in [(60, 8), (12, 40)]:
    x, y = rng.normal(size=(n, d)), rng.integers(0, 4, n)
    test_x, test_y = rng.normal(size=(200, d)), rng.integers(0, 4, 200)
    mean, std = x.mean(0), x.std(0) + 1e-5
    design = lambda f: np.c_[(f - mean) / std, np.full(len(f), 100.0)]
    ridge = Ridge(alpha=3.0, fit_intercept=False, solver='cholesky')
    ridge.fit(design(x), 2.0 * np.eye(4)[y] - 1.0)
    expected = np.mean(np.argmax(ridge.predict(design(test_x)), 1) != test_y)
    assert fewshot.ridge_error(x, y, test_x, test_y, 4, 3.0) == pytest.approx(expected)


def test_separable_classes_are_classified_without_error_from_one_shot_each():
  centres = np.eye(3) * 10
  rng = np.random.default_rng(1)
  test_y = rng.integers(0, 3, 50)
  test_x = centres[test_y] + rng.normal(scale=0.1, size=(50, 3))
  assert fewshot.ridge_error(centres, np.arange(3), test_x, test_y, 3, 1.0) == 0.0
  # a wrong label on a training image costs test errors: the probe learns from the shots
  assert fewshot.ridge_error(centres, np.array([1, 0, 2]), test_x, test_y, 3, 1.0) > 0.3


def test_shots_are_drawn_per_class_nested_and_seeded():
  labels = np.array([0] * 10 + [1] * 10 + [2] * 3)
  one, five = (fewshot.draw_shots(labels, 3, k, seed=0) for k in (1, 5))
  assert np.bincount(labels[five], minlength=3).tolist() == [5, 5, 3]  # class 2 has only 3
  assert set(one) <= set(five)  # the 5-shot draw holds the 1-shot one (same seed)
  assert np.array_equal(fewshot.draw_shots(labels, 3, 5, seed=0), five)
  draws = {tuple(fewshot.draw_shots(labels, 3, 5, seed=s)) for s in range(4)}
  assert len(draws) > 1


def test_probe_errors_average_the_seeds_and_count_short_classes():
  rng = np.random.default_rng(2)
  train_y = np.array([0] * 6 + [1] * 6 + [2] * 2)
  train_x = np.eye(3)[train_y] * 5 + rng.normal(size=(14, 3))
  test_y = rng.integers(0, 3, 30)
  test_x = np.eye(3)[test_y] * 5 + rng.normal(size=(30, 3))
  probe = fewshot.Probe(shots=(1, 4), seeds=3)
  out = fewshot.probe_errors((train_x, train_y), (test_x, test_y), 3, probe)
  for k in (1, 4):
    assert len(out[f'top1_error_{k}shot_seeds']) == 3
    assert out[f'top1_error_{k}shot'] == pytest.approx(np.mean(out[f'top1_error_{k}shot_seeds']))
  assert 'classes_short_1shot' not in out and out['classes_short_4shot'] == 1
  assert (out['num_examples'], out['num_train_examples']) == (30, 14)


def _config(evals=None):
  config = load_sibling_config(_CONFIGS, 'digits').get_config('depth=8,steps=4,batch=16')
  config.update_from_flattened_dict({'log_every_steps': 2, 'eval_every_steps': 4})
  config.progress_bar = False
  for name, spec in (evals or {}).items():
    config.evals[name] = spec
  return config


def test_a_probe_during_training_equals_evaluate_fewshot_of_the_final_checkpoint(tmp_path):
  config = _config({'fewshot': {'shots': '1,5', 'seeds': 2, 'every_steps': 0}})
  writer = ListWriter()
  run = str(tmp_path / 'run')
  result = train.train_and_evaluate(config, run, train_iter=ArrayBatches(16), writer=writer)
  records = [r for r in writer.records if r['split'] == 'fewshot']
  assert [r['step'] for r in records] == [4]
  assert {'top1_error_1shot', 'top1_error_5shot', 'num_examples'} <= set(records[0])
  got = result['evals']['fewshot']
  assert (got['split'], got['train_split'], got['seeds'], got['num_examples']) == (
    'test',
    'train',
    2,
    360,
  )
  assert len(got['top1_error_5shot_seeds']) == 2
  alone = evaluate_workdir(run, probe=fewshot.Probe(shots=(1, 5), seeds=2, train_split=''))
  for k in (1, 5):
    assert alone[f'top1_error_{k}shot'] == got[f'top1_error_{k}shot']
  assert alone['num_train_examples'] == 1437 and alone['step'] == 4
  saved = json.loads((tmp_path / 'run' / 'results.json').read_text())
  assert saved['evals']['fewshot']['top1_error_1shot'] == got['top1_error_1shot']


def test_the_probed_features_are_what_the_classifier_reads():
  """`pre_logits` (sown by the ResNet) is the classifier's input: fc(pre_logits) = the logits."""
  from resnet_jax.models import create_model

  model = create_model('resnet8', num_classes=5)
  x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
  variables = model.init(jax.random.key(0), x, train=False)
  logits, state = model.apply(variables, x, train=False, mutable=['intermediates'])
  pre = state['intermediates']['pre_logits'][0]
  fc = variables['params']['fc']
  np.testing.assert_allclose(pre @ fc['kernel'] + fc['bias'], logits, rtol=1e-5, atol=1e-5)
  assert pre.shape == (2, fc['kernel'].shape[0])
  plain = model.apply(variables, x, train=False)  # without 'intermediates' mutable: logits only
  assert isinstance(plain, jax.Array) and 'intermediates' not in variables


@pytest.mark.parametrize(
  'spec,match',
  [
    ({'shots': '0,5'}, r'evals\.bad\.shots must be positive counts'),
    ({'shots': 'five'}, r'evals\.bad\.shots must be positive counts'),
    ({'seeds': 2}, 'seeds belong to a few-shot probe: add shots'),
    ({'shots': '5', 'seeds': 0}, r'evals\.bad\.seeds must be positive'),
    ({'shots': '5', 'l2_reg': -1.0}, r'evals\.bad\.l2_reg must be a positive number'),
    ({'shots': '5', 'crops': 10}, 'one centre view: drop crops/scales'),
    ({'shots': '5', 'train_split': 'no_such_split'}, 'no_such_split'),
  ],
)
def test_a_bad_probe_is_refused_before_anything_is_written(tmp_path, spec, match):
  config = _config({'bad': spec})
  with pytest.raises((validation.ConfigError, ValueError), match=match):
    train.train_and_evaluate(config, str(tmp_path / 'run'), train_iter=ArrayBatches(16))
  assert not (tmp_path / 'run').exists()


def test_a_probe_may_read_a_dataset_of_other_classes(tmp_path):
  """A CIFAR-10 run probed on CIFAR-100 (100 classes): refused as a test set, measured as a
  probe, with the shots drawn from CIFAR-100's train split."""
  import tensorflow_datasets as tfds

  config = load_sibling_config(_CONFIGS, 'cifar').get_config('depth=8,bn_group=8,steps=1')
  config.batch_size = 8
  config.progress_bar = False
  config.data.data_dir = str(tmp_path / 'tfds')
  config.evals.c100 = {'dataset': 'cifar100', 'shots': '1,2', 'seeds': 1, 'every_steps': 0}
  run = str(tmp_path / 'run')
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    result = train.train_and_evaluate(config, run)
    alone = evaluate_workdir(
      run, dataset='cifar100', probe=fewshot.Probe((1, 2), 1, train_split='')
    )
  got = result['evals']['c100']
  assert (got['dataset'], got['split'], got['train_split'], got['num_examples']) == (
    'cifar100',
    'test',
    'train',
    24,
  )
  assert got['top1_error_2shot'] == alone['top1_error_2shot']
  assert alone['dataset'] == 'cifar100' and alone['num_train_examples'] == 24


def test_evaluate_fewshot_on_the_command_line(tmp_path):
  """The CLI's promise: one JSON line with each shot count's error; bad flags: one error line."""
  workdir = str(tmp_path / 'w')
  train.train_and_evaluate(_config(), workdir, train_iter=ArrayBatches(16))
  out = runner.run_evaluate(workdir, '--fewshot', '1,10', '--seeds', '2', fast_compile=True)
  assert out['top1_error_10shot'] < out['top1_error_1shot'] <= 1.0
  assert len(out['top1_error_10shot_seeds']) == 2 and out['train_split'] == 'train'
  for args, needle in [
    (('--fewshot', '0'), 'positive counts'),
    (('--seeds', '2'), 'go with --fewshot'),
    (('--fewshot', '5', '--crops', '10'), 'leave out --crops'),
    (('--fewshot', '5', '--l2-reg', 'nan'), 'positive number'),
  ]:
    proc = runner.run_cli('resnet_jax.evaluate', '--workdir', workdir, *args)
    runner.assert_one_line_error(proc, needle)


def test_a_probes_records_keep_the_means_and_its_summary_each_seed():
  """metrics.jsonl / TensorBoard get one scalar per k; results.json also each seed's error."""
  probe = fewshot.Probe(shots=(1, 5), seeds=2, train_split='train')
  evaluator = evaluators.Evaluator('fs', 'test', 1, (), 0, 8, 'cifar100', probe)
  result = {'num_examples': 9, 'num_train_examples': 30, 'classes_short_5shot': 1}
  result.update(top1_error_1shot=0.5, top1_error_1shot_seeds=[0.4, 0.6])
  result.update(top1_error_5shot=0.25, top1_error_5shot_seeds=[0.25, 0.25])
  assert evaluators.record_of(result) == {
    'num_examples': 9,
    'top1_error_1shot': 0.5,
    'top1_error_5shot': 0.25,
  }
  summary = evaluator.summary(result)
  assert summary['top1_error_1shot_seeds'] == [0.4, 0.6] and summary['dataset'] == 'cifar100'
  assert (summary['train_split'], summary['seeds'], summary['l2_reg']) == ('train', 2, 1024.0)
  assert evaluator.describe() == 'cifar100 train -> test, 1,5-shot linear probe, 2 seeds'
