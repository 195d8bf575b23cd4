"""Precise BN (issue 14 §3): the exact average of per-batch BN statistics; evaluate only reads."""

import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import evaluate, precise_bn, runtime, train
from resnet_jax.default_config import load_sibling_config
from resnet_jax.models import create_model
from resnet_jax.train_step import create_mesh
from tests.runner import ROOT, run_evaluate


@pytest.mark.parametrize('group,devices', [(None, 1), (2, 4)])
def test_equals_the_numpy_average_of_per_batch_statistics(group, devices):
  model = create_model('resnet8', num_classes=3, bn_group_size=group)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  rng = np.random.default_rng(0)
  batches = [rng.normal(2.0, 3.0, (4, 8, 8, 1)).astype(np.float32) for _ in range(3)]
  new = precise_bn.precise_batch_stats(
    model, variables, iter(batches), create_mesh(jax.devices()[:devices]), num_batches=3
  )
  means, variances = [], []
  for x in batches:  # the first BN's input is conv1's output; its statistics in numpy
    _, state = model.apply(
      variables,
      x,
      train=True,
      mutable=['batch_stats', 'intermediates'],
      capture_intermediates=lambda mdl, _: mdl.name == 'conv1',
    )
    y = np.asarray(state['intermediates']['conv1']['__call__'][0], np.float64)
    g = y.reshape((-1, group or len(x)) + y.shape[1:])  # ghost groups as the layer forms them
    means.append(g.mean(axis=(1, 2, 3)).mean(axis=0))
    variances.append(g.var(axis=(1, 2, 3)).mean(axis=0))  # biased, per group, then averaged
  got = jax.device_get(new['batch_stats']['bn1'])
  np.testing.assert_allclose(got['mean'], np.mean(means, axis=0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got['var'], np.mean(variances, axis=0), rtol=1e-4, atol=1e-5)
  assert new['params'] is variables['params'] or jax.tree.all(
    jax.tree.map(lambda a, b: bool(jnp.all(a == b)), new['params'], variables['params'])
  )
  with pytest.raises(ValueError, match='gave 3'):
    precise_bn.precise_batch_stats(model, variables, iter(batches), create_mesh(), num_batches=4)


def _tree_digest(root: str) -> str:
  digest = hashlib.sha256()
  for folder, dirs, files in sorted(os.walk(root)):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(folder, name)
      digest.update(os.path.relpath(path, root).encode())
      with open(path, 'rb') as f:
        digest.update(f.read())
  return digest.hexdigest()


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  config = load_sibling_config(ROOT + '/configs/x.py', 'digits').get_config('depth=8')
  config.num_train_steps = 3
  config.batch_size = 32
  config.eval_batch_size = 120
  config.log_every_steps = 1
  config.progress_bar = False
  workdir = str(tmp_path_factory.mktemp('run'))
  train.train_and_evaluate(config, workdir)
  return workdir


class TestOnOneTrainedWorkdir:
  """The tests that read the one trained workdir: one class, which pytest-xdist runs in one worker
  (see `pytest_xdist_make_scheduler` in conftest.py), so the module fixture `trained` is built
  once."""

  def test_evaluate_precise_bn_changes_the_statistics_in_memory_only(self, trained):
    before = _tree_digest(trained)
    plain = evaluate.evaluate_workdir(trained)
    precise = evaluate.evaluate_workdir(trained, precise_bn_batches=2)
    assert precise['precise_bn_batches'] == 2 and 'precise_bn_batches' not in plain
    assert precise['num_examples'] == plain['num_examples'] == 360
    assert precise['loss'] != plain['loss']
    model = runtime.load_trained_model(trained)
    recomputed = precise_bn.precise_bn_for_experiment(model.experiment, model.variables, 2)
    old, new = model.variables['batch_stats']['bn1'], recomputed['batch_stats']['bn1']
    assert not np.allclose(old['mean'], new['mean'])
    assert _tree_digest(trained) == before  # byte-identical: nothing written, nothing touched

  def test_cli_with_grain_workers_table4_and_precise_bn(self, trained, tmp_path):
    """ImageNet configs read with Grain worker processes: the CLI must run them (absl flags)."""
    workdir = str(tmp_path / 'copy')
    shutil.copytree(trained, workdir)
    with open(os.path.join(workdir, 'config.json')) as f:
      config = json.load(f)
    config['data']['num_workers'] = 1
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(config, f)
    got = run_evaluate(workdir, '--precise-bn=1', '--scales=8,12', devices=2, fast_compile=True)
    assert got['num_examples'] == 360 and got['precise_bn_batches'] == 1
