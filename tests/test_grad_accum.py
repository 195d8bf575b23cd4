"""Gradient accumulation: the paper's batch on a smaller device, with the one-pass update.

With ghost BN (statistics over fixed groups of examples, the paper's per-GPU batch), a step over
micro-batches made of whole groups is the same function of the batch as one pass: the same
losses, gradients and running statistics, up to float summation order.
"""

import json

import jax
import numpy as np
import pytest

from resnet_jax import train
from resnet_jax.default_config import load_sibling_config
from resnet_jax.train_step import jit_train_step
from resnet_jax.validation import ConfigError, validate_grad_accum
from tests.runner import ROOT, one_train_step
from tests.test_benchmark import _script

_BATCH = 16


def _step(accum_steps: int, num_devices: int):
  """One momentum-SGD step of a ghost-BN (groups of 2) resnet8 on a fixed batch of 16."""
  state, metrics, hlo = one_train_step(
    accum_steps=accum_steps, num_devices=num_devices, compiled_text=True
  )
  return jax.device_get((state.params, state.batch_stats, state.opt_state)), metrics, hlo


@pytest.mark.parametrize('accum_steps,num_devices', [(2, 1), (4, 1), (2, 4)])
def test_accumulated_step_is_the_one_pass_step(accum_steps, num_devices):
  want, want_metrics, one_pass_hlo = _step(1, num_devices)
  got, got_metrics, hlo = _step(accum_steps, num_devices)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), got, want)
  for key in ('loss', 'top1_error'):
    assert float(got_metrics[key]) == pytest.approx(float(want_metrics[key]), rel=1e-5)
  # Micro-batches take the same slice of every device's share: no example crosses devices.
  for collective in ('all-to-all', 'all-gather', 'collective-permute'):
    assert (collective in hlo) == (collective in one_pass_hlo), collective


@pytest.mark.parametrize(
  'steps,group,message',
  [
    (0, 2, 'grad_accum_steps must be positive'),
    (3, 2, 'grad_accum_steps=3 does not divide the per-device batch 16'),
    (2, None, 'whole-batch BN statistics would become per-micro-batch ones'),
    (4, 8, 'micro-batches of 4 examples per device, and model.bn_group_size=8 does not divide'),
  ],
)
def test_accumulation_that_would_change_the_update_is_refused(steps, group, message):
  with pytest.raises(ConfigError, match=message):
    validate_grad_accum(steps, group, batch_size=64, n_devices=4)
  validate_grad_accum(2, 8, batch_size=64, n_devices=4)  # 8 per device: one group per micro
  validate_grad_accum(2, None, batch_size=64, n_devices=4, frozen_bn=True)  # no batch statistics


def test_a_run_with_accumulation_trains_as_the_run_without(tmp_path, monkeypatch):
  """train_and_evaluate passes grad_accum_steps to the step: the same final weights' eval."""
  results, compiled_with = [], []

  def recording(*args, **kwargs):
    compiled_with.append(kwargs.get('accum_steps'))
    return jit_train_step(*args, **kwargs)

  monkeypatch.setattr(train, 'jit_train_step', recording)
  for accum in (1, 2):
    config = load_sibling_config(ROOT + '/configs/x.py', 'digits').get_config('depth=8,steps=2')
    config.batch_size, config.model.bn_group_size = 16, 2  # 4 devices: 2 per micro
    config.grad_accum_steps, config.progress_bar = accum, False
    results.append(train.train_and_evaluate(config, str(tmp_path / f'accum{accum}'))['eval'])
  assert results[1]['loss'] == pytest.approx(results[0]['loss'], rel=1e-4)
  assert results[1]['top1_error'] == results[0]['top1_error']
  assert compiled_with == [1, 2]


def test_accumulation_divides_the_step_memory_by_its_micro_batches(capsys):
  """What accumulation is for, in XLA's own buffer assignment (benchmark.py --compile-only)."""
  benchmark = _script('benchmark')
  temp = {}
  for accum in (1, 4):
    benchmark.main(
      ['--model=resnet8', '--image-size=32', '--batch-size=64', '--bn-group=4']
      + [f'--grad-accum-steps={accum}', '--compile-only', '--json', '--no-scan']
    )
    temp[accum] = json.loads(capsys.readouterr().out)['train_temp_bytes']
  assert temp[4] < 0.4 * temp[1]


def test_each_micro_batch_gets_its_own_dropout_key():
  """Micro-batch j's dropout / drop-path masks come from the step's key folded with j: no two
  micro-batches share masks. A stand-in gradient function returns a draw from its key as loss."""
  from types import SimpleNamespace

  import jax.numpy as jnp

  from resnet_jax.train_step import _accumulated

  def grad_fn(params, images, labels, key):
    return (jax.random.uniform(key), (jnp.zeros(()), {})), params

  state = SimpleNamespace(params={'w': jnp.zeros(2)}, batch_stats={})
  key = jax.random.key(7)
  images, labels = jnp.zeros((8, 2, 2, 1)), jnp.zeros(8, jnp.int32)
  loss = _accumulated(grad_fn, state, images, labels, key, 4, 1)[0]
  draws = [float(jax.random.uniform(jax.random.fold_in(key, j))) for j in range(4)]
  assert len(set(draws)) == 4
  assert float(loss) == pytest.approx(np.mean(draws), rel=1e-6)
