"""Defects found walking this session's features as a researcher would (optimizers, schedules,
training-checkpoint import, ReaL): each test failed on the code before its fix."""

import math

import pytest

from resnet_jax import validation
from tests.runner import digits_config


@pytest.mark.parametrize('bad', [math.nan, math.inf])
@pytest.mark.parametrize(
  'overrides,needle',
  [
    ({'optimizer.name': 'lars'}, 'optimizer.trust_coefficient must be positive and finite'),
    ({'optimizer.name': 'adamw'}, 'optimizer.eps must be positive'),
    ({'optimizer.name': 'lamb'}, 'optimizer.eps must be positive'),
    ({'optimizer.name': 'lars'}, 'optimizer.eps must be non-negative and finite'),
    ({'schedule.name': 'polynomial'}, 'schedule.end_lr must be non-negative and finite'),
    ({'schedule.name': 'polynomial'}, 'schedule.power must be non-negative and finite'),
  ],
)
def test_nan_and_inf_optimizer_and_schedule_fields_are_refused(overrides, needle, bad):
  """A NaN passed every `value < 0` check: trust_coefficient=nan started a run that wrote its
  workdir and died at step 1 on a non-finite update. Each field is now refused up front."""
  field = needle.split(' must')[0]
  with pytest.raises(validation.ConfigError, match=needle.replace('(', r'\(')):
    validation.validate_config(digits_config(**overrides, **{field: bad}))
