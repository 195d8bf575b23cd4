"""The one path from a config to running objects.

Training, `evaluate`, `predict`, `summary`, the Fig. 7 analysis, the benchmarks and the sweeps all
build their model here, from `config.model` (big_vision style: the fields of `config.model` are
`create_model`'s keyword arguments). Trainers get the optimizer, schedule and train state
(fresh, restored or initialised from pretrained weights); readers get model variables only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from etils import epath
from jax.sharding import Mesh

from resnet_jax import checkpointing, data, optim, pretrained
from resnet_jax.data import image_folder
from resnet_jax.data.device_preprocess import make_device_preprocess
from resnet_jax.models import create_model, layout
from resnet_jax.train_step import TrainState, abstract_state, create_mesh, init_state
from resnet_jax.workdir import check_recorded_class_names, read_run_config

logger = logging.getLogger(__name__)

COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@contextlib.contextmanager
def eval_batches(
  config: ml_collections.ConfigDict, split: str | None, crops: int, preprocessor: Any = None
) -> Iterator[Any]:
  """This process's batches of `split` at `config.eval_batch_size` rounded up to whole devices,
  closed on exit: no Grain worker outlives a failed evaluation or probe."""
  n_dev, n_proc = jax.device_count(), jax.process_count()
  global_batch = math.ceil(config.eval_batch_size / n_dev) * n_dev
  it = iter(
    data.create_eval_iterator(
      config,
      split=split,
      local_batch_size=global_batch // n_proc,
      process_index=jax.process_index(),
      process_count=n_proc,
      crops=crops,
      preprocessor=preprocessor,
    )
  )
  with contextlib.closing(it):
    yield it


def build_model(config: ml_collections.ConfigDict, num_classes: int | None = None) -> nn.Module:
  """`create_model(**config.model)` with the compute dtype; `num_classes` fills an unset count,
  and an unset `scan` becomes the backend's faster layout (scanned on the CPU only)."""
  kwargs = config.model.to_dict()
  kwargs['num_classes'] = kwargs.get('num_classes') or num_classes
  if kwargs.get('scan') is None:
    kwargs['scan'] = jax.default_backend() == 'cpu'
  return create_model(**kwargs, dtype=COMPUTE_DTYPES[config.dtype])


@dataclasses.dataclass(frozen=True)
class Experiment:
  """What every user of a config needs: the dataset's description, the model and the mesh."""

  config: ml_collections.ConfigDict
  dataset: data.DatasetInfo
  model: nn.Module
  mesh: Mesh
  preprocess: Any = None  # uint8 batch -> model input inside the jitted steps

  def abstract_variables(self) -> dict[str, Any]:
    """Shapes of {'params', 'batch_stats'}, without allocating them."""
    x = jax.ShapeDtypeStruct((1,) + self.dataset.image_shape, jnp.float32)
    return jax.eval_shape(lambda x: self.model.init(jax.random.key(0), x, train=False), x)

  def check_channels(self, name: str, channels: int) -> None:
    """Refuses dataset `name`'s `channels`-channel images where the network was trained on
    another count: its figures would mean nothing (a test set, a few-shot probe)."""
    run = self.dataset
    if channels != run.image_shape[2]:
      raise ValueError(
        f'{name} has {channels}-channel images and the run was trained on '
        f'{run.image_shape[2]}-channel ones ({run.name})'
      )

  def config_reading(self, name: str, data_dir: str | None = None) -> ml_collections.ConfigDict:
    """The run's config reading dataset `name` (at `data_dir`, when given) through the run's
    own evaluation input: no held-out images (they are carved from the run's own data), and an
    image tree read in the channels the network was trained on (a tree has no count of its own)."""
    config = self.config.copy_and_resolve_references()
    config.data.name = name
    if data_dir is not None:
      config.data.data_dir = data_dir
    config.data.validation_size = 0
    if name == image_folder.NAME:
      config.data.channels = self.dataset.image_shape[2]
    return config


def build_experiment(config: ml_collections.ConfigDict) -> Experiment:
  """Model, dataset description and mesh; a bad model name fails before any data is opened."""
  build_model(config, num_classes=config.model.num_classes or 1)
  info = data.get_dataset_info(config)
  classes = config.model.num_classes
  if classes and classes < info.num_classes:  # one_hot of a larger label is all zeros: no loss
    raise ValueError(
      f'model.num_classes={classes} is smaller than the {info.num_classes} classes of '
      f'{config.data.name}: its labels >= {classes} would train nothing and always count as '
      "errors. Leave it unset (None) for the dataset's count"
    )
  return Experiment(
    config,
    info,
    build_model(config, info.num_classes),
    create_mesh(),
    make_device_preprocess(config),
  )


@dataclasses.dataclass(frozen=True)
class Training:
  """An experiment plus what only training needs: length, schedule, optimizer, state shapes."""

  experiment: Experiment
  steps_per_epoch: int
  total_steps: int
  learning_rate_fn: optax.Schedule
  optimizer: optax.GradientTransformation
  abstract_state: TrainState

  @property
  def state_sharding(self) -> Any:
    return jax.tree.map(lambda s: s.sharding, self.abstract_state)


def build_training(config: ml_collections.ConfigDict) -> Training:
  experiment = build_experiment(config)
  steps_per_epoch = math.ceil(experiment.dataset.num_train_examples / config.batch_size)
  total_steps = (
    config.num_train_steps
    if config.num_train_steps > 0
    else int(math.ceil(config.num_epochs * steps_per_epoch))
  )
  lr_fn = optim.create_learning_rate_fn(config, steps_per_epoch, total_steps)
  tx = optim.create_optimizer(config, lr_fn)
  ema = bool(config.ema_decay)  # the state carries the weights' average (resnet_jax.ema)
  abstract = abstract_state(
    experiment.model, tx, experiment.dataset.image_shape, experiment.mesh, ema=ema
  )
  return Training(experiment, steps_per_epoch, total_steps, lr_fn, tx, abstract)


@dataclasses.dataclass
class StartingPoint:
  """Where a run begins: the state, the input position to continue from, and its history."""

  state: TrainState
  step: int
  iterator_state: dict[str, Any] | None  # None: start the input pipeline from the beginning
  wall_time_before_s: float  # time spent by earlier invocations of this run


def _restore_any_layout(
  training: Training, checkpointer: checkpointing.Checkpointer
) -> checkpointing.Restored | None:
  """Restores the newest checkpoint whether it holds scanned or unrolled blocks.

  The layout is a detail of `config.model.scan`: a run may resume with the other setting. The
  checkpoint is restored as saved (with its checksum verified), then converted.
  """
  try:
    return checkpointer.restore(training.abstract_state)
  except checkpointing.CheckpointMismatchError:
    model = training.experiment.model
    other = model.clone(scan=not model.scan)
    saved_shape = abstract_state(
      other,
      training.optimizer,
      training.experiment.dataset.image_shape,
      training.experiment.mesh,
      ema=hasattr(training.abstract_state, 'ema'),
    )
    if checkpointing.describe_mismatch(saved_shape, training.abstract_state) == '':
      raise  # both layouts are the same tree (one block per stage): a real mismatch
    try:
      restored = checkpointer.restore(saved_shape)
    except checkpointing.CheckpointMismatchError:
      restored = None
    if restored is None:
      raise
  logger.info(
    'converting checkpoint %d to the %s layout', restored.step, layout.model_layout(model)
  )
  state = restored.state
  state = state.replace(
    apply_fn=model.apply,
    **{
      k: layout.for_model(getattr(state, k), model)
      for k in ('params', 'batch_stats', 'opt_state', 'ema')
      if hasattr(state, k)
    },
  )
  return restored._replace(state=jax.device_put(state, training.state_sharding))


def initial_variables(training: Training) -> dict[str, Any] | None:
  """`config.init_from`'s weights laid over a fresh init (its head re-initialised where the class
  count differs); None without init_from. CheckpointMismatchError when they do not fit the model:
  train checks this before it makes a new workdir, so a misfit leaves nothing behind."""
  experiment = training.experiment
  config, model = experiment.config, experiment.model
  if not config.init_from:
    return None
  shape = (1,) + experiment.dataset.image_shape
  fresh = jax.device_get(
    jax.jit(lambda r: model.init(r, jnp.zeros(shape), train=False))(jax.random.key(config.seed))
  )
  given = pretrained.load_model_variables(config.init_from)
  try:
    weights = layout.for_model(given, model)
  except checkpointing.CheckpointMismatchError:
    raise
  except ValueError as e:  # another depth: without this the error did not say init_from
    raise checkpointing.CheckpointMismatchError(
      f'init_from {config.init_from} does not fit this model: {e}'
    ) from None
  variables, reinit = pretrained.merge_pretrained(fresh, weights)
  logger.info('initialised from %s (re-initialised: %s)', config.init_from, reinit or 'none')
  return variables


def starting_point(
  training: Training,
  checkpointer: checkpointing.Checkpointer,
  initial: dict[str, Any] | None = None,
) -> StartingPoint:
  """The newest good checkpoint, or a fresh state (from `config.init_from` weights if set:
  `initial`, when `initial_variables` already read them)."""
  restored = _restore_any_layout(training, checkpointer)
  if restored is not None:
    logger.info('resuming from %s/%d', checkpointer.directory, restored.step)
    return StartingPoint(
      restored.state,
      restored.step,
      restored.progress['iterator'],
      float(restored.progress.get('wall_time_s', 0.0)),
    )
  experiment = training.experiment
  config, model, mesh = experiment.config, experiment.model, experiment.mesh
  variables = initial if initial is not None else initial_variables(training)
  state = init_state(
    model,
    training.optimizer,
    experiment.dataset.image_shape,
    config.seed,
    mesh,
    variables,
    ema=bool(config.ema_decay),
  )
  return StartingPoint(state, 0, None, 0.0)


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """A finished or running run's weights, for readers (evaluation, analysis)."""

  experiment: Experiment
  variables: dict[str, Any]
  step: int


def load_trained_model(
  workdir: str | epath.PathLike, overrides: dict[str, Any] | None = None, weights: str = 'model'
) -> TrainedModel:
  """The model of the run in `workdir` with its newest good weights; never writes to `workdir`.

  `overrides` ({'eval_batch_size': 64, ...}, dotted keys allowed) change how it is evaluated,
  not what was trained. `weights`: 'model', or 'ema' (the run's average of its weights).
  """
  config = read_run_config(workdir)
  for key, value in (overrides or {}).items():
    section = config
    *parents, leaf = key.split('.')
    for p in parents:
      section = section[p]
    section[leaf] = value
  experiment = build_experiment(config)
  check_recorded_class_names(workdir, experiment.dataset.class_names)  # renamed tree folders
  variables, step = checkpointing.restore_model_variables(workdir, weights=weights)
  variables = layout.for_model(variables, experiment.model)
  mismatch = checkpointing.describe_mismatch(experiment.abstract_variables(), variables)
  if mismatch:
    raise checkpointing.CheckpointMismatchError(
      f'{workdir}: the checkpoint does not fit the model its config.json describes: {mismatch}'
    )
  return TrainedModel(experiment, variables, step)
