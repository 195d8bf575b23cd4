"""Defects found by walking this session's features as a researcher would (2026-11-25)."""

import numpy as np
import pytest

from resnet_jax import validation
from resnet_jax.data import augment
from tests.fixtures import make_interpolation_golden as golden
from tests.runner import digits_config


def test_a_warmup_start_without_a_warm_up_is_refused():
  """timm's --warmup-lr starts a warm-up: with schedule.warmup_steps and warmup_epochs both 0 the
  run has none, so schedule.warmup_init_lr would be silently ignored (as end_lr with piecewise or
  warmup_init_lr with a constant warm-up, which are refused)."""
  no_warmup = {'schedule.warmup_steps': 0, 'schedule.warmup_epochs': 0.0}
  with pytest.raises(validation.ConfigError, match='warmup_init_lr is set but the run has no warm'):
    validation.validate_config(digits_config(**no_warmup, **{'schedule.warmup_init_lr': 1e-3}))
  validation.validate_config(digits_config(**no_warmup))  # unset: fine without a warm-up
  for warm in ({'schedule.warmup_steps': 10}, {'schedule.warmup_epochs': 0.5}):
    fields = {**no_warmup, **warm, 'schedule.warmup_init_lr': 1e-3}
    validation.validate_config(digits_config(**fields))  # a warm-up to start: accepted


def test_eval_crop_pct_alone_leaves_the_bilinear_training_crops_as_they_were():
  """README: only a non-bilinear interpolation cuts the training box first (torchvision's
  resized_crop); eval_crop_pct changes the evaluation input only."""
  image = golden.golden_array(61, 83, 'RGB')
  plain = augment.Preprocessor('inception', 32, 3)
  pct = augment.Preprocessor('inception', 32, 3, eval_crop_pct=0.95)
  for seed in range(4):
    a, b = (p.train(image, np.random.default_rng(seed)) for p in (plain, pct))
    np.testing.assert_array_equal(a, b)
  assert plain.eval(image).shape == pct.eval(image).shape == (32, 32, 3)
  assert not np.array_equal(plain.eval(image), pct.eval(image))  # 36 -> 33 px before the crop
