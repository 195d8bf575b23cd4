"""The experiment configs: what each recipe evaluates on and trains with."""

import os
import re

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


@pytest.mark.parametrize('steps,boundaries', [(1, ''), (2, '1'), (3, '1,2'), (8000, '4000,6000')])
def test_the_cifar_recipe_scales_its_boundaries_to_any_length(steps, boundaries):
  """fashion_mnist.py:steps=2 gave boundaries '1,1', which the schedule refuses (a decay given
  twice); steps=1 gave '0,0'."""
  from resnet_jax import optim

  config = load_sibling_config('configs/x.py', 'fashion_mnist').get_config(f'steps={steps}')
  assert config.schedule.boundaries == boundaries
  optim.create_learning_rate_fn(config, 469, steps)


@pytest.mark.parametrize('name,arg', [('r50', 'depth=101'), ('cifar', 'depth=20,depth=56')])
def test_a_config_arg_given_twice_is_refused(name, arg):
  """r50.py:depth=101 trained a ResNet-101 (its 'depth=50,depth=101': the last one won)."""
  with pytest.raises(ValueError, match="'depth' is given twice"):
    load_sibling_config('configs/x.py', name).get_config(arg)


_ARG_CONFIGS = ['digits', 'cifar', 'fashion_mnist', 'imagenet', 'wrn', 'finetune']
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _accepted_args(name: str) -> set[str]:
  """The config args get_config takes: parse_arg's refusal of an unknown one lists them."""
  with pytest.raises(ValueError, match='valid: ') as refused:
    load_sibling_config('configs/x.py', name).get_config('no_such_arg')
  return set(str(refused.value).split('valid: ')[1].split(', '))


@pytest.mark.parametrize('name', _ARG_CONFIGS)
def test_the_readme_lists_exactly_the_args_each_config_takes(name):
  """README's config list left out imagenet.py's `dataset` and the whole of fashion_mnist.py,
  wrn.py and finetune.py's args."""
  with open(os.path.join(_ROOT, 'README.md'), encoding='utf-8') as f:
    readme = f.read()
  entry = re.search(rf'^  - `{name}\.py`: (.*?)(?=^  - |^\n)', readme, re.M | re.S)
  assert entry, f'README lists no configs/{name}.py'
  listed = re.findall(r'`(\w+)(?:=[^`]*)?`', entry.group(1).split('Args:', 1)[-1])
  assert set(listed) == _accepted_args(name)


@pytest.mark.parametrize('name', _ARG_CONFIGS)
def test_each_config_docstring_documents_every_arg_it_takes(name):
  doc = load_sibling_config('configs/x.py', name).__doc__
  section = doc.split('onfig args', 1)[1]
  missing = [a for a in _accepted_args(name) if not re.search(rf'\b{a}\b', section)]
  assert not missing, f'configs/{name}.py docstring does not document {missing}'
