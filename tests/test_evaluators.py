"""Evaluators declared in the config: each its own split, views and cadence, beside the main one."""

import json
import os

import pytest

from resnet_jax import evaluators, train, validation
from resnet_jax.default_config import load_sibling_config
from resnet_jax.evaluate import evaluate_workdir
from tests.test_train_loop import ArrayBatches, ListWriter

_CONFIGS = os.path.join(os.path.dirname(__file__), '..', 'configs', 'x.py')


def _config(evals=None):
  config = load_sibling_config(_CONFIGS, 'digits').get_config('depth=8,steps=6,batch=16')
  config.update_from_flattened_dict(
    {'log_every_steps': 2, 'eval_every_steps': 4, 'checkpoint_every_steps': 4}
  )
  config.progress_bar = False
  for name, spec in (evals or {}).items():
    config.evals[name] = spec
  return config


def test_each_evaluator_runs_on_its_cadence_and_equals_evaluating_the_final_checkpoint(tmp_path):
  config = _config(
    {
      'ten_crop': {'crops': 10, 'every_steps': 0},  # only at the end
      'train_set': {'split': 'train', 'every_steps': 2, 'batch_size': 100},
      'multiscale': {'scales': '8,12', 'crops': 2, 'batch_size': 50, 'every_steps': 0},
    }
  )
  writer = ListWriter()
  result = train.train_and_evaluate(
    config, str(tmp_path), train_iter=ArrayBatches(16), writer=writer
  )

  def steps(split):
    return [r['step'] for r in writer.records if r['split'] == split]

  assert steps('eval') == [4, 6]  # the main evaluator is unchanged
  assert steps('train_set') == [2, 4, 6] and steps('ten_crop') == [6] and steps('multiscale') == [6]
  assert result['eval_split'] == 'test' and result['eval']['num_examples'] == 360
  evals = result['evals']
  assert sorted(evals) == ['multiscale', 'ten_crop', 'train_set']
  assert evals['train_set']['split'] == 'train' and evals['train_set']['num_examples'] == 1437
  assert evals['multiscale']['scales'] == [8, 12] and evals['multiscale']['crops'] == 2
  # The figures are what `python -m resnet_jax.evaluate` reports for the final checkpoint.
  for name, kwargs in [
    ('ten_crop', {'crops': 10}),
    ('train_set', {'split': 'train', 'batch_size': 100}),
    ('multiscale', {'scales': [8, 12], 'crops': 2, 'batch_size': 50}),
  ]:
    alone = evaluate_workdir(str(tmp_path), **kwargs)
    assert alone['num_examples'] == evals[name]['num_examples'], name
    assert alone['top1_error'] == evals[name]['top1_error'], name
    assert alone['loss'] == pytest.approx(evals[name]['loss'], rel=1e-5), name
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved['evals'] == evals

  # A finished run, rerun, evaluates them all again and records nothing new.
  again = ListWriter()
  again.records = list(writer.records)
  rerun = train.train_and_evaluate(config, str(tmp_path), train_iter=ArrayBatches(16), writer=again)
  assert again.records == writer.records and rerun['evals'] == evals


def test_a_run_without_extra_evaluators_writes_no_evals_key(tmp_path):
  config = _config()
  config.num_train_steps = 2
  result = train.train_and_evaluate(
    config, str(tmp_path), train_iter=ArrayBatches(16), writer=ListWriter()
  )
  assert 'evals' not in result and result['eval']['num_examples'] == 360


@pytest.mark.parametrize(
  'spec,match',
  [
    ({'crops': 3}, r'evals\.bad\.crops must be 1 or 2 or 10'),
    ({'scales': '8,12', 'crops': 10}, r'crops must be 1 or 2 with scales'),
    ({'scales': '8,-1'}, r'evals\.bad\.scales must be positive sizes'),
    ({'crop': 10}, r'unknown field\(s\) crop'),
    ({'every_steps': '5'}, r'every_steps must be an integer'),
    ({'batch_size': 0}, r'batch_size must be positive'),
    ({'split': 7}, r'split must be a split name'),
  ],
)
def test_a_bad_evaluator_is_refused_before_anything_is_written(tmp_path, spec, match):
  with pytest.raises(validation.ConfigError, match=match):
    train.train_and_evaluate(_config({'bad': spec}), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('name', ['train', 'eval'])
def test_an_evaluator_may_not_take_the_name_of_the_train_or_main_records(name):
  with pytest.raises(validation.ConfigError, match='the name must be an identifier other than'):
    evaluators.from_config(_config({name: {'split': 'test'}}))


def test_defaults_follow_the_main_evaluator():
  config = _config({'more': {}})
  main, more = evaluators.from_config(config)
  assert (main.name, main.split, main.crops, main.every_steps) == ('eval', 'test', 1, 4)
  assert (more.split, more.crops, more.scales, more.every_steps) == ('test', 1, (), 4)
  assert more.batch_size == config.eval_batch_size
  assert more.due(8, at_end=False) and not more.due(6, at_end=False) and more.due(6, at_end=True)


def test_the_paper_configs_declare_the_evaluations_the_paper_reports():
  imagenet = load_sibling_config(_CONFIGS, 'imagenet')
  paper = {e.name: e for e in evaluators.from_config(imagenet.get_config('depth=34'))}
  # Tables 2-3 are 10-crop; Fig. 4 plots centre-crop validation error during training.
  assert (paper['eval'].split, paper['eval'].crops) == ('validation', 10)
  assert (paper['center_crop'].crops, paper['center_crop'].every_steps) == (1, 5000)
  table4 = {e.name: e for e in evaluators.from_config(imagenet.get_config('depth=152,multiscale'))}
  assert table4['multiscale'].scales == (224, 256, 384, 480, 640)
  assert table4['multiscale'].every_steps == 0
  modern = {e.name for e in evaluators.from_config(imagenet.get_config('recipe=modern'))}
  assert modern == {'eval'}
  # CIFAR with a held-out validation split still reports the test error the paper's Table 6 has.
  cifar = load_sibling_config(_CONFIGS, 'cifar')
  held_out = {e.name: e for e in evaluators.from_config(cifar.get_config('val=5000'))}
  assert held_out['eval'].split == 'validation' and held_out['test'].split == 'test'
  assert {e.name for e in evaluators.from_config(cifar.get_config(''))} == {'eval'}


def test_an_evaluator_on_another_test_set_equals_evaluate_dataset(tmp_path):
  """`dataset=cifar10_1`: CIFAR-10.1 through the run's own evaluation preprocessing, at the end
  of the run, recorded under its name with the dataset it read; the same figures as
  `evaluate --dataset=cifar10_1` of the final checkpoint."""
  import tensorflow_datasets as tfds

  config = load_sibling_config(_CONFIGS, 'cifar').get_config('depth=8,bn_group=8,steps=1')
  config.batch_size = 8
  config.progress_bar = False
  config.data.data_dir = str(tmp_path / 'tfds')
  config.evals.c101 = {'dataset': 'cifar10_1', 'every_steps': 0, 'crops': 2}
  run = str(tmp_path / 'run')
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    result = train.train_and_evaluate(config, run)
    alone = evaluate_workdir(run, dataset='cifar10_1', crops=2)
  got = result['evals']['c101']
  assert (got['dataset'], got['split'], got['crops'], got['num_examples']) == (
    'cifar10_1',
    'test',
    2,
    24,
  )
  assert got['top1_error'] == alone['top1_error']
  assert got['loss'] == pytest.approx(alone['loss'], rel=1e-5)
  assert 'dataset' not in result['eval']  # the main evaluator still reads the run's own data


@pytest.mark.parametrize(
  'spec,match',
  [
    ({'dataset': 'cifar100'}, 'cifar100 has 100 classes'),
    ({'dataset': 'mnist'}, 'mnist has 1-channel images'),
    ({'dataset': 7}, r'evals\.bad\.dataset must be a TFDS dataset name'),
  ],
)
def test_an_evaluator_on_a_test_set_of_other_classes_is_refused_before_the_run(
  tmp_path, spec, match
):
  import tensorflow_datasets as tfds

  config = load_sibling_config(_CONFIGS, 'cifar').get_config('depth=8,bn_group=8,steps=1')
  config.batch_size = 8
  config.data.data_dir = str(tmp_path / 'tfds')
  config.evals.bad = spec
  with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(ValueError, match=match):
      train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_label_set_figures_are_recorded_with_the_rest():
  """A dataset with label sets (ReaL) adds its two figures to metrics.jsonl and results.json."""
  result = {'loss': 1.0, 'top1_error': 0.5, 'top5_error': 0.1, 'num_examples': 6}
  result.update(real_top1_error=0.25, real_num_examples=4, extra='not recorded')
  evaluator = evaluators.Evaluator('real', 'validation', 1, (), 0, 8, 'imagenet2012_real')
  summary = evaluator.summary(result)
  assert summary['real_top1_error'] == 0.25 and summary['real_num_examples'] == 4
  assert summary['dataset'] == 'imagenet2012_real' and 'extra' not in summary
  assert evaluator.describe() == 'imagenet2012_real validation, 1 crop'


def test_a_test_sets_split_defaults_to_its_one_split():
  config = _config({'v2': {'dataset': 'imagenet_v2'}, 'real': {'dataset': 'imagenet2012_real'}})
  by_name = {e.name: e for e in evaluators.from_config(config)}
  assert (by_name['v2'].dataset, by_name['v2'].split) == ('imagenet_v2', 'test')
  assert (by_name['real'].dataset, by_name['real'].split) == ('imagenet2012_real', 'validation')
  own = evaluators.from_config(_config({'own': {'dataset': 'digits'}}))[1]
  assert (own.dataset, own.split) == (None, 'test')  # the run's own dataset: its eval split
