"""ResNet-RS (Bello et al. 2021, "Revisiting ResNets: Improved Training and Scaling Strategies"),
read as the spec of timm's `resnetrs*`: ResNet-D's deep stem and avg-pool shortcuts, the stem's
max-pool replaced by a 3x3/2 conv + BN + ReLU, squeeze-and-excitation at ratio 1/4, and the
paper's depths 50-420 (Table 7). Parameter counts and timm's logits (golden and live) are in
tests/test_resnet_d.py with the other timm nets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import convert
from resnet_jax.models import attention, create_model, parse_name
from resnet_jax.models.names import RS_DEPTHS


def _params(model, size=32):
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x))['params']


def test_the_papers_depths_are_bottleneck_blocks_per_stage():
  for depth in (50, 101, 152, 200, 350):  # 3 convs a bottleneck, the stem conv and fc
    assert 2 + 3 * sum(RS_DEPTHS[depth]) == depth
  # the two the paper names loosely: 272 and 419 such layers
  assert RS_DEPTHS[270] == (4, 29, 53, 4) and RS_DEPTHS[420] == (4, 44, 87, 4)
  assert create_model('resnetrs200').stage_sizes == (3, 24, 36, 3)


def test_the_stem_pools_with_a_strided_conv_and_the_blocks_squeeze_by_4():
  model = create_model('resnetrs50', num_classes=5)
  params = _params(model)
  assert model.stem == 'deep_conv_pool' and model.avg_down and model.attention == 'se'
  assert params['stem_pool_conv']['kernel'].shape == (3, 3, 64, 64)
  assert 'stem_pool_bn' in params
  se = params['layer4_2']['se']
  assert se['fc1']['kernel'].shape == (1, 1, 2048, 512)  # 2048 / 4
  assert attention.se_channels(256, 4) == 64
  x = jnp.zeros((1, 64, 64, 3), jnp.float32)
  features = create_model('resnetrs50', features_only=True).init(jax.random.key(0), x)
  out = create_model('resnetrs50', features_only=True).apply(features, x)
  assert out['C2'].shape == (1, 16, 16, 256)  # stride 4 after the conv pool, as after max-pool


def test_names_and_refusals():
  spec = parse_name('resnetrs101')
  assert (spec.variant, spec.tweak, spec.attention, spec.block) == (
    'resnetrs',
    'd',
    'se',
    'bottleneck',
  )
  with pytest.raises(ValueError, match='ResNet-RS nets are resnetrs'):
    parse_name('resnetrs60')
  with pytest.raises(ValueError, match='contradicts it'):
    create_model('resnetrs50', stem='7x7')
  with pytest.raises(ValueError, match='contradicts it'):
    create_model('resnetrs50', attention='none')


def test_timm_keys_of_the_stem_pool_round_trip():
  model = create_model('resnetrs50', num_classes=3)
  x = jnp.zeros((1, 32, 32, 3), jnp.float32)
  variables = model.init(jax.random.key(1), x)
  sd = convert.to_torchvision(variables, avg_down=True)
  assert sd['maxpool.0.weight'].shape == (64, 64, 3, 3)
  assert sd['maxpool.1.running_var'].shape == (64,)
  back = convert.from_torchvision(sd, 'resnetrs50')
  jax.tree.map(np.testing.assert_array_equal, back['params'], variables['params'])
