"""Rules of this session's code that the mutation audit (a one-line change to each, one at a
time) found no test for: each test below fails on that change and passes on the code."""

import numpy as np
import pytest

from resnet_jax import losses, optim
from resnet_jax.default_config import base_config


def test_bce_threshold_is_strictly_greater_as_timms():
  """timm's BinaryCrossEntropy binarises with `target.gt(threshold)`: a target exactly at the
  threshold is a negative."""
  targets = np.array([[0.5, 0.5, 0.0]], np.float32)
  logits = np.array([[-4.0, -4.0, -4.0]], np.float32)
  got = losses.binary_cross_entropy(logits, targets, target_threshold=0.5, sum_classes=True)
  want = 3 * np.log1p(np.exp(-4.0))  # all three are negatives, each confidently right
  np.testing.assert_allclose(got, [want], rtol=1e-5)


def test_an_unknown_loss_name_is_refused_by_the_loss_itself():
  with pytest.raises(ValueError, match='loss must be one of'):
    losses.Loss(name='cross_entropy')


def test_the_polynomial_schedule_defaults_to_power_2_and_end_lr_0():
  """MLPerf's LARS rule: with schedule.power and end_lr unset, lr = peak (1 - t/T)^2 -> 0."""
  c = base_config()
  c.schedule.name = 'polynomial'
  c.schedule.base_lr = 1.0
  c.schedule.scale_with_batch = False
  c.schedule.warmup_epochs = 0
  c.schedule.warmup_steps = 10
  c.schedule.warmup = 'linear'
  lr = optim.create_learning_rate_fn(c, 10, 110)
  for step, want in [(5, 0.5), (10, 1.0), (35, 0.75**2), (60, 0.25), (110, 0.0)]:
    np.testing.assert_allclose(lr(step), want, rtol=1e-6, atol=1e-7, err_msg=f'step {step}')


def test_an_averaged_models_prefix_is_dropped_only_when_every_key_has_it():
  """AveragedModel keys are all 'module.'-prefixed; a mapping where only some are keeps its keys
  as they are (stripping a few would make keys the model does not have)."""
  from resnet_jax import torch_weights

  w = np.ones(2, np.float32)
  sets = torch_weights.weight_sets(
    {'model': {'a': w}, 'model_ema': {'module.a': w, 'b': w, 'n_averaged': np.int64(3)}}
  )
  assert list(sets['ema']) == ['module.a', 'b']
  sets = torch_weights.weight_sets(
    {'model': {'a': w}, 'model_ema': {'module.a': w, 'n_averaged': w}}
  )
  assert list(sets['ema']) == ['a']


def _updates(name, grads, fields=None, wd=0.0, params=None, leaf=('conv', 'kernel')):
  """The updates `create_optimizer` gives for a sequence of gradients on a tiny conv + BN tree."""
  import jax.numpy as jnp

  c = base_config()
  c.optimizer.name = name
  c.optimizer.weight_decay = wd
  c.optimizer.weight_decay_mask = 'kernels'
  c.optimizer.update(fields or {})
  tx = optim.create_optimizer(c, lambda step: 0.1)
  if params is None:
    params = {'conv': {'kernel': jnp.full((2, 2), 0.5)}, 'bn': {'scale': jnp.ones(2)}}
  state, out = tx.init(params), []
  for g in grads:
    g = {'conv': {'kernel': jnp.asarray(g[0])}, 'bn': {'scale': jnp.asarray(g[1])}}
    u, state = tx.update(g, state, params)
    out.append(np.asarray(u[leaf[0]][leaf[1]]))
  return out


GRADS = [
  (np.array([[1e-3, -2e-3], [3e-4, 1e-3]], np.float32), np.array([1e-3, 2e-3], np.float32)),
  (np.array([[-1e-3, 5e-4], [2e-3, -1e-4]], np.float32), np.array([-1e-3, 3e-3], np.float32)),
  (np.array([[4e-4, 1e-3], [-3e-3, 2e-3]], np.float32), np.array([2e-3, -1e-3], np.float32)),
]


@pytest.mark.parametrize(
  'name,defaults',
  [
    ('lars', {'trust_coefficient': 1e-3, 'eps': 0.0}),  # You et al. 2017, MLPerf's eeta
    ('lamb', {'b1': 0.9, 'b2': 0.999, 'eps': 1e-6}),  # You et al. 2019, timm's Lamb
    ('adamw', {'b1': 0.9, 'b2': 0.999, 'eps': 1e-8}),  # torch.optim.AdamW
  ],
)
def test_unset_optimizer_fields_are_the_papers_defaults(name, defaults):
  """An optimizer field left None stands for its paper's / torch's default value: three updates
  equal those with the value written out (small gradients, so eps shows; three, so b2 does)."""
  unset = _updates(name, GRADS, wd=0.1)
  explicit = _updates(name, GRADS, defaults, wd=0.1)
  for got, want in zip(unset, explicit):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


def test_lars_trust_ratio_is_1_where_the_gradient_or_the_weight_is_zero():
  """MLPerf's and timm's LARS: a kernel with |g| = 0 (decay only) or |w| = 0 takes the plain
  lr x (g + wd w) step, no trust ratio."""
  import jax.numpy as jnp

  zero_g = [(np.zeros((2, 2), np.float32), np.ones(2, np.float32))]
  (u,) = _updates('lars', zero_g, wd=0.1)
  np.testing.assert_allclose(u, -0.1 * 0.1 * np.full((2, 2), 0.5), rtol=1e-6)
  params = {'conv': {'kernel': jnp.zeros((2, 2))}, 'bn': {'scale': jnp.ones(2)}}
  (u,) = _updates('lars', GRADS[:1], wd=0.1, params=params)
  np.testing.assert_allclose(u, -0.1 * GRADS[0][0], rtol=1e-6)


def test_lars_takes_nesterov_momentum_when_asked():
  """optimizer.nesterov is read by LARS as by SGD (torch's SGD rule on the lr-scaled step d:
  v = m v + d, update -(d + m v)); on BN's scale (no trust ratio, no decay) d = lr g."""
  got = _updates('lars', GRADS, {'nesterov': True}, wd=0.1, leaf=('bn', 'scale'))
  v = np.zeros(2)
  for (_, g), u in zip(GRADS, got):
    v = 0.9 * v + 0.1 * g
    np.testing.assert_allclose(u, -(0.1 * g + 0.9 * v), rtol=1e-5)


def test_a_namespace_whose_state_is_not_a_dict_is_refused(tmp_path):
  """A training checkpoint's `args` unpickle to their values (a dict); any other state is a
  damaged or crafted file, named as such, not a Namespace holding whatever it was given."""
  from resnet_jax import torch_checkpoint
  from tests.test_torch_checkpoint import _global, _state_pickle, _zip

  pkl = _state_pickle({'args': _global('argparse', 'Namespace') + b')\x81]b'})
  with pytest.raises(ValueError, match='argparse.Namespace with state list'):
    torch_checkpoint.load(_zip(tmp_path / 'args.pth', pkl, {}))


def test_converting_the_ema_prints_no_note_about_the_ema(tmp_path, capsys):
  """The note that a file also holds an EMA is for a conversion of the model's weights only."""
  import os

  from resnet_jax import convert
  from tests.fixtures import golden_weights

  train = os.path.join(golden_weights.FIXTURES, 'tiny_resnet18_train.pth')
  convert.main(
    ['--arch', 'resnet18', '--torchvision-weights', train, '--out', str(tmp_path / 'ema')]
    + ['--weights', 'ema']
  )
  out = capsys.readouterr().out
  assert 'wrote resnet18 (the EMA weights)' in out and 'note:' not in out


def test_the_evaluate_command_names_a_relative_data_dir_absolutely(tmp_path, monkeypatch):
  """`prepare` prints a command to copy: a relative --data_dir is written as the absolute path
  it names, so the command works from any directory."""
  from resnet_jax.data import prepare

  monkeypatch.chdir(tmp_path)
  assert prepare.evaluate_command('imagenet_v2', 'tfds').endswith(f'--data-dir={tmp_path}/tfds')


class _FixedDraws:
  """An rng whose draws are given: `integers` returns `ints` (sliced to `size`), `random` `us`."""

  def __init__(self, ints, us):
    self.ints, self.us = ints, us

  def integers(self, high, size=None):
    return self.ints[0] if size is None else np.asarray(self.ints[:size])

  def random(self, size):
    return np.asarray(self.us[:size])


def test_autoaugment_applies_a_step_whose_draw_equals_its_probability():
  """torchvision's AutoAugment applies an operation when its uniform draw is <= p: the imagenet
  policy's first sub-policy (Posterize 0.4 bin 8, Rotate 0.6 bin 9) at draws (0.4, 0.6)."""
  from resnet_jax.data import auto_augment

  policy = auto_augment.parse('autoaugment_imagenet')
  ops = auto_augment.policy_draws(policy, _FixedDraws([0, 1, 1], [0.4, 0.6]), (32, 32))
  assert [name for name, _ in ops] == ['Posterize', 'Rotate']
  assert ops[1][1] == pytest.approx(30.0)  # bin 9 of 10 is the top, sign draw 1: not negated


def test_a_bad_auto_augment_flag_names_the_accepted_forms(capsys):
  """`cli_type` (the benchmark scripts' --auto-augment): argparse's one usage line says what is
  accepted, not only 'invalid value'."""
  import argparse

  from resnet_jax.data import auto_augment

  parser = argparse.ArgumentParser(prog='bench')
  parser.add_argument('--auto-augment', type=auto_augment.cli_type)
  assert parser.parse_args(['--auto-augment', 'rand_augment_n3_m5']).auto_augment == (
    'rand_augment_n3_m5'
  )
  with pytest.raises(SystemExit) as e:
    parser.parse_args(['--auto-augment', 'rand_augment_n0_m9'])
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert e.value.code == 2
  assert err.startswith("bench: error: argument --auto-augment: 'rand_augment_n0_m9' is not one of")
  assert '(N of 1-14 operations, magnitude M of 0-30)' in err


def test_scales_on_a_dataset_with_label_sets_are_refused(monkeypatch):
  """ReaL's label sets are counted by the 1/2/10-crop evaluation only: `--scales` there is
  refused with the reason, before any evaluation (the run and dataset are stand-ins here)."""
  import types

  from resnet_jax import evaluate, runtime
  from tests.runner import digits_config

  experiment = types.SimpleNamespace(config=digits_config(), mesh=None)
  trained = types.SimpleNamespace(experiment=experiment, variables={})
  monkeypatch.setattr(runtime, 'load_trained_model', lambda *a, **k: trained)
  monkeypatch.setattr(evaluate, 'replicated', lambda mesh: None)
  monkeypatch.setattr(
    evaluate.sources, 'open_split', lambda *a, **k: types.SimpleNamespace(label_sets=True)
  )
  with pytest.raises(ValueError, match='--scales is not supported on digits'):
    evaluate.evaluate_workdir('run', scales=[8])


def test_batches_with_label_sets_reach_the_label_set_step(monkeypatch):
  """run_evaluation passes a batch's 'label_set' on to the step (ReaL's sets): digits with every
  class in each image's set gives ReaL error 0 over all 360 test images."""
  import contextlib

  import jax

  from resnet_jax import evaluate, runtime
  from resnet_jax.default_config import load_sibling_config
  from resnet_jax.train_step import create_mesh
  from tests.test_evaluate import CONFIGS, _digits_state

  config = load_sibling_config(CONFIGS, 'digits').get_config('depth=8')
  config.eval_batch_size = 128
  mesh = create_mesh(jax.devices()[:1])
  variables, _, model = _digits_state(mesh)
  real_iterator = runtime.eval_batches

  @contextlib.contextmanager
  def with_sets(*args, **kwargs):
    with real_iterator(*args, **kwargs) as batches:
      yield ({**b, 'label_set': np.ones((len(b['label']), 10), bool)} for b in batches)

  monkeypatch.setattr(runtime, 'eval_batches', with_sets)
  as_float = lambda images, rng: images.astype(np.float32)
  step = evaluate.jit_label_set_eval_step(mesh, model.apply, preprocess=as_float)
  result = evaluate.run_evaluation(step, variables, config, mesh, split='test')
  assert (result['real_num_examples'], result['real_top1_error']) == (360, 0.0)


def test_a_dataset_with_label_sets_is_evaluated_with_the_label_set_step(monkeypatch):
  """evaluate_workdir picks `jit_label_set_eval_step` where the split has label sets (stand-ins
  for the run and the dataset; the step itself is tested above)."""
  import types

  from resnet_jax import evaluate, runtime
  from tests.runner import digits_config

  experiment = types.SimpleNamespace(
    config=digits_config(), mesh=None, model=types.SimpleNamespace(apply=None), preprocess=None
  )
  trained = types.SimpleNamespace(experiment=experiment, variables={}, step=1)
  monkeypatch.setattr(runtime, 'load_trained_model', lambda *a, **k: trained)
  monkeypatch.setattr(evaluate, 'replicated', lambda mesh: None)
  for label_sets, want in ((True, 'label_set_step'), (False, 'eval_step')):
    monkeypatch.setattr(
      evaluate.sources,
      'open_split',
      lambda *a, s=label_sets, **k: types.SimpleNamespace(label_sets=s),
    )
    monkeypatch.setattr(evaluate, 'jit_label_set_eval_step', lambda *a, **k: 'label_set_step')
    monkeypatch.setattr(evaluate, 'jit_eval_step', lambda *a, **k: 'eval_step')
    used = []
    monkeypatch.setattr(evaluate, 'run_evaluation', lambda step, *a, **k: used.append(step) or {})
    evaluate.evaluate_workdir('run')
    assert used == [want]


def test_an_evaluator_with_scales_on_a_dataset_with_label_sets_is_refused_before_the_run(
  monkeypatch,
):
  """`evals.NAME.scales` on ReaL is refused by `check_sources`, before training (stand-ins for
  the prepared dataset)."""
  import dataclasses
  import types

  from resnet_jax import data, evaluators, validation

  monkeypatch.setattr(evaluators, 'on_other_dataset', lambda experiment, d, s: ('its config', None))
  monkeypatch.setattr(
    data.sources, 'open_split', lambda *a, **k: types.SimpleNamespace(label_sets=True)
  )
  main = evaluators.Evaluator('eval', 'test', 1, (), 0, 8)
  real = evaluators.Evaluator('real', 'validation', 1, (8,), 0, 8, 'imagenet2012_real')
  with pytest.raises(validation.ConfigError, match='evals.real: scales are not supported'):
    evaluators.check_sources([main, real], experiment=None)
  evaluators.check_sources([main, dataclasses.replace(real, scales=())], experiment=None)


def test_an_evaluator_on_a_dataset_with_label_sets_uses_the_label_set_step(monkeypatch):
  """EvalRunner evaluates a ReaL-like dataset with `jit_label_set_eval_step` (built once), any
  other with the plain step (stand-ins for the run and the datasets)."""
  import types

  import ml_collections

  from resnet_jax import data, evaluators
  from tests.runner import digits_config

  built = []
  monkeypatch.setattr(evaluators, 'jit_eval_step', lambda *a, **k: 'eval_step')
  monkeypatch.setattr(
    evaluators, 'jit_label_set_eval_step', lambda *a, **k: built.append(1) or 'label_set_step'
  )
  monkeypatch.setattr(data, 'make_preprocessor', lambda config: 'preprocessor')
  other = lambda e, dataset, s: (
    ml_collections.ConfigDict({'dataset': dataset, 'eval_batch_size': 8}),
    None,
  )
  monkeypatch.setattr(evaluators, 'on_other_dataset', other)
  monkeypatch.setattr(
    data.sources,
    'open_split',
    lambda config, s: types.SimpleNamespace(label_sets=config.dataset == 'imagenet2012_real'),
  )
  used = []
  monkeypatch.setattr(evaluators, 'run_evaluation', lambda step, *a, **k: used.append(step))
  experiment = types.SimpleNamespace(
    config=digits_config(), mesh=None, model=types.SimpleNamespace(apply=None), preprocess=None
  )
  runner = evaluators.EvalRunner(experiment)
  real = evaluators.Evaluator('real', 'validation', 1, (), 0, 8, 'imagenet2012_real')
  v2 = evaluators.Evaluator('v2', 'test', 1, (), 0, 8, 'imagenet_v2')
  for evaluator in (real, v2, real):
    runner.run(evaluator, variables={})
  assert used == ['label_set_step', 'eval_step', 'label_set_step'] and built == [1]


def test_real_records_and_eval_batches_carry_the_label_sets(tmp_path):
  """imagenet2012_real (mock records of TFDS's own builder): the label is `original_label`, and
  each record's ReaL set reaches the eval batch as a multi-hot 'label_set' [b, 1000]."""
  import tensorflow_datasets as tfds

  from resnet_jax import data
  from resnet_jax.data import sources
  from resnet_jax.default_config import load_sibling_config
  from tests.runner import ROOT

  config = load_sibling_config(ROOT + '/configs/x.py', 'imagenet').get_config('depth=18')
  config.data.name = 'imagenet2012_real'
  config.data.data_dir = str(tmp_path / 'tfds')
  config.data.image_size = 32
  config.data.num_workers = 0
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    source = sources.open_split(config, 'validation')
    assert source.label_sets and source.num_classes == 1000
    raw = tfds.data_source('imagenet2012_real', split='validation', data_dir=config.data.data_dir)
    records = [source.records[i] for i in range(4)]
    for record, want in zip(records, raw):
      assert record['label'] == want['original_label']
      np.testing.assert_array_equal(record['label_set'], want['real_label'])
    batch = next(
      iter(
        data.create_eval_iterator(
          config, split='validation', local_batch_size=4, process_index=0, process_count=1
        )
      )
    )
  assert batch['label_set'].shape == (4, 1000) and batch['label_set'].dtype == bool
  got = sorted(tuple(np.flatnonzero(s)) for s in batch['label_set'])
  assert got == sorted(tuple(sorted(set(r['label_set'].tolist()))) for r in records)


@pytest.mark.parametrize('content', ['[]', '[1, 2]', '[[1], [true]]', '[[1], [2.0]]'])
def test_real_json_needs_one_list_of_int_classes_per_image(tmp_path, content):
  """ReaL's real.json: a non-empty list holding one list of int class indices per image (an
  empty file, bare ints, booleans or floats are not ReaL labels)."""
  from resnet_jax.data import offline

  path = tmp_path / 'real.json'
  path.write_text(content)
  with pytest.raises(offline.PrepareError, match='not a list of label lists'):
    offline.local_downloads('imagenet2012_real', [str(path)], None)
  path.write_text('[[0, 999], [], [5]]')
  assert offline.local_downloads('imagenet2012_real', [str(path)], None) == {
    offline.REAL_LABELS_URL: str(path)
  }
  with pytest.raises(offline.PrepareError, match='expected one file'):
    offline.local_downloads('imagenet2012_real', [str(path), str(path)], None)


def test_real_json_from_is_not_taken_for_the_manual_dir(tmp_path):
  """imagenet2012_real's --from is real.json; the val tar is looked for in --manual_dir or
  TFDS's default DATA_DIR/downloads/manual (only imagenet2012 takes a --from DIR of tars)."""
  from tests.runner import assert_one_line_error, run_prepare

  (tmp_path / 'real.json').write_text('[[1], [2]]')
  data_dir = tmp_path / 'tfds'
  proc = run_prepare(
    'imagenet2012_real', '--from', str(tmp_path / 'real.json'), '--data_dir', str(data_dir)
  )
  assert_one_line_error(
    proc, f'needs ILSVRC2012_img_val.tar (from image-net.org) in {data_dir}/downloads/manual'
  )


def test_a_prepared_test_set_ends_with_its_evaluate_command_not_a_train_one(
  monkeypatch, capsys, tmp_path
):
  """CIFAR-10.1, ImageNet-V2 and ReaL are test sets: `prepare` ends with how to evaluate a run on
  them (the preparation itself is a stand-in here); a training dataset ends with `train with:`."""
  from resnet_jax.data import prepare

  monkeypatch.setattr(prepare, 'prepare', lambda args: (args.name, (32, 32, 3)))
  assert prepare.main(['cifar10_1', '--data_dir', str(tmp_path)]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[-2:] == [
    'evaluate a run trained on its classes with:',
    '  ' + prepare.evaluate_command('cifar10_1', str(tmp_path)),
  ]
  assert prepare.main(['cifar10', '--data_dir', str(tmp_path)]) == 0
  assert 'train with:' in capsys.readouterr().out


def test_summary_json_names_the_stem_as_create_model_spells_it_and_takes_avg_down(capsys):
  """`summary --json`: the paper's stem is '7x7' (create_model's `stem=`), and `--avg-down` is
  ResNet-D's shortcuts on any projection net (avg_down adds no parameters: the flag shows in the
  JSON, not in the count)."""
  import json

  from resnet_jax import summary

  summary.main(['resnet18', '--json'])
  out = json.loads(capsys.readouterr().out)
  assert (out['stem'], out['avg_down']) == ('7x7', False)
  summary.main(['resnet18', '--avg-down', '--json'])
  out = json.loads(capsys.readouterr().out)
  assert (out['stem'], out['avg_down']) == ('7x7', True)
