"""Mixup and CutMix in the train step (resnet_jax/mixing.py), as torchvision's recipe defines them.

The spec: lambda ~ Beta(alpha, alpha); a Mixup image is the lambda-combination of its pair; a
CutMix image takes one box from its partner and its lambda is recomputed from the clipped box;
targets mix the one-hots with the same weights and sum to 1; pairs never cross devices, so the
compiled step adds no collective and gives the same update on 1 and 4 devices; mixing off is the
step of before.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from resnet_jax import mixing
from resnet_jax.default_config import base_config
from resnet_jax.train_step import (
  cross_entropy,
  state_fingerprint,
)
from resnet_jax.validation import ConfigError
from tests.runner import one_train_step

_B, _K = 16, 4


def _batch(seed=0, size=8):
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.normal(size=(_B, size, size, 3)), jnp.float32)
  labels = jnp.asarray(np.arange(_B) % _K, jnp.int32)  # partners (i ^ 1) differ in label
  return images, labels


def _lambda_of(targets, labels):
  """Each example's own weight: its own label's entry of the soft target."""
  return np.asarray(targets)[np.arange(len(labels)), np.asarray(labels)]


def test_partners_are_the_adjacent_pairs():
  x = jnp.arange(8)
  np.testing.assert_array_equal(mixing.partners(x), [1, 0, 3, 2, 5, 4, 7, 6])


def test_mixup_lambda_is_beta_alpha_alpha():
  mix = jax.jit(mixing.Mixing(_K, mixup_alpha=0.2))
  images, labels = _batch()
  lams = [
    float(_lambda_of(mix(images, labels, jax.random.key(i))[1], labels)[0]) for i in range(400)
  ]
  assert stats.kstest(lams, stats.beta(0.2, 0.2).cdf).pvalue > 0.01
  assert stats.kstest(lams, stats.beta(1.0, 1.0).cdf).pvalue < 0.01  # the test can tell alphas


def test_a_mixup_image_is_the_lambda_combination_of_its_pair():
  images, labels = _batch()
  for seed in range(5):
    mixed, targets = mixing.Mixing(_K, mixup_alpha=0.4)(images, labels, jax.random.key(seed))
    lam = _lambda_of(targets, labels)[:, None, None, None]
    want = lam * np.asarray(images) + (1 - lam) * np.asarray(images)[np.arange(_B) ^ 1]
    np.testing.assert_allclose(mixed, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, rtol=1e-6)
    partner_share = np.asarray(targets)[np.arange(_B), np.asarray(labels)[np.arange(_B) ^ 1]]
    np.testing.assert_allclose(partner_share, 1 - lam[:, 0, 0, 0], rtol=1e-5)


@pytest.mark.parametrize('size', [8, 7])
def test_cutmix_takes_one_box_whose_area_is_one_minus_lambda(size):
  """Also when the box is clipped at the border (torchvision recomputes lambda from it)."""
  images, labels = _batch(size=size)
  mix = jax.jit(mixing.Mixing(_K, cutmix_alpha=1.0))
  clipped = 0
  for seed in range(60):
    mixed, targets = mix(images, labels, jax.random.key(seed))
    mixed, x = np.asarray(mixed), np.asarray(images)
    taken = np.all(mixed == x[np.arange(_B) ^ 1], axis=-1) & ~np.all(mixed == x, axis=-1)
    kept = np.all(mixed == x, axis=-1)
    assert np.all(taken | kept)
    assert np.all(taken == taken[:1])  # one box for the whole batch
    rows, cols = np.nonzero(taken[0])
    if rows.size:  # a rectangle
      assert taken[0, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
      clipped += rows.min() == 0 or cols.min() == 0 or rows.max() == size - 1
      clipped += cols.max() == size - 1
    lam = _lambda_of(targets, labels)
    np.testing.assert_allclose(lam, 1 - taken[0].mean(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, rtol=1e-6)
  assert clipped > 0


def test_cutmix_box_follows_torchvision_int_half_sides():
  """int(0.5 * sqrt(1 - lam) * W) half sides around the centre, clipped: lam 0.75 on 8x8 with
  the centre inside is a 4x4 box (area 1/4); lam 1 cuts nothing."""
  for seed in range(20):
    mask, lam = mixing.cutmix_box(jax.random.key(seed), jnp.float32(0.75), 8, 8)
    mask = np.asarray(mask)
    rows, cols = np.nonzero(mask)
    assert rows.max() - rows.min() + 1 <= 4 and cols.max() - cols.min() + 1 <= 4
    assert float(lam) == pytest.approx(1 - mask.mean())
  mask, lam = mixing.cutmix_box(jax.random.key(0), jnp.float32(1.0), 8, 8)
  assert not np.asarray(mask).any() and float(lam) == 1.0


def test_both_on_choose_cutmix_with_the_switch_probability():
  images, labels = _batch()
  mix = jax.jit(mixing.Mixing(_K, mixup_alpha=0.2, cutmix_alpha=1.0, switch_prob=0.5))
  cut = 0
  for seed in range(200):
    mixed = np.asarray(mix(images, labels, jax.random.key(seed))[0])
    x = np.asarray(images)
    per_pixel = np.all(mixed == x, -1) | np.all(mixed == x[np.arange(_B) ^ 1], -1)
    cut += bool(per_pixel.all())  # CutMix copies pixels; Mixup blends every one
  assert 70 < cut < 130


def test_cutmix_box_centre_is_uniform_over_every_pixel():
  """lam 0.9 on 8x8: half sides int(0.5 * sqrt(0.1) * 8) = 1, so the box's last row / column
  is its centre's (clipped at 7): all 8 rows and columns occur, about equally often."""
  keys = jax.random.split(jax.random.key(0), 800)
  masks = np.asarray(jax.vmap(lambda k: mixing.cutmix_box(k, jnp.float32(0.9), 8, 8)[0])(keys))
  last_row = 7 - np.argmax(masks.any(2)[:, ::-1], axis=1)
  last_col = 7 - np.argmax(masks.any(1)[:, ::-1], axis=1)
  for last in (last_row, last_col):
    counts = np.bincount(last, minlength=8)
    assert stats.chisquare(counts).pvalue > 0.001, counts


@pytest.mark.parametrize('switch_prob', [0.0, 1.0])
def test_switch_prob_is_the_probability_of_cutmix(switch_prob):
  """mix_switch_prob 0: always Mixup (every pixel blended); 1: always CutMix (pixels copied)."""
  images, labels = _batch()
  mix = jax.jit(mixing.Mixing(_K, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=switch_prob))
  x = np.asarray(images)
  for seed in range(8):
    mixed = np.asarray(mix(images, labels, jax.random.key(seed))[0])
    copied = np.all(mixed == x, -1) | np.all(mixed == x[np.arange(_B) ^ 1], -1)
    assert bool(copied.all()) == (switch_prob == 1.0)


def test_mix_prob_zero_leaves_the_batch_and_one_hot_targets():
  images, labels = _batch()
  mixed, targets = mixing.Mixing(_K, mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.0)(
    images, labels, jax.random.key(3)
  )
  np.testing.assert_array_equal(mixed, images)
  np.testing.assert_array_equal(targets, jax.nn.one_hot(labels, _K))


def test_soft_targets_are_smoothed_as_torch_smooths_them():
  """torch's CrossEntropyLoss(label_smoothing=e) with probability targets t uses
  (1 - e) t + e / K: the mixed one-hot is smoothed after mixing."""
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(3, _K)), jnp.float32)
  t = jnp.asarray([[0.7, 0.3, 0, 0], [0, 1.0, 0, 0], [0.5, 0, 0, 0.5]], jnp.float32)
  want = -(((1 - 0.1) * t + 0.1 / _K) * jax.nn.log_softmax(logits)).sum(-1)
  np.testing.assert_allclose(cross_entropy(logits, t, 0.1), want, rtol=1e-6)
  hard = jnp.asarray([0, 1, 3])
  np.testing.assert_allclose(
    cross_entropy(logits, jax.nn.one_hot(hard, _K), 0.1), cross_entropy(logits, hard, 0.1)
  )


def _step(num_devices, mix, accum_steps=1, seed=1):
  """One step of a resnet8 on a fixed batch of 16 with the given mixing (the step's key from
  `seed`: seed 0's first CutMix box is empty on these 8x8 images)."""
  return one_train_step(
    num_devices=num_devices,
    accum_steps=accum_steps,
    compiled_text=True,
    step_kwargs={'mixing': mix, 'seed': seed},
  )


_BOTH = mixing.Mixing(_K, mixup_alpha=0.2, cutmix_alpha=1.0)


@pytest.mark.parametrize(
  'mix', [_BOTH, mixing.Mixing(_K, cutmix_alpha=1.0), mixing.Mixing(_K, mixup_alpha=0.2)]
)
def test_mixing_moves_no_example_between_devices(mix):
  _, plain_m, plain_hlo = _step(4, None)
  s4, m4, hlo = _step(4, mix)
  assert float(m4['loss']) != float(plain_m['loss'])  # it did mix
  for collective in ('all-to-all', 'all-gather', 'collective-permute'):
    assert (collective in hlo) == (collective in plain_hlo), collective
  s1, m1, _ = _step(1, mix)
  np.testing.assert_allclose(m1['loss'], m4['loss'], rtol=1e-5)
  assert float(m1['top1_error']) == float(m4['top1_error'])
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_mixing_with_accumulation_is_the_one_pass_step():
  """Pairs lie inside each micro-batch: accumulation still gives the one-pass update."""
  want, want_m, _ = _step(4, _BOTH)
  got, got_m, _ = _step(4, _BOTH, accum_steps=2)
  assert float(got_m['loss']) == pytest.approx(float(want_m['loss']), rel=1e-5)
  for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


def test_mixing_changes_the_step_and_off_is_the_step_of_before():
  plain, plain_m, _ = _step(4, None)
  mixed, mixed_m, _ = _step(4, mixing.Mixing(_K, mixup_alpha=0.2))  # (a CutMix box may be empty)
  assert state_fingerprint(mixed) != state_fingerprint(plain)
  assert float(mixed_m['loss']) != float(plain_m['loss'])
  config = base_config()
  assert mixing.from_config(config, _K) is None  # the default: the step gets no mixing at all
  config.data.mix_prob = 0.5
  assert mixing.from_config(config, _K) is None  # only the alphas turn it on
  config.data.cutmix_alpha = 1.0
  assert mixing.from_config(config, _K) == mixing.Mixing(_K, 0.0, 1.0, 0.5, 0.5)


def test_each_step_draws_its_own_mixing():
  """The draws come from the step's key, a function of the step number: the same weights and
  batch at step 0 and step 1 mix differently (and the plain step does not depend on it)."""
  mix = mixing.Mixing(_K, mixup_alpha=1.0)
  losses = {}
  for m, start in ((mix, 0), (mix, 1), (None, 0), (None, 1)):
    metrics = one_train_step(num_devices=1, start_step=start, step_kwargs={'mixing': m})[1]
    losses[m is None, start] = float(metrics['loss'])
  assert losses[False, 0] != losses[False, 1]
  assert losses[True, 0] == losses[True, 1]


@pytest.mark.parametrize(
  'overrides,message',
  [
    ({'data.mixup_alpha': -0.1}, 'data.mixup_alpha must be >= 0'),
    ({'data.mix_prob': 1.5}, r'data.mix_prob must be a probability in \[0, 1\]'),
    ({'data.cutmix_alpha': 1.0, 'batch_size': 12}, 'the 3 examples per device'),
    (
      {'data.cutmix_alpha': 1.0, 'batch_size': 16, 'grad_accum_steps': 4},
      'the 1 examples per device and micro-batch',
    ),
  ],
)
def test_mixing_that_would_pair_across_devices_is_refused(overrides, message):
  config = base_config()
  config.update_from_flattened_dict(overrides)
  with pytest.raises(ConfigError, match=message):
    mixing.validate(config, 4)
  config.data.cutmix_alpha = config.data.mixup_alpha = 0.0
  config.data.mix_prob = 1.0
  mixing.validate(config, 4)  # off: any batch
