"""`keep_best`: the checkpoint with the lowest main-eval error survives, across resumes too."""

import json

import jax.numpy as jnp

from resnet_jax import checkpointing, train
from tests.test_train_loop import ArrayBatches, ListWriter, _config


def _steps(workdir) -> list[int]:
  return sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())


def test_the_best_checkpoint_survives_a_resume(tmp_path):
  """Orbax kept the metrics in memory only: a resumed run's BestN saw none and deleted the best
  checkpoint at its first save."""
  state = {'w': jnp.ones(3)}
  ckpt = checkpointing.Checkpointer(tmp_path, max_to_keep=1, keep_best=True)
  for step, error in [(1, 0.1), (2, 0.5), (3, 0.6)]:
    ckpt.save(step, state, {'iterator': None}, metrics={'top1_error': error})
  ckpt.close()
  assert _steps(tmp_path) == [1, 3]
  resumed = checkpointing.Checkpointer(tmp_path, max_to_keep=1, keep_best=True)
  resumed.save(4, state, {'iterator': None}, metrics={'top1_error': 0.7})
  resumed.close()
  assert _steps(tmp_path) == [1, 4]


def test_each_kept_checkpoint_carries_the_error_of_its_own_state(tmp_path):
  """Evaluations every 2 steps, checkpoints every 5: step 5 was saved labelled with step 4's
  error (and the evaluated states of steps 2 and 4 were never saved), so the 'best' checkpoint
  was not the evaluated one."""
  config = _config(steps=7)
  config.update_from_flattened_dict(
    {'eval_every_steps': 2, 'checkpoint_every_steps': 5, 'keep_best': True, 'max_to_keep': 1}
  )
  writer = ListWriter()
  train.train_and_evaluate(config, str(tmp_path), train_iter=ArrayBatches(16), writer=writer)
  errors = {r['step']: r['top1_error'] for r in writer.records if r['split'] == 'eval'}
  assert sorted(errors) == [2, 4, 6, 7]
  kept = {}
  for step in _steps(tmp_path):
    text = (tmp_path / 'checkpoints' / str(step) / 'metrics' / 'metrics').read_text()
    kept[step] = json.loads(text)['top1_error']
  assert 7 in kept  # the latest
  assert all(kept[step] == errors[step] for step in kept), (kept, errors)
  assert min(kept.values()) == min(errors.values())
