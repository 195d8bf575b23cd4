"""optimizer.clip_grad_norm: the gradient's global L2 norm clipped before any optimizer, as
torch's `clip_grad_norm_` (timm's --clip-grad, big_vision's grad_clip_norm) does it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import optim, validation
from resnet_jax.default_config import base_config


def _params():
  return {
    'conv1': {'kernel': jnp.ones((2, 3), jnp.float32)},
    'bn1': {'scale': jnp.ones((3,), jnp.float32), 'bias': jnp.zeros((3,), jnp.float32)},
    'layer1_0': {'conv1': {'kernel': jnp.ones((3, 3), jnp.float32)}},
  }


def _norm(tree):
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(g))) for g in jax.tree.leaves(tree))))


def _grads(scale):
  """Gradients whose global norm is `scale` x the norm of a fixed random tree."""
  leaves, tree = jax.tree.flatten(_params())
  rng = np.random.default_rng(0)
  drawn = [jnp.asarray(rng.normal(size=leaf.shape), jnp.float32) for leaf in leaves]
  norm = _norm(drawn)
  return jax.tree.unflatten(tree, [g * (scale / norm) for g in drawn])


def _config(name='sgd', clip=0.0, **model):
  c = base_config()
  c.optimizer.name = name
  c.optimizer.weight_decay = 0.0
  c.optimizer.clip_grad_norm = clip
  c.model.update(model)
  return c


def _first_update(config, grads):
  tx = optim.create_optimizer(config, optax.constant_schedule(0.1))
  params = _params()
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates


@pytest.mark.parametrize('name', ['sgd', 'lamb', 'adamw', 'lars'])
def test_a_larger_gradient_is_rescaled_to_the_norm_a_smaller_one_is_not(name):
  """norm 10 clipped at 2: the optimizer sees g x 2 / (10 + 1e-6) (torch's rule); norm 0.5 at 2:
  the gradient as it is. Checked against the unclipped optimizer fed the rescaled gradient."""
  big, small = _grads(10.0), _grads(0.5)
  scaled = jax.tree.map(lambda g: g * (2.0 / (10.0 + 1e-6)), big)
  clipped = _first_update(_config(name, clip=2.0), big)
  by_hand = _first_update(_config(name), scaled)
  for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(by_hand)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
  for a, b in zip(
    jax.tree.leaves(_first_update(_config(name, clip=2.0), small)),
    jax.tree.leaves(_first_update(_config(name), small)),
  ):
    np.testing.assert_array_equal(a, b)
  if name == 'sgd':  # SGD's first step is -lr g: the clipped step has norm lr x 2
    assert _norm(clipped) == pytest.approx(0.1 * 2.0, rel=1e-5)


def test_clipping_keeps_the_optimizer_state_so_runs_resume_with_it_on_or_off():
  params = _params()
  for name in ('sgd', 'lamb'):
    on = optim.create_optimizer(_config(name, clip=1.0), optax.constant_schedule(0.1))
    off = optim.create_optimizer(_config(name), optax.constant_schedule(0.1))
    assert jax.tree.structure(on.init(params)) == jax.tree.structure(off.init(params))


def test_frozen_leaves_count_for_nothing_in_the_norm():
  """With the stem frozen, its (huge) gradient neither moves it nor shrinks the others' step."""
  grads = _grads(0.5)
  grads['conv1']['kernel'] = jnp.full((2, 3), 1e3, jnp.float32)
  updates = _first_update(_config(clip=1.0, frozen_stages=0), grads)
  assert not np.asarray(updates['conv1']['kernel']).any()
  np.testing.assert_allclose(
    updates['layer1_0']['conv1']['kernel'], -0.1 * grads['layer1_0']['conv1']['kernel'], rtol=1e-6
  )


def test_a_negative_norm_is_refused():
  config = _config(clip=-1.0)
  with pytest.raises(validation.ConfigError, match='optimizer.clip_grad_norm'):
    validation.validate_config(config)
