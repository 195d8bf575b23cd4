"""Last session's features walked as a researcher would (2026-11-25): BiT weights converted,
fine-tuned and evaluated; the ResNet-RS recipe; ImageNet-V2's numbered folders."""

import math

import pytest

from resnet_jax import multiscale, summary
from resnet_jax.models import create_model


@pytest.mark.parametrize(
  'name, kwargs',
  [
    ('resnet18', {}),
    ('resnet50d', {}),  # deep stem
    ('resnet50c', {}),
    ('resnetrs50', {}),  # deep stem, its max-pool a strided conv
    ('resnetv2_50x1_bit', {}),  # BiT's 7x7 conv, pad, unpadded pool
    ('resnetv2_50x1_bit', dict(output_stride=16)),
    ('resnetrs50', dict(output_stride=8)),
  ],
)
def test_whole_image_testing_knows_every_imagenet_stems_stride(name, kwargs):
  """Table 4's whole-image testing (`evaluate --scales`, `evals` with `scales`) batches images by
  whole numbers of the net's stride; it stopped with 'cannot tell the total stride of ResNet' for
  the deep stems and BiT's (after training, for an `evals` entry)."""
  model = create_model(name, **kwargs)
  last = summary.feature_maps(create_model(name, features_only=True, **kwargs), 64)[-1]
  assert multiscale.network_stride(model) == last['stride'] == kwargs.get('output_stride', 32)


@pytest.mark.parametrize('name', ['resnet20', 'wrn16_2', 'resnet164'])
def test_groupnorm_on_a_cifar_net_is_refused_when_built(name):
  """BiT's GroupNorm has 32 groups; a CIFAR net's stem and first stage have 16 channels. It was
  accepted by create_model and failed at init inside flax ('Number of groups (32) does not divide
  the number of channels (16)')."""
  with pytest.raises(ValueError, match="GroupNorm's 32 groups .* ImageNet-family"):
    create_model(name, norm='group', weight_standardization=True)


def test_groupnorm_gives_an_imagenet_net_no_batch_stats():
  """README: create_model(name, norm='group', weight_standardization=True) on an ImageNet-family
  net: GroupNorm layers, no running statistics, the same parameter count as its BatchNorm twin
  (GroupNorm's scale and bias per channel, as BatchNorm's)."""
  import jax
  import jax.numpy as jnp

  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  shapes = {}
  for norm in ('batch', 'group'):
    model = create_model('resnet18', norm=norm, weight_standardization=norm == 'group')
    shapes[norm] = jax.eval_shape(lambda x, m=model: m.init(jax.random.key(0), x), x)
  assert set(shapes['group']) == {'params'} and set(shapes['batch']) == {'params', 'batch_stats'}
  count = lambda tree: sum(math.prod(a.shape) for a in jax.tree.leaves(tree['params']))
  assert count(shapes['group']) == count(shapes['batch'])
