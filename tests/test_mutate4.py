"""Rules of this session's code that mutation audit 4 (a one-line change to each, one at a time;
docs/mutation-audit-4.md) found no test for: each test below fails on that change and passes on the
code."""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from resnet_jax import models, optim, predict, summary, validation
from resnet_jax.data import augment, auto_augment, offline, timm_augment, views
from resnet_jax.models import backbone
from tests.fixtures import make_interpolation_golden as golden
from tests.runner import digits_config

# ---------------------------------------------------------------- timm's RandAugment (T11, T12)


def test_timm_strings_take_the_limits_of_their_ranges():
  """n is 1-14 inclusive (14: the cap shared with torchvision's form) and p is in [0, 1] inclusive:
  'p0' is a legal (if idle) policy that applies nothing and takes no magnitude or sign draws."""
  assert auto_augment.parse('rand-m7-n14').num_ops == timm_augment.MAX_OPS == 14
  policy = auto_augment.parse('rand-m7-n3-p0')
  assert policy.prob == 0.0
  rng = np.random.default_rng(0)
  assert timm_augment.draws(policy, rng) == []
  image = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  out = auto_augment.augment_array(image, 'rand-m7-n3-p0', np.random.default_rng(2))
  np.testing.assert_array_equal(out, image)


# --------------------------------------- the Preprocessor's own checks of timm's fields (I15, I16)


@pytest.mark.parametrize(
  'kwargs, needle',
  [
    ({'augment': 'inception', 'eval_crop_pct': 0.9, 'eval_resize_size': 40}, 'both set the eval'),
    ({'augment': 'cifar', 'eval_crop_pct': 0.9}, "not 'cifar'"),
    ({'augment': 'none', 'eval_crop_pct': 0.875}, "not 'none'"),
  ],
)
def test_the_preprocessor_refuses_contradicting_or_ignored_crop_pct(kwargs, needle):
  """The pipeline's Preprocessor is also built directly (the benchmark scripts, notebooks): there
  too crop_pct and an explicit eval resize contradict each other, and crop_pct on a mode without
  an eval resize would be silently ignored."""
  with pytest.raises(ValueError, match=needle):
    augment.Preprocessor(image_size=32, channels=3, **kwargs)
  augment.Preprocessor('inception', 32, 3, eval_crop_pct=0.9)  # alone on a crop mode: accepted


def test_a_timm_filter_without_crop_pct_still_takes_torchvisions_geometry():
  """interpolation='bicubic' alone (no crop_pct) is timm's eval with its default resize: the long
  side is int()'d as torchvision's Resize does (81 x 37 / 59 = 50.8 -> 50, where the pipeline's own
  geometry rounds to 51), the centre offset rounded."""
  array = golden.golden_array(59, 81, 'RGB')
  pre = augment.Preprocessor('inception', 32, 3, interpolation='bicubic')
  assert pre.eval_resize == 37 and pre.geometry == 'torchvision'
  img = Image.fromarray(array).resize((50, 37), Image.BICUBIC)
  want = views.center_crop(np.asarray(img), 32, 'torchvision')
  np.testing.assert_array_equal(pre.eval(array), want)


# ----------------------------------------------------------------- predict's timm input (I21, I23)


def test_predict_crop_pct_is_in_0_exclusive_to_1():
  for bad in ('0', '0.0', '-0.5', '1.01', 'nan', 'x'):
    with pytest.raises(argparse.ArgumentTypeError, match='crop_pct in'):
      predict.crop_pct(bad)
  assert predict.crop_pct('1') == 1.0 and predict.crop_pct('0.95') == 0.95


def test_predict_resamples_a_huge_resize_with_the_chosen_filter_too(monkeypatch):
  """Past MAX_RESIZED_PIXELS only the centre crop is resampled: still with --interpolation's
  filter (within a level of the full resize-then-crop), not always bilinear."""
  image = Image.fromarray(golden.golden_array(83, 120, 'RGB'))
  full = {f: predict.preprocess(image, 48, 50, resample=f) for f in (Image.BILINEAR, Image.BICUBIC)}
  monkeypatch.setattr(predict, 'MAX_RESIZED_PIXELS', 0)
  boxed = predict.preprocess(image, 48, 50, resample=Image.BICUBIC)
  level = 1.0 / 255 / predict.IMAGENET_STD.min() + 1e-6
  assert np.abs(boxed - full[Image.BICUBIC]).max() <= level
  assert np.abs(boxed - full[Image.BILINEAR]).max() > 2 * level


def test_crop_pct_alone_on_a_mode_without_an_eval_resize_is_a_config_error():
  """Not only a non-default filter: crop_pct alone on 'none' would be ignored, so the config
  check refuses it (one error line from the CLIs), before the pipeline is built."""
  config = digits_config(**{'data.augment': 'none', 'data.eval_crop_pct': 0.9})
  with pytest.raises(validation.ConfigError, match="eval_crop_pct apply to .* not 'none'"):
    validation.validate_config(config)


# -------------------------------------------------------------------- the schedule's end_lr (S4)


def test_an_end_lr_equal_to_the_peak_is_accepted_and_flat():
  """end_lr may be the peak itself ("at most the peak"): the cosine then stays at the peak."""
  config = digits_config(**{'schedule.name': 'cosine'})
  peak = optim.peak_learning_rate(config)
  config.schedule.end_lr = peak
  validation.validate_config(config)
  config.schedule.warmup_epochs, config.schedule.warmup_steps = 0, 0
  lr = optim.create_learning_rate_fn(config, steps_per_epoch=10, total_steps=100)
  np.testing.assert_allclose([lr(s) for s in (0, 50, 100)], peak, rtol=1e-6)


# --------------------------------------------------------------------------- ResNet-RS names (A9)


def test_resnet_rs_names_refuse_basic_blocks():
  """ResNet-RS nets are bottleneck nets (Bello et al. 2021, Table 7): block='basic' contradicts
  the name; block='bottleneck' (or None) is the name's own."""
  with pytest.raises(ValueError, match='ResNet-RS nets are .* bottleneck nets'):
    models.parse_name('resnetrs50', block='basic')
  assert models.parse_name('resnetrs50', block='bottleneck') == models.parse_name('resnetrs50')


def test_resnet_rs_stem_pool_is_part_of_the_stem_and_its_bn_a_bn():
  """ResNet-RS's strided conv + BN in place of the max-pool (stem_pool_conv / stem_pool_bn) belong
  to the stem: frozen_stages=0 freezes them, the summary counts them in the stem, and
  frozen_bn_affine freezes that BN's scale and bias as every other BN's (a source fix: the BN name
  pattern lacked stem_pool_bn, so it trained under frozen_bn_affine)."""
  model = models.create_model('resnetrs50', num_classes=3)
  x = jnp.zeros((1, 64, 64, 3))
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))['params']
  stem = backbone.frozen_mask(params, frozen_stages=0)
  assert all(jax.tree_util.tree_leaves(stem['stem_pool_conv']))
  assert all(jax.tree_util.tree_leaves(stem['stem_pool_bn']))
  assert not any(jax.tree_util.tree_leaves(stem['layer1_0']))
  affine = backbone.frozen_mask(params, frozen_bn_affine=True)
  assert affine['stem_pool_bn'] == {'scale': True, 'bias': True}
  assert not any(jax.tree_util.tree_leaves(affine['stem_pool_conv']))
  assert [summary.stage_of(n) for n in ('stem_pool_conv', 'stem_pool_bn')] == ['stem', 'stem']


# -------------------------------------------------------------- prepare --from's refusal (O2)


def test_from_on_another_dataset_names_every_dataset_it_takes():
  """The refusal lists FROM_ARCHIVES (the list the not-prepared hint also reads), so the two
  cannot disagree."""
  with pytest.raises(offline.PrepareError) as info:
    offline.local_downloads('mnist', ['mnist.tar.gz'], None)
  message = str(info.value)
  assert message.startswith('mnist: --from is not supported')
  assert f'it takes {", ".join(offline.FROM_ARCHIVES)} archives' in message
  assert offline.FROM_ARCHIVES == ('cifar10', 'cifar100', 'fashion_mnist', 'imagenette')
