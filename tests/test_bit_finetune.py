"""The BiT-HyperRule (Kolesnikov et al. 2020, Sec. 3.3; google-research/big_transfer's
bit_hyperrule.py and bit_pytorch/train.py) as configs/bit.py, and the pieces it added: the 'bit'
augment (resize to a square, random crop, flip), normalize 'inception' ([-1, 1]) and
model.zero_init_head."""

import os

import jax
import numpy as np
import pytest
from PIL import Image

from resnet_jax import optim, validation
from resnet_jax.data import augment, pipeline
from resnet_jax.default_config import base_config, load_config_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
bit = load_config_module(os.path.join(ROOT, 'configs', 'bit.py'))


@pytest.mark.parametrize(
  'n, steps, warmup, boundaries, mixup',
  [
    (1_437, 500, 100, [200, 300, 400], 0.0),  # the released code's small schedule
    (19_999, 500, 100, [200, 300, 400], 0.0),
    (20_000, 10_000, 500, [3_000, 6_000, 9_000], 0.1),  # 30 / 60 / 90 %
    (499_999, 10_000, 500, [3_000, 6_000, 9_000], 0.1),
    (500_000, 20_000, 500, [6_000, 12_000, 18_000], 0.1),
    (1_281_167, 20_000, 500, [6_000, 12_000, 18_000], 0.1),
  ],
)
def test_steps_schedule_and_mixup_follow_the_training_set_size(n, steps, warmup, boundaries, mixup):
  rule = bit.hyperrule(n, 32 * 32)
  assert (rule['steps'], rule['warmup'], rule['boundaries']) == (steps, warmup, boundaries)
  assert rule['mixup_alpha'] == mixup


@pytest.mark.parametrize(
  'area, resize, crop',
  [(32 * 32, 160, 128), (96 * 96 - 1, 160, 128), (96 * 96, 448, 384), (None, 448, 384)],
)
def test_resolution_follows_the_image_area(area, resize, crop):
  rule = bit.hyperrule(50_000, area)
  assert (rule['resize'], rule['crop']) == (resize, crop)


def test_the_config_reads_the_split_and_validates():
  """digits: 1,437 training images of 8 x 8 -> 500 steps, no MixUp, 160 -> 128."""
  c = bit.get_config('')
  assert c.num_train_steps == 500 and c.data.mixup_alpha == 0.0
  assert (c.data.augment, c.data.train_resize, c.data.image_size) == ('bit', 160, 128)
  assert c.data.normalize == 'inception' and c.model.zero_init_head
  assert c.model.name == 'resnetv2_50x1_bit'
  o = c.optimizer
  assert (o.name, o.momentum, o.nesterov, o.weight_decay) == ('sgd', 0.9, False, 0.0)
  assert c.schedule.base_lr == pytest.approx(0.003)
  validation.validate_config(c)
  big = bit.get_config('train_examples=50000,image_area=50176,batch=128')
  assert (big.num_train_steps, big.data.mixup_alpha) == (10_000, 0.1)
  assert (big.data.train_resize, big.data.image_size) == (448, 384)
  assert big.schedule.base_lr == pytest.approx(0.003 * 128 / 512)  # linear in the batch
  validation.validate_config(big)


def test_an_unknown_dataset_says_how_to_give_the_rule_its_sizes():
  with pytest.raises(ValueError, match='unknown dataset.*give train_examples= and image_area='):
    bit.get_config('dataset=no_such_dataset')
  c = bit.get_config('dataset=no_such_dataset,train_examples=30000,image_area=50000')
  assert (c.num_train_steps, c.data.image_size) == (10_000, 384)


def test_the_rule_reads_the_split_given_as_an_arg(monkeypatch):
  """BiT's few-shot transfer trains on a slice of the train split: the rule sizes that slice."""
  from resnet_jax.data import sources

  sizes = {'train': 50_000, 'train[:1%]': 500}
  opened = []

  def fake_open_split(config, split):
    opened.append((split, config.data.validation_size))
    return type('Split', (), {'native_shape': (32, 32, 3), '__len__': lambda _: sizes[split]})()

  monkeypatch.setattr(sources, 'open_split', fake_open_split)
  full = bit.get_config('dataset=cifar10')
  few = bit.get_config('dataset=cifar10,train_split=train[:1%],validation_size=50')
  assert opened == [('train', 0), ('train[:1%]', 50)]
  assert (full.num_train_steps, full.data.mixup_alpha) == (10_000, 0.1)
  assert (few.num_train_steps, few.data.mixup_alpha) == (500, 0.0)
  assert few.data.train_split == 'train[:1%]' and few.data.validation_size == 50


@pytest.mark.parametrize(
  'field, value',
  [
    ('train_split', 'train[:10%]'),
    ('data_dir', '/elsewhere'),
    ('name', 'synthetic'),
    ('validation_size', 100),
  ],
)
def test_overriding_what_the_rule_read_is_refused(field, value):
  """`--config.data.train_split=...` after configs/bit.py chose steps and MixUp by the split it
  read would train a few-shot slice on the full split's schedule: refused, naming the arg."""
  c = bit.get_config('')
  validation.validate_config(c)
  c.data[field] = value
  with pytest.raises(validation.ConfigError, match=f'data.{field} was set to .*configs/bit.py'):
    validation.validate_config(c)


def test_overrides_are_free_when_the_rule_read_nothing():
  c = bit.get_config('train_examples=1000,image_area=1024')
  c.data.train_split = 'train[:50%]'
  validation.validate_config(c)


@pytest.mark.parametrize('arg', ['steps=-1', 'train_examples=-5', 'image_area=-1', 'resize=-2'])
def test_negative_counts_are_refused(arg):
  """steps=-1 became num_train_steps=-1, "train num_epochs": 3.2 million steps, silently."""
  with pytest.raises(ValueError, match=f'{arg.split("=")[0]} must be >= 0'):
    bit.get_config(arg)


def test_an_unreadable_split_says_to_give_the_data_as_args():
  """A --config.data.data_dir override comes too late for the rule: the hint says so."""
  with pytest.raises(
    ValueError, match='before --config.data.. overrides apply: give dataset=, data_dir='
  ):
    bit.get_config('dataset=image_folder')


def test_lr_schedule_values_at_the_boundaries():
  c = bit.get_config('train_examples=50000,image_area=1024')
  lr = optim.create_learning_rate_fn(c, 100, c.num_train_steps)
  expected = {
    0: 0.0,
    250: 0.0015,  # linear warm-up from 0
    499: 0.003 * 499 / 500,
    500: 0.003,
    2_999: 0.003,
    3_000: 3e-4,
    5_999: 3e-4,
    6_000: 3e-5,
    9_000: 3e-6,
    9_999: 3e-6,
  }
  for step, value in expected.items():
    assert float(lr(step)) == pytest.approx(value, rel=1e-5, abs=1e-12), step


def test_a_steps_override_keeps_the_schedules_fractions():
  c = bit.get_config('steps=50,image_size=32')
  assert c.num_train_steps == 50 and c.schedule.warmup_steps == 10
  assert c.schedule.boundaries == '20,30,40'
  assert (c.data.image_size, c.data.train_resize) == (32, 40)  # 160 / 128 of the crop


def test_inception_normalisation_maps_pixels_to_minus_one_one():
  n = pipeline._normalizer('inception', {})
  x = np.array([[[0, 127, 255]]], np.uint8)
  np.testing.assert_allclose(n(x), [[[-1.0, 127 / 127.5 - 1, 1.0]]], rtol=1e-6)
  scale = pipeline._normalizer('scale', {})  # unchanged: [0, 1]
  np.testing.assert_allclose(scale(x), x / 255.0, rtol=1e-6)
  c = base_config()
  c.data.normalize = 'inception'
  np.testing.assert_allclose(pipeline.make_normalization(c).normalizer(x), n(x))


def _image(h=37, w=53, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_bit_augment_is_resize_then_random_crop_then_flip():
  """torchvision's Resize((R, R)) + RandomCrop(S) + RandomHorizontalFlip on PIL, as train.py."""
  image = _image()
  pre = augment.Preprocessor('bit', 24, 3, train_resize=30)
  flips = set()
  for seed in range(8):
    got = pre.train(image, np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    top, left = int(rng.integers(0, 7)), int(rng.integers(0, 7))
    ref = Image.fromarray(image).resize((30, 30), Image.BILINEAR)
    ref = ref.crop((left, top, left + 24, top + 24))
    flip = rng.random() < 0.5
    flips.add(flip)
    ref = ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else ref
    np.testing.assert_array_equal(got, np.asarray(ref))
  assert flips == {True, False}
  ev = np.asarray(Image.fromarray(image).resize((24, 24), Image.BILINEAR))
  np.testing.assert_array_equal(pre.eval(image), ev)  # straight to the crop size
  np.testing.assert_array_equal(pre.eval_uint8(image), ev)
  assert pre.eval(image, crops=2).shape == (2, 24, 24, 3)


@pytest.mark.parametrize(
  'augment_, resize, needle',
  [('inception', 40, 'augment bit only'), ('bit', 16, 'at least image_size')],
)
def test_train_resize_refusals(augment_, resize, needle):
  c = base_config()
  c.data.augment, c.data.train_resize = augment_, resize
  with pytest.raises(validation.ConfigError, match=needle):
    validation.validate_config(c)
  with pytest.raises(ValueError, match='train_resize'):
    augment.Preprocessor(augment_, 32, 3, train_resize=resize)


def test_zero_init_head():
  from resnet_jax.models import create_model

  x = np.zeros((1, 16, 16, 3), np.float32)
  for zero in (False, True):
    model = create_model('resnet18', num_classes=5, zero_init_head=zero)
    params = model.init(jax.random.key(0), x, train=False)['params']
    kernel = np.asarray(params['fc']['kernel'])
    assert (not kernel.any()) == zero
    assert not np.asarray(params['fc']['bias']).any()


@pytest.mark.slow
def test_three_steps_of_the_config_on_digits(tmp_path):
  """The config end to end: resnetv2_50x1_bit at 32 px, 3 steps, evaluated."""
  from tests import runner

  workdir = str(tmp_path / 'w')
  config = 'configs/bit.py:batch=8,steps=3,image_size=32'
  out = runner.run_main(workdir, config=config, devices=1, fast_compile=True)
  runner.assert_ok(out)
  result = runner.results(workdir)
  assert result['step'] == 3 and np.isfinite(result['eval']['loss'])


def test_convert_points_bit_weights_at_the_hyperrule_config():
  """convert's closing hint: BiT weights are fine-tuned with configs/bit.py (the BiT-HyperRule),
  torchvision's with configs/finetune.py, as before."""
  from resnet_jax import convert

  bit = convert.finetune_hint('resnetv2_50x1_bit', '/tmp/w', 3)
  assert '--config=configs/bit.py:arch=resnetv2_50x1_bit,dataset=NAME ' in bit
  tv = convert.finetune_hint('resnet18', '/tmp/w', 3)
  assert '--config=configs/finetune.py:arch=resnet18,dataset=NAME ' in tv
