"""Invariants of the sharded train/eval steps (4 simulated CPU devices, tiny net)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from resnet_jax.models import create_model
from resnet_jax.train_step import (
  batch_sharding,
  create_mesh,
  init_state,
  jit_eval_step,
  jit_train_step,
  model_variables,
  state_fingerprint,
)

_CACHE = {}


def _setup(lr=0.05):
  """A fresh state each call (the train step donates it); compiled steps are shared."""
  if 'model' not in _CACHE:
    _CACHE['model'] = create_model('resnet8', num_classes=4)
    _CACHE['tx'] = optax.sgd(lr, momentum=0.9)
  model, tx, mesh = _CACHE['model'], _CACHE['tx'], create_mesh()
  state = init_state(model, tx, (8, 8, 1), seed=0, mesh=mesh)
  if 'steps' not in _CACHE:
    sharding = jax.tree.map(lambda x: x.sharding, state)
    _CACHE['steps'] = (
      jit_train_step(mesh, sharding, optax.constant_schedule(lr)),
      jit_eval_step(mesh, _CACHE['model'].apply),
    )
  train_step, eval_step = _CACHE['steps']
  rng = np.random.default_rng(0)
  batch = {
    'image': rng.normal(size=(16, 8, 8, 1)).astype(np.float32),
    'label': rng.integers(0, 4, size=16).astype(np.int32),
  }
  put = lambda b: {k: jax.device_put(v, batch_sharding(mesh)) for k, v in b.items()}
  return state, train_step, eval_step, put, batch


def test_uses_every_device_and_shards_the_batch():
  state, train_step, _, put, batch = _setup()
  assert jax.device_count() == 4
  g = put(batch)
  assert len(g['image'].addressable_shards) == 4
  assert g['image'].addressable_shards[0].data.shape == (4, 8, 8, 1)
  new_state, _ = train_step(state, g)
  assert int(new_state.step) == 1


def test_loss_decreases_on_a_fixed_batch():
  state, train_step, _, put, batch = _setup()
  losses = []
  for _ in range(15):
    state, m = train_step(state, put(batch))
    losses.append(float(m['loss']))
  assert losses[-1] < 0.5 * losses[0], losses


def test_bn_stats_update_in_train_not_in_eval():
  state, train_step, eval_step, put, batch = _setup()
  before = jax.device_get(state.batch_stats)
  fp = state_fingerprint(state)
  ev = dict(batch, mask=np.ones(16, bool))
  eval_step(model_variables(state), put(ev))
  assert state_fingerprint(state) == fp  # eval changes nothing
  state, _ = train_step(state, put(batch))
  after = jax.device_get(state.batch_stats)
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), before, after)
  assert all(jax.tree.leaves(changed))


def test_eval_counts_only_masked_examples():
  state, _, eval_step, put, batch = _setup()
  ev = dict(batch, mask=np.arange(16) < 10)
  sums = jax.device_get(eval_step(model_variables(state), put(ev)))
  assert sums['count'] == 10
  assert 0 <= sums['top1_errors'] <= 10 and sums['top5_errors'] <= sums['top1_errors']


def test_nonfinite_step_is_not_applied():
  state, train_step, _, put, batch = _setup()
  bad = dict(batch, image=np.full_like(batch['image'], np.nan))
  fp_params = state_fingerprint(state.replace(step=jnp.zeros((), jnp.int32)))
  new_state, m = train_step(state, put(bad))
  assert int(m['nonfinite']) == 1 and int(m['nonfinite_step']) == 0
  assert int(new_state.step) == 1
  assert state_fingerprint(new_state.replace(step=jnp.zeros((), jnp.int32))) == fp_params


def test_same_update_on_one_device_and_four():
  """Data parallelism is exact: the sharded step equals the single-device step."""
  state, train_step, _, put, batch = _setup()
  model, tx = _CACHE['model'], _CACHE['tx']
  mesh1 = create_mesh(jax.devices()[:1])
  s1 = init_state(model, tx, (8, 8, 1), seed=0, mesh=mesh1)
  t1 = jit_train_step(mesh1, jax.tree.map(lambda x: x.sharding, s1), optax.constant_schedule(0.05))
  s1, m1 = t1(s1, {k: jax.device_put(v, batch_sharding(mesh1)) for k, v in batch.items()})
  s4, m4 = train_step(state, put(batch))
  np.testing.assert_allclose(m1['loss'], m4['loss'], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_update_that_overflows_the_parameters_is_not_applied():
  """Finite loss and gradients can still give inf parameters (a huge learning rate)."""
  _, _, _, put, batch = _setup()
  mesh = create_mesh()
  huge = init_state(_CACHE['model'], optax.sgd(1e39), (8, 8, 1), seed=0, mesh=mesh)
  step = jit_train_step(
    mesh, jax.tree.map(lambda x: x.sharding, huge), optax.constant_schedule(1e39)
  )
  fp_params = state_fingerprint(huge.replace(step=jnp.zeros((), jnp.int32)))
  new_state, m = step(huge, put(batch))
  assert int(m['nonfinite']) == 1
  assert state_fingerprint(new_state.replace(step=jnp.zeros((), jnp.int32))) == fp_params


def test_a_skipped_step_still_advances_the_schedule():
  """The skipped step kept optax's schedule count, so every later update used the lr of one
  step earlier than the learning_rate the metrics report (decays came late by the skips)."""
  _, _, _, put, batch = _setup()
  mesh = create_mesh()
  schedule = optax.piecewise_constant_schedule(0.1, {1: 0.0})  # lr 0 from step 1 on
  tx = optax.sgd(schedule, momentum=0.9)
  state = init_state(_CACHE['model'], tx, (8, 8, 1), seed=0, mesh=mesh)
  step = jit_train_step(mesh, jax.tree.map(lambda x: x.sharding, state), schedule)
  state, m = step(state, put(dict(batch, image=np.full_like(batch['image'], np.nan))))
  assert int(m['nonfinite']) == 1
  before = state_fingerprint(state.params)
  state, m = step(state, put(batch))  # step 1 reports lr 0: nothing may move
  assert int(m['nonfinite']) == 0 and float(m['learning_rate']) == 0.0
  assert state_fingerprint(state.params) == before


def test_label_smoothing_mixes_the_one_hot_target_with_the_uniform_one():
  """Szegedy et al. 2016: target (1 - a) * one_hot + a / K, so the loss is (1 - a) times the
  plain cross-entropy plus a times the mean over the K classes of -log p; the train step's loss
  is that loss of the batch (the step reports the loss it differentiates)."""
  from resnet_jax.train_step import cross_entropy

  logits = jnp.asarray(np.random.default_rng(1).normal(size=(5, 4)), jnp.float32)
  labels = jnp.asarray([0, 3, 1, 1, 2])
  logp = np.asarray(jax.nn.log_softmax(logits))
  plain, uniform = -logp[np.arange(5), labels], -logp.mean(-1)
  np.testing.assert_allclose(cross_entropy(logits, labels), plain, rtol=1e-6)
  np.testing.assert_allclose(
    cross_entropy(logits, labels, 0.2), 0.8 * plain + 0.2 * uniform, rtol=1e-5
  )
  state, _, _, put, batch = _setup()
  mesh = create_mesh()
  step = jit_train_step(
    mesh,
    jax.tree.map(lambda x: x.sharding, state),
    optax.constant_schedule(0.05),
    label_smoothing=0.2,
  )
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  out, _ = state.apply_fn(variables, batch['image'], train=True, mutable=['batch_stats'])
  want = float(cross_entropy(out, batch['label'], 0.2).mean())
  _, m = step(state, put(batch))
  np.testing.assert_allclose(float(m['loss']), want, rtol=1e-4)
  assert abs(want - float(cross_entropy(out, batch['label']).mean())) > 1e-3


def test_the_augmentation_key_is_a_function_of_seed_and_step():
  """The device augmentation of a batch depends on (seed, step) only: the same pair gives the
  same input (a resumed run sees what the uninterrupted one saw), another step or seed another
  draw (the crops and flips change from step to step)."""
  import flax.linen as nn

  from resnet_jax.train_step import TrainState, train_step

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(3)(x.reshape(x.shape[0], -1))

  model = Tiny()
  batch = {'image': jnp.zeros((4, 2, 2, 1)), 'label': jnp.asarray([0, 1, 2, 0])}
  variables = model.init(jax.random.key(0), batch['image'])
  noisy = lambda images, rng: images + jax.random.normal(rng, images.shape)

  def loss(step, seed):
    state = TrainState.create(apply_fn=model.apply, variables=variables, tx=optax.sgd(0.1))
    state = state.replace(step=jnp.asarray(step, jnp.int32))
    _, m = train_step(
      state, batch, learning_rate_fn=optax.constant_schedule(0.1), preprocess=noisy, seed=seed
    )
    return float(m['loss'])

  assert loss(3, 0) == loss(3, 0)
  assert len({loss(0, 0), loss(1, 0), loss(2, 0), loss(0, 1)}) == 4


def test_multi_crop_evaluation_averages_the_softmax_of_every_crop():
  """Paper Tables 2-3 (10-crop testing): an example's score is the mean over its crops of the
  softmax probabilities (not of the logits, nor one crop's)."""
  from resnet_jax.train_step import eval_probabilities, metric_sums

  w = jnp.asarray(np.random.default_rng(0).normal(size=(12, 5)), jnp.float32)
  apply_fn = lambda v, x, train=False: 3.0 * x.reshape(x.shape[0], -1) @ v
  images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 10, 2, 2, 3)), jnp.float32)
  per_crop = jax.nn.softmax(apply_fn(w, images.reshape(20, 2, 2, 3))).reshape(2, 10, 5)
  probs = eval_probabilities(apply_fn, w, images)
  np.testing.assert_allclose(probs, per_crop.mean(axis=1), rtol=1e-5, atol=1e-7)
  sums = metric_sums(probs, jnp.asarray([0, 4]), jnp.asarray([True, True]))
  want = -np.log(np.asarray(per_crop.mean(axis=1))[[0, 1], [0, 4]]).sum()
  np.testing.assert_allclose(sums['loss'], want, rtol=1e-5)


def test_top5_counts_a_label_ranked_fifth_as_right_and_sixth_as_wrong():
  """top-5 error: the label is not among the 5 most probable classes; masked rows count for
  nothing in any sum."""
  from resnet_jax.train_step import metric_sums

  probs = jnp.asarray(np.tile(np.linspace(0.2, 0.02, 8) / 0.88, (4, 1)), jnp.float32)
  labels = jnp.asarray([0, 4, 5, 7])  # ranks 1, 5, 6, 8
  sums = metric_sums(probs, labels, jnp.asarray([True, True, True, False]))
  assert float(sums['count']) == 3
  assert float(sums['top1_errors']) == 2 and float(sums['top5_errors']) == 1
  np.testing.assert_allclose(sums['loss'], -np.log(np.asarray(probs)[0, [0, 4, 5]]).sum(), 1e-5)


def test_a_step_with_finite_loss_but_non_finite_gradients_is_not_applied():
  """A finite loss is not enough: sqrt at 0 has a finite value and an infinite slope, and that
  update is not applied (the parameters keep their values, the step is reported)."""
  import flax.linen as nn

  from resnet_jax.train_step import TrainState, train_step

  class Kink(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      w = self.param('w', nn.initializers.zeros, (3,))
      return x.reshape(x.shape[0], -1)[:, :3] + jnp.sqrt(w)

  model = Kink()
  batch = {'image': jnp.ones((2, 2, 2, 1)), 'label': jnp.asarray([0, 1])}
  state = TrainState.create(
    apply_fn=model.apply, variables=model.init(jax.random.key(0), batch['image']), tx=optax.sgd(0.1)
  )
  new, m = train_step(state, batch, learning_rate_fn=optax.constant_schedule(0.1))
  assert np.isfinite(float(m['loss'])) and int(m['nonfinite']) == 1
  np.testing.assert_array_equal(new.params['w'], state.params['w'])
