"""The experiment configs: what each recipe evaluates on and trains with."""

import pytest

from resnet_jax.default_config import load_sibling_config

_IMAGENET_CONFIGS = ['imagenet', 'r18', 'r34', 'r50', 'r101', 'r152']


@pytest.mark.parametrize('name', _IMAGENET_CONFIGS)
@pytest.mark.parametrize('recipe', ['paper', 'modern'])
def test_imagenet_recipes_evaluate_on_the_validation_split(name, recipe):
  # TFDS's imagenet2012 builder creates train and validation only (its test images have no labels).
  module = load_sibling_config('configs/x.py', name)
  config = module.get_config(f'recipe={recipe}')
  assert config.data.name == 'imagenet2012'
  assert config.data.eval_split == 'validation'


@pytest.mark.parametrize('depth', [8, 20, 56, 1202])
def test_imagenet_config_refuses_a_cifar_depth(depth):
  """imagenet.py:depth=20 built the CIFAR ResNet-20 (3x3 stem, widths 16-64) for ImageNet."""
  module = load_sibling_config('configs/x.py', 'imagenet')
  with pytest.raises(ValueError, match='depth must be one of 18, 34, 50, 101, 152'):
    module.get_config(f'depth={depth}')
