"""Scanned blocks (``scan=True``) compute what the unrolled net computes, for every block kind.

Models are shrunk (``clone`` with tiny widths and stage sizes 3/2/1: scans of length 2 and 1 and a
stage with no scan) so each compiles in about a second on a CPU. Parameters come from the unrolled
init and are moved across with ``models.layout``, so both nets start from the same point.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax.models import create_model, layout

STAGES = (3, 2, 1)

# (name, create_model options): every block kind, shortcut option, plain twin and ghost BN.
CASES = {
  'basic_A': ('resnet20', {}),
  'basic_B_ghost_bn': ('resnet20', dict(shortcut='B', bn_group_size=2)),
  'basic_C': ('resnet20', dict(shortcut='C')),
  'plain_basic': ('plain20', {}),
  'bottleneck_B_1x1': ('resnet29', dict(block='bottleneck')),
  'bottleneck_C_3x3': ('resnet29', dict(block='bottleneck', shortcut='C', stride_on='3x3')),
  'preact_basic_A': ('resnet20', dict(preact=True)),
  'preact_bottleneck_B': ('resnet29', dict(block='bottleneck', preact=True)),
  'imagenet_basic_B': ('resnet18', {}),
  'imagenet_preact_bottleneck': ('resnet50', dict(preact=True, shortcut='C')),
}


def tiny(name, scan=False, remat=False, **kw):
  """A ``create_model`` net with tiny widths and stages of 3, 2, 1 blocks."""
  model = create_model(name, num_classes=5, scan=scan, remat=remat, **kw)
  widths = (4, 8, 8) if model.stem == 'cifar' else (4, 4, 8, 8)
  return model.clone(widths=widths, stage_sizes=STAGES + ((1,) if model.stem != 'cifar' else ()))


def batch(model, n=4, seed=0):
  size = 8 if model.stem == 'cifar' else 16
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((n, size, size, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 5, n), jnp.int32)
  return x, y


TX = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))


@functools.cache
def step_fn(model):
  """The train step's update (forward in train mode, cross-entropy, SGD momentum + decay)."""

  def step(params, batch_stats, opt_state, x, y):
    def loss_fn(p):
      logits, upd = model.apply(
        {'params': p, 'batch_stats': batch_stats}, x, train=True, mutable=['batch_stats']
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, (logits, upd['batch_stats'])

    (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = TX.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, logits, loss

  return jax.jit(step)


def init(model, x):
  """XLA's RngBitGenerator key: compiles in a fraction of threefry's time on CPU."""
  return jax.jit(lambda x: model.init(jax.random.key(0, impl='rbg'), x, train=False))(x)


def init_shapes(model, x):
  return jax.eval_shape(lambda x: model.init(jax.random.key(0, impl='rbg'), x, train=False), x)


def assert_trees_close(a, b, atol=1e-4, rtol=1e-4):
  """Float tolerance: BN over 4 examples (1x1 maps in the last stage) amplifies rounding."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=atol, rtol=rtol), a, b)


@pytest.mark.parametrize('case', sorted(CASES))
def test_scanned_matches_unrolled_logits_and_train_step(case):
  name, kw = CASES[case]
  unrolled, scanned = tiny(name, **kw), tiny(name, scan=True, **kw)
  x, y = batch(unrolled)
  v = init(unrolled, x)
  vs = layout.to_scanned(v, unrolled.stage_sizes)
  assert layout.detect_layout(vs) == 'scanned' and layout.detect_layout(v) == 'unrolled'
  # The scanned model's own init has exactly this structure and these shapes (traced, not run).
  assert jax.tree.map(np.shape, vs) == jax.tree.map(np.shape, dict(init_shapes(scanned, x)))

  eval_u = jax.jit(lambda v, x: unrolled.apply(v, x, train=False))(v, x)
  eval_s = jax.jit(lambda v, x: scanned.apply(v, x, train=False))(vs, x)
  np.testing.assert_allclose(eval_s, eval_u, atol=1e-5, rtol=1e-5)

  opt_u = TX.init(v['params'])
  p_u, s_u, o_u, logits_u, loss_u = step_fn(unrolled)(v['params'], v['batch_stats'], opt_u, x, y)
  opt_s = layout.to_scanned(opt_u)  # optimizer state mirrors the params: converts the same way
  p_s, s_s, o_s, logits_s, loss_s = step_fn(scanned)(vs['params'], vs['batch_stats'], opt_s, x, y)
  np.testing.assert_allclose(logits_s, logits_u, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(loss_s, loss_u, atol=1e-6, rtol=1e-6)
  assert_trees_close(layout.to_unrolled(p_s), p_u)
  assert_trees_close(layout.to_unrolled(s_s), s_u)
  assert_trees_close(layout.to_unrolled(o_s), o_u)
  assert not np.allclose(p_u['fc']['kernel'], v['params']['fc']['kernel'])  # it did train


def test_resume_across_layouts_and_remat():
  """Two steps unrolled == one step unrolled, convert the whole state, one step scanned+remat."""
  unrolled = tiny('resnet20', shortcut='B')
  scanned = tiny('resnet20', shortcut='B', scan=True, remat=True)
  x, y = batch(unrolled)
  x2, y2 = batch(unrolled, seed=1)
  v = init(unrolled, x)
  state = (v['params'], v['batch_stats'], TX.init(v['params']))
  first = step_fn(unrolled)(*state, x, y)[:3]
  ref = step_fn(unrolled)(*first, x2, y2)[:3]
  resumed = step_fn(scanned)(*layout.to_scanned(first), x2, y2)[:3]
  assert_trees_close(layout.to_unrolled(resumed), ref)
  # remat alone (unrolled) changes nothing either.
  remat = tiny('resnet20', shortcut='B', remat=True)
  assert_trees_close(step_fn(remat)(*first, x2, y2)[:3], ref)


def test_layout_walks_through_pytree_nodes_like_a_train_state():
  @flax.struct.dataclass
  class State:
    step: jax.Array
    params: dict
    opt_state: tuple

  params = {
    'layer1_0': {'w': np.zeros(2)},
    'layer1_1': {'w': np.ones(2)},
    'layer1_2': {'w': np.full(2, 2.0)},
    'fc': {'w': np.ones(3)},
  }
  state = State(np.int32(3), params, (optax.EmptyState(), optax.TraceState(trace=params)))
  scanned = layout.to_scanned(state, (3,))
  assert isinstance(scanned, State) and scanned.step == 3
  np.testing.assert_array_equal(scanned.params['layer1_scan']['w'], [[1, 1], [2, 2]])
  assert isinstance(scanned.opt_state[1], optax.TraceState)
  assert set(scanned.opt_state[1].trace) == {'layer1_0', 'layer1_scan', 'fc'}
  back = layout.to_unrolled(scanned)
  jax.tree.map(np.testing.assert_array_equal, back, state)


def test_round_trip_is_identity_and_layout_helpers():
  model = tiny('resnet29', block='bottleneck', preact=True)
  x, _ = batch(model)
  v = jax.device_get(init(model, x))
  back = layout.to_unrolled(layout.to_scanned(v, STAGES), STAGES)
  assert jax.tree.structure(back) == jax.tree.structure(v)
  jax.tree.map(np.testing.assert_array_equal, back, v)
  assert list(back['params']) == list(v['params'])  # key order kept too
  assert layout.detect_layout(layout.to_unrolled(v)) == 'unrolled'
  scanned = layout.to_scanned(v)
  assert layout.to_scanned(scanned)['params'].keys() == scanned['params'].keys()  # idempotent
  stacked = scanned['params']['layer1_scan']['conv2']['kernel']
  assert stacked.shape == (2,) + v['params']['layer1_1']['conv2']['kernel'].shape
  np.testing.assert_array_equal(stacked[1], v['params']['layer1_2']['conv2']['kernel'])
  assert 'layer3_scan' not in scanned['params']  # a one-block stage has nothing to scan
  # Abstract trees (restore targets) convert too, keeping dtype.
  abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  conv = layout.to_scanned(abstract)['params']['layer1_scan']['conv1']['kernel']
  assert isinstance(conv, jax.ShapeDtypeStruct) and conv.shape[0] == 2
  assert layout.convert_layout(scanned, 'unrolled')['params'].keys() == v['params'].keys()
  assert layout.model_layout(model) == 'unrolled'
  assert layout.model_layout(model.clone(scan=True)) == 'scanned'
  assert layout.for_model(v, model.clone(scan=True))['params'].keys() == scanned['params'].keys()
  with pytest.raises(ValueError, match='stage sizes'):
    layout.to_scanned(v, (3, 3, 1))
  with pytest.raises(ValueError, match='stage sizes'):
    layout.to_unrolled(scanned, (3, 2, 2))
  with pytest.raises(ValueError, match='layout'):
    layout.convert_layout(v, 'rolled')


def test_scanned_tree_checked_against_stage_sizes_passes_through():
  """What a reader restores from a scanned run is already scanned: converting it for the scanned
  model with its stage sizes is the identity (it was refused: 'stage 1 has 1 blocks')."""
  model = tiny('resnet20')
  x, _ = batch(model)
  scanned = layout.to_scanned(jax.device_get(init(model, x)), STAGES)
  again = layout.to_scanned(scanned, STAGES)
  assert jax.tree.structure(again) == jax.tree.structure(scanned)
  jax.tree.map(np.testing.assert_array_equal, again, scanned)
  got = layout.for_model(scanned, model.clone(scan=True))
  assert got['params'].keys() == scanned['params'].keys()
  with pytest.raises(ValueError, match='stage sizes'):
    layout.to_scanned(scanned, (3, 3, 1))


def test_scanned_full_size_counts_and_compiled_program_size():
  """Full-size nets: same parameter count in both layouts; the scanned program does not grow
  with depth (HLO text of the forward pass)."""

  def count(model):
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    return sum(int(np.prod(l.shape)) for l in jax.tree.leaves(v['params']))

  assert count(create_model('resnet110', scan=True)) == 1_727_962
  assert count(create_model('resnet164', block='bottleneck', preact=True, scan=True)) == count(
    create_model('resnet164', block='bottleneck', preact=True)
  )

  def hlo_size(name):
    model = create_model(name, scan=True)
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    return len(jax.jit(lambda v, x: model.apply(v, x)).lower(v, x).as_text())

  assert hlo_size('resnet1202') < 1.05 * hlo_size('resnet20')


@pytest.mark.parametrize(
  'kernel,padding', [(3, ((1, 1), (1, 1))), (1, ((0, 0), (0, 0))), (3, ((0, 2), (1, 0)))]
)
def test_loop_friendly_conv_has_the_same_value_and_gradients(kernel, padding):
  """The custom-VJP conv used inside scans: same output and both gradients as lax's autodiff."""
  from resnet_jax.models.layers import loop_friendly_conv

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 5, 6, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((kernel, kernel, 3, 4)), jnp.float32)
  dn = ('NHWC', 'HWIO', 'NHWC')
  ref = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=dn)
  ours = lambda x, w: loop_friendly_conv(x, w, (1, 1), padding, dimension_numbers=dn)
  np.testing.assert_allclose(ours(x, w), ref(x, w), atol=1e-5)
  assert 'custom_vjp' in str(jax.make_jaxpr(ours)(x, w))  # the canonical-gradient path was taken
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  for a, b in zip(jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(ref), (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
  strided = loop_friendly_conv(x, w, (2, 2), padding, dimension_numbers=dn)  # falls back
  np.testing.assert_allclose(
    strided, jax.lax.conv_general_dilated(x, w, (2, 2), padding, dimension_numbers=dn), atol=1e-5
  )


def test_scan_default_follows_the_backend(monkeypatch):
  """Unset `model.scan`: scanned on the CPU (flat compile, not slower there), unrolled on a GPU
  or TPU (the unrolled step measured 17-33 % faster on an H100); an explicit value wins."""
  from resnet_jax import default_config, runtime

  config = default_config.base_config()
  config.model.name = 'resnet8'
  assert config.model.scan is None
  assert runtime.build_model(config, 10).scan is True  # this machine: CPU
  monkeypatch.setattr(runtime.jax, 'default_backend', lambda: 'gpu')
  assert runtime.build_model(config, 10).scan is False
  config.model.scan = True
  assert runtime.build_model(config, 10).scan is True
