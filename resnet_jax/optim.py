"""Learning-rate schedules and the optimizers (SGD, LARS, LAMB, AdamW), built from optax pieces.

The paper's schedules are piecewise constant (CIFAR: 0.1, /10 at 32k and 48k; ImageNet: /10 at
epochs 30 and 60) with an optional constant warm-up at 0.01 (ResNet-110); the modern recipe is a
linear warm-up into a cosine decay. SGD's weight decay is the coupled L2 of the paper (added to
the gradient before momentum); the large-batch and adaptive optimizers are in `optimizers.py`.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections
import optax

from resnet_jax.models import backbone

logger = logging.getLogger(__name__)


def _parse_numbers(text: str | None, key: str) -> list[float]:
  try:
    values = [float(x) for x in text.split(',') if x.strip()] if text else []
  except ValueError:
    raise ValueError(
      f"schedule.{key} must be comma-separated numbers like '30,60', got {text!r}"
    ) from None
  if any(v < 0 for v in values):
    raise ValueError(f'schedule.{key} must not be negative, got {text!r}')
  return values


def schedule_boundaries(config: ml_collections.ConfigDict, steps_per_epoch: int) -> list[int]:
  """The piecewise schedule's decay steps, from `boundaries` (steps) or `boundaries_epochs`.

  Only one of the two may be set: a config file's epochs plus a command line's steps would
  otherwise be merged into one list of decays nobody asked for. Boundaries must increase
  strictly: two equal ones would silently decay once, not twice.
  """
  s = config.schedule
  steps = _parse_numbers(s.boundaries, 'boundaries')
  epochs = _parse_numbers(s.boundaries_epochs, 'boundaries_epochs')
  if steps and epochs:
    raise ValueError(
      f'set schedule.boundaries (steps, {s.boundaries!r}) or schedule.boundaries_epochs '
      f"(epochs, {s.boundaries_epochs!r}), not both: set the other to ''"
    )
  key = 'boundaries' if steps else 'boundaries_epochs'
  boundaries = [int(b) for b in steps] + [int(round(e * steps_per_epoch)) for e in epochs]
  if any(b >= a for b, a in zip(boundaries, boundaries[1:])):
    raise ValueError(
      f'schedule.{key} must increase strictly, got {s[key]!r}'
      + (f' (steps {boundaries} at {steps_per_epoch} steps an epoch)' if epochs else '')
    )
  return boundaries


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
  """`base_lr`, scaled linearly with the global batch (x batch/256) when asked to."""
  lr = config.schedule.base_lr
  if config.schedule.scale_with_batch:
    lr *= config.batch_size / 256
  return lr


def create_learning_rate_fn(
  config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
) -> optax.Schedule:
  """The schedule named by `config.schedule.name`, as a function of the global step."""
  s = config.schedule
  peak = peak_learning_rate(config)
  warmup = int(s.warmup_steps)
  if s.warmup_epochs:
    if warmup:
      raise ValueError(
        f'set schedule.warmup_steps ({warmup}) or schedule.warmup_epochs ({s.warmup_epochs}), '
        'not both: set the other to 0'
      )
    warmup = int(round(s.warmup_epochs * steps_per_epoch))
  if s.name == 'piecewise':
    boundaries = schedule_boundaries(config, steps_per_epoch)
    if boundaries and boundaries[-1] >= total_steps:
      logger.warning(
        'schedule boundaries %s are not all inside the %d-step run: the learning rate never '
        'decays there (a shorter num_train_steps does not move them; set schedule.boundaries '
        "too, or the config's steps= arg where it has one)",
        ','.join(map(str, boundaries)),
        total_steps,
      )
    main = optax.piecewise_constant_schedule(peak, {b: s.decay_factor for b in boundaries})
  elif s.name == 'cosine':  # down to end_lr (timm's --min-lr; None: 0)
    end = s.get('end_lr') or 0.0
    main = optax.cosine_decay_schedule(
      peak, decay_steps=max(total_steps - warmup, 1), alpha=end / peak if peak else 0.0
    )
  elif s.name == 'constant':
    main = optax.constant_schedule(peak)
  elif s.name == 'polynomial':  # You et al. 2017's "poly" rule, MLPerf's LARS schedule
    main = optax.polynomial_schedule(
      init_value=peak,
      end_value=s.get('end_lr') or 0.0,
      power=2.0 if s.get('power') is None else s.power,
      transition_steps=max(total_steps - warmup, 1),
    )
  else:
    raise ValueError(
      f"schedule.name must be 'piecewise', 'cosine', 'polynomial' or 'constant', got {s.name!r}"
    )
  if warmup <= 0:
    return main
  if warmup >= total_steps:
    logger.warning(
      'the %d-step warm-up is not shorter than the %d-step run: the learning rate never '
      'leaves it (set schedule.warmup_steps, or warmup_epochs, below the run length)',
      warmup,
      total_steps,
    )
  if s.warmup == 'constant':
    warm = optax.constant_schedule(s.warmup_lr)
  elif s.warmup == 'linear':
    # From warmup_init_lr (timm's --warmup-lr; default 0) to the peak.
    warm = optax.linear_schedule(s.get('warmup_init_lr', 0.0), peak, warmup)
  else:
    raise ValueError(f"schedule.warmup must be 'constant' or 'linear', got {s.warmup!r}")
  if s.name == 'piecewise':
    # Boundaries are absolute steps of the whole run, so the piecewise part is not shifted.
    return lambda step: jax.numpy.where(step < warmup, warm(step), main(step))
  return optax.join_schedules([warm, main], [warmup])


WEIGHT_DECAY_MASKS = ('all', 'kernels', 'not_norm')


def weight_decay_mask(params, which: str):
  """Which leaves are decayed: 'all' (the paper's Caffe L2), 'kernels' (conv/dense weights: the
  modern recipe) or 'not_norm' (everything but BatchNorm's scale and bias: torchvision's
  `--norm-weight-decay 0`, whose new recipe decays the classifier's bias too). A BatchNorm is the
  module whose parameters are `scale` and `bias`; a dense layer's `bias` sits beside a `kernel`."""
  if which not in WEIGHT_DECAY_MASKS:
    raise ValueError(
      f'optimizer.weight_decay_mask must be one of {WEIGHT_DECAY_MASKS}, got {which!r}'
    )
  names = lambda path: tuple(getattr(k, 'key', k) for k in path)
  paths = {names(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}

  def decayed(path: tuple[str, ...]) -> bool:
    if which == 'all' or path[-1] == 'kernel':
      return True
    return which == 'not_norm' and path[:-1] + ('kernel',) in paths  # a dense layer's bias

  return jax.tree_util.tree_map_with_path(lambda p, _: decayed(names(p)), params)


OPTIMIZERS = ('sgd', 'lars', 'lamb', 'adamw')

# The fields each optimizer reads besides weight_decay and weight_decay_mask, with the values a
# None field stands for (LARS: You et al. 2017 and MLPerf's eta 0.001; LAMB: You et al. 2019 and
# timm's eps 1e-6; AdamW: Loshchilov & Hutter, torch's eps 1e-8). momentum and nesterov keep the
# SGD defaults (0.9, False) that LARS shares.
OPTIMIZER_FIELDS = {
  'sgd': {'momentum': None, 'nesterov': None},
  'lars': {'momentum': None, 'nesterov': None, 'trust_coefficient': 1e-3, 'eps': 0.0},
  'lamb': {'b1': 0.9, 'b2': 0.999, 'eps': 1e-6},
  'adamw': {'b1': 0.9, 'b2': 0.999, 'eps': 1e-8},
}


def trust_ratio_mask(params):
  """The leaves LARS and LAMB scale by their trust ratio: conv and dense kernels. BatchNorm's
  scale and bias and the classifier's bias take the plain (lr x) update, as in MLPerf's LARS
  (which excludes 'batch_normalization' and 'bias') and timm's Lars/Lamb (no trust ratio where
  its default parameter groups put no weight decay: every 1-d parameter)."""
  return weight_decay_mask(params, 'kernels')


def _field(o: ml_collections.ConfigDict, name: str, key: str):
  value = o.get(key)
  return OPTIMIZER_FIELDS[name][key] if value is None else value


def scale_by_lars(
  weight_decay: float, decay_mask, trust_coefficient: float, eps: float
) -> optax.GradientTransformation:
  """LARS's layer-wise step direction (You et al. 2017, Algorithm 1): for a trust-ratio leaf w
  with gradient g, eta * |w| / (|g| + wd * |w| + eps) * (g + wd * w), the ratio 1 where |w| or |g|
  is 0 (MLPerf's and timm's rule; optax.lars divides by |g + wd * w| instead); other leaves
  g + wd * w. wd is 0 on the leaves `decay_mask` leaves out. Stateless."""

  def update_fn(updates, state, params):
    if params is None:
      raise ValueError('LARS needs the params: tx.update(grads, state, params)')
    decayed, trusted = decay_mask(params), trust_ratio_mask(params)

    def one(g, w, decay, trust):
      wd = weight_decay if decay else 0.0
      direction = g + wd * w
      if not trust:
        return direction
      w_norm, g_norm = jnp.linalg.norm(w), jnp.linalg.norm(g)
      ratio = trust_coefficient * w_norm / (g_norm + wd * w_norm + eps)
      ratio = jnp.where((w_norm > 0) & (g_norm > 0), ratio, 1.0)
      return ratio.astype(g.dtype) * direction

    return jax.tree.map(one, updates, params, decayed, trusted), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _adaptive(
  name: str, o: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule, decay_mask
) -> optax.GradientTransformation:
  """LARS, LAMB or AdamW with decoupled weight decay: the decay is not part of the loss's
  gradient, so no Adam moment sees it. AdamW (Loshchilov & Hutter 2019) and LAMB (You et al.
  2019, Alg. 2) add wd * w to Adam's bias-corrected step m / (sqrt(v) + eps), after the moments
  (LAMB: before its trust ratio, as in the paper and timm's Lamb with its default
  decoupled_decay=False); LARS (You et al. 2017, Alg. 1) has no moments to keep it out of: it
  adds wd * w to the gradient inside its layer-wise rescaling, before momentum, as MLPerf does.
  The step is then multiplied by the lr, as torch's AdamW and timm's optimizers do (lr * wd * w
  per step: their weight_decay values carry over). timm's Lamb also clips the global gradient
  norm to 1 by default; this one only with `optimizer.clip_grad_norm=1.0`."""
  wd = o.weight_decay
  if name == 'adamw':
    return optax.adamw(
      learning_rate_fn,
      b1=_field(o, name, 'b1'),
      b2=_field(o, name, 'b2'),
      eps=_field(o, name, 'eps'),
      weight_decay=wd,
      mask=decay_mask,
    )
  if name == 'lamb':  # trust ratio |w| / |r + wd * w| on the kernels (optax's, = the paper's)
    return optax.chain(
      optax.scale_by_adam(
        b1=_field(o, name, 'b1'), b2=_field(o, name, 'b2'), eps=_field(o, name, 'eps')
      ),
      optax.add_decayed_weights(wd, mask=decay_mask),
      optax.masked(optax.scale_by_trust_ratio(), trust_ratio_mask),
      optax.scale_by_learning_rate(learning_rate_fn),
    )
  return optax.chain(  # lars: the momentum buffer accumulates lr-scaled steps (Algorithm 1)
    scale_by_lars(wd, decay_mask, _field(o, name, 'trust_coefficient'), _field(o, name, 'eps')),
    optax.scale_by_learning_rate(learning_rate_fn),
    optax.trace(decay=o.momentum, nesterov=o.nesterov),
  )


def clip_by_global_norm(
  tx: optax.GradientTransformation, max_norm: float
) -> optax.GradientTransformation:
  """``tx`` fed gradients rescaled to a global L2 norm of at most ``max_norm`` (timm's
  ``--clip-grad``, big_vision's ``grad_clip_norm``; torch's ``clip_grad_norm_``). A wrapper, not
  a link of the chain: the optimizer state keeps its tree, so a run resumes with clipping switched
  on or off, and old checkpoints restore."""

  def update(updates, state, params=None):
    norm = jnp.sqrt(
      sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(updates))
    )
    # torch's rule: scale = max_norm / (norm + 1e-6), applied only when below 1
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    updates = jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates)
    return tx.update(updates, state, params)

  return optax.GradientTransformation(tx.init, update)


def create_optimizer(
  config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule
) -> optax.GradientTransformation:
  """The optimizer `config.optimizer.name` names; frozen stages get no update at all.

  'sgd' (the default): momentum (optionally Nesterov) with coupled L2 weight decay, the state
  tree of before (old checkpoints resume). 'lars', 'lamb', 'adamw': `_adaptive`, decoupled decay.
  `optimizer.weight_decay_mask` selects the decayed leaves for every optimizer;
  `optimizer.clip_grad_norm` > 0 clips the gradient's global norm first (`clip_by_global_norm`).
  """
  o = config.optimizer
  which = o.weight_decay_mask
  weight_decay_mask({}, which)  # an unknown mask is refused here, not at the first update
  name = o.get('name', 'sgd')
  if name not in OPTIMIZERS:
    raise ValueError(f'optimizer.name must be one of {OPTIMIZERS}, got {name!r}')
  decay_mask = lambda p: weight_decay_mask(p, which)
  if name == 'sgd':
    tx = optax.chain(
      optax.add_decayed_weights(o.weight_decay, mask=decay_mask),
      optax.sgd(learning_rate_fn, momentum=o.momentum, nesterov=o.nesterov),
    )
  else:
    tx = _adaptive(name, o, learning_rate_fn, decay_mask)
  if o.get('clip_grad_norm', 0.0):  # over the trained leaves only: freeze() routes the rest away
    tx = clip_by_global_norm(tx, float(o.clip_grad_norm))
  return backbone.freeze(tx, config.model)  # frozen stages / BN affine: no update at all
