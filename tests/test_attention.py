"""Squeeze-and-excitation ResNets (Hu et al. 2018, "Squeeze-and-Excitation Networks"), read as the
spec: the SE-ResNet module rescales each block's residual branch per channel by
sigmoid(W2 relu(W1 z)), z the branch's global average, with W1 reducing C to C/r (r = 16), before
the shortcut is added. timm's SE-ResNets (`seresnet50`, `seresnext50_32x4d`, ...) are checked in
tests/test_resnet_d.py (parameter counts, golden and live logits); here the rule itself."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import convert, default_config, runtime, summary
from resnet_jax.models import attention, create_model, parse_name
from resnet_jax.train_step import count_params


def _init(model, size=16):
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  return model.init(jax.random.key(0), x, train=False)


@pytest.mark.parametrize(
  'channels,reduced',
  # r = 16, rounded to the nearest multiple of 8 and at least 8 (timm): exact for ImageNet's
  # bottleneck widths 256-2048; 8 where C/16 is smaller (CIFAR's 16-64, ResNet-18's 64 and 128)
  [(16, 8), (64, 8), (128, 8), (256, 16), (512, 32), (1024, 64), (2048, 128), (200, 16)],
)
def test_the_squeeze_width_is_c_over_16_in_multiples_of_8(channels, reduced):
  assert attention.se_channels(channels) == reduced


def test_the_module_rescales_each_channel_by_its_gate():
  rng = np.random.default_rng(0)
  y = rng.normal(size=(2, 3, 5, 32)).astype(np.float32)
  module = attention.SqueezeExcite()
  variables = module.init(jax.random.key(0), jnp.asarray(y))
  p = jax.tree.map(np.asarray, variables['params'])
  assert p['fc1']['kernel'].shape == (1, 1, 32, 8) and p['fc2']['kernel'].shape == (1, 1, 8, 32)
  p['fc1']['bias'] = rng.normal(size=8).astype(np.float32)
  p['fc2']['bias'] = rng.normal(size=32).astype(np.float32)
  got = module.apply({'params': p}, jnp.asarray(y))
  z = y.mean(axis=(1, 2))  # squeeze: [N, C]
  h = np.maximum(z @ p['fc1']['kernel'][0, 0] + p['fc1']['bias'], 0)
  gate = 1 / (1 + np.exp(-(h @ p['fc2']['kernel'][0, 0] + p['fc2']['bias'])))
  np.testing.assert_allclose(got, y * gate[:, None, None, :], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  'name,last',
  [
    ('seresnet18', 'bn2'),
    ('seresnet50', 'bn3'),
    ('seresnet20', 'bn2'),
    ('seresnext50_32x4d', 'bn3'),
  ],
)
def test_every_block_has_its_se_on_the_branch_output(name, last):
  """One `se` per block, sized for the block's output channels (the branch's, before the add)."""
  variables = _init(create_model(name, num_classes=3), 32)
  blocks = {k: v for k, v in variables['params'].items() if k.startswith('layer')}
  assert blocks and all('se' in b for b in blocks.values())
  for block in blocks.values():
    channels = block[last]['scale'].shape[0]
    assert block['se']['fc2']['kernel'].shape == (1, 1, attention.se_channels(channels), channels)


@pytest.mark.parametrize('block', ['basic', 'bottleneck'])
def test_pre_activation_blocks_attend_to_their_last_conv(block):
  model = create_model('resnet20' if block == 'basic' else 'resnet29', block=block, preact=True)
  model = model.clone(attention='se')
  blocks = {k: v for k, v in _init(model)['params'].items() if k.startswith('layer')}
  last = 'conv2' if block == 'basic' else 'conv3'
  for b in blocks.values():
    channels = b[last]['kernel'].shape[-1]
    assert b['se']['fc1']['kernel'].shape == (1, 1, channels, attention.se_channels(channels))


def test_names_and_the_attention_option_are_the_same_net():
  assert parse_name('seresnet50').attention == 'se'
  assert parse_name('resnet50').attention == 'none'
  assert parse_name('seresnet110').family == 'cifar'  # Hu et al.'s CIFAR SE-ResNet-110
  a = _init(create_model('seresnet18', num_classes=3))
  b = _init(create_model('resnet18', num_classes=3, attention='se'))
  assert jax.tree.map(jnp.shape, a) == jax.tree.map(jnp.shape, b)
  plain = create_model('plain20', attention='se')  # SE needs no shortcut: the block's output
  assert 'se' in _init(plain)['params']['layer1_0']
  no_se = create_model('resnet18', num_classes=3)
  assert count_params(a['params']) > count_params(_init(no_se)['params'])


@pytest.mark.parametrize(
  'build,needle',
  [
    (lambda: create_model('seresnet50', attention='none'), 'contradicts it'),
    (lambda: create_model('resnet50', attention='cbam'), "one of none, se or None, got 'cbam'"),
    (lambda: parse_name('seplain20'), 'the se prefix names squeeze-and-excitation ResNets'),
  ],
)
def test_refusals(build, needle):
  with pytest.raises(ValueError, match=needle):
    build()


def test_the_config_field_reaches_the_model_and_a_run_resumes_only_with_the_same(tmp_path):
  from etils import epath

  from resnet_jax import train
  from resnet_jax.workdir import CONFIG_FILE

  config = default_config.base_config()
  assert config.model.attention is None  # the name's own
  config.model.update(name='resnet20', attention='se')
  assert runtime.build_model(config).attention == 'se'
  workdir = epath.Path(tmp_path)
  (workdir / CONFIG_FILE).write_text(config.to_json_best_effort())
  train._prepare_workdir(workdir, config)  # the same config resumes
  other = default_config.base_config()
  other.model.update(name='resnet20')
  with pytest.raises(train.ConfigError, match='holds a run with model.attention='):
    train._prepare_workdir(workdir, other)


def test_the_se_weights_get_gradients_and_torch_keys_round_trip():
  model = create_model('seresnet18', num_classes=4)
  variables = _init(model, 32)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)

  def loss(params):
    logits, _ = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
    return jnp.mean(logits**2)

  grads = jax.grad(loss)(variables['params'])['layer2_1']['se']
  assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads))
  sd = convert.to_torchvision(variables)
  assert sd['layer2.1.se.fc1.weight'].shape == (8, 128, 1, 1)
  assert sd['layer2.1.se.fc2.bias'].shape == (128,)
  back = convert.from_torchvision(sd, 'seresnet18')
  jax.tree.map(np.testing.assert_array_equal, back['params'], variables['params'])
  with pytest.raises(ValueError, match='the file has squeeze-and-excitation blocks .* seresnet18'):
    convert.from_torchvision(sd, 'resnet18')
  plain = convert.to_torchvision(_init(create_model('resnet18', num_classes=4), 32))
  with pytest.raises(ValueError, match='seresnet18 has squeeze-and-excitation blocks, the file'):
    convert.from_torchvision(plain, 'seresnet18')


def test_summary_counts_the_se_parameters(capsys):
  import json

  summary.main(['seresnet50', '--json'])
  out = json.loads(capsys.readouterr().out)
  assert out['params'] == 28_088_024  # timm's, 1000 classes
  assert (out['attention'], out['se_reduction']) == ('se', 16)
  summary.main(['resnetrs50', '--json'])
  assert json.loads(capsys.readouterr().out)['se_reduction'] == 4
  summary.main(['resnet50', '--json'])
  assert (lambda o: (o['attention'], o['se_reduction']))(json.loads(capsys.readouterr().out)) == (
    'none',
    None,
  )
