"""Precise BN: BatchNorm running statistics recomputed after training as an exact average.

The moving averages kept during training lag the weights (each is a mix of statistics of older
weights) and depend on the momentum. The ResNet authors' released models instead use statistics
computed over many training images with the final weights. This module does what fvcore's and
pycls's `PreciseBN` do: run the net in training mode (every BN normalises with its batch
statistics, so each layer sees the inputs it saw in training) over N batches of the run's own
training pipeline, with `bn_momentum=0` so that after each batch a layer's running mean/var are
exactly that batch's statistics (with ghost groups: the mean over the groups, as the layer itself
updates them), and set each running mean and var to the average over the N batches.

Variance convention: the average of the per-batch *biased* variances, E_b[Var_b(x)]. Biased
because that is the variance every BN normalised with in training and the one our layer stores
(Flax's convention). The average of per-batch variances rather than the variance of the pooled
data (which adds the spread of the batch means, Var_b(E_b[x])) because test-time BN should
reproduce the normalisation the layer applied in training, batch by batch; this is also what
fvcore/pycls compute.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from resnet_jax import data
from resnet_jax.train_step import batch_sharding, device_batch, replicated


def _as_float(images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
  del rng
  return images.astype(jnp.float32)


def _accumulate(model, preprocess, seed, variables, totals, images, index):
  """totals + this batch's statistics (momentum 0: the running stats become the batch's)."""
  key = jax.random.fold_in(jax.random.key(seed), index)
  x = preprocess(images, rng=key)
  _, updates = model.apply(
    variables, x, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.fold_in(key, 1)}
  )
  return jax.tree.map(jnp.add, totals, updates['batch_stats'])


def precise_batch_stats(
  model: nn.Module,
  variables: dict[str, Any],
  batches: Iterable[np.ndarray],
  mesh: Mesh,
  *,
  num_batches: int,
  preprocess: Callable = _as_float,
  seed: int = 0,
) -> dict[str, Any]:
  """`variables` with `batch_stats` replaced by the average over `num_batches` batches of the
  per-batch BN statistics (training mode, the model's own ghost groups).

  `batches` yields this process's uint8 (or float) image batches; `preprocess(images, rng=key)`
  turns them into model input (the training augmentation; key = fold_in(key(seed), i)). The
  statistics are accumulated on the device in one jitted step per batch.
  """
  if not isinstance(num_batches, int) or num_batches < 1:
    raise ValueError(f'precise BN needs a positive number of batches, got {num_batches!r}')
  if not jax.tree.leaves(variables.get('batch_stats', {})):  # GroupNorm nets (BiT)
    raise ValueError('the model keeps no BatchNorm statistics (GroupNorm): precise BN has none')
  if 'bn_momentum' not in {f.name for f in getattr(model, '__dataclass_fields__', {}).values()}:
    raise ValueError(f'{type(model).__name__} has no bn_momentum field to set to 0')
  rep = replicated(mesh)
  step = jax.jit(
    functools.partial(_accumulate, model.clone(bn_momentum=0.0), preprocess, int(seed)),
    in_shardings=(rep, rep, batch_sharding(mesh), rep),
    out_shardings=rep,
    donate_argnums=(1,),
  )
  variables = jax.device_put(variables, rep)
  totals = jax.device_put(jax.tree.map(jnp.zeros_like, variables['batch_stats']), rep)
  count = 0
  for images in itertools.islice(batches, num_batches):
    image = device_batch({'image': images}, mesh, ('image',))['image']
    totals = step(variables, totals, image, jnp.int32(count))
    count += 1
  if count < num_batches:
    raise ValueError(f'precise BN asked for {num_batches} batches, the input gave {count}')
  stats = jax.tree.map(lambda t: t / count, totals)
  return {**variables, 'batch_stats': stats}


def precise_bn_for_experiment(
  experiment: Any, variables: dict[str, Any], num_batches: int, seed: int | None = None
) -> dict[str, Any]:
  """Precise BN over `num_batches` global batches of the run's training pipeline (config.seed
  unless `seed`), batch size and augmentation as configured; nothing is written anywhere."""
  config = experiment.config
  n_proc = jax.process_count()
  if config.batch_size % n_proc:
    raise ValueError(f'batch_size {config.batch_size} does not divide over {n_proc} processes')
  seed = int(config.seed if seed is None else seed)
  it = data.create_train_iterator(
    config,
    local_batch_size=config.batch_size // n_proc,
    process_index=jax.process_index(),
    process_count=n_proc,
    seed=seed,
  )
  with contextlib.closing(it):
    return precise_batch_stats(
      experiment.model,
      variables,
      (batch['image'] for batch in it),
      experiment.mesh,
      num_batches=num_batches,
      preprocess=experiment.preprocess or _as_float,
      seed=seed,
    )
