"""An exponential moving average (EMA) of the weights, kept in the train state (torchvision's).

torchvision's reference trainer (references/classification/train.py and utils.py,
github.com/pytorch/vision) keeps `ExponentialMovingAverage`, an `AveragedModel` with
`use_buffers=True`: the parameters *and* the BatchNorm running statistics are averaged,
`ema = decay * ema + (1 - decay) * model`, once every `model_ema_steps` (32) iterations, after
the optimizer step. Its first update copies the model (`n_averaged == 0`), and during the lr
warm-up it resets `n_averaged` after each update, so the EMA keeps copying the weights until the
first update after the warm-up, which copies them once more.

Here: `config.ema_decay` (0: off) is the decay of *one update*, and `config.ema_every_steps` the
steps between updates (an update after the optimizer step of every step s with
s % ema_every_steps == 0, s counted from 0 over the whole run; torchvision counts within each
epoch). An update at a step s < warm-up steps + ema_every_steps copies the weights (the warm-up is
the schedule's, `schedule.warmup_steps` or `warmup_epochs`; none: only the first update copies).
torchvision derives its per-update decay from `--model-ema-decay 0.99998` as
1 - min(1, (1 - 0.99998) * batch * ema_steps / epochs) (pycls' adjustment); configs/imagenet.py's
`recipe=torchvision` sets that value. The average is float32, replicated like the params, saved
in every checkpoint (and so in `state_fingerprint`), and restored with the run. A run without EMA
has exactly the train state it had before this module existed: its old checkpoints resume.

Optax's `incremental_update` is the update (`step_size * new + (1 - step_size) * old`). It is
computed at every step and a select keeps the old average between updates (under 1 % of a
ResNet-50 step's memory traffic: docs/performance.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from resnet_jax.validation import ConfigError

SUFFIX = '_ema'  # metrics.jsonl split / results.json key of an evaluator's EMA figures


def _as_float32(tree: Any) -> Any:
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


@dataclasses.dataclass(frozen=True)
class Ema:
  """When and how much the EMA moves; `update` is traced into the train step."""

  decay: float
  every_steps: int = 1
  warmup_steps: int = 0

  def weight(self, step: jax.Array) -> jax.Array:
    """The new weights' share in the update after step `step` (0: no update at that step)."""
    copy = step < self.warmup_steps + self.every_steps
    share = jnp.where(copy, 1.0, 1.0 - self.decay).astype(jnp.float32)
    return jnp.where(step % self.every_steps == 0, share, 0.0)

  def update(self, step: jax.Array, variables: dict[str, Any], ema: dict[str, Any]) -> Any:
    """The average after the optimizer step of step `step`, given the new model `variables`."""
    share = self.weight(step)
    blended = optax.incremental_update(_as_float32(variables), ema, share)
    return jax.tree.map(lambda new, old: jnp.where(share > 0, new, old), blended, ema)


def warmup_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """The schedule's warm-up in steps (what `optim.create_learning_rate_fn` uses)."""
  s = config.schedule
  return int(s.warmup_steps) or int(round(s.warmup_epochs * steps_per_epoch))


def from_config(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Ema | None:
  """The configured EMA, or None when `ema_decay` is 0 (the state has no `ema` then)."""
  if not config.ema_decay:
    return None
  return Ema(
    float(config.ema_decay), int(config.ema_every_steps), warmup_steps(config, steps_per_epoch)
  )


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether the run's state carries an EMA (and so its checkpoints)."""
  return bool(config.ema_decay)


def validate(config: ml_collections.ConfigDict) -> None:
  """Refuses EMA values that cannot give a correct run, before anything is written."""
  if not 0 <= config.ema_decay < 1:
    raise ConfigError(f'ema_decay must be in [0, 1) (0: no EMA), got {config.ema_decay}')
  if config.ema_every_steps < 1:
    raise ConfigError(f'ema_every_steps must be >= 1, got {config.ema_every_steps}')


def check_resume(
  old: ml_collections.ConfigDict, config: ml_collections.ConfigDict, workdir: Any
) -> None:
  """A run's state has an `ema` or not: switching EMA on or off cannot resume it."""
  before, now = enabled(old), enabled(config)
  if before != now:
    raise ConfigError(
      f'workdir {workdir} holds a run with ema_decay={old.ema_decay!r}, this config has '
      f'{config.ema_decay!r}: EMA {"on" if before else "off"} there, {"on" if now else "off"} '
      f'here; use another --workdir (--config.init_from={workdir} starts from its weights)'
    )
