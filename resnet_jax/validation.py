"""Refusing a config before anything is written: values that cannot give a correct run.

Everything here is checked by `train.train_and_evaluate` before it takes the workdir's lock or
writes a file, so a bad value costs one `error:` line, not a failed run hours in.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections

from resnet_jax import losses, optim, runtime


class ConfigError(ValueError):
  """A config or command-line value that cannot give a correct run."""


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Refuses, before anything is written, values that cannot give a correct run.

  Everything that would otherwise fail hours in (at the first eval or log point) or silently
  do the wrong thing (keep no checkpoint, learn backwards) is checked here.
  """
  if config.batch_size <= 0:
    raise ConfigError(f'batch_size must be positive, got {config.batch_size}')
  n_dev, n_proc = jax.device_count(), jax.process_count()
  if config.batch_size % n_dev:
    raise ConfigError(
      f'batch_size {config.batch_size} is not divisible by the {n_dev} devices: '
      f'use a multiple of {n_dev} (per-device batch must be whole)'
    )
  if config.batch_size % n_proc:
    raise ConfigError(f'batch_size {config.batch_size} is not divisible by {n_proc} processes')
  if config.dtype not in runtime.COMPUTE_DTYPES:
    raise ConfigError(
      f'dtype must be one of {sorted(runtime.COMPUTE_DTYPES)}, got {config.dtype!r}'
    )
  if config.on_nonfinite not in ('error', 'skip'):
    raise ConfigError(f"on_nonfinite must be 'error' or 'skip', got {config.on_nonfinite!r}")
  if config.model.num_classes is not None and config.model.num_classes < 1:
    raise ConfigError(
      f"model.num_classes must be positive, or None for the dataset's, got "
      f'{config.model.num_classes}'
    )
  if config.num_train_steps == 0 or config.num_train_steps < -1:
    raise ConfigError(
      f'num_train_steps must be positive, or -1 to train num_epochs; got {config.num_train_steps}'
    )
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ConfigError('set num_train_steps > 0 or num_epochs > 0')
  _require_at_least(
    {
      'log_every_steps': (config.log_every_steps, 1, ''),
      'max_to_keep': (
        config.max_to_keep,
        1,
        ' (0 would keep no checkpoint at all, not even the final one)',
      ),
      'eval_batch_size': (config.eval_batch_size, 1, ''),
      'schedule.base_lr': (config.schedule.base_lr, 0, ''),
      'schedule.warmup_steps': (config.schedule.warmup_steps, 0, ''),
      'schedule.warmup_epochs': (config.schedule.warmup_epochs, 0, ''),
      'schedule.warmup_lr': (config.schedule.warmup_lr, 0, ''),
      'optimizer.weight_decay': (config.optimizer.weight_decay, 0, ''),
      # Negative: every update after a decay (or every momentum step) pushes uphill.
      'schedule.decay_factor': (config.schedule.decay_factor, 0, ''),
      'optimizer.momentum': (config.optimizer.momentum, 0, ''),
      'optimizer.clip_grad_norm': (config.optimizer.clip_grad_norm, 0, ' (0 switches it off)'),
    }
  )
  if config.data.num_workers is None or config.data.num_workers < -1:
    raise ConfigError(
      f'data.num_workers must be >= 0, or -1 for one per core less one, got '
      f'{config.data.num_workers}'
    )
  if config.data.eval_crops not in (1, 10):
    raise ConfigError(f'data.eval_crops must be 1 or 10, got {config.data.eval_crops}')
  validate_data_sizes(config.data)
  validate_interpolation(config.data)
  from resnet_jax.data import augment  # pylint: disable=import-outside-toplevel

  try:
    augment.check_train_resize(
      config.data.augment, config.data.get('train_resize', 0), config.data.image_size
    )
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if not 0 <= config.label_smoothing < 1:
    raise ConfigError(f'label_smoothing must be in [0, 1), got {config.label_smoothing}')
  reps = config.data.repeated_augmentations
  if reps is None or not 1 <= reps <= config.batch_size:
    raise ConfigError(
      f'data.repeated_augmentations must be in [1, batch_size {config.batch_size}], got {reps}'
    )
  if not 0 <= config.data.random_erasing <= 1:
    raise ConfigError(f'data.random_erasing must be in [0, 1], got {config.data.random_erasing}')
  validate_read_when_built(config)
  validate_head_dropout(config.model)
  validate_optimizer(config.optimizer)
  validate_schedule_shape(config)
  validate_loss(config)
  validate_bn_groups(config.model.bn_group_size, config.batch_size, n_dev)
  validate_grad_accum(
    config.grad_accum_steps,
    config.model.bn_group_size,
    config.batch_size,
    n_dev,
    frozen_bn=not uses_batch_statistics(config.model),
  )


def validate_read_when_built(config: ml_collections.ConfigDict) -> None:
  """Refuses a field overridden after the config file read the data with it (``read_when_built``):
  configs/bit.py chose steps, MixUp and resolution by the train split it read, so a later
  ``--config.data.train_split=train[:1%]`` would silently train with the full split's rule."""
  reads = config.get('read_when_built') or {}
  for section, fields in reads.items():
    if section == 'by':
      continue
    for key, value in fields.items():
      if config[section][key] != value:
        raise ConfigError(
          f'{section}.{key} was set to {config[section][key]!r} after {reads.get("by")} read '
          f'the data with {value!r} to make its choices: give the value as its arg instead'
        )


def validate_head_dropout(model: ml_collections.ConfigDict) -> None:
  """`model.head_dropout_rate` is a probability below 1 (at 1 every feature reaching the classifier
  would be zeroed and the scaling 1 / (1 - rate) divide by zero)."""
  rate = model.get('head_dropout_rate', 0.0)
  if rate is None or not 0 <= rate < 1:
    raise ConfigError(f'model.head_dropout_rate must be in [0, 1) (0: none), got {rate}')


def validate_optimizer(o: ml_collections.ConfigDict) -> None:
  """`optimizer.name` is known, its fields are in range, and no field it ignores was set (a b1
  given to SGD, a momentum given to AdamW would otherwise be silently dropped)."""
  name = o.get('name', 'sgd')
  if name not in optim.OPTIMIZERS:
    raise ConfigError(f'optimizer.name must be one of {", ".join(optim.OPTIMIZERS)}, got {name!r}')
  used = optim.OPTIMIZER_FIELDS[name]
  ignored = [
    k for k in ('b1', 'b2', 'eps', 'trust_coefficient') if k not in used and o.get(k) is not None
  ]
  if 'momentum' not in used and o.momentum != 0.9:  # the default SGD and LARS share
    ignored.append('momentum')
  if 'nesterov' not in used and o.nesterov:
    ignored.append('nesterov')
  if ignored:
    reads = ', '.join(sorted(used)) or 'none of these'
    raise ConfigError(
      f'optimizer.{ignored[0]} is set but optimizer.name={name!r} ignores it (it reads {reads}): '
      'unset it or choose the optimizer that uses it'
    )
  if not 0 <= o.momentum < 1:  # at 1 the buffer never forgets a gradient; above, it grows
    raise ConfigError(f'optimizer.momentum must be in [0, 1), got {o.momentum}')
  for key in ('b1', 'b2'):
    value = o.get(key)
    if value is not None and not 0 <= value < 1:
      raise ConfigError(f'optimizer.{key} must be in [0, 1), got {value}')
  eps = o.get('eps')
  if eps is not None and (not eps >= 0 or (eps == 0 and name != 'lars') or eps == math.inf):
    what = 'non-negative' if name == 'lars' else "positive (Adam's step divides by sqrt(v) + eps)"
    what += ' and finite'
    raise ConfigError(f'optimizer.eps must be {what}, got {eps}')
  coefficient = o.get('trust_coefficient')
  if coefficient is not None and not 0 < coefficient < math.inf:
    raise ConfigError(f'optimizer.trust_coefficient must be positive and finite, got {coefficient}')


def validate_schedule_shape(config: ml_collections.ConfigDict) -> None:
  """`schedule.end_lr` (polynomial and cosine) and `power` (polynomial) are read only by those
  schedules, non-negative, and end_lr is at most the peak lr (above it the "decay" would climb);
  `warmup_init_lr` starts a linear warm-up of some steps only, non-negative."""
  s = config.schedule
  readers = {'end_lr': ('polynomial', 'cosine'), 'power': ('polynomial',)}
  for key, names in readers.items():
    value = s.get(key)
    if value is None:
      continue
    if s.name not in names:
      raise ConfigError(
        f'schedule.{key} is set but schedule.name={s.name!r} ignores it: set schedule.name to '
        + ' or '.join(repr(n) for n in names)
      )
    if not 0 <= value < math.inf:
      raise ConfigError(f'schedule.{key} must be non-negative and finite, got {value}')
  peak = optim.peak_learning_rate(config)
  if s.get('end_lr') is not None and s.end_lr > peak:
    raise ConfigError(f'schedule.end_lr={s.end_lr} is above the peak learning rate {peak:g}')
  start = s.get('warmup_init_lr', 0.0)
  if start:
    if s.warmup != 'linear':
      raise ConfigError(
        f'schedule.warmup_init_lr is set but schedule.warmup={s.warmup!r} ignores it: set '
        "schedule.warmup='linear' (a constant warm-up runs at schedule.warmup_lr)"
      )
    if not 0 <= start < math.inf:  # above the peak it ramps down: timm allows that too
      raise ConfigError(f'schedule.warmup_init_lr must be non-negative and finite, got {start}')
    if not (s.warmup_steps or s.warmup_epochs):  # no warm-up to start: it would be ignored
      raise ConfigError(
        'schedule.warmup_init_lr is set but the run has no warm-up (schedule.warmup_steps and '
        'schedule.warmup_epochs are 0): set one of them, or schedule.warmup_init_lr=0'
      )


def validate_loss(config: ml_collections.ConfigDict) -> None:
  """`loss` is known and the BCE options are set only for it, the threshold in [0, 1) (at 1 or
  above every target would be 0)."""
  name = config.get('loss', 'softmax_xent')
  if name not in losses.LOSSES:
    raise ConfigError(f'loss must be one of {", ".join(losses.LOSSES)}, got {name!r}')
  threshold = config.get('bce_target_threshold')
  if name != 'sigmoid_bce':
    for key, unset in (('bce_target_threshold', None), ('bce_sum_classes', False)):
      if config.get(key, unset) != unset:
        raise ConfigError(f"{key} is set but loss={name!r} ignores it: set loss='sigmoid_bce'")
  if threshold is not None and not 0 <= threshold < 1:
    raise ConfigError(f'bce_target_threshold must be in [0, 1), got {threshold}')


def validate_data_sizes(data: ml_collections.ConfigDict) -> None:
  """Counts and sizes under `config.data` that the pipeline would silently reinterpret (a negative
  validation_size or prefetch acted as 0 or 1) or fail on with a message naming no key (PIL's
  'height and width must be > 0', NumPy's 'high <= 0' for a synthetic set of 0 classes)."""
  at_least = {
    'data.validation_size': (data.validation_size, 0, ' (0: no held-out split)'),
    'data.image_size': (data.image_size, 0, " (0: the dataset's own size)"),
    'data.prefetch': (data.prefetch, 0, ''),
    'data.eval_image_size': (data.eval_image_size, 0, ' (0: data.image_size)'),
    'data.eval_resize': (data.eval_resize, 0, ' (0: the eval size x 256/224)'),
  }
  if data.name == 'synthetic':  # these fields describe the random images themselves
    at_least.update(
      {
        'data.image_size': (data.image_size, 1, ''),
        'data.channels': (data.channels, 1, ''),
        'data.num_classes': (data.num_classes, 1, ''),
        'data.num_train_examples': (data.num_train_examples, 0, ' (0: an ImageNet-sized epoch)'),
        'data.num_eval_examples': (data.num_eval_examples, 0, ' (0: 10,000)'),
      }
    )
  _require_at_least(at_least)


def validate_interpolation(data: ml_collections.ConfigDict) -> None:
  """`data.interpolation` is known, and `data.eval_crop_pct` is timm's crop_pct, in (0, 1] (0:
  off), not set beside `data.eval_resize` (both set the eval resize); both are read by the
  ImageNet crop modes only, so elsewhere they would be silently ignored, as would
  `data.decoder='opencv'`."""
  from resnet_jax.data import views  # pylint: disable=import-outside-toplevel

  interpolation = data.get('interpolation', 'bilinear')
  pct = data.get('eval_crop_pct', 0.0)
  if interpolation not in views.INTERPOLATIONS:
    raise ConfigError(
      f'data.interpolation must be one of {", ".join(views.INTERPOLATIONS)}, got {interpolation!r}'
    )
  if pct is None or not 0 <= pct <= 1:
    raise ConfigError(f"data.eval_crop_pct must be in (0, 1] (timm's crop_pct; 0: off), got {pct}")
  if pct and data.eval_resize:
    raise ConfigError(
      f'data.eval_crop_pct={pct} and data.eval_resize={data.eval_resize} both set the eval '
      'resize: set one of them'
    )
  if (interpolation != 'bilinear' or pct) and data.augment not in ('imagenet', 'inception'):
    raise ConfigError(
      f"data.interpolation / data.eval_crop_pct apply to the crop-based augment 'imagenet' or "
      f"'inception', not {data.augment!r}"
    )
  if data.get('decoder', 'pil') == 'opencv' and data.augment not in ('imagenet', 'inception'):
    raise ConfigError(
      "data.decoder='opencv' decodes the training crops of the crop-based augment 'imagenet' or "
      f"'inception'; augment {data.augment!r} decodes with PIL: leave data.decoder='pil'"
    )


def _require_at_least(bounds: dict[str, tuple[Any, int, str]]) -> None:
  """`{key: (value, 0 or 1, note)}`: each value at least its bound, or one error naming the key."""
  for key, (value, low, note) in bounds.items():
    if value is None or value < low:
      what = 'positive' if low == 1 else 'non-negative'
      raise ConfigError(f'{key} must be {what}{note}, got {value}')


def validate_bn_groups(group: int | None, batch_size: int, n_devices: int) -> None:
  """Ghost-BN groups must not straddle devices, unless they are made of whole devices.

  A group that splits one device's examples with its neighbour's makes XLA all-gather the full
  activations at every BatchNorm. Allowed: `group` divides the per-device batch (per-device
  groups), or it is a multiple of it that divides the global batch (groups of whole devices).
  A global batch smaller than one group is one group (models/layers.BatchNorm), so that is
  allowed too.
  """
  if group is None or group >= batch_size:
    if group is not None and group <= 0:
      raise ConfigError(f'model.bn_group_size must be positive or None, got {group}')
    return
  if group <= 0:
    raise ConfigError(f'model.bn_group_size must be positive or None, got {group}')
  per_device = batch_size // n_devices
  if per_device % group == 0 or (group % per_device == 0 and batch_size % group == 0):
    return
  divisors = [d for d in range(1, per_device + 1) if per_device % d == 0 and d <= group]
  raise ConfigError(
    f'model.bn_group_size={group} does not fit the per-device batch {per_device} '
    f'(batch_size {batch_size} over {n_devices} devices): its groups would straddle devices. '
    f'Use a divisor of {per_device} (e.g. {divisors[-1]}), a multiple of {per_device} that '
    f'divides {batch_size}, or None (whole-batch statistics)'
  )


def validate_grad_accum(
  steps: int, group: int | None, batch_size: int, n_devices: int, *, frozen_bn: bool = False
) -> None:
  """Gradient accumulation must give the one-pass update: every ghost-BN group inside one
  micro-batch (train_step._accumulated takes the same slice of every device's share). Whole-batch
  statistics (group None) would silently become per-micro-batch statistics, so they are refused.
  `frozen_bn` (running statistics in training, as in fine-tuning) uses no batch statistics.
  """
  _require_at_least({'grad_accum_steps': (steps, 1, '')})
  if steps == 1:
    return
  per_device = batch_size // n_devices
  if per_device % steps:
    raise ConfigError(
      f'grad_accum_steps={steps} does not divide the per-device batch {per_device} '
      f'(batch_size {batch_size} over {n_devices} devices)'
    )
  micro = per_device // steps
  if not frozen_bn and (group is None or micro % group):
    what = (
      'whole-batch BN statistics would become per-micro-batch ones'
      if group is None
      else f'model.bn_group_size={group} does not divide them: BN statistics would differ from '
      'one pass'
    )
    raise ConfigError(
      f'grad_accum_steps={steps} makes micro-batches of {micro} examples per device, and '
      f'{what}. Set model.bn_group_size to a divisor of {micro} (the paper: 32 on ImageNet, '
      '64 on CIFAR)'
    )


def profile_window(spec: str) -> tuple[int, int] | None:
  """'START,STOP' (steps) -> the window to trace with jax.profiler, or None."""
  if not spec:
    return None
  try:
    start, stop = (int(x) for x in spec.split(','))
  except ValueError:
    raise ConfigError(f"profile_steps must be 'START,STOP' (e.g. '10,20'), got {spec!r}") from None
  if not 0 <= start < stop:
    raise ConfigError(f'profile_steps needs 0 <= START < STOP, got {spec!r}')
  return start, stop


def uses_batch_statistics(model: ml_collections.ConfigDict) -> bool:
  """Whether the configured net normalises with batch statistics in training: not with frozen
  BN, nor a GroupNorm net (BiT's resnetv2_*_bit: per example, so accumulation is exact)."""
  from resnet_jax.models import parse_name  # pylint: disable=import-outside-toplevel

  try:
    bit = parse_name(model.name, model.get('block')).variant == 'bit'
  except ValueError:  # building the model names the problem
    bit = False
  return not (bool(model.frozen_bn) or bit)
