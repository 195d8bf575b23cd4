"""The train state and the jit-compiled train/eval steps, sharded over a `data` mesh axis.

One `jax.jit` program sees the *global* batch (sharded over every device of every host) and the
replicated state; XLA inserts the gradient all-reduce and the BatchNorm statistics reductions.
Nothing here depends on the device count: the same global batch gives the same update on 1 device
or 1,000.
"""

from __future__ import annotations

import functools
import hashlib
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax.losses import Loss, cross_entropy  # noqa: F401  (cross_entropy: re-exported)

DATA_AXIS = 'data'


class TrainState(struct.PyTreeNode):
  """Everything a resumed run needs besides the input position (there is no other randomness)."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  apply_fn: Callable = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  @classmethod
  def create(cls, *, apply_fn, variables, tx) -> 'TrainState':
    params = variables['params']
    return cls(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get('batch_stats', {}),
      opt_state=tx.init(params),
      apply_fn=apply_fn,
      tx=tx,
    )


class EmaTrainState(TrainState):
  """A `TrainState` that also carries `ema`, the float32 average of {'params', 'batch_stats'}
  (`resnet_jax.ema`); a run without EMA keeps the plain `TrainState`, so its checkpoints are
  those of before."""

  ema: Any

  @classmethod
  def create(cls, *, apply_fn, variables, tx) -> 'EmaTrainState':
    base = TrainState.create(apply_fn=apply_fn, variables=variables, tx=tx)
    as_f32 = lambda x: jnp.asarray(x, jnp.float32)
    ema = jax.tree.map(as_f32, {'params': base.params, 'batch_stats': base.batch_stats})
    return cls(**{f: getattr(base, f) for f in _FIELDS}, ema=ema)


_FIELDS = ('step', 'params', 'batch_stats', 'opt_state', 'apply_fn', 'tx')


def create_mesh(devices=None) -> Mesh:
  """A 1-D mesh over every device of every process: data parallelism."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# Applied to batch['image'] first thing inside the jitted steps: (images, rng) -> model input.
# rng is a per-step key in training and None in evaluation.
Preprocess = Callable[..., jax.Array]


def _as_float(images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
  del rng
  return images.astype(jnp.float32)


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  learning_rate_fn: Callable,
  label_smoothing: float = 0.0,
  preprocess: Preprocess = _as_float,
  seed: int = 0,
  accum_steps: int = 1,
  num_shards: int = 1,
  mixing: Callable | None = None,
  ema: Any = None,
  loss: Loss | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the global batch.

  A step whose loss, gradients or new parameters/statistics are not finite is not applied (state
  unchanged except `step`); it is reported in the metrics so the host can stop with an error
  naming it or skip it. `accum_steps > 1` computes the same update over that many micro-batches,
  one at a time (see `_accumulated`); `num_shards` is the mesh's data-axis size. `mixing`
  (`mixing.Mixing`) turns the normalised batch and its labels into mixed images and soft targets;
  `ema` (`ema.Ema`, with an `EmaTrainState`) updates the weights' average after the step.
  `loss` (`losses.Loss`, which carries its own smoothing) is the batch loss to minimise; None:
  softmax cross-entropy with `label_smoothing`.
  """
  if loss is None:
    loss = Loss('softmax_xent', label_smoothing)
  elif label_smoothing:
    raise ValueError('pass label_smoothing inside `loss` (losses.Loss), not beside it')
  step_key = jax.random.fold_in(jax.random.key(seed), state.step)
  # The whole batch is preprocessed at once, so its random lighting is the same for any accum_steps.
  images = preprocess(batch['image'], rng=step_key)
  labels = batch['label']
  if mixing is not None:  # pairs stay inside each device's share and micro-batch: no data moves
    images, labels = mixing(images, labels, jax.random.fold_in(step_key, 2))

  def loss_fn(params, images, labels, dropout_key):
    logits, updates = state.apply_fn(
      {'params': params, 'batch_stats': state.batch_stats},
      images,
      train=True,
      mutable=['batch_stats'],
      rngs={'dropout': dropout_key},
    )
    # Soft targets: the error is against the dominant label (torchvision's train accuracy).
    hard = jnp.argmax(labels, -1) if labels.ndim == 2 else labels
    errors = jnp.mean(jnp.argmax(logits, -1) != hard)
    return loss(logits, labels), (errors, updates['batch_stats'])

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  dropout_key = jax.random.fold_in(step_key, 1)
  if accum_steps == 1:
    (batch_loss, (top1_error, new_batch_stats)), grads = grad_fn(
      state.params, images, labels, dropout_key
    )
  else:
    batch_loss, top1_error, new_batch_stats, grads = _accumulated(
      grad_fn, state, images, labels, dropout_key, accum_steps, num_shards
    )
  updates, new_opt_state = state.tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)

  finite = (
    jnp.isfinite(batch_loss)
    & jnp.isfinite(_sum_of_squares(grads))
    & jnp.isfinite(_sum_of_squares(new_params))
    & jnp.isfinite(_sum_of_squares(new_batch_stats))
  )
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  # A skipped step keeps the optimizer's moments but still advances its schedule's count: the lr
  # applied stays lr(state.step), the one the metrics report. Adam's own count (its bias
  # correction, LAMB/AdamW) stays with its moments, as when torch skips optimizer.step().
  keep_opt = lambda new, old: jax.tree.map(
    lambda n, o: n if _is_schedule(n) else keep(n, o), new, old, is_leaf=_is_schedule
  )
  new_state = state.replace(
    step=state.step + 1,
    params=keep(new_params, state.params),
    batch_stats=keep(new_batch_stats, state.batch_stats),
    opt_state=keep_opt(new_opt_state, state.opt_state),
  )
  if ema is not None:
    new_state = new_state.replace(ema=ema.update(state.step, model_variables(new_state), state.ema))
  metrics = {
    'loss': batch_loss,
    'top1_error': top1_error,
    'learning_rate': learning_rate_fn(state.step),
    'nonfinite': jnp.logical_not(finite).astype(jnp.int32),
    # The first non-finite step of a logging window is the min over the window of this value.
    'nonfinite_step': jnp.where(finite, jnp.iinfo(jnp.int32).max, state.step),
  }
  return new_state, metrics


def _accumulated(grad_fn, state, images, labels, dropout_key, accum_steps, num_shards):
  """Loss, top-1 error, BN statistics and gradients of the batch, one micro-batch at a time.

  Each micro-batch is a mean over the same number of examples and starts from the same running
  statistics, so the means of their losses, gradients and updated statistics (an affine function
  of the batch statistics) are the full batch's, when BN groups lie inside micro-batches (checked
  by `validation.validate_grad_accum`). Micro-batch j is the j-th slice of every device's share:
  no example moves between devices. Only dropout masks differ from the one-pass step.
  """

  def split(x):  # [B, ...] -> [accum_steps, B / accum_steps, ...]
    m = x.shape[0] // (num_shards * accum_steps)
    x = x.reshape((num_shards, accum_steps, m) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape((accum_steps, num_shards * m) + x.shape[3:])

  def body(carry, micro):
    images, labels, j = micro
    (loss, (errors, stats)), grads = grad_fn(
      state.params, images, labels, jax.random.fold_in(dropout_key, j)
    )
    return jax.tree.map(jnp.add, carry, (loss, errors, stats, grads)), None

  zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)
  carry = (jnp.zeros(()), jnp.zeros(()), zeros(state.batch_stats), zeros(state.params))
  xs = (split(images), split(labels), jnp.arange(accum_steps))
  sums, _ = jax.lax.scan(body, carry, xs)
  return jax.tree.map(lambda x: x / accum_steps, sums)


def _is_schedule(node: Any) -> bool:
  return isinstance(node, optax.ScaleByScheduleState)


def _sum_of_squares(tree: Any) -> jax.Array:
  return sum(
    (jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)),
    jnp.zeros((), jnp.float32),
  )


def eval_probabilities(
  apply_fn: Callable, variables: Any, images: jax.Array, preprocess: Preprocess = _as_float
) -> jax.Array:
  """Softmax probabilities [B, classes]; with crops ([B, crops, H, W, C]) averaged over them."""
  images = preprocess(images, rng=None)
  if images.ndim == 5:
    b, crops = images.shape[:2]
    logits = apply_fn(variables, images.reshape((b * crops,) + images.shape[2:]), train=False)
    return jax.nn.softmax(logits.astype(jnp.float32)).reshape(b, crops, -1).mean(axis=1)
  return jax.nn.softmax(apply_fn(variables, images, train=False).astype(jnp.float32))


def metric_sums(probs: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """Sums (not means) of loss and top-1/top-5 errors over the real (mask=True) examples."""
  log_probs = jnp.log(jnp.clip(probs, 1e-30))
  nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  top5 = jax.lax.top_k(probs, min(5, probs.shape[-1]))[1]
  in_top5 = jnp.any(top5 == labels[:, None], axis=-1)
  top1_wrong = jnp.argmax(probs, -1) != labels
  m = mask.astype(jnp.float32)
  return {
    'loss': jnp.sum(nll * m),
    'top1_errors': jnp.sum(top1_wrong * m),
    'top5_errors': jnp.sum(jnp.logical_not(in_top5) * m),
    'count': jnp.sum(m),
  }


def eval_step(
  variables: Any,
  batch: dict[str, jax.Array],
  *,
  apply_fn: Callable,
  preprocess: Preprocess = _as_float,
) -> dict[str, jax.Array]:
  """Metric sums of one eval batch; `image` is [B, H, W, C] or [B, crops, H, W, C].

  With crops the softmax probabilities are averaged over the crops, as in the paper's 10-crop
  testing; padding examples (mask=False) count for nothing.
  """
  probs = eval_probabilities(apply_fn, variables, batch['image'], preprocess)
  return metric_sums(probs, batch['label'], batch['mask'])


def jit_train_step(
  mesh: Mesh,
  state_sharding: Any,
  learning_rate_fn: Callable,
  *,
  label_smoothing: float = 0.0,
  preprocess: Preprocess = _as_float,
  seed: int = 0,
  accum_steps: int = 1,
  mixing: Callable | None = None,
  ema: Any = None,
  loss: Loss | None = None,
) -> Callable:
  """`train_step` under jit: batch split on `data`, state replicated and donated."""
  return jax.jit(
    functools.partial(
      train_step,
      learning_rate_fn=learning_rate_fn,
      label_smoothing=label_smoothing,
      preprocess=preprocess,
      seed=seed,
      accum_steps=accum_steps,
      num_shards=mesh.shape[DATA_AXIS],
      mixing=mixing,
      ema=ema,
      loss=loss,
    ),
    in_shardings=(state_sharding, batch_sharding(mesh)),
    out_shardings=(state_sharding, replicated(mesh)),
    donate_argnums=(0,),
  )


def jit_eval_step(
  mesh: Mesh, apply_fn: Callable, *, preprocess: Preprocess = _as_float
) -> Callable:
  """`eval_step(variables, batch)` under jit: batch split on `data`, variables replicated."""
  return jax.jit(
    functools.partial(eval_step, apply_fn=apply_fn, preprocess=preprocess),
    in_shardings=(replicated(mesh), batch_sharding(mesh)),
    out_shardings=replicated(mesh),
  )


def model_variables(state: TrainState) -> dict[str, Any]:
  """What the model needs at inference: {'params', 'batch_stats'}."""
  return {'params': state.params, 'batch_stats': state.batch_stats}


def device_batch(local: dict[str, Any], mesh: Mesh, keys: tuple[str, ...]) -> dict[str, jax.Array]:
  """This process's slice of a batch -> global arrays sharded on the mesh's `data` axis."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(local[k])) for k in keys}


def _state_class(ema: bool) -> type[TrainState]:
  return EmaTrainState if ema else TrainState


def _fresh_state(
  model: nn.Module,
  tx: optax.GradientTransformation,
  image_shape: tuple[int, ...],
  rng: jax.Array,
  ema: bool = False,
) -> TrainState:
  variables = model.init(rng, jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False)
  return _state_class(ema).create(apply_fn=model.apply, variables=variables, tx=tx)


def init_state(
  model: nn.Module,
  tx: optax.GradientTransformation,
  image_shape: tuple[int, ...],
  seed: int,
  mesh: Mesh,
  variables: Any = None,
  ema: bool = False,
) -> TrainState:
  """Initialises (or wraps given `variables` into) a train state replicated over the mesh;
  `ema`: an `EmaTrainState`, its average starting at the initial weights."""
  rep = replicated(mesh)
  if variables is None:
    make = functools.partial(_fresh_state, model, tx, image_shape, ema=ema)
    return jax.jit(make, out_shardings=rep)(jax.random.key(seed))
  state = _state_class(ema).create(apply_fn=model.apply, variables=variables, tx=tx)
  return jax.device_put(state, rep)


def abstract_state(
  model: nn.Module,
  tx: optax.GradientTransformation,
  image_shape: tuple[int, ...],
  mesh: Mesh,
  ema: bool = False,
) -> TrainState:
  """Shapes, dtypes and shardings of the train state, without allocating it (for restores)."""
  shapes = jax.eval_shape(
    functools.partial(_fresh_state, model, tx, image_shape, ema=ema), jax.random.key(0)
  )
  rep = replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), shapes)


def state_fingerprint(state: TrainState) -> str:
  """SHA-256 over every array of the state in a fixed (sorted-path) order: equal iff same state."""
  flat, _ = jax.tree_util.tree_flatten_with_path(state)
  digest = hashlib.sha256()
  for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
    value = np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(str(value.dtype).encode() + str(value.shape).encode())
    digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()


def count_params(params: Any) -> int:
  """Number of scalars in a params tree (works on arrays and on ShapeDtypeStructs)."""
  return int(sum(math.prod(p.shape) for p in jax.tree.leaves(params)))
