"""Stochastic depth (Huang et al. 2016, "Deep Networks with Stochastic Depth"), read as the spec.

Survival probability p_l = 1 - l / L (1 - p_L) over all L blocks of the net; in training a block's
residual branch is dropped (the block is its shortcut) with probability 1 - p_l, per example, the
survivors scaled by 1 / p_l so that evaluation is the plain forward. Nets are tiny (widths 2-8,
4x4 / 8x8 inputs) so each case compiles in about a second on a CPU.
"""

import functools
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import train
from resnet_jax.models import create_model, drop_path, layers, layout
from resnet_jax.models.blocks import BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck
from tests.runner import assert_one_line_error, digits_config, one_train_step, run_main

STAGES = (3, 2, 1)  # L = 6 blocks: a scan of 2 and of 1, and a stage with no scan


def tiny(name='resnet20', rate=0.5, scan=False, remat=False, **kw):
  model = create_model(name, num_classes=3, drop_path_rate=rate, scan=scan, remat=remat, **kw)
  return model.clone(widths=(2, 4, 4), stage_sizes=STAGES)


def images(n, size=4, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal((n, size, size, channels)), jnp.float32)


def sown(model, variables, x, key=1):
  """Logits and, per block in net order, (rate, kept mask) that a training forward used."""
  logits, upd = model.apply(
    variables,
    x,
    train=True,
    mutable=['batch_stats', drop_path.COLLECTION],
    rngs={'dropout': jax.random.key(key)},
  )
  blocks = []
  for name in sorted(upd[drop_path.COLLECTION], key=lambda n: (n.split('_')[0], n[-4:] == 'scan')):
    (rate,), (kept,) = (upd[drop_path.COLLECTION][name][k] for k in ('rate', 'kept'))
    if name.endswith('_scan'):  # leading axis: the scanned blocks 1.. of the stage
      blocks += [(rate[k], kept[k]) for k in range(rate.shape[0])]
    else:
      blocks.append((rate, kept))
  return logits, blocks


# ---- the linear rule ----------------------------------------------------------------------------


def test_survival_probabilities_follow_the_linear_decay_rule():
  """p_l = 1 - l / L (1 - p_L), l = 1..L counted over all stages; the last block's p_L = 0.5."""
  rates = drop_path.block_rates((18, 18, 18), 0.5)  # ResNet-110: L = 54
  flat = [r for stage in rates for r in stage]
  survival = [1 - r for r in flat]
  assert len(flat) == 54
  assert survival == pytest.approx([1 - l / 54 * (1 - 0.5) for l in range(1, 55)])
  assert survival[-1] == pytest.approx(0.5) and survival[0] == pytest.approx(1 - 0.5 / 54)
  assert rates[1][0] == pytest.approx(19 / 54 * 0.5)  # stages continue the count
  assert drop_path.block_rates((2, 1), 0.0) == [[0.0, 0.0], [0.0]]


def test_timm_rule_never_drops_the_first_block_and_drops_the_last_at_the_rate():
  """timm's ResNet: block_dpr = drop_path_rate * net_block_idx / (net_num_blocks - 1)."""
  rates = drop_path.block_rates((3, 4, 6, 3), 0.05, 'timm')  # ResNet-50: L = 16
  flat = [r for stage in rates for r in stage]
  assert flat == pytest.approx([i / 15 * 0.05 for i in range(16)])
  assert flat[0] == 0.0 and flat[-1] == pytest.approx(0.05)
  assert drop_path.block_rates((1,), 0.3, 'timm') == [[0.0]]


@pytest.mark.parametrize('scan', [False, True])
def test_the_timm_rule_reaches_every_block(scan):
  model = tiny(scan=scan, drop_path_rule='timm')
  x = images(8)
  _, blocks = sown(model, model.init(jax.random.key(0), x), x)
  assert [float(rate) for rate, _ in blocks] == pytest.approx([l / 5 * 0.5 for l in range(6)])


def test_timm_rule_matches_timm_resnet50_live():
  """The rate of every block of timm's own resnet50(drop_path_rate=0.05) (live where timm is)."""
  import importlib.util

  pytest.importorskip('torch')  # before the fixture module, which imports torch
  if importlib.util.find_spec('torchvision') is None or importlib.util.find_spec('timm') is None:
    pytest.skip('timm (and torchvision) are not installed')
  from tests.fixtures.make_torch_golden import importable_torchvision

  importable_torchvision()
  timm = pytest.importorskip('timm')
  net = timm.create_model('resnet50', drop_path_rate=0.05)
  theirs = [
    0.0 if block.drop_path is None else block.drop_path.drop_prob
    for stage in (net.layer1, net.layer2, net.layer3, net.layer4)
    for block in stage
  ]
  ours = [r for stage in drop_path.block_rates((3, 4, 6, 3), 0.05, 'timm') for r in stage]
  assert ours == pytest.approx(theirs, abs=1e-12)


@pytest.mark.parametrize('scan,remat', [(False, False), (True, False), (True, True)])
def test_every_block_uses_its_rate_scanned_or_unrolled(scan, remat):
  """The rate reaches each block as a call argument; a scan hands its blocks theirs in turn."""
  model = tiny(scan=scan, remat=remat)
  x = images(8)
  variables = model.init(jax.random.key(0), x)
  _, blocks = sown(model, variables, x)
  used = [float(rate) for rate, _ in blocks]
  assert used == pytest.approx([l / 6 * 0.5 for l in range(1, 7)])


@pytest.mark.parametrize('scan', [False, True])
def test_fraction_of_dropped_branches_per_block_is_one_minus_survival(scan):
  n = 4096
  model = tiny(scan=scan, rate=0.6)
  x = images(n)
  variables = model.init(jax.random.key(0), x[:2])
  _, blocks = sown(model, variables, x)
  assert len(blocks) == 6
  for l, (rate, kept) in enumerate(blocks, start=1):
    want = l / 6 * 0.6
    sigma = math.sqrt(want * (1 - want) / n)
    kept = np.asarray(kept)
    assert abs((1 - kept.mean()) - want) < 4.5 * sigma, (l, 1 - kept.mean(), want)
  # Blocks draw independently: two blocks' masks are not the same draw.
  assert not np.array_equal(blocks[-1][1], blocks[-2][1])


# ---- a dropped block is its shortcut; a kept one is rescaled ----------------------------------

# (block class, features, strides, shortcut, input channels, extra fields)
BLOCKS = {
  'basic_identity': (BasicBlock, 4, 1, 'A', 4, {}),
  'basic_A_subsample_pad': (BasicBlock, 4, 2, 'A', 2, {}),
  'basic_B_projection': (BasicBlock, 4, 2, 'B', 2, {}),
  'basic_C': (BasicBlock, 4, 1, 'C', 4, {}),
  'bottleneck_B': (Bottleneck, 2, 2, 'B', 4, {}),
  'resnext_bottleneck': (Bottleneck, 2, 1, 'B', 8, dict(groups=2, base_width=32)),
  'wrn_preact_dropout': (PreActBasicBlock, 4, 1, 'B', 4, dict(dropout_rate=0.3)),
  'preact_basic_identity': (PreActBasicBlock, 4, 1, 'A', 4, {}),
  'preact_basic_B': (PreActBasicBlock, 4, 2, 'B', 2, {}),
  'preact_bottleneck_C': (PreActBottleneck, 2, 1, 'C', 8, {}),
}
# The last layer of each kind's residual branch: scaling it by c scales the branch by c.
LAST = {BasicBlock: 'bn2', Bottleneck: 'bn3', PreActBasicBlock: 'conv2', PreActBottleneck: 'conv3'}


def block_and_input(case, n, running_average=False):
  cls, features, strides, shortcut, cin, extra = BLOCKS[case]
  norm = functools.partial(layers.BatchNorm, use_running_average=running_average)
  block = cls(
    features,
    conv=layers.conv,
    norm=norm,
    strides=strides,
    shortcut=shortcut,
    deterministic=False,
    **extra,
  )
  return block, images(n, channels=cin, seed=1)


def branch_scaled(variables, block, c):
  """The block's variables with its residual branch multiplied by c (its last layer scaled)."""
  params = jax.tree.map(lambda a: a, variables['params'])
  last = params[LAST[type(block)]]
  params[LAST[type(block)]] = {k: v * c for k, v in last.items()}  # BN scale+bias or conv kernel
  return {**variables, 'params': params}


@pytest.mark.parametrize('case', sorted(BLOCKS))
def test_a_dropped_block_is_exactly_its_shortcut_and_a_survivor_is_scaled(case):
  n, rate = 512, 0.4
  block, x = block_and_input(case, n)
  variables = block.init({'params': jax.random.key(0), 'dropout': jax.random.key(2)}, x)
  rngs = {'dropout': jax.random.key(3)}
  out, upd = block.apply(variables, x, rate, mutable=['batch_stats', 'drop_path'], rngs=rngs)
  kept = np.asarray(upd['drop_path']['kept'][0])
  apply = lambda v: block.apply(v, x, None, mutable=['batch_stats'], rngs=rngs)
  shortcut_only, stats = apply(branch_scaled(variables, block, 0.0))
  survivor = apply(branch_scaled(variables, block, 1 / (1 - rate)))[0]
  out, shortcut_only, survivor = map(np.asarray, (out, shortcut_only, survivor))
  assert 0 < kept.sum() < n
  np.testing.assert_array_equal(out[~kept], shortcut_only[~kept])
  np.testing.assert_allclose(out[kept], survivor[kept], rtol=1e-5, atol=1e-5)
  # ... and the two references are told apart: every row is one of them, not both.
  assert np.all(np.abs(shortcut_only - survivor).reshape(n, -1).max(1) > 1e-3)
  if case.endswith('identity'):  # the shortcut is x itself (ReLU'd after a post-act block)
    want = x if block.preact else jax.nn.relu(x)
    np.testing.assert_array_equal(out[~kept], np.asarray(want)[~kept])
  # BatchNorm inside the branch still sees every example: the same statistics as without.
  jax.tree.map(np.testing.assert_array_equal, upd['batch_stats'], stats['batch_stats'])
  sigma = math.sqrt(rate * (1 - rate) / n)
  assert abs((1 - kept.mean()) - rate) < 4.5 * sigma


@pytest.mark.parametrize('case', ['preact_basic_identity', 'preact_basic_B', 'preact_bottleneck_C'])
def test_the_expected_training_output_is_the_evaluation_output(case):
  """BN on running statistics, one example repeated: the mean over per-example masks of a
  pre-activation block (output linear in its mask) is the deterministic forward. Without the
  1 / p_l scaling it would be off by (1 - p) times the branch, about 30 sigma here."""
  n, rate = 8192, 0.5
  block, x = block_and_input(case, 1, running_average=True)
  variables = block.init(jax.random.key(0), x)
  noise = lambda s: 0.2 * jax.random.normal(jax.random.key(4), s.shape)  # not the init stats
  stats = jax.tree_util.tree_map_with_path(
    lambda path, s: s * jnp.exp(noise(s)) if path[-1].key == 'var' else s + noise(s),
    variables['batch_stats'],
  )
  variables = {**variables, 'batch_stats': stats}
  evaluation = np.asarray(block.clone(deterministic=True).apply(variables, x, rate))
  shortcut = np.asarray(block.apply(branch_scaled(variables, block, 0.0), x, None))
  train = block.apply(variables, jnp.repeat(x, n, 0), rate, rngs={'dropout': jax.random.key(5)})
  mean = np.asarray(train, np.float64).mean(0, keepdims=True)
  branch = evaluation - shortcut
  sigma = np.abs(branch) * math.sqrt(rate / (1 - rate) / n)
  assert np.abs(branch).max() > 0.1
  # float32 rounding of a batch of 8192 vs 1 (XLA's conv blocking): about 1e-5
  assert np.all(np.abs(mean - evaluation) <= 5 * sigma + 1e-4)


def test_expected_net_features_equal_evaluation_with_frozen_bn():
  """The same through the whole model (frozen BN, ImageNet pre-activation net): its first stage
  output (C2, the first unit's sum) averages to the evaluation forward's."""
  model = create_model(
    'resnet18', preact=True, frozen_bn=True, features_only=True, drop_path_rate=0.8
  ).clone(widths=(4, 4, 4, 4), stage_sizes=(1, 1, 1, 1))
  x = images(1, size=16)
  variables = model.init(jax.random.key(0), x)
  evaluation = np.asarray(model.apply(variables, x, train=False)['C2'])
  n = 4096
  train, _ = model.apply(
    variables,
    jnp.repeat(x, n, 0),
    train=True,
    mutable=['batch_stats'],
    rngs={'dropout': jax.random.key(1)},
  )
  mean = np.asarray(train['C2'], np.float64).mean(0, keepdims=True)
  rate = 0.8 / 4  # block 1 of 4
  dropped = np.asarray(train['C2'])  # rows are shortcut or shortcut + branch / (1 - rate)
  spread = dropped.max(0, keepdims=True) - dropped.min(0, keepdims=True)  # |branch| / (1 - rate)
  sigma = spread * math.sqrt(rate * (1 - rate) / n)
  assert spread.max() > 0.1
  assert np.all(np.abs(mean - evaluation) <= 5 * sigma + 1e-4)


# ---- rate 0, evaluation, layouts ---------------------------------------------------------------


@pytest.mark.parametrize('scan', [False, True])
def test_rate_zero_is_the_net_without_drop_path(scan):
  """Default 0: no variables added (same checkpoints), no rng needed, no random op in the
  training program; a net trained with drop path evaluates as the plain forward, no rng."""
  off, on = tiny(rate=0.0, scan=scan), tiny(rate=0.5, scan=scan)
  x = images(4)
  v_off, v_on = off.init(jax.random.key(0), x), on.init(jax.random.key(0), x)
  assert jax.tree.structure(v_off) == jax.tree.structure(v_on)
  jax.tree.map(np.testing.assert_array_equal, v_off, v_on)
  train = lambda m, **kw: m.apply(v_off, x, train=True, mutable=['batch_stats'], **kw)
  jaxpr = str(jax.make_jaxpr(lambda x: off.apply(v_off, x, train=True, mutable=['batch_stats']))(x))
  assert 'random_bits' not in jaxpr and 'threefry' not in jaxpr
  assert 'random_bits' in str(
    jax.make_jaxpr(
      lambda x: on.apply(
        v_off, x, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.key(1)}
      )
    )(x)
  )
  train(off)  # no rngs: fine
  with pytest.raises(Exception, match='dropout'):
    train(on)
  np.testing.assert_array_equal(off.apply(v_off, x), on.apply(v_off, x))
  on_train = train(on, rngs={'dropout': jax.random.key(1)})[0]
  assert not np.allclose(on_train, train(off)[0])


def test_scanned_and_unrolled_nets_evaluate_alike_and_remat_draws_the_same_masks():
  unrolled, scanned = tiny(), tiny(scan=True)
  x = images(8)
  v = unrolled.init(jax.random.key(0), x)
  vs = layout.to_scanned(v, unrolled.stage_sizes)
  np.testing.assert_allclose(scanned.apply(vs, x), unrolled.apply(v, x), rtol=1e-5, atol=1e-5)
  for model, variables in ((unrolled, v), (scanned, vs)):
    logits, blocks = sown(model, variables, x)
    rematted, remat_blocks = sown(model.clone(remat=True), variables, x)
    np.testing.assert_allclose(rematted, logits, rtol=1e-5, atol=1e-6)
    for (_, a), (_, b) in zip(blocks, remat_blocks):
      np.testing.assert_array_equal(a, b)


def test_batch_mode_drops_a_block_for_the_whole_batch():
  """Huang et al.'s original draw (drop_path_mode='batch'): all examples share a block's fate."""
  model = tiny(drop_path_mode='batch', rate=0.6)
  x = images(4)
  variables = model.init(jax.random.key(0), x)
  masks = lambda key: jnp.stack([kept for _, kept in sown(model, variables, x, key)[1]])
  draws = jax.jit(jax.vmap(masks))
  kept = np.asarray(draws(jnp.arange(800)))  # (keys, blocks, examples)
  assert np.all(kept == kept[:, :, :1])
  for l in range(1, 7):
    want, got = l / 6 * 0.6, 1 - kept[:, l - 1, 0].mean()
    assert abs(got - want) < 4.5 * math.sqrt(want * (1 - want) / 800), (l, got, want)


# ---- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'kwargs,match',
  [
    (dict(name='plain20', drop_path_rate=0.5), 'plain net'),
    (dict(name='resnet20', residual=False, drop_path_rate=0.2), 'no shortcut'),
    (dict(name='resnet20', drop_path_rate=1.0), r'in \[0, 1\)'),
    (dict(name='resnet20', drop_path_rate=-0.1), r'in \[0, 1\)'),
    (dict(name='resnet20', drop_path_rate=0.1, drop_path_mode='col'), "'row' or 'batch'"),
    (dict(name='resnet20', drop_path_rate=0.1, drop_path_rule='linear'), "'huang' or 'timm'"),
  ],
)
def test_bad_drop_path_settings_are_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    create_model(**kwargs)
  create_model('plain20', drop_path_rate=0.0)  # the default stays valid for plain nets


def test_the_cli_refuses_drop_path_on_a_plain_net_in_one_line(tmp_path):
  proc = run_main(str(tmp_path), config='configs/cifar.py:depth=8,plain,drop_path=0.5')
  assert_one_line_error(proc, 'drop_path_rate=0.5', 'plain net')


# ---- training: the train step, gradient accumulation, a run that resumes -----------------------


def _one_step(rate, accum_steps):
  state, metrics, _ = one_train_step(accum_steps=accum_steps, size=4, drop_path_rate=rate)
  return jax.device_get(state.params), float(metrics['loss'])


@pytest.mark.parametrize('accum_steps', [1, 2])
def test_a_train_step_with_drop_path_is_deterministic_and_not_the_plain_step(accum_steps):
  """The train step's 'dropout' stream drives the masks (folded in per micro-batch)."""
  params, loss = _one_step(0.5, accum_steps)
  again, loss_again = _one_step(0.5, accum_steps)
  plain, plain_loss = _one_step(0.0, accum_steps)
  jax.tree.map(np.testing.assert_array_equal, params, again)
  assert loss == loss_again and np.isfinite(loss) and loss != plain_loss
  assert not np.allclose(params['fc']['kernel'], plain['fc']['kernel'])


@pytest.mark.slow
def test_a_digits_run_with_drop_path_differs_is_reproducible_and_resumes_exactly(tmp_path):
  def run(workdir, rate):
    config = digits_config(
      num_train_steps=2,
      batch_size=16,
      checkpoint_every_steps=1,
      eval_every_steps=0,
      log_every_steps=1,
      max_to_keep=5,
      progress_bar=False,
    )
    config.model.drop_path_rate = rate
    return train.train_and_evaluate(config, str(workdir))['state_fingerprint']

  on = run(tmp_path / 'on', 0.5)
  assert run(tmp_path / 'off', 0.0) != on
  assert run(tmp_path / 'on_again', 0.5) == on
  # Interrupted after step 1: the resumed run draws step 2's masks as the uninterrupted one did.
  resumed = tmp_path / 'resumed'
  shutil.copytree(tmp_path / 'on', resumed)
  os.remove(resumed / 'results.json')
  shutil.rmtree(resumed / 'checkpoints' / '2')
  assert run(resumed, 0.5) == on
