"""configs/imagenet.py's recipes from other code bases: recipe=torchvision, torchvision's new-recipe
hyper-parameters that we have (references/classification/README.md, ResNet section; train.py's
EMA decay adjustment), and recipe=rsb_a1|a2|a3, "ResNet strikes back" (arXiv 2110.00476, Table
1, and timm's train.py of that release)."""

import pytest

from resnet_jax import ema, mixing, optim, validation
from resnet_jax.data import auto_augment, pipeline
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


@pytest.mark.parametrize(
  'recipe,epochs,size,lr,decay,drop,reps,mixup,magnitude',
  [
    ('rsb_a1', 600, 224, 5e-3, 0.01, 0.05, 3, 0.2, 7),
    ('rsb_a2', 300, 224, 5e-3, 0.02, 0.05, 3, 0.1, 7),
    ('rsb_a3', 100, 160, 8e-3, 0.02, 0.0, 1, 0.1, 6),
  ],
)
def test_resnet_strikes_back_procedures(
  recipe, epochs, size, lr, decay, drop, reps, mixup, magnitude
):
  """Table 1 of the paper, column by column, with timm's train.py defaults of its release."""
  c = _imagenet(f'recipe={recipe}')
  assert c.batch_size == 2048 and optim.peak_learning_rate(c) == pytest.approx(lr)
  assert c.num_epochs == epochs and c.data.image_size == size
  o = c.optimizer
  assert (o.name, o.weight_decay, o.weight_decay_mask, o.clip_grad_norm) == (
    'lamb',
    decay,
    'kernels',
    1.0,
  )
  s = c.schedule
  assert (s.name, s.warmup, s.warmup_epochs, s.warmup_init_lr, s.end_lr) == (
    'cosine',
    'linear',
    5.0,
    1e-4,
    1e-6,
  )
  assert (c.loss, c.bce_target_threshold, c.label_smoothing) == ('sigmoid_bce', 0.2, 0.0)
  assert (c.model.drop_path_rate, c.model.drop_path_rule) == (drop, 'timm')
  assert c.model.zero_init_last_bn and c.model.stride_on == '3x3' and c.model.name == 'resnet50'
  d = c.data
  assert (d.mixup_alpha, d.cutmix_alpha, d.mix_prob, d.mix_switch_prob) == (mixup, 1.0, 1.0, 0.5)
  assert d.repeated_augmentations == reps and d.random_erasing == 0.0
  assert d.auto_augment == f'rand-m{magnitude}-mstd0.5-inc1'
  assert (d.augment, d.eval_image_size, d.eval_crop_pct, d.interpolation) == (
    'inception',
    224,
    0.95,
    'random',
  )
  c.data.name = 'synthetic'  # (random images: the preprocessing is what is checked)
  preprocessor = pipeline.make_preprocessor(c)  # timm's RandAugment string and eval resize
  assert auto_augment.parse(d.auto_augment).magnitude == magnitude
  assert (preprocessor.eval_image_size, preprocessor.eval_resize) == (224, 235)
  assert c.ema_decay == 0.0 and c.dtype == 'bfloat16'
  validation.validate_config(c)  # every value is one the product accepts


def test_rsb_learning_rate_follows_the_batch_and_plain_nets_get_no_drop_path():
  c = _imagenet('recipe=rsb_a2,batch=256')
  assert optim.peak_learning_rate(c) == pytest.approx(5e-3 / 8)
  c = _imagenet('recipe=rsb_a1,depth=101,tweaks=d')
  assert c.model.name == 'resnet101d' and c.model.drop_path_rate == 0.05
  c = _imagenet('recipe=rsb_a1,plain')
  assert c.model.drop_path_rate == 0.0 and not c.model.zero_init_last_bn
  validation.validate_config(c)


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
