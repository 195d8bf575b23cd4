"""config.loss: softmax cross-entropy and timm's per-class binary cross-entropy ("ResNet strikes
back"), against numpy transcriptions of timm's `BinaryCrossEntropy`; its wiring into the train
step and the config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import losses, validation
from resnet_jax.train_step import batch_sharding, create_mesh, init_state, jit_train_step
from tests.runner import assert_one_line_error, digits_config, run_main

K = 5
LOGITS = np.random.default_rng(0).normal(size=(4, K)).astype(np.float32) * 3
LABELS = np.array([0, 3, 1, 4])


def timm_bce(logits, targets, smoothing=0.0, threshold=None, sum_classes=False):
  """timm.loss.BinaryCrossEntropy in numpy: integer targets become one-hot with off value s/K
  and on value 1 - s + s/K; with a threshold, targets > threshold are 1, the rest 0; then
  binary_cross_entropy_with_logits, 'mean' over batch and classes (timm's default) or the sum
  over classes averaged over the batch (sum_classes, timm's --bce-sum)."""
  x = logits.astype(np.float64)
  if targets.ndim == 1:
    off = smoothing / K
    t = np.full(x.shape, off)
    t[np.arange(len(targets)), targets] = 1 - smoothing + off
  else:
    t = targets.astype(np.float64)
  if threshold is not None:
    t = (t > threshold).astype(np.float64)
  p = 1 / (1 + np.exp(-x))
  per = -(t * np.log(p) + (1 - t) * np.log(1 - p))
  return per.sum(-1).mean() if sum_classes else per.mean()


@pytest.mark.parametrize('sum_classes', [False, True])
@pytest.mark.parametrize('threshold', [None, 0.2])
@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_bce_equals_timms_formula(smoothing, threshold, sum_classes):
  loss = losses.Loss('sigmoid_bce', smoothing, threshold, sum_classes)
  got = float(loss(jnp.asarray(LOGITS), jnp.asarray(LABELS)))
  want = timm_bce(LOGITS, LABELS, smoothing, threshold, sum_classes)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_bce_of_mixed_targets_and_the_threshold_that_makes_both_partners_positive():
  """Mixup at lambda 0.7 of classes 0 and 3: with smoothing 0.1 timm's Mixup target is 0.7 of
  one smoothed one-hot plus 0.3 of the other; threshold 0.2 turns both classes into 1."""
  lam, s = 0.7, 0.1
  hard = jax.nn.one_hot(jnp.asarray([[0, 3]] * 4), K)
  mixed = lam * hard[:, 0] + (1 - lam) * hard[:, 1]  # what mixing.py hands the loss
  off = s / K
  timm_target = lam * (np.eye(K)[0] * (1 - s) + off) + (1 - lam) * (np.eye(K)[3] * (1 - s) + off)
  want = timm_bce(LOGITS, np.tile(timm_target, (4, 1)))
  got = losses.Loss('sigmoid_bce', s)(jnp.asarray(LOGITS), mixed)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  binary = np.zeros((4, K))
  binary[:, [0, 3]] = 1
  got = losses.Loss('sigmoid_bce', s, 0.2)(jnp.asarray(LOGITS), mixed)
  np.testing.assert_allclose(float(got), timm_bce(LOGITS, binary), rtol=1e-5)


def test_softmax_xent_is_the_default_and_unchanged():
  c = digits_config()
  c.label_smoothing = 0.1
  loss = losses.from_config(c)
  assert loss == losses.Loss('softmax_xent', 0.1)
  want = optax.softmax_cross_entropy(
    LOGITS, optax.smooth_labels(jax.nn.one_hot(LABELS, K), 0.1)
  ).mean()
  np.testing.assert_allclose(float(loss(jnp.asarray(LOGITS), jnp.asarray(LABELS))), want, rtol=1e-6)


def test_the_train_step_minimises_and_reports_the_configured_loss():
  """The step's reported loss is BCE of the model's training-mode logits, and its update is
  BCE's gradient step (plain SGD, lr 0.1)."""
  from resnet_jax.models import create_model

  mesh = create_mesh(jax.devices()[:1])
  model = create_model('resnet8', num_classes=K)
  state = init_state(model, optax.sgd(0.1), (8, 8, 1), seed=0, mesh=mesh)
  rng = np.random.default_rng(1)
  batch = {
    'image': rng.normal(size=(8, 8, 8, 1)).astype(np.float32),
    'label': rng.integers(0, K, 8).astype(np.int32),
  }
  loss = losses.Loss('sigmoid_bce', 0.1, 0.2)

  def bce(params):
    logits, _ = state.apply_fn(
      {'params': params, 'batch_stats': state.batch_stats},
      jnp.asarray(batch['image']),
      train=True,
      mutable=['batch_stats'],
    )
    return loss(logits, jnp.asarray(batch['label'])), logits

  (want, logits), grads = jax.value_and_grad(bce, has_aux=True)(state.params)
  np.testing.assert_allclose(
    float(want), timm_bce(np.asarray(logits), batch['label'], 0.1, 0.2), rtol=1e-5
  )
  step = jit_train_step(
    mesh, jax.tree.map(lambda x: x.sharding, state), optax.constant_schedule(0.1), loss=loss
  )
  params = jax.tree.map(np.asarray, state.params)
  new, metrics = step(state, {k: jax.device_put(v, batch_sharding(mesh)) for k, v in batch.items()})
  np.testing.assert_allclose(float(metrics['loss']), float(want), rtol=1e-5)
  jax.tree.map(
    lambda n, p, g: np.testing.assert_allclose(n, p - 0.1 * np.asarray(g), rtol=1e-4, atol=1e-6),
    jax.tree.map(np.asarray, new.params),
    params,
    grads,
  )


@pytest.mark.parametrize(
  'overrides,needle',
  [
    ({'loss': 'bce'}, "loss must be one of softmax_xent, sigmoid_bce, got 'bce'"),
    ({'loss': 'sigmoid_bce', 'bce_target_threshold': 1.0}, r'must be in \[0, 1\), got 1.0'),
    ({'loss': 'sigmoid_bce', 'bce_target_threshold': -0.2}, r'must be in \[0, 1\)'),
    ({'bce_target_threshold': 0.2}, "bce_target_threshold is set but loss='softmax_xent'"),
    ({'bce_sum_classes': True}, "bce_sum_classes is set but loss='softmax_xent' ignores it"),
  ],
)
def test_bad_loss_fields_are_refused(overrides, needle):
  with pytest.raises(validation.ConfigError, match=needle):
    validation.validate_config(digits_config(**overrides))


def test_bce_fields_are_accepted_with_bce():
  config = digits_config(
    **{'loss': 'sigmoid_bce', 'bce_target_threshold': 0.2, 'bce_sum_classes': True}
  )
  validation.validate_config(config)
  assert losses.from_config(config) == losses.Loss('sigmoid_bce', 0.0, 0.2, True)


def test_a_bad_loss_on_the_command_line_is_one_error_line(tmp_path):
  proc = run_main(str(tmp_path / 'w'), '--config.bce_target_threshold=0.2', devices=1)
  assert_one_line_error(proc, "bce_target_threshold is set but loss='softmax_xent' ignores it")


def test_a_run_trains_on_the_loss_its_config_names(tmp_path):
  """config.loss reaches the step train_and_evaluate builds: the first logged train loss of a
  fresh ResNet-8 is about log(2) = 0.69 per class under BCE, log(10) = 2.3 under softmax."""
  from resnet_jax import train
  from tests.test_train_loop import ArrayBatches, ListWriter
  from tests.test_train_loop import _config as loop_config

  first = {}
  for name in losses.LOSSES:
    config = loop_config(2)
    config.update_from_flattened_dict({'loss': name, 'log_every_steps': 1, 'eval_every_steps': 2})
    writer = ListWriter()
    train.train_and_evaluate(
      config, str(tmp_path / name), train_iter=ArrayBatches(16), writer=writer
    )
    first[name] = next(r['loss'] for r in writer.records if r['split'] == 'train')
  assert 0.5 < first['sigmoid_bce'] < 0.9 and 2.0 < first['softmax_xent'] < 2.8, first
