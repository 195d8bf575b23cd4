"""configs/resnetrs.py, ResNet-RS's training recipe (Bello et al. 2021, arXiv 2103.07579), read as
the spec of its authors' per-model configs (tensorflow/tpu models/official/resnet/resnet_rs/
configs/*.yaml, resnet_main.py) and TF Model Garden's imagenet_resnetrs*.yaml; and the features
it needed: dropout before the classifier (`model.head_dropout_rate`) and TF's per-stage
stochastic depth (`model.drop_path_rule='stage'`). No training at scale: three steps at most."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import optim, runtime, train, validation
from resnet_jax.data import pipeline, timm_augment
from resnet_jax.default_config import load_sibling_config
from resnet_jax.models import create_model, drop_path
from resnet_jax.models.names import RS_DEPTHS


def _rs(arg: str = ''):
  return load_sibling_config('configs/x.py', 'resnetrs').get_config(arg)


# tensorflow/tpu's resnetrs{depth}_i{size}.yaml: image_size (train = eval), dropout_rate,
# drop_connect_rate (null = 0), randaug_magnitude.
TABLE = [
  (50, 160, 0.25, 0.0, 10),
  (101, 160, 0.25, 0.0, 10),
  (101, 192, 0.25, 0.0, 15),
  (152, 192, 0.25, 0.0, 15),
  (152, 224, 0.25, 0.0, 15),
  (152, 256, 0.25, 0.0, 15),
  (200, 256, 0.25, 0.1, 15),
  (270, 256, 0.25, 0.1, 15),
  (350, 256, 0.25, 0.1, 15),
  (350, 320, 0.4, 0.1, 15),
  (420, 320, 0.4, 0.1, 15),
]


@pytest.mark.parametrize('depth, size, dropout, stochastic_depth, magnitude', TABLE)
def test_per_model_table(depth, size, dropout, stochastic_depth, magnitude):
  c = _rs(f'depth={depth},size={size}')
  assert (c.data.image_size, c.model.head_dropout_rate) == (size, dropout)
  assert (c.model.drop_path_rate, c.model.drop_path_rule) == (stochastic_depth, 'stage')
  policy = timm_augment.parse(c.data.auto_augment)
  assert (policy.magnitude, policy.num_ops, policy.prob) == (magnitude, 2, 1.0)
  assert (policy.magnitude_std, policy.increasing) == (0.0, False)
  assert policy.magnitude_max == max(10, magnitude)  # level 15 reaches the ops, not clipped to 10
  validation.validate_config(c)  # every value is one the product accepts
  model = runtime.build_model(c, 1000)  # the net the name builds, with the recipe's head
  assert model.stage_sizes == RS_DEPTHS[depth] and c.model.name == f'resnetrs{depth}'
  assert (model.head_dropout_rate, model.se_reduction, model.bn_momentum) == (dropout, 4, 0.0)
  c.data.name = 'synthetic'  # evaluated at the training size, the 0.875 centre crop, bicubic
  preprocessor = pipeline.make_preprocessor(c)
  assert (preprocessor.eval_image_size, preprocessor.eval_resize) == (size, round(size / 0.875))


def test_default_size_is_the_converted_checkpoints_and_others_are_refused():
  defaults = {50: 160, 101: 192, 152: 256, 200: 256, 270: 256, 350: 256, 420: 320}
  assert {d: _rs(f'depth={d}').data.image_size for d in RS_DEPTHS} == defaults
  with pytest.raises(ValueError, match='released RS-50 at 160'):
    _rs('depth=50,size=224')
  with pytest.raises(ValueError, match='released RS-350 at 256, 320'):
    _rs('depth=350,size=288')
  with pytest.raises(ValueError, match='ResNet-RS nets'):
    _rs('depth=18')
  with pytest.raises(ValueError, match='bn_group must be'):
    _rs('bn_group=-1')


def test_readme_and_docstring_list_exactly_the_config_args():
  with pytest.raises(ValueError, match='valid: ') as refused:
    _rs('no_such_arg')
  accepted = set(str(refused.value).split('valid: ')[1].split(', '))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, 'README.md'), encoding='utf-8') as f:
    entry = re.search(r'^  - `resnetrs\.py`: (.*?)$', f.read(), re.M)
  assert entry, 'README lists no configs/resnetrs.py'
  listed = re.findall(r'`(\w+)(?:=[^`]*)?`', entry.group(1).split('Args:', 1)[-1])
  assert set(listed) == accepted
  doc = load_sibling_config('configs/x.py', 'resnetrs').__doc__.split('Config args:', 1)[1]
  assert all(re.search(rf'\b{a}\b', doc) for a in accepted)


def test_shared_recipe_values():
  c = _rs()
  assert (c.batch_size, c.num_epochs, c.dtype) == (4096, 350.0, 'bfloat16')
  assert optim.peak_learning_rate(c) == pytest.approx(1.6)  # 0.1 x 4096 / 256
  s = c.schedule
  assert (s.name, s.warmup, s.warmup_epochs) == ('cosine', 'linear', 5.0)
  o = c.optimizer
  assert (o.name, o.momentum, o.nesterov) == ('sgd', 0.9, False)
  assert (o.weight_decay, o.weight_decay_mask) == (4e-5, 'not_norm')
  assert (c.label_smoothing, c.loss, c.ema_decay, c.ema_every_steps) == (
    0.1,
    'softmax_xent',
    0.9999,
    1,
  )
  assert c.model.zero_init_last_bn and c.model.bn_momentum == 0.0
  d = c.data
  assert (d.augment, d.normalize, d.interpolation, d.eval_split) == (
    'inception',
    'mean_std',
    'bicubic',
    'validation',
  )
  assert d.auto_augment == 'rand-m10-n2-mmax10-inc0-p1.0'


@pytest.mark.parametrize('batch, lr', [(4096, 1.6), (1024, 0.4), (256, 0.1), (8192, 3.2)])
def test_learning_rate_scales_with_the_batch(batch, lr):
  assert optim.peak_learning_rate(_rs(f'batch={batch}')) == pytest.approx(lr)
  c = _rs()
  c.batch_size = batch  # --config.batch_size, applied after get_config
  assert optim.peak_learning_rate(c) == pytest.approx(lr)


def test_tf_l2_loss_is_our_coupled_weight_decay_on_all_but_batchnorm():
  """TF adds 4e-5 x tf.nn.l2_loss(v) = 4e-5 x sum(v^2) / 2 to the loss for every variable but BN's:
  the gradient 4e-5 x v is SGD's coupled decay 4e-5 on the `not_norm` leaves."""
  w = jnp.asarray([0.5, -2.0, 3.0])
  grad = jax.grad(lambda v: 4e-5 * jnp.sum(v**2) / 2)(w)
  np.testing.assert_allclose(grad, 4e-5 * w, rtol=1e-6)
  model = create_model('resnetrs50', num_classes=10)
  x = jnp.zeros((1, 32, 32, 3))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), x))['params']
  mask = optim.weight_decay_mask(params, 'not_norm')
  assert mask['fc']['kernel'] and mask['fc']['bias']  # TF decays the classifier's bias too
  se = mask['layer4_2']['se']
  assert se['fc1']['kernel'] and se['fc1']['bias'] and se['fc2']['bias']  # SE's convs
  assert not mask['layer4_2']['bn3']['scale'] and not mask['layer4_2']['bn3']['bias']
  assert not mask['stem_pool_bn']['scale']


def test_stage_rule_is_tf_drop_connect_per_stage():
  """resnet_model.py: block group g of 2..5 gets rate x g / 5, the same for all its blocks."""
  rates = drop_path.block_rates(RS_DEPTHS[200], 0.1, 'stage')
  assert [len(r) for r in rates] == list(RS_DEPTHS[200])
  for stage, expected in zip(rates, (0.04, 0.06, 0.08, 0.1)):
    assert stage == pytest.approx([expected] * len(stage))
  three = drop_path.block_rates((1, 2, 1), 0.3, 'stage')  # 3 stages: 2/4, 3/4, 4/4 x rate
  assert sum(three, []) == pytest.approx([0.15, 0.225, 0.225, 0.3])
  drop_path.check(0.1, 'row', 'stage')
  with pytest.raises(ValueError, match="'stage'"):
    drop_path.check(0.1, 'row', 'linear')


@pytest.mark.parametrize('scan', [False, True])
def test_the_net_drops_each_stage_at_its_rate(scan):
  model = create_model(
    'resnet18', num_classes=3, drop_path_rate=0.2, drop_path_rule='stage', scan=scan
  ).clone(stage_sizes=(1, 2, 1, 1))
  x = jnp.ones((2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  _, updates = model.apply(
    variables,
    x,
    train=True,
    mutable=['batch_stats', drop_path.COLLECTION],
    rngs={'dropout': jax.random.key(1)},
  )
  recorded = updates[drop_path.COLLECTION]
  rates = {
    name: np.ravel(np.asarray(recorded[name]['rate'][0])).tolist() for name in sorted(recorded)
  }
  second = {'layer2_1': [0.12]} if not scan else {'layer2_scan': [0.12]}
  expected = {'layer1_0': [0.08], 'layer2_0': [0.12], **second, 'layer3_0': [0.16]}
  expected['layer4_0'] = [0.2]
  assert rates.keys() == expected.keys()
  for name, values in expected.items():
    assert rates[name] == pytest.approx(values)


def _tiny(rate: float):
  """ResNet-18's module with one block per stage: the head is what is tested."""
  return create_model('resnet18', num_classes=5, head_dropout_rate=rate).clone(
    stage_sizes=(1, 1, 1, 1)
  )


def test_head_dropout_changes_training_outputs_only():
  x = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
  plain, dropped = _tiny(0.0), _tiny(0.5)
  variables = plain.init(jax.random.key(0), x)
  # Same parameters and statistics, leaf for leaf: dropout has no variables.
  other = dropped.init(jax.random.key(0), x)
  assert jax.tree.structure(other) == jax.tree.structure(variables)
  jax.tree.map(np.testing.assert_array_equal, other, variables)

  def train(model, key):
    out, _ = model.apply(
      variables, x, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.key(key)}
    )
    return np.asarray(out)

  np.testing.assert_array_equal(dropped.apply(variables, x), plain.apply(variables, x))  # eval
  base = train(plain, 0)
  assert not np.allclose(train(dropped, 0), base)
  assert not np.allclose(train(dropped, 0), train(dropped, 1))  # a fresh mask per key
  np.testing.assert_array_equal(train(dropped, 3), train(dropped, 3))
  # Rate 0 has no dropout module: training needs no rng and matches with or without one.
  out, _ = plain.apply(variables, x, train=True, mutable=['batch_stats'])
  np.testing.assert_array_equal(np.asarray(out), base)


def test_head_dropout_is_inverted_dropout_of_the_pooled_features():
  """fc(mask x pooled / (1 - rate)): with fc the identity on 5 features, each logit is either
  0 or its pooled value x 2 at rate 0.5."""
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  model = _tiny(0.5)
  variables = model.init(jax.random.key(0), x)
  width = variables['params']['fc']['kernel'].shape[0]
  eye = jnp.zeros((width, 5)).at[:5, :5].set(jnp.eye(5))
  params = dict(variables['params'], fc={'kernel': eye, 'bias': jnp.zeros(5)})
  variables = dict(variables, params=params)
  out, _ = model.apply(
    variables, x, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.key(2)}
  )
  # train mode normalises with the batch statistics: compare against train mode at rate 0.
  reference, _ = _tiny(0.0).apply(variables, x, train=True, mutable=['batch_stats'])
  out, reference = np.asarray(out), np.asarray(reference)
  kept = out != 0
  assert 0 < kept.mean() < 1
  np.testing.assert_allclose(out[kept], 2 * reference[kept], rtol=1e-5)


@pytest.mark.parametrize('rate', [1.0, -0.1])
def test_bad_head_dropout_is_refused(rate):
  with pytest.raises(ValueError, match='head_dropout_rate'):
    create_model('resnet18', head_dropout_rate=rate)
  c = _rs()
  c.model.head_dropout_rate = rate
  with pytest.raises(validation.ConfigError, match=r'model.head_dropout_rate must be in \[0, 1\)'):
    validation.validate_config(c)


def _smoke(tmp_path, arg: str, **overrides):
  c = _rs(arg)
  c.update_from_flattened_dict(
    {
      'data.name': 'synthetic',
      'data.num_classes': 10,
      'data.image_size': 32,
      'data.num_eval_examples': 8,
      'data.num_workers': 0,
      'batch_size': 4,
      'eval_batch_size': 8,
      'num_train_steps': 3,
      'schedule.warmup_epochs': 0.0,
      'schedule.warmup_steps': 1,  # so the EMA averages from step 1 on
      'log_every_steps': 1,
      'eval_every_steps': 0,
      'checkpoint_every_steps': 3,
      'progress_bar': False,
      'dtype': 'float32',
      **overrides,
    }
  )
  workdir = tmp_path / 'run'
  result = train.train_and_evaluate(c, str(workdir))
  assert result['step'] == 3
  for key in ('eval', 'eval_ema'):
    assert np.isfinite(result[key]['loss']) and result[key]['num_examples'] == 8
  assert result['eval_ema'] != result['eval']  # the average moved away from the model
  return json.loads((workdir / 'config.json').read_text())


def test_three_steps_of_the_recipe_on_a_tiny_net(tmp_path):
  """RS-350 at 320's regularisation (dropout 0.4, stochastic depth 0.1 per stage, RandAugment at
  15 with p 1) on random 32-pixel images, with a CIFAR SE net in place of the RS-350."""
  saved = _smoke(tmp_path, 'depth=350,size=320', **{'model.name': 'seresnet8'})
  assert saved['model']['head_dropout_rate'] == 0.4
  assert saved['data']['auto_augment'] == 'rand-m15-n2-mmax15-inc0-p1.0'


@pytest.mark.slow
def test_three_steps_of_resnetrs50(tmp_path):
  """The recipe as configured for RS-50 at 32 pixels, batch 4 (float32: CPU's bfloat16 convs
  compile 2-3x slower)."""
  saved = _smoke(tmp_path, 'depth=50')
  assert saved['model']['name'] == 'resnetrs50' and saved['model']['head_dropout_rate'] == 0.25
