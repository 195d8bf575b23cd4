"""ResNeXt, torchvision Wide ResNets and CIFAR Wide ResNets: counts, names, options, scan, dropout.

Counts of the big nets come from ``jax.eval_shape`` (nothing allocated); numerics use nets shrunk
with ``clone`` (tiny widths, short stages), as tests/test_scan.py does. torchvision logit parity
of the new families is in tests/test_convert.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import optim, runtime, summary
from resnet_jax.analysis import paper_numbers
from resnet_jax.default_config import load_config_module
from resnet_jax.models import create_model, layout, parse_name
from resnet_jax.train_step import TrainState, train_step


def abstract_params(model, size=32):
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)['params']


def count(model):
  return sum(math.prod(p.shape) for p in jax.tree.leaves(abstract_params(model)))


# torchvision's counts (its docs' "num_params") and the WRN reference implementation's
# (szagoruyko/wide-residual-networks: 36.5M for WRN-28-10, 11.0M for WRN-16-8 in the paper).
@pytest.mark.parametrize(
  'name,kwargs,expected',
  [
    ('resnext50_32x4d', {}, 25_028_904),
    ('resnext101_32x8d', {}, 88_791_336),
    ('resnext101_64x4d', {}, 83_455_272),
    ('wide_resnet50_2', {}, 68_883_240),
    ('wide_resnet101_2', {}, 126_886_696),
    ('wrn28_10', {}, 36_479_194),
    ('wrn16_8', {}, 10_961_370),
    ('wrn40_4', {}, 8_949_210),
    ('wrn28_10', dict(num_classes=100), 36_536_884),
  ],
)
def test_parameter_counts(name, kwargs, expected):
  assert count(create_model(name, **kwargs)) == expected


@pytest.mark.parametrize(
  'name,gmacs',
  [  # torchvision's weights metadata, '_ops'
    ('resnext50_32x4d', 4.23),
    ('resnext101_32x8d', 16.414),
    ('resnext101_64x4d', 15.46),
    ('wide_resnet50_2', 11.398),
    ('wide_resnet101_2', 22.753),
  ],
)
def test_macs_match_torchvision(name, gmacs):
  assert round(summary.analyze(create_model(name), 224)['macs'] / 1e9, 3) == gmacs


def test_names_parse_into_one_family():
  assert parse_name('resnext50_32x4d')[3:7] == ('bottleneck', 'resnext', 32, 4)
  assert parse_name('resnext101_64x4d').depth == 101
  assert parse_name('wide_resnet101_2')[3:7] == ('bottleneck', 'wide_resnet', 1, 128)
  spec = parse_name('wrn28_10')
  assert (spec.family, spec.depth, spec.block, spec.variant, spec.widen) == (
    'cifar',
    28,
    'basic',
    'wrn',
    10,
  )
  m = create_model('wrn16_8')
  assert (m.stage_sizes, tuple(m.widths), m.stem_width) == ((2, 2, 2), (128, 256, 512), 16)
  assert m.block_cls.preact and m.shortcut == 'B' and m.num_classes == 10
  m = create_model('resnext101_32x8d')
  assert (m.groups, m.base_width, m.stage_sizes, m.num_classes) == (32, 8, (3, 4, 23, 3), 1000)


@pytest.mark.parametrize(
  'call,match',
  [
    (lambda: create_model('resnext18_32x4d'), 'bottleneck nets; depth must be one of 50, 101, 152'),
    (lambda: create_model('wide_resnet34_2'), 'bottleneck nets'),
    (lambda: create_model('wrn27_10'), 'depth 6n\\+4'),
    (lambda: create_model('wrn28_10', block='bottleneck'), 'basic blocks'),
    (lambda: create_model('resnet18', groups=32), 'ImageNet bottleneck nets'),
    (lambda: create_model('resnet56', width_per_group=128), 'ImageNet bottleneck nets'),
    (lambda: create_model('resnext50_32x4d', groups=64), 'groups=32; groups=64 contradicts'),
    (lambda: create_model('resnet50', groups=0), 'positive int'),
    (lambda: create_model('wrn16_4', dropout_rate=1.0), 'dropout_rate'),
  ],
)
def test_clear_refusals(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_groups_and_width_turn_resnet50_into_resnext_and_wide():
  shapes = lambda m: jax.tree.map(lambda p: p.shape, abstract_params(m))
  assert shapes(create_model('resnet50', groups=32, width_per_group=4)) == shapes(
    create_model('resnext50_32x4d')
  )
  assert shapes(create_model('resnet50', width_per_group=128)) == shapes(
    create_model('wide_resnet50_2')
  )
  p = abstract_params(create_model('resnext50_32x4d'))
  # torchvision: width = int(planes * 4 / 64) * 32 = 128 in layer1, 3x3 kernel HW x (128/32) x 128
  assert p['layer1_0']['conv1']['kernel'].shape == (1, 1, 64, 128)
  assert p['layer1_0']['conv2']['kernel'].shape == (3, 3, 4, 128)
  assert p['layer4_2']['conv3']['kernel'].shape == (1, 1, 1024, 2048)


def test_plain_twins_and_shortcut_options():
  a = count(create_model('resnext50_32x4d', shortcut='A'))
  assert count(create_model('resnext50_32x4d', residual=False)) == a
  assert (
    a
    < count(create_model('resnext50_32x4d'))
    < count(create_model('resnext50_32x4d', shortcut='C'))
  )
  plain = count(create_model('wrn16_4', residual=False))
  assert plain == count(create_model('wrn16_4', shortcut='A'))
  assert plain < count(create_model('wrn16_4'))  # option B: three bare 1x1 projections
  assert count(create_model('wrn16_4', preact=False)) > 0  # the post-activation twin builds


def _tiny(name, **kwargs):
  """Shrunk copies: groups and dilation still take effect, compile in seconds on a CPU."""
  model = create_model(name, **kwargs)
  if model.stem == 'imagenet':
    return model.clone(widths=(16, 16, 16, 16), stage_sizes=(3, 2, 1, 1))
  return model.clone(stage_sizes=(3, 2, 1))


@pytest.mark.parametrize(
  'name,kwargs',
  [
    ('resnet50', dict(groups=4, width_per_group=16)),  # a ResNeXt with 4 groups of 4
    ('wide_resnet50_2', dict(output_stride=8)),
    ('wrn16_2', {}),
    ('wrn16_2', dict(dropout_rate=0.3)),  # dropout is off in evaluation: no rng needed
  ],
)
def test_scanned_equals_unrolled(name, kwargs):
  unrolled = _tiny(name, **kwargs)
  scanned = unrolled.clone(scan=True)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
  variables = unrolled.init(jax.random.key(1), x, train=False)
  moved = layout.to_scanned(variables, unrolled.stage_sizes)
  assert 'layer1_scan' in moved['params']
  np.testing.assert_allclose(
    scanned.apply(moved, x, train=False),
    unrolled.apply(variables, x, train=False),
    rtol=1e-5,
    atol=1e-5,
  )


@pytest.mark.parametrize('scan', [False, True])
def test_dropout_needs_an_rng_only_when_training(scan):
  model = create_model('wrn10_2', dropout_rate=0.3, scan=scan).clone(stage_sizes=(2, 1, 1))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 16, 16, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), x, train=False)
  no_dropout = model.clone(dropout_rate=0.0)
  np.testing.assert_array_equal(
    model.apply(variables, x, train=False), no_dropout.apply(variables, x, train=False)
  )
  run = lambda key: model.apply(
    variables, x, train=True, mutable=['batch_stats'], rngs={'dropout': key}
  )[0]
  plain = no_dropout.apply(variables, x, train=True, mutable=['batch_stats'])[0]  # no rng needed
  np.testing.assert_array_equal(run(jax.random.key(3)), run(jax.random.key(3)))
  assert not np.allclose(run(jax.random.key(3)), run(jax.random.key(4)))
  assert not np.allclose(run(jax.random.key(3)), plain)
  with pytest.raises(Exception, match='dropout'):
    model.apply(variables, x, train=True, mutable=['batch_stats'])


def test_train_step_passes_a_dropout_rng_per_step():
  model = create_model('wrn10_1', dropout_rate=0.5, num_classes=3)
  x = np.random.default_rng(0).standard_normal((4, 8, 8, 3)).astype(np.float32)
  batch = {'image': jnp.asarray(x), 'label': jnp.asarray([0, 1, 2, 0])}
  tx = optax.sgd(0.1)

  # One compile: init and the step under jit (eagerly, each op would compile on its own).
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(batch['image'])
  state = TrainState.create(apply_fn=model.apply, variables=variables, tx=tx)
  step = jax.jit(lambda seed: train_step(state, batch, learning_rate_fn=lambda s: 0.1, seed=seed))

  (_, m0), (_, m0b), (_, m1) = step(0), step(0), step(1)
  assert float(m0['nonfinite']) == 0
  assert float(m0['loss']) == float(m0b['loss'])  # the rng is a function of (seed, step)
  assert float(m0['loss']) != float(m1['loss'])  # and it is used: another seed, other masks


def test_wrn_recipe_and_paper_numbers():
  c = load_config_module('configs/wrn.py').get_config('depth=16,k=8,dataset=cifar100')
  model = runtime.build_model(c, 100)
  assert (model.widths, model.dropout_rate, model.block_cls.preact) == ((128, 256, 512), 0.3, True)
  assert (c.optimizer.nesterov, c.optimizer.weight_decay, c.schedule.decay_factor) == (
    True,
    5e-4,
    0.2,
  )
  assert (c.schedule.boundaries_epochs, c.num_epochs, c.batch_size) == ('60,120,160', 200.0, 128)
  lr = optim.create_learning_rate_fn(c, 391, 200 * 391)
  assert np.isclose(float(lr(60 * 391 - 1)), 0.1) and np.isclose(float(lr(60 * 391 + 1)), 0.02)
  assert np.isclose(float(lr(160 * 391 + 1)), 0.1 * 0.2**3)
  assert paper_numbers.wrn_paper_error('cifar10', 28, 10, 0.3) == (
    3.89,
    'Zagoruyko & Komodakis 2016, Table 5',
  )
  assert paper_numbers.wrn_paper_error('cifar100', 28, 10, 0.0)[0] == 19.25
  assert paper_numbers.wrn_paper_error('cifar10', 16, 8, 0.3) is None


def test_finetune_config_builds_every_family():
  module = load_config_module('configs/finetune.py')
  for arch in ('resnext50_32x4d', 'resnext101_64x4d', 'wide_resnet101_2'):
    c = module.get_config(f'arch={arch},frozen_bn,frozen_stages=1')
    model = runtime.build_model(c, 10)
    assert (model.num_classes, model.frozen_bn, model.frozen_stages) == (10, True, 1)
