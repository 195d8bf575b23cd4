"""ResNets as backbones: C2-C5 features, output stride by dilation, frozen BN, frozen stages.

Feature parity is against torchvision's own ``IntermediateLayerGetter`` around its own ResNet
(random weights and BN statistics, 64x64 inputs), with and without ``replace_stride_with_dilation``.
"""

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import convert, optim, summary
from resnet_jax.default_config import base_config
from resnet_jax.models import backbone, create_model, layout

RETURN_LAYERS = {'layer1': 'C2', 'layer2': 'C3', 'layer3': 'C4', 'layer4': 'C5'}
DILATE = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}


def abstract(model, size):
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  return variables, jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)


@pytest.mark.parametrize(
  'name,output_stride',
  [
    ('resnet18', 32),
    ('resnet50', 32),
    ('resnet50', 8),
    ('resnext50_32x4d', 16),
  ],
)
def test_features_match_torchvision_intermediate_layer_getter(
  torch, random_torchvision, name, output_stride
):
  from torchvision.models._utils import IntermediateLayerGetter

  kwargs = {} if output_stride == 32 else {'replace_stride_with_dilation': DILATE[output_stride]}
  reference = IntermediateLayerGetter(random_torchvision(name, **kwargs), RETURN_LAYERS)
  x = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    ref = reference(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
  state_dict = random_torchvision(name, **kwargs).state_dict()
  variables = convert.from_torchvision(state_dict, name, features_only=True)
  assert 'fc' not in variables['params']
  model = create_model(name, features_only=True, output_stride=output_stride)
  ours = model.apply(variables, jnp.asarray(x), train=False)
  assert list(ours) == ['C2', 'C3', 'C4', 'C5']
  for key, value in ours.items():
    expected = ref[key].numpy().transpose(0, 2, 3, 1)
    assert value.shape == expected.shape, key
    assert np.linalg.norm(np.asarray(value) - expected) / np.linalg.norm(expected) < 1e-4, key


@pytest.mark.parametrize(
  'name,channels', [('resnet18', (64, 128, 256, 512)), ('resnext101_32x8d', (256, 512, 1024, 2048))]
)
def test_output_stride_by_dilation_shapes_and_same_parameters(name, channels):
  sizes = {32: (56, 28, 14, 7), 16: (56, 28, 14, 14), 8: (56, 28, 28, 28)}
  classifier, _ = abstract(create_model(name), 224)
  expected_params = jax.tree.map(lambda p: p.shape, classifier['params'])
  del expected_params['fc']
  for output_stride, spatial in sizes.items():
    variables, features = abstract(
      create_model(name, features_only=True, output_stride=output_stride), 224
    )
    assert jax.tree.map(lambda p: p.shape, variables['params']) == expected_params
    assert [f.shape for f in features.values()] == [(1, s, s, c) for s, c in zip(spatial, channels)]
    logits_model = create_model(name, output_stride=output_stride)  # a dilated classifier too
    assert abstract(logits_model, 224)[1].shape == (1, 1000)


def test_features_only_and_output_stride_refused_where_meaningless():
  with pytest.raises(ValueError, match='ImageNet-family backbones'):
    create_model('resnet56', features_only=True)
  with pytest.raises(ValueError, match='ImageNet-family backbones'):
    create_model('wrn28_10', output_stride=16)
  with pytest.raises(ValueError, match='output_stride must be 32, 16 or 8'):
    create_model('resnet50', output_stride=4)
  with pytest.raises(ValueError, match='frozen_stages must be -1'):
    create_model('resnet50', frozen_stages=5)


def _tiny(**kwargs):
  return create_model('resnet18', **kwargs).clone(widths=(8, 8, 16, 16), stage_sizes=(1, 1, 1, 1))


def _randomised_stats(model, x):
  variables = model.init(jax.random.key(0), x, train=False)
  keys = iter(jax.random.split(jax.random.key(1), 1000))
  stats = jax.tree.map(
    lambda s: s + 0.3 * jax.random.uniform(next(keys), s.shape), variables['batch_stats']
  )
  return {'params': variables['params'], 'batch_stats': stats}


@pytest.mark.parametrize('scan', [False, True])
def test_frozen_bn_is_invariant_under_train(scan):
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32, 32, 3)), jnp.float32)
  model = _tiny(frozen_bn=True).clone(stage_sizes=(2, 2, 1, 1), scan=scan)
  variables = _randomised_stats(model, x)
  out, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  np.testing.assert_array_equal(out, model.apply(variables, x, train=False))
  jax.tree.map(np.testing.assert_array_equal, updates['batch_stats'], variables['batch_stats'])
  live = model.clone(frozen_bn=False)  # the test can fail: live BN changes both
  out_live, up_live = live.apply(variables, x, train=True, mutable=['batch_stats'])
  assert not np.allclose(out_live, out)
  assert not np.allclose(
    up_live['batch_stats']['bn1']['mean'], variables['batch_stats']['bn1']['mean']
  )


def _grads(model, variables, x):
  def loss(params):
    out, _ = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
    return jnp.sum(out**2)

  return jax.grad(loss)(variables['params'])


def test_frozen_affine_and_frozen_stages_get_no_gradient():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32, 32, 3)), jnp.float32)
  model = _tiny(frozen_bn=True, frozen_bn_affine=True, frozen_stages=1)
  variables = _randomised_stats(model, x)
  grads = _grads(model, variables, x)
  norm = lambda tree: float(sum(jnp.sum(g**2) for g in jax.tree.leaves(tree)))
  for frozen in ('conv1', 'bn1', 'layer1_0'):
    assert norm(grads[frozen]) == 0.0, frozen
  assert norm(grads['layer2_0']['bn1']) == 0.0  # frozen affine everywhere
  assert norm(grads['layer2_0']['conv1']) > 0 and norm(grads['fc']) > 0
  free = _grads(model.clone(frozen_bn_affine=False, frozen_stages=-1), variables, x)
  assert norm(free['conv1']) > 0 and norm(free['layer2_0']['bn1']) > 0
  # a frozen stage's BN runs on its statistics even with frozen_bn off; later stages update
  partly = model.clone(frozen_bn=False, frozen_bn_affine=False)
  _, up = partly.apply(variables, x, train=True, mutable=['batch_stats'])
  jax.tree.map(
    np.testing.assert_array_equal,
    up['batch_stats']['layer1_0'],
    variables['batch_stats']['layer1_0'],
  )
  assert not np.allclose(
    up['batch_stats']['layer2_0']['bn1']['mean'],
    variables['batch_stats']['layer2_0']['bn1']['mean'],
  )


def test_optimizer_leaves_frozen_leaves_untouched_despite_weight_decay():
  config = base_config()
  config.model.frozen_stages = 1
  config.model.frozen_bn_affine = True
  config.optimizer.weight_decay = 0.1
  params = {
    'conv1': {'kernel': jnp.ones((3,))},
    'layer1_scan': {'conv1': {'kernel': jnp.ones(2)}},
    'layer2_0': {'conv1': {'kernel': jnp.ones(2)}, 'bn1': {'scale': jnp.ones(2)}},
    'fc': {'bias': jnp.ones(2)},
  }
  mask = backbone.frozen_mask(params, 1, True)
  assert mask == {
    'conv1': {'kernel': True},
    'layer1_scan': {'conv1': {'kernel': True}},
    'layer2_0': {'conv1': {'kernel': False}, 'bn1': {'scale': True}},
    'fc': {'bias': False},
  }
  tx = optim.create_optimizer(config, optax.constant_schedule(0.1))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new, params)
  assert moved == jax.tree.map(lambda f: not f, mask)
  config.model.frozen_stages, config.model.frozen_bn_affine = -1, False
  plain = optim.create_optimizer(config, optax.constant_schedule(0.1))
  assert jax.tree.structure(plain.init(params)) != jax.tree.structure(tx.init(params))


def test_scanned_dilated_features_equal_unrolled():
  model = create_model('resnet50', features_only=True, output_stride=8).clone(
    widths=(8, 8, 8, 8), stage_sizes=(2, 3, 3, 2)
  )
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 32, 32, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), x, train=False)
  scanned = model.clone(scan=True).apply(layout.to_scanned(variables, model.stage_sizes), x)
  for key, value in model.apply(variables, x).items():
    np.testing.assert_allclose(scanned[key], value, rtol=1e-5, atol=1e-5)


def test_summary_prints_feature_shapes_and_strides(capsys):
  summary.main(['resnext50_32x4d', '--features', '--output-stride', '16', '--json'])
  out = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert [(f['name'], f['shape'], f['stride']) for f in out['features']] == [
    ('C2', [56, 56, 256], 4),
    ('C3', [28, 28, 512], 8),
    ('C4', [14, 14, 1024], 16),
    ('C5', [14, 14, 2048], 16),
  ]
  assert out['params'] == 25_028_904 - 2048 * 1000 - 1000 and out['num_classes'] is None
  summary.main(['wide_resnet50_2', '--features'])
  text = capsys.readouterr().out
  assert re.search(r'feature C5 +7x7x2048 +stride 32\n', text)
  assert math.isclose(float(text.split('(')[1].split(' G')[0]), 11.4, abs_tol=0.05)


@pytest.mark.slow
def test_finetune_resnext_with_frozen_bn_and_stages_from_converted_weights(
  torch, converted_random_weights, tmp_path
):
  """configs/finetune.py on a converted ResNeXt: frozen stages and BN statistics come out as
  converted, the rest trains (weight decay and momentum included)."""
  from resnet_jax import checkpointing
  from tests.runner import results, run_main

  weights, converted = converted_random_weights('resnext50_32x4d', seed=8)
  workdir = tmp_path / 'ft'
  proc = run_main(
    str(workdir),
    f'--config.init_from={converted}',
    '--config.eval_every_steps=0',
    devices=1,
    fast_compile=True,
    config='configs/finetune.py:arch=resnext50_32x4d,steps=2,batch=8,'
    'image_size=16,frozen_bn,frozen_stages=2',
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert results(str(workdir))['step'] == 2
  final, _ = checkpointing.restore_model_variables(str(workdir))
  final = layout.convert_layout(final, layout.UNROLLED)  # CPU runs default to scanned stages
  start = convert.adapt_input_channels(
    convert.from_torchvision(torch.load(weights), 'resnext50_32x4d'), 1
  )
  same = lambda a, b: all(
    np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )
  for name in ('conv1', 'bn1', 'layer1_0', 'layer2_3'):
    assert same(final['params'][name], start['params'][name]), name
  assert same(final['batch_stats'], start['batch_stats'])
  assert not same(final['params']['layer3_0']['conv2'], start['params']['layer3_0']['conv2'])
  assert not same(final['params']['layer4_2']['bn3'], start['params']['layer4_2']['bn3'])
