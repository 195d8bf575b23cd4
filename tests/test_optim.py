"""The paper's learning-rate schedules and weight decay, checked at their boundaries."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import optim
from resnet_jax.default_config import load_sibling_config

CONFIGS = __file__.rsplit('/tests/', 1)[0] + '/configs/x.py'


def _config(name, arg=''):
  return load_sibling_config(CONFIGS, name).get_config(arg)


def test_cifar_schedule_paper_boundaries():
  c = _config('cifar', 'depth=56')
  lr = optim.create_learning_rate_fn(c, steps_per_epoch=391, total_steps=c.num_train_steps)
  assert c.num_train_steps == 64_000
  for step, want in [
    (0, 0.1),
    (31_999, 0.1),
    (32_000, 0.01),
    (47_999, 0.01),
    (48_000, 0.001),
    (63_999, 0.001),
  ]:
    np.testing.assert_allclose(lr(step), want, rtol=1e-6, err_msg=f'step {step}')


def test_resnet110_warms_up_at_0_01_for_400_steps():
  c = _config('cifar', 'depth=110')
  lr = optim.create_learning_rate_fn(c, steps_per_epoch=391, total_steps=c.num_train_steps)
  for step, want in [(0, 0.01), (399, 0.01), (400, 0.1), (32_000, 0.01), (48_000, 0.001)]:
    np.testing.assert_allclose(lr(step), want, rtol=1e-6, err_msg=f'step {step}')
  c56 = _config('cifar', 'depth=56')
  assert c56.schedule.warmup_steps == 0


def test_imagenet_paper_schedule_divides_at_epochs_30_and_60():
  c = _config('imagenet', 'depth=34')
  spe = 5005
  lr = optim.create_learning_rate_fn(c, steps_per_epoch=spe, total_steps=c.num_train_steps)
  assert c.num_train_steps == 600_000
  np.testing.assert_allclose(lr(30 * spe - 1), 0.1, rtol=1e-6)
  np.testing.assert_allclose(lr(30 * spe), 0.01, rtol=1e-6)
  np.testing.assert_allclose(lr(60 * spe), 0.001, rtol=1e-6)


def test_modern_recipe_linear_warmup_cosine_and_batch_scaling():
  c = _config('imagenet', 'depth=50,recipe=modern,batch=1024')
  spe = 1251
  total = int(c.num_epochs * spe)
  lr = optim.create_learning_rate_fn(c, steps_per_epoch=spe, total_steps=total)
  peak = 0.1 * 1024 / 256
  warm = 5 * spe  # warmup_epochs: 5 epochs at any batch size
  np.testing.assert_allclose(lr(0), 0.0, atol=1e-9)
  np.testing.assert_allclose(lr(warm // 2), peak * (warm // 2) / warm, rtol=1e-5)
  np.testing.assert_allclose(lr(warm), peak, rtol=1e-5)
  np.testing.assert_allclose(lr(total), 0.0, atol=1e-6)
  assert float(lr(warm + (total - warm) // 2)) == pytest.approx(peak / 2, rel=1e-3)


def test_linear_warmup_from_warmup_init_lr_and_cosine_down_to_end_lr():
  """timm's cosine recipe: a linear warm-up from --warmup-lr and a cosine that ends at --min-lr,
  lr(t) = end + (peak - end) (1 + cos(pi t' / T')) / 2 over the steps after the warm-up."""
  c = _config('imagenet', 'depth=50,recipe=modern')
  c.schedule.warmup_init_lr = 1e-4
  c.schedule.end_lr = 1e-6
  spe, total = 100, 4000
  lr = optim.create_learning_rate_fn(c, steps_per_epoch=spe, total_steps=total)
  peak, warm = 0.1, 500
  cosine = lambda t: 1e-6 + (peak - 1e-6) * (1 + np.cos(np.pi * (t - warm) / (total - warm))) / 2
  for step, want in [(0, 1e-4), (250, 1e-4 + (peak - 1e-4) / 2), (warm, peak)] + [
    (t, cosine(t)) for t in (1000, 2250, 3999, total)
  ]:
    np.testing.assert_allclose(lr(step), want, rtol=1e-5, atol=1e-9, err_msg=f'step {step}')


def test_bad_schedule_name_is_an_error():
  c = _config('cifar')
  c.schedule.name = 'exponential'
  with pytest.raises(ValueError, match='schedule.name'):
    optim.create_learning_rate_fn(c, 10, 100)


@pytest.mark.parametrize(
  'mask,decayed',
  [
    ('all', {'conv/kernel', 'bn/scale', 'bn/bias', 'fc/kernel', 'fc/bias'}),
    ('kernels', {'conv/kernel', 'fc/kernel'}),
    ('not_norm', {'conv/kernel', 'fc/kernel', 'fc/bias'}),  # torchvision's norm_weight_decay=0
  ],
)
def test_weight_decay_mask(mask, decayed):
  """Coupled L2: with zero gradients, exactly the masked leaves move by -lr * wd * w."""
  c = _config('cifar')
  c.optimizer.weight_decay_mask = mask
  c.optimizer.momentum = 0.0
  params = {
    'conv': {'kernel': jnp.ones((3, 3))},
    'bn': {'scale': jnp.ones(3), 'bias': jnp.ones(3)},
    'fc': {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones(2)},
  }
  tx = optim.create_optimizer(c, optax.constant_schedule(0.1))
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  flat = jax.tree_util.tree_flatten_with_path(updates)[0]
  assert len(flat) == 5
  for path, u in flat:
    name = '/'.join(k.key for k in path)
    want = -0.1 * 1e-4 if name in decayed else 0.0
    np.testing.assert_allclose(u, want, rtol=1e-6, err_msg=name)


def test_an_unknown_weight_decay_mask_is_refused_when_the_optimizer_is_built():
  c = _config('cifar')
  c.optimizer.weight_decay_mask = 'no_bias'
  with pytest.raises(ValueError, match="weight_decay_mask must be one of.*'not_norm'"):
    optim.create_optimizer(c, optax.constant_schedule(0.1))


@pytest.mark.parametrize('nesterov', [False, True])
def test_sgd_heavy_ball_momentum_and_nesterov(nesterov):
  """SGD with momentum mu (buffer b = g + mu * b): the step is -lr * b, or with Nesterov
  (config.optimizer.nesterov, the modern and fine-tuning recipes) -lr * (g + mu * b)."""
  c = _config('cifar')
  c.optimizer.weight_decay, c.optimizer.nesterov = 0.0, nesterov
  params = {'conv': {'kernel': jnp.ones(2)}}
  tx = optim.create_optimizer(c, optax.constant_schedule(0.1))
  grads = jax.tree.map(jnp.ones_like, params)
  state, steps = tx.init(params), []
  for _ in range(2):
    updates, state = tx.update(grads, state, params)
    steps.append(float(updates['conv']['kernel'][0]))
  mu = c.optimizer.momentum
  assert mu == 0.9
  want = [1 + mu, 1 + mu * (1 + mu)] if nesterov else [1.0, 1 + mu]
  np.testing.assert_allclose(steps, [-0.1 * w for w in want], rtol=1e-6)


def test_a_boundary_given_twice_is_refused_not_applied_once():
  """'100' as steps and '1' epoch of 100 steps decayed once (optax keys boundaries by step)."""
  c = _config('cifar')
  c.schedule.boundaries, c.schedule.boundaries_epochs = '100', '1'
  with pytest.raises(ValueError, match='not both'):
    optim.create_learning_rate_fn(c, 100, 300)
  c.schedule.boundaries, c.schedule.boundaries_epochs = '100,100', None
  with pytest.raises(ValueError, match='schedule.boundaries must increase strictly'):
    optim.create_learning_rate_fn(c, 100, 300)


def test_boundaries_from_a_config_file_and_the_command_line_are_not_merged():
  """configs/wrn.py's epochs plus --config.schedule.boundaries=1000,2000 gave five decays."""
  c = _config('wrn')
  c.schedule.boundaries = '1000,2000'
  with pytest.raises(ValueError, match="set the other to ''"):
    optim.create_learning_rate_fn(c, 391, 200 * 391)
  c.schedule.boundaries_epochs = ''
  lr = optim.create_learning_rate_fn(c, 391, 200 * 391)
  assert [float(lr(s)) for s in (999, 1000, 2000, 30_000)] == pytest.approx([0.1, 0.02, 4e-3, 4e-3])


@pytest.mark.parametrize('text', ['5o', '32k', '-5'])
def test_a_malformed_boundary_names_its_field(text):
  c = _config('cifar')
  c.schedule.boundaries = text
  with pytest.raises(ValueError, match='schedule.boundaries must'):
    optim.create_learning_rate_fn(c, 100, 300)


@pytest.mark.parametrize('recipe', ['paper', 'modern'])
def test_imagenet_lr_and_warmup_follow_a_batch_size_override(recipe):
  """--config.batch_size=1024 kept the lr of batch 256 (paper: 0.1, not 0.4) and the modern
  recipe's warm-up of 25,022 steps (5 epochs at 256: 20 epochs at 1024)."""
  c = _config('imagenet', f'recipe={recipe}')
  c.batch_size = 1024
  spe = 1252  # ceil(1,281,167 / 1024)
  lr = optim.create_learning_rate_fn(c, steps_per_epoch=spe, total_steps=90 * spe)
  if recipe == 'paper':
    assert float(lr(0)) == pytest.approx(0.4)
  else:
    assert float(lr(5 * spe)) == pytest.approx(0.4, rel=1e-4)
    assert float(lr(5 * spe // 2)) == pytest.approx(0.2, rel=1e-3)


def test_warmup_in_steps_and_in_epochs_is_refused():
  c = _config('imagenet', 'recipe=modern')
  c.schedule.warmup_steps = 1000
  with pytest.raises(ValueError, match='warmup_steps .* or schedule.warmup_epochs'):
    optim.create_learning_rate_fn(c, 5005, 90 * 5005)


def test_a_warmup_as_long_as_the_run_is_reported(caplog):
  """configs/digits.py:steps=40 warms up for 50 steps: the cosine never started, silently."""
  c = _config('digits', 'steps=40')
  with caplog.at_level('WARNING'):
    optim.create_learning_rate_fn(c, 23, c.num_train_steps)
  assert '50-step warm-up is not shorter than the 40-step run' in caplog.text


@pytest.mark.parametrize('key', ['schedule.decay_factor', 'optimizer.momentum'])
def test_a_negative_decay_factor_or_momentum_is_refused(key):
  """decay_factor=-0.1 trained with lr -0.01 after the first boundary: gradient ascent."""
  from resnet_jax import validation

  c = _config('cifar')
  c.update_from_flattened_dict({key: -0.1})
  with pytest.raises(validation.ConfigError, match=f'{key} must be non-negative'):
    validation.validate_config(c)


def test_the_paper_recipe_keeps_its_epochs_when_the_command_line_changes_the_batch():
  """60e4 iterations at batch 256 are 30e4 at 512: --config.batch_size (applied after get_config,
  by ml_collections' config flag) used to keep 60e4, twice the paper's epochs."""
  from absl import flags
  from ml_collections import config_flags

  argv = ['prog', '--config=' + CONFIGS.replace('x.py', 'imagenet.py'), '--config.batch_size=512']
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  config = flag_values.config
  assert (config.batch_size, config.num_train_steps) == (512, 300_000)
  assert json.loads(config.to_json())['num_train_steps'] == 300_000  # config.json's value
  config.num_train_steps = 10  # a user's own length still wins
  config.batch_size = 1024
  assert config.num_train_steps == 10


def test_a_decay_past_the_end_of_a_shortened_run_is_reported(caplog):
  """cifar.py with --config.num_train_steps=8000 kept the paper's decays at 32k and 48k: the lr
  stayed at 0.1 for the whole run, silently."""
  c = _config('cifar')
  with caplog.at_level('WARNING'):
    optim.create_learning_rate_fn(c, 391, 64_000)
  assert 'boundaries' not in caplog.text
  with caplog.at_level('WARNING'):
    optim.create_learning_rate_fn(c, 391, 8_000)
  assert 'boundaries 32000,48000 are not all inside the 8000-step run' in caplog.text


def test_the_cifar_recipe_scales_its_schedule_with_the_steps_arg():
  """Sec. 4.2 at another length: decays at 50 % and 75 %, ResNet-110's warm-up 400/64k of it."""
  c = _config('cifar', 'depth=110,steps=8000')
  assert (c.num_train_steps, c.schedule.boundaries, c.schedule.warmup_steps) == (
    8000,
    '4000,6000',
    50,
  )
  assert c.eval_every_steps == 250
  lr = optim.create_learning_rate_fn(c, 391, c.num_train_steps)
  assert [float(lr(s)) for s in (49, 50, 3999, 4000, 6000)] == pytest.approx(
    [0.01, 0.1, 0.1, 0.01, 0.001]
  )
