"""LARS, LAMB and AdamW (config.optimizer.name): each one's first updates against a numpy
transcription of its paper's rule, the weight-decay and trust-ratio masks, frozen stages, skipped
steps, the config checks, a short training run each and an exact resume."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import checkpointing, optim, validation
from resnet_jax.default_config import base_config
from resnet_jax.models import backbone
from tests.runner import assert_one_line_error, digits_config, run_main

ADAPTIVE = ('lars', 'lamb', 'adamw')
# A tiny model's leaves: conv and dense kernels, BatchNorm's scale and bias, the dense bias.
SHAPES = {
  'conv/kernel': (2, 3),
  'bn/scale': (3,),
  'bn/bias': (3,),
  'fc/kernel': (3, 2),
  'fc/bias': (2,),
}
DECAYED = {  # optim.weight_decay_mask's three choices on that tree
  'all': set(SHAPES),
  'kernels': {'conv/kernel', 'fc/kernel'},
  'not_norm': {'conv/kernel', 'fc/kernel', 'fc/bias'},
}
TRUSTED = {'conv/kernel', 'fc/kernel'}  # LARS/LAMB's trust ratio: kernels only (MLPerf, timm)
WD, B1, B2, EPS, ETA, MOMENTUM = 0.1, 0.8, 0.95, 1e-3, 0.02, 0.9


def lr(step):  # a schedule that changes every step, so lr inside vs outside momentum shows
  return 0.1 * (step + 1)


def _tree(flat):
  out = {}
  for name, value in flat.items():
    module, leaf = name.split('/')
    out.setdefault(module, {})[leaf] = jnp.asarray(value, jnp.float32)
  return out


def _flat(tree):
  return {
    '/'.join(k.key for k in p): np.asarray(v)
    for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _config(name, mask='all', **fields):
  c = base_config()
  c.optimizer.name = name
  c.optimizer.weight_decay = WD
  c.optimizer.weight_decay_mask = mask
  c.optimizer.update(fields)
  return c


def _paper_fields(name):
  return {'lars': dict(trust_coefficient=ETA, eps=EPS), 'lamb': dict(b1=B1, b2=B2, eps=EPS)}.get(
    name, dict(b1=B1, b2=B2, eps=EPS)
  )


def _reference(name, mask, params, grads):
  """The papers' update rules in numpy, leaf by leaf (wd is 0 on the leaves the mask leaves out):
  LARS (You et al. 2017, Alg. 1): v = m v + lr * eta |w| / (|g| + wd |w|) * (g + wd w), w -= v
  (trust ratio on kernels only; 1 where |w| or |g| is 0); AdamW (Loshchilov & Hutter, torch's
  lr-scaled decay): w -= lr * (m^ / (sqrt(v^) + eps) + wd w); LAMB (You et al. 2019, Alg. 2):
  r = m^ / (sqrt(v^) + eps) + wd w, w -= lr * |w| / |r| * r on kernels, lr * r elsewhere."""
  w = {k: v.astype(np.float64) for k, v in params.items()}
  state = {k: [np.zeros_like(v), np.zeros_like(v)] for k, v in w.items()}
  out = []
  for t, g_t in enumerate(grads):
    for k in w:
      g, wd = g_t[k].astype(np.float64), WD if k in DECAYED[mask] else 0.0
      if name == 'lars':
        d = g + wd * w[k]
        if k in TRUSTED:
          wn, gn = np.linalg.norm(w[k]), np.linalg.norm(g)
          d = d * (ETA * wn / (gn + wd * wn + EPS) if wn > 0 and gn > 0 else 1.0)
        state[k][0] = MOMENTUM * state[k][0] + lr(t) * d
        w[k] = w[k] - state[k][0]
        continue
      m, v = state[k]
      m[:] = B1 * m + (1 - B1) * g
      v[:] = B2 * v + (1 - B2) * g * g
      r = (m / (1 - B1 ** (t + 1))) / (np.sqrt(v / (1 - B2 ** (t + 1))) + EPS) + wd * w[k]
      if name == 'lamb' and k in TRUSTED:
        wn, rn = np.linalg.norm(w[k]), np.linalg.norm(r)
        r = r * (wn / rn if wn > 0 and rn > 0 else 1.0)
      w[k] = w[k] - lr(t) * r
    out.append(dict(w))
  return out


@pytest.mark.parametrize('mask', ['all', 'kernels', 'not_norm'])
@pytest.mark.parametrize('name', ADAPTIVE)
def test_three_updates_follow_the_papers_rule(name, mask):
  rng = np.random.default_rng(0)
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
  grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(3)]
  tx = optim.create_optimizer(_config(name, mask, **_paper_fields(name)), lr)
  p, state, got = _tree(params), None, []
  state = tx.init(p)
  for g in grads:
    updates, state = tx.update(_tree(g), state, p)
    p = optax.apply_updates(p, updates)
    got.append(_flat(p))
  for t, (have, want) in enumerate(zip(got, _reference(name, mask, params, grads))):
    for k in SHAPES:
      np.testing.assert_allclose(have[k], want[k], rtol=2e-5, atol=1e-6, err_msg=f'step {t} {k}')


def test_lamb_with_clipping_at_1_follows_timm_lamb_live():
  """timm's own `Lamb` (the optimizer of "ResNet strikes back"; max_grad_norm=1.0 by default)
  with timm's two parameter groups (decay on kernels; none, and so no trust ratio, on BatchNorm
  and biases) against ours with `clip_grad_norm=1.0`, weight_decay_mask='kernels': the same
  parameters after four steps whose gradients' global norm is above 1 (live where timm is)."""
  import importlib.util

  torch = pytest.importorskip('torch')
  if importlib.util.find_spec('torchvision') is None or importlib.util.find_spec('timm') is None:
    pytest.skip('timm (and torchvision) are not installed')
  from tests.fixtures.make_torch_golden import importable_torchvision

  importable_torchvision()
  timm_optim = pytest.importorskip('timm.optim')
  rng = np.random.default_rng(1)
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
  grads = [
    {k: 3 * rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(4)
  ]
  theirs = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
  groups = [
    {'params': [theirs[k] for k in SHAPES if k in TRUSTED], 'weight_decay': WD},
    {'params': [theirs[k] for k in SHAPES if k not in TRUSTED], 'weight_decay': 0.0},
  ]
  opt = timm_optim.Lamb(groups, lr=lr(0), betas=(B1, B2), eps=EPS)
  for t, g in enumerate(grads):
    for k, value in g.items():
      theirs[k].grad = torch.from_numpy(value.copy())
    for group in opt.param_groups:
      group['lr'] = lr(t)
    opt.step()
  config = _config('lamb', 'kernels', b1=B1, b2=B2, eps=EPS, clip_grad_norm=1.0)
  tx = optim.create_optimizer(config, lr)
  p = _tree(params)
  state = tx.init(p)
  for g in grads:
    updates, state = tx.update(_tree(g), state, p)
    p = optax.apply_updates(p, updates)
  for k, have in _flat(p).items():
    np.testing.assert_allclose(have, theirs[k].detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize('name', ['lars', 'lamb'])
def test_the_trust_ratio_skips_batchnorm_and_biases(name):
  """With no decay, a BN scale/bias or a bias moves by the plain step; a kernel's step is
  rescaled (LARS: eta |w| / |g|, LAMB: |w| / |r|), whatever the size of its gradient."""
  c = _config(name, **({'trust_coefficient': ETA} if name == 'lars' else {}))
  c.optimizer.weight_decay, c.optimizer.momentum = 0.0, 0.9
  params = _tree({k: np.full(s, 2.0) for k, s in SHAPES.items()})
  grads = _tree({k: np.full(s, 100.0) for k, s in SHAPES.items()})
  tx = optim.create_optimizer(c, optax.constant_schedule(0.1))
  step = _flat(tx.update(grads, tx.init(params), params)[0])
  for k, u in step.items():
    plain = -0.1 * (100.0 if name == 'lars' else 1.0)  # Adam's first step is g / |g| = 1
    ratio = (ETA * 2 / 100 if name == 'lars' else 2.0) if k in TRUSTED else 1.0
    np.testing.assert_allclose(u, plain * ratio, rtol=1e-4, err_msg=k)


def test_sgd_stays_the_optimizer_of_before():
  """The default builds the same chain as before the other optimizers existed: the same state
  tree (old checkpoints restore) and the same updates."""
  c = base_config()
  assert c.optimizer.name == 'sgd'
  params = _tree({k: np.ones(s) for k, s in SHAPES.items()})
  before = optax.chain(
    optax.add_decayed_weights(1e-4, mask=lambda p: optim.weight_decay_mask(p, 'all')),
    optax.sgd(optax.constant_schedule(0.1), momentum=0.9, nesterov=False),
  )
  tx = optim.create_optimizer(c, optax.constant_schedule(0.1))
  assert jax.tree.structure(tx.init(params)) == jax.tree.structure(before.init(params))
  grads = jax.tree.map(lambda x: x * 3, params)
  got = tx.update(grads, tx.init(params), params)[0]
  want = before.update(grads, before.init(params), params)[0]
  assert jax.tree.map(lambda a, b: bool(jnp.all(a == b)), got, want) == jax.tree.map(
    lambda _: True, params
  )


@pytest.mark.parametrize('name', ADAPTIVE)
def test_frozen_stages_get_no_update_from_any_optimizer(name):
  c = _config(name)
  c.model.frozen_stages, c.model.frozen_bn_affine = 1, True
  params = {
    'conv1': {'kernel': jnp.ones((3,))},
    'layer1_0': {'conv1': {'kernel': jnp.ones(2)}},
    'layer2_0': {'conv1': {'kernel': jnp.ones(2)}, 'bn1': {'scale': jnp.ones(2)}},
    'fc': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)},
  }
  frozen = backbone.frozen_mask(params, 1, True)
  tx = optim.create_optimizer(c, optax.constant_schedule(0.1))
  state, new = tx.init(params), params
  for _ in range(2):
    updates, state = tx.update(jax.tree.map(jnp.ones_like, new), state, new)
    new = optax.apply_updates(new, updates)
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new, params)
  assert moved == jax.tree.map(lambda f: not f, frozen)


@pytest.mark.parametrize(
  'overrides,needle',
  [
    (
      {'optimizer.name': 'adam'},
      "optimizer.name must be one of sgd, lars, lamb, adamw, got 'adam'",
    ),
    ({'optimizer.name': 'adamw', 'optimizer.b1': -0.1}, r'optimizer.b1 must be in \[0, 1\)'),
    ({'optimizer.name': 'lamb', 'optimizer.b2': 1.0}, r'optimizer.b2 must be in \[0, 1\)'),
    ({'optimizer.name': 'adamw', 'optimizer.eps': -1e-8}, 'optimizer.eps must be positive'),
    ({'optimizer.name': 'lamb', 'optimizer.eps': 0.0}, 'optimizer.eps must be positive'),
    ({'optimizer.name': 'lars', 'optimizer.eps': -1.0}, 'optimizer.eps must be non-negative'),
    (
      {'optimizer.name': 'lars', 'optimizer.trust_coefficient': 0.0},
      'trust_coefficient must be positive',
    ),
    ({'optimizer.b1': 0.9}, "optimizer.b1 is set but optimizer.name='sgd' ignores it"),
    ({'optimizer.trust_coefficient': 1e-3}, "trust_coefficient is set but optimizer.name='sgd'"),
    (
      {'optimizer.name': 'lars', 'optimizer.b2': 0.99},
      "optimizer.b2 is set but optimizer.name='lars'",
    ),
    (
      {'optimizer.name': 'adamw', 'optimizer.momentum': 0.5},
      "momentum is set but optimizer.name='adamw'",
    ),
    (
      {'optimizer.name': 'lamb', 'optimizer.nesterov': True},
      "nesterov is set but optimizer.name='lamb'",
    ),
    ({'optimizer.name': 'adamw', 'optimizer.trust_coefficient': 1.0}, 'trust_coefficient is set'),
  ],
)
def test_bad_optimizer_fields_are_refused(overrides, needle):
  with pytest.raises(validation.ConfigError, match=needle):
    validation.validate_config(digits_config(**overrides))


@pytest.mark.parametrize(
  'overrides',
  [
    {'optimizer.name': 'lars', 'optimizer.nesterov': True, 'optimizer.eps': 0.0},
    {'optimizer.name': 'lamb', 'optimizer.b1': 0.0, 'optimizer.eps': 1e-6},
    {'optimizer.name': 'adamw', 'optimizer.b2': 0.99},
    {'optimizer.name': 'sgd', 'optimizer.momentum': 0.5},
  ],
)
def test_fields_the_optimizer_reads_are_accepted(overrides):
  validation.validate_config(digits_config(**overrides))


def test_a_bad_optimizer_on_the_command_line_is_one_error_line(tmp_path):
  proc = run_main(str(tmp_path / 'w'), '--config.optimizer.name=sgdw', devices=1)
  assert_one_line_error(proc, "optimizer.name must be one of sgd, lars, lamb, adamw, got 'sgdw'")
  assert not (tmp_path / 'w' / 'config.json').exists()


def _digits_batches():
  """sklearn's digits as [N, 8, 8, 1] floats in [0, 1] and their labels."""
  from sklearn.datasets import load_digits

  digits = load_digits()
  return (digits.images[..., None] / 16).astype(np.float32), digits.target.astype(np.int32)


@pytest.mark.parametrize(
  'name,base_lr', [('sgd', 0.1), ('lars', 2.0), ('lamb', 0.01), ('adamw', 0.003)]
)
def test_a_short_digits_run_learns_with_each_optimizer(name, base_lr):
  """60 steps of batch 32 of a ResNet-8 on the digits: the train loss falls from about
  log(10) = 2.3 to under 1 (each optimizer at a learning rate of its usual scale)."""
  from resnet_jax.models import create_model
  from resnet_jax.train_step import batch_sharding, create_mesh, init_state, jit_train_step

  c = _config(name)
  c.optimizer.weight_decay, c.optimizer.weight_decay_mask = 1e-4, 'kernels'
  schedule = optax.constant_schedule(base_lr)
  tx = optim.create_optimizer(c, schedule)
  mesh = create_mesh(jax.devices()[:1])
  state = init_state(create_model('resnet8', num_classes=10), tx, (8, 8, 1), seed=0, mesh=mesh)
  step = jit_train_step(mesh, jax.tree.map(lambda x: x.sharding, state), schedule)
  images, labels = _digits_batches()
  order = np.random.default_rng(0).permutation(len(labels))
  losses = []
  for i in range(60):
    idx = order[(i * 32) % 1760 : (i * 32) % 1760 + 32]
    batch = {'image': images[idx], 'label': labels[idx]}
    state, metrics = step(
      state, {k: jax.device_put(v, batch_sharding(mesh)) for k, v in batch.items()}
    )
    losses.append(float(metrics['loss']))
  assert losses[0] > 1.8
  assert np.mean(losses[-10:]) < 1.0, losses


def test_a_skipped_step_keeps_adams_moments_and_bias_correction_count():
  """on_nonfinite=skip with AdamW: the non-finite step changes neither the moments nor Adam's
  step count (as when torch skips optimizer.step()); the schedule's count still advances, so the
  next step uses the lr the metrics report."""
  from resnet_jax.models import create_model
  from resnet_jax.train_step import batch_sharding, create_mesh, init_state, jit_train_step

  schedule = lambda s: 0.01 * (s + 1)
  tx = optim.create_optimizer(_config('adamw'), schedule)
  mesh = create_mesh(jax.devices()[:1])
  state = init_state(create_model('resnet8', num_classes=4), tx, (8, 8, 1), seed=0, mesh=mesh)
  step = jit_train_step(mesh, jax.tree.map(lambda x: x.sharding, state), schedule)
  rng = np.random.default_rng(0)
  batch = {
    'image': rng.normal(size=(8, 8, 8, 1)).astype(np.float32),
    'label': rng.integers(0, 4, 8).astype(np.int32),
  }
  put = lambda b: {k: jax.device_put(v, batch_sharding(mesh)) for k, v in b.items()}
  state, _ = step(state, put(batch))
  adam = lambda s: s.opt_state[0]  # adamw = chain(scale_by_adam, decay, scale_by_schedule)
  before = jax.tree.map(np.asarray, adam(state))
  state, m = step(state, put(dict(batch, image=np.full_like(batch['image'], np.nan))))
  assert int(m['nonfinite']) == 1
  after = adam(state)
  assert int(after.count) == int(before.count) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, after), before)
  assert int(state.opt_state[-1].count) == 2  # the schedule's


def _run(tmp_path, name, steps=4, fail_after=None, **overrides):
  from tests.test_train_loop import run_loop

  return run_loop(tmp_path, name, steps, fail_after, **{'eval_every_steps': 4, **overrides})


def test_a_resumed_lamb_run_ends_in_the_state_of_an_uninterrupted_one(tmp_path):
  """LAMB's moments and both its counts are checkpointed: killed after step 3 and resumed from
  the checkpoint of step 2, the run ends with the uninterrupted one's state fingerprint."""
  lamb = {'optimizer.name': 'lamb', 'schedule.base_lr': 0.01, 'optimizer.weight_decay': 0.01}
  straight = _run(tmp_path, 'straight', **lamb)
  with pytest.raises(RuntimeError, match='pipeline broke'):
    _run(tmp_path, 'crashed', fail_after=3, **lamb)
  assert checkpointing.Checkpointer(tmp_path / 'crashed').latest_step() == 2
  resumed = _run(tmp_path, 'crashed', **lamb)
  assert resumed['state_fingerprint'] == straight['state_fingerprint']
  assert _run(tmp_path, 'sgd')['state_fingerprint'] != straight['state_fingerprint']
  with pytest.raises(validation.ConfigError, match="optimizer.name='lamb', this config has 'sgd'"):
    _run(tmp_path, 'crashed')


def test_the_mlperf_lars_recipe_and_its_polynomial_schedule():
  """configs/imagenet.py:recipe=lars: MLPerf's TF2 reference at batch 4096 (README_tensorflow2.md,
  lars_util.py): LARS eta 0.001, wd 2e-4 on kernels only, momentum 0.9, label smoothing 0.1, 42
  epochs; lr 10 x step / warm-up for 5 epochs, then (10 - 1e-4)(1 - t/T)^2 + 1e-4."""
  from resnet_jax.default_config import load_sibling_config

  c = load_sibling_config('configs/x.py', 'imagenet').get_config('recipe=lars')
  validation.validate_optimizer(c.optimizer)
  validation.validate_schedule_shape(c)
  assert (c.batch_size, c.num_epochs, c.label_smoothing, c.dtype) == (4096, 42, 0.1, 'float32')
  o = c.optimizer
  assert (o.name, o.trust_coefficient, o.eps, o.momentum, o.nesterov) == ('lars', 1e-3, 0, 0.9, 0)
  assert (o.weight_decay, o.weight_decay_mask) == (2e-4, 'kernels')
  spe = 313  # ceil(1,281,167 / 4096): the reference's --steps_per_loop
  total, warm = 42 * spe, 5 * spe
  lr = optim.create_learning_rate_fn(c, spe, total)
  poly = lambda s: (10 - 1e-4) * (1 - (s - warm) / (total - warm)) ** 2 + 1e-4
  for step, want in [(0, 0.0), (warm // 2, 10 * (warm // 2) / warm), (warm, 10.0)] + [
    (s, poly(s)) for s in (warm + 1000, total - 100, total)
  ]:
    np.testing.assert_allclose(lr(step), want, rtol=1e-5, atol=1e-7, err_msg=f'step {step}')


@pytest.mark.parametrize(
  'overrides,needle',
  [
    ({'schedule.name': 'constant', 'schedule.end_lr': 1e-4}, "name='constant' ignores it"),
    ({'schedule.name': 'cosine', 'schedule.power': 1.0}, "name='cosine' ignores it"),
    ({'schedule.name': 'polynomial', 'schedule.power': -1.0}, 'schedule.power must be non-neg'),
    ({'schedule.name': 'cosine', 'schedule.end_lr': 0.2}, 'end_lr=0.2 is above the peak'),
    (
      {'schedule.warmup': 'constant', 'schedule.warmup_init_lr': 1e-3},
      "schedule.warmup='constant' ignores it",
    ),
    (
      {'schedule.warmup': 'linear', 'schedule.warmup_init_lr': -0.5},
      'warmup_init_lr must be non-negative and finite',
    ),
  ],
)
def test_schedule_shape_fields_are_checked(overrides, needle):
  with pytest.raises(validation.ConfigError, match=needle):
    validation.validate_config(digits_config(**overrides))


@pytest.mark.parametrize('name', ['lars', 'lamb'])
def test_gradient_accumulation_gives_the_one_pass_update(name):
  """grad_accum_steps=2 with ghost-BN groups inside the micro-batches: the same parameters and
  optimizer state as one pass (the optimizer sees the same mean gradient)."""
  from resnet_jax.models import create_model
  from resnet_jax.train_step import batch_sharding, create_mesh, init_state, jit_train_step

  fields = {'lars': {'trust_coefficient': ETA}, 'lamb': {'eps': 1e-3}}[name]
  tx = optim.create_optimizer(_config(name, 'kernels', **fields), optax.constant_schedule(0.1))
  mesh = create_mesh(jax.devices()[:1])
  model = create_model('resnet8', num_classes=4, bn_group_size=2)
  rng = np.random.default_rng(0)
  batch = {
    'image': rng.normal(size=(16, 8, 8, 1)).astype(np.float32),
    'label': rng.integers(0, 4, 16).astype(np.int32),
  }
  batch = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in batch.items()}
  out = []
  for accum in (1, 2):
    state = init_state(model, tx, (8, 8, 1), seed=0, mesh=mesh)
    step = jit_train_step(
      mesh, jax.tree.map(lambda x: x.sharding, state), lambda s: 0.1, accum_steps=accum
    )
    state, _ = step(state, batch)
    out.append(jax.device_get((state.params, state.opt_state)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), *out)
