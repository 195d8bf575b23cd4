"""Testing a run on a dataset other than its own (`evaluate --dataset`, evaluators' `dataset`):
which of the run's classes its labels mean, and the refusal of one whose labels mean nothing to
the run (other classes or channels).

Same label space: another test set built for the run's classes (CIFAR-10.1, ImageNet-V2, a tree
named or numbered as the run's classes), read through the run's own evaluation input. A subset
named as some of the run's classes (ImageNet-A/R's 200 of ImageNet's 1000): scored on those
classes' logits (`scored_on`), their benchmarks' protocol.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from resnet_jax import data, runtime
from resnet_jax.data import image_folder, sources
from resnet_jax.data.split import named_classes


def default_split(name: str) -> str:
  """The split of test set `name` to evaluate: the one split CIFAR-10.1 and ImageNet-V2/-A/-R
  have, 'test'; ReaL's, ImageNet's 'validation'."""
  return 'validation' if name.split(':')[0] in sources.LABEL_SETS else 'test'


def on_other_dataset(
  experiment: runtime.Experiment, name: str, split: str | None, data_dir: str | None = None
) -> tuple[ml_collections.ConfigDict, tuple[int, ...] | None]:
  """The run's config reading `split` (default 'test') of dataset `name` (at `data_dir`, when
  given), its labels checked; and the run's classes it is scored on (None: all of them).

  A test set built to match another (CIFAR-10.1, ImageNet-V2) measures how the run generalises;
  one named with a subset of the run's classes (ImageNet-A/R: 200 of ImageNet's) is scored on
  those classes' logits (`scored_on`); one with other classes or channels would give a number
  that means nothing, so it is refused.
  """
  config = experiment.config_reading(name, data_dir)
  if name == image_folder.NAME:  # a numbered split alone (ImageNet-V2) indexes the run's classes
    config.model.num_classes = experiment.dataset.num_classes
  config.data.eval_split = split or default_split(name)
  source = sources.open_split(config, config.data.eval_split)
  run = experiment.dataset
  columns = None
  if source.num_classes != run.num_classes:
    columns = class_columns(source.class_names, run)
    if columns is None:
      same = (
        f"a tree: class folders 0..{run.num_classes - 1} as ImageNet-V2's, or named as the "
        "run's classes"
        if name == image_folder.NAME
        else 'e.g. cifar10_1 for cifar10, imagenet_v2 for imagenet2012'
      )
      raise ValueError(
        f'{name} has {source.num_classes} classes and the run was trained on {run.name}, which '
        f'has {run.num_classes}: --dataset needs the same label space, or a subset of its '
        f"classes by name as ImageNet-A/R's ({same})"
      )
  else:
    check_class_names(name, source.class_names, run)
  experiment.check_channels(name, source.native_shape[2])
  return config, columns


def scored_on(apply_fn: Callable, columns: tuple[int, ...] | None) -> Callable:
  """`apply_fn` keeping the logits of `columns` only: softmax, loss and top-1/top-5 of a test set
  of a subset of the run's classes are then over those classes (Hendrycks et al.'s ImageNet-A/R
  protocol), its label k meaning the run's class columns[k]."""
  if columns is None:
    return apply_fn
  keep = np.asarray(columns, np.int32)

  def apply(variables: Any, *args: Any, **kwargs: Any) -> jax.Array:
    return apply_fn(variables, *args, **kwargs)[..., keep]

  return apply


def class_columns(
  class_names: Sequence[str] | None, run: data.DatasetInfo
) -> tuple[int, ...] | None:
  """The run's index of each of dataset's classes when they are fewer and all among the run's
  by name (ImageNet-A's and -R's 200 WordNet ids among ImageNet's 1000), else None: such a test
  set is scored on those classes' logits only, as Hendrycks et al. score ImageNet-A/R."""
  names, known = named_classes(class_names), run.class_names
  if names is None or known is None or len(names) >= len(known) or len(set(names)) < len(names):
    return None
  index = {name: i for i, name in enumerate(known)}
  if not all(name in index for name in names):
    return None
  return tuple(index[name] for name in names)


def check_class_names(name: str, class_names: Sequence[str] | None, run: data.DatasetInfo) -> None:
  """Refuses dataset `name` when its classes and the run's, both named, differ (in name or
  order): a tree of other classes, or the same classes under other names, would count every
  right answer wrong, silently. Numbered classes (ImageNet-V2's folders, CIFAR-10-C's labels)
  index the run's and pass."""
  names = named_classes(class_names)
  if names is None or run.class_names is None or names == run.class_names:
    return
  k = next((i for i, (a, b) in enumerate(zip(names, run.class_names)) if a != b), len(names))
  layout = (
    "name its class folders as the run's classes are named, or by class index, 0..N-1 "
    "(ImageNet-V2's layout)"
    if name == image_folder.NAME
    else 'evaluate on a test set built for the same classes'
  )
  raise ValueError(
    f'{name} names its classes otherwise than {run.name}, which the run was trained on: class '
    f'{k} is {names[k]!r} there and {run.class_names[k]!r} in the run: {layout}'
  )
