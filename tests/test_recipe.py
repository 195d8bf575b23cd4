"""configs/imagenet.py:recipe=torchvision: torchvision's new-recipe hyper-parameters that we have
(references/classification/README.md, ResNet section; train.py's EMA decay adjustment)."""

import pytest

from resnet_jax import ema, mixing, optim
from resnet_jax.default_config import load_sibling_config


def _imagenet(arg: str):
  return load_sibling_config('configs/x.py', 'imagenet').get_config(arg)


def test_torchvision_recipe_values():
  c = _imagenet('recipe=torchvision')
  assert c.batch_size == 1024 and optim.peak_learning_rate(c) == pytest.approx(0.5)
  assert (c.schedule.name, c.schedule.warmup, c.schedule.warmup_epochs) == ('cosine', 'linear', 5)
  assert c.num_epochs == 600 and c.label_smoothing == 0.1
  assert (c.data.mixup_alpha, c.data.cutmix_alpha, c.data.mix_prob) == (0.2, 1.0, 1.0)
  assert c.data.mix_switch_prob == 0.5  # torchvision's RandomChoice of the two
  assert c.optimizer.weight_decay == 2e-5 and c.optimizer.weight_decay_mask == 'not_norm'
  d = c.data  # --train-crop-size 176 --val-resize-size 232 --auto-augment ta_wide ...
  assert (d.image_size, d.eval_image_size, d.eval_resize) == (176, 224, 232)
  assert (d.augment, d.auto_augment, d.random_erasing) == ('inception', 'trivial_wide', 0.1)
  assert d.repeated_augmentations == 4
  assert c.optimizer.momentum == 0.9 and not c.optimizer.nesterov
  assert not c.model.zero_init_last_bn and c.model.stride_on == '3x3'
  # train.py: alpha = min(1, (1 - 0.99998) * world_size * batch_per_gpu * ema_steps / epochs)
  assert c.ema_every_steps == 32
  assert c.ema_decay == pytest.approx(1 - 2e-5 * 1024 * 32 / 600)
  assert ema.from_config(c, 1252).warmup_steps == 5 * 1252
  assert mixing.from_config(c, 1000) == mixing.Mixing(1000, 0.2, 1.0, 1.0, 0.5)


def test_torchvision_recipe_follows_the_batch_and_length():
  c = _imagenet('recipe=torchvision,batch=256')
  assert optim.peak_learning_rate(c) == pytest.approx(0.125)
  assert c.ema_decay == pytest.approx(1 - 2e-5 * 256 * 32 / 600)
  c.batch_size, c.num_epochs = 2048, 300.0  # --config.batch_size / num_epochs after get_config
  assert c.ema_decay == pytest.approx(1 - 2e-5 * 2048 * 32 / 300)
  c.ema_decay = 0.0  # and it can still be turned off
  assert ema.from_config(c, 100) is None


@pytest.mark.parametrize('recipe', ['paper', 'modern'])
def test_the_other_recipes_mix_nothing_and_keep_no_ema(recipe):
  c = _imagenet(f'recipe={recipe}')
  assert c.batch_size == 256
  assert mixing.from_config(c, 1000) is None and ema.from_config(c, 100) is None
  assert c.model.zero_init_last_bn == (recipe == 'modern')


def test_the_recipe_benchmark_times_the_four_variants(capsys):
  """scripts/benchmark_recipe.py (docs/performance.md's figure) on a tiny input."""
  import json

  from tests.test_benchmark import _script

  bench = _script('benchmark_recipe')
  bench.main(['--batch-size=8', '--image-size=8', '--steps=1', '--rounds=1', '--json'])
  result = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert set(result['ms_per_step']) == {'plain', 'mixing', 'ema', 'both'}
  assert result['ratio_to_plain']['plain'] == 1.0
  assert all(v > 0 for v in result['ms_per_step'].values())
