"""The weights' EMA (resnet_jax/ema.py): torchvision's update rule, kept and resumed with the run,
evaluated beside the model; a run without it keeps the train state (and checkpoints) of before.
Also the resume of a run with Mixup/CutMix on: bit-exact, as every other resume."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from resnet_jax import checkpointing, ema, evaluate, evaluators, pretrained, train
from resnet_jax.default_config import load_sibling_config
from resnet_jax.models import create_model
from resnet_jax.train_step import (
  EmaTrainState,
  TrainState,
  batch_sharding,
  create_mesh,
  init_state,
  jit_train_step,
  state_fingerprint,
)
from resnet_jax.validation import ConfigError
from tests.test_train_loop import (
  _CONFIGS,
  ArrayBatches,
  FailingBatches,
  ListWriter,
  _config,
  run_loop,
)


def _tree(value):
  return {'params': {'w': jnp.full((2,), value, jnp.float32)}, 'batch_stats': {'m': jnp.ones(1)}}


def _run_updates(rule, values):
  """The average after each step s, the model's weights being values[s] after it."""
  avg, out = _tree(0.0), []
  for s, v in enumerate(values):
    avg = rule.update(jnp.int32(s), _tree(v), avg)
    out.append(float(avg['params']['w'][0]))
  return out


def test_updates_every_n_steps_with_the_decay_after_copying_first():
  """torchvision's AveragedModel: the first update copies (n_averaged == 0), then
  ema = decay * ema + (1 - decay) * model at each update; nothing moves in between. (A decay
  other than 1/2, so that decay and 1 - decay cannot be swapped unseen.)"""
  got = _run_updates(ema.Ema(decay=0.75, every_steps=3), [1.0, 2, 3, 4, 5, 6, 7])
  want = [1.0, 1.0, 1.0, 0.75 * 1 + 0.25 * 4, 1.75, 1.75, 0.75 * 1.75 + 0.25 * 7]
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_updates_during_the_warmup_copy_the_weights():
  """torchvision resets n_averaged after each update of the lr warm-up: those updates and the
  first one after the warm-up copy the model."""
  got = _run_updates(ema.Ema(decay=0.75, every_steps=2, warmup_steps=3), [1.0, 2, 3, 4, 5, 6, 7])
  want = [1.0, 1.0, 3.0, 3.0, 5.0, 5.0, 0.75 * 5 + 0.25 * 7]  # step 4 < 3 + 2 still copies
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_the_train_step_averages_params_and_bn_statistics_in_float32():
  mesh = create_mesh()
  model = create_model('resnet8', num_classes=4)
  tx = optax.sgd(0.1, momentum=0.9)
  state = init_state(model, tx, (8, 8, 1), seed=0, mesh=mesh, ema=True)
  assert isinstance(state, EmaTrainState)
  rule = ema.Ema(decay=0.75, every_steps=1)
  step = jit_train_step(
    mesh, jax.tree.map(lambda x: x.sharding, state), optax.constant_schedule(0.1), ema=rule
  )
  rng = np.random.default_rng(0)
  batch = {
    'image': rng.normal(size=(16, 8, 8, 1)).astype(np.float32),
    'label': rng.integers(0, 4, size=16).astype(np.int32),
  }
  batch = {k: jax.device_put(v, batch_sharding(mesh)) for k, v in batch.items()}
  state, _ = step(state, batch)  # step 0: the average copies the new weights
  first = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.ema), first)
  state, _ = step(state, batch)
  second = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
  want = jax.tree.map(lambda a, b: 0.75 * a + 0.25 * b, first, second)
  got = jax.device_get(state.ema)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7), got, want)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(got))
  assert state.ema['params']['conv1']['kernel'].sharding == state.params['conv1']['kernel'].sharding
  assert state_fingerprint(state) != state_fingerprint(
    state.replace(ema=jax.tree.map(lambda x: x + 1, state.ema))
  )  # the fingerprint covers the average


_RECIPE = {
  'data.mixup_alpha': 0.2,
  'data.cutmix_alpha': 1.0,
  'label_smoothing': 0.1,
  'ema_decay': 0.5,
  'ema_every_steps': 1,
  'schedule.warmup_steps': 1,
}


@pytest.mark.parametrize('overrides', [_RECIPE, {'data.cutmix_alpha': 1.0}], ids=['recipe', 'cut'])
def test_a_resumed_run_with_mixing_and_ema_ends_in_the_same_state(tmp_path, overrides):
  straight = run_loop(tmp_path, 'straight', **overrides)
  with pytest.raises(RuntimeError, match='pipeline broke'):
    run_loop(tmp_path, 'crashed', fail_after=3, **overrides)  # after its checkpoint of step 2
  assert checkpointing.Checkpointer(tmp_path / 'crashed').latest_step() == 2
  resumed = run_loop(tmp_path, 'crashed', **overrides)
  assert resumed['state_fingerprint'] == straight['state_fingerprint']
  assert resumed.get('eval_ema') == straight.get('eval_ema')
  plain = run_loop(tmp_path, 'plain')
  assert plain['state_fingerprint'] != straight['state_fingerprint']


@pytest.fixture(scope='module')
def ema_run(tmp_path_factory):
  """A 4-step digits run with EMA (decay 0.5, every step, no warm-up) and one without."""
  tmp = tmp_path_factory.mktemp('ema')
  overrides = {'ema_decay': 0.5, 'schedule.warmup_steps': 0, 'evals.test': dict(every_steps=0)}
  with_ema = run_loop(tmp, 'ema', **overrides)
  without = run_loop(tmp, 'plain', **{'schedule.warmup_steps': 0})
  return tmp / 'ema', with_ema, tmp / 'plain', without


class TestOneEmaRun:
  """Tests sharing the `ema_run` fixture (one xdist unit: built once)."""

  def test_results_and_metrics_carry_the_ema_beside_the_model(self, ema_run):
    workdir, result, _, without = ema_run
    saved = json.loads((workdir / 'results.json').read_text())
    assert set(saved['eval_ema']) == set(evaluators.RESULT_KEYS)
    assert saved['eval_ema'] != saved['eval']
    assert set(saved['evals']) == {'test', 'test_ema'}
    assert 'eval_ema' not in without and 'evals' not in without
    state_keys = checkpoint_keys(workdir)
    assert state_keys == {'step', 'params', 'batch_stats', 'opt_state', 'ema'}

  def test_evaluate_weights_ema_reports_what_the_run_recorded(self, ema_run, capsys):
    workdir, result, _, _ = ema_run
    evaluate.main(['--workdir', str(workdir), '--weights', 'ema'])
    got = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert got['weights'] == 'ema'
    for key in evaluators.RESULT_KEYS:
      assert got[key] == pytest.approx(result['eval_ema'][key], rel=1e-5)
    evaluate.main(['--workdir', str(workdir)])
    got = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert 'weights' not in got and got['loss'] == pytest.approx(result['eval']['loss'], rel=1e-5)

  def test_evaluate_weights_ema_of_a_run_without_is_one_error_line(self, ema_run, capsys):
    _, _, plain, _ = ema_run
    with pytest.raises(SystemExit) as e:
      evaluate.main(['--workdir', str(plain), '--weights', 'ema'])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith('error: ') and len(err.strip().splitlines()) == 1
    assert 'no EMA weights' in err and 'ema_decay' in err

  def test_init_from_a_run_with_ema_takes_its_model_weights(self, ema_run):
    workdir = ema_run[0]
    given = pretrained.load_model_variables(workdir)
    model, _ = checkpointing.restore_model_variables(workdir, weights='model')
    average, _ = checkpointing.restore_model_variables(workdir, weights='ema')
    jax.tree.map(np.testing.assert_array_equal, given, model)
    assert state_fingerprint(given['params']) != state_fingerprint(average['params'])

  def test_switching_ema_on_or_off_does_not_resume(self, ema_run):
    workdir, _, plain, _ = ema_run
    with pytest.raises(ConfigError, match='ema_decay=0.5, this config has 0.0'):
      run_loop(workdir.parent, 'ema', steps=6, **{'schedule.warmup_steps': 0})
    with pytest.raises(ConfigError, match='ema_decay=0.0, this config has 0.5'):
      run_loop(plain.parent, 'plain', steps=6, **{'ema_decay': 0.5, 'schedule.warmup_steps': 0})


def checkpoint_keys(workdir) -> set:
  """The top-level keys of the newest checkpoint's saved train state."""
  manager = ocp.CheckpointManager(
    workdir / 'checkpoints',
    options=ocp.CheckpointManagerOptions(read_only=True, create=False),
    item_handlers={'state': ocp.PyTreeCheckpointHandler()},
  )
  try:
    return set(manager.item_metadata(manager.latest_step())['state'].keys())
  finally:
    manager.close()


def test_a_run_without_ema_keeps_the_state_and_checkpoints_of_before(tmp_path):
  """Old checkpoints hold exactly {step, params, batch_stats, opt_state}: a run without EMA
  restores into that same tree (an `ema: None` field would not: Orbax refuses the missing key)."""
  result = run_loop(tmp_path, 'plain', steps=2)
  assert checkpoint_keys(tmp_path / 'plain') == {'step', 'params', 'batch_stats', 'opt_state'}
  mesh = create_mesh()
  state = init_state(create_model('resnet8', num_classes=4), optax.sgd(0.1), (8, 8, 1), 0, mesh)
  assert type(state) is TrainState
  resumed = run_loop(tmp_path, 'plain', steps=2)  # finished: restored, nothing recomputed
  assert resumed['state_fingerprint'] == result['state_fingerprint']


def test_an_evaluator_named_like_an_ema_record_is_refused():
  config = _config()
  config.evals.test_ema = dict(split='test')
  with pytest.raises(ConfigError, match='not ending in _ema'):
    evaluators.from_config(config)


@pytest.mark.parametrize(
  'key,value,message',
  [('ema_decay', 1.0, r'ema_decay must be in \[0, 1\)'), ('ema_every_steps', 0, 'must be >= 1')],
)
def test_bad_ema_values_are_refused(key, value, message):
  config = _config()
  config[key] = value
  with pytest.raises(ConfigError, match=message):
    ema.validate(config)


def test_a_run_with_ema_resumes_across_the_scanned_and_unrolled_layouts(tmp_path):
  """The average is converted with the weights (runtime._restore_any_layout)."""

  def run(name, scan, fail_after=None):
    config = load_sibling_config(_CONFIGS, 'digits').get_config('depth=14,steps=4,batch=16')
    config.update_from_flattened_dict(
      {
        'log_every_steps': 2,
        'eval_every_steps': 0,
        'checkpoint_every_steps': 2,
        'progress_bar': False,
        'model.scan': scan,
        'ema_decay': 0.5,
        'schedule.warmup_steps': 0,
      }
    )
    batches = ArrayBatches(16) if fail_after is None else FailingBatches(16, fail_after)
    return train.train_and_evaluate(
      config, str(tmp_path / name), train_iter=batches, writer=ListWriter()
    )

  straight = run('a', True)
  with pytest.raises(RuntimeError, match='pipeline broke'):
    run('b', True, fail_after=3)
  resumed = run('b', False)
  assert resumed['eval_ema']['loss'] == pytest.approx(straight['eval_ema']['loss'], rel=1e-4)
  assert resumed['eval_ema'] != resumed['eval']
