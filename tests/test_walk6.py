"""Last session's features walked as a researcher would (2026-11-25): BiT weights converted,
fine-tuned and evaluated; the ResNet-RS recipe; ImageNet-V2's numbered folders."""

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
