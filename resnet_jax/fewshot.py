"""Few-shot linear probes of a run's representation (BiT, Kolesnikov et al. 2020; big_vision's
``fewshot_lsr`` evaluator).

How good are the features a run learned, beyond its own classes? Take the pooled features before
the classifier (``pre_logits``, which ``ResNet`` sows) of a dataset's train and test splits, both
through the run's evaluation view (resize, centre crop, the run's normalisation); for each seed
draw ``k`` training images per class (a seeded permutation of each class, so the 5-shot set holds
the 1-shot one), fit an L2-regularised least-squares classifier on them in closed form, and count
its test errors. As in big_vision: features standardised by the drawn images' mean and standard
deviation, a constant feature of 100 for an almost unregularised bias, targets +1 / -1 (one-hot
scaled), ``l2_reg`` 1024, shots 1, 5, 10, 25 and 3 seeds by default; the reported error is the
mean over the seeds (each seed's beside it). A class with fewer than ``k`` training images uses
all it has (``classes_short`` counts them).

Any dataset with the run's channels can be probed (other classes included: that is the point),
read with the run's evaluation preprocessing: ``config.evals.NAME = dict(shots='1,5,10,25',
dataset='cifar100')`` during training, or ``python -m resnet_jax.evaluate --workdir DIR --fewshot
1,5,10,25 [--dataset NAME]`` afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from resnet_jax import cli, data, runtime
from resnet_jax.data import sources
from resnet_jax.train_step import batch_sharding, device_batch, replicated

BIAS_FEATURE = 100.0  # large, so the bias is almost unregularised
DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_SEEDS = 3
DEFAULT_L2_REG = 1024.0


@dataclasses.dataclass(frozen=True)
class Probe:
  """A few-shot evaluation: the training images per class, how many draws, the ridge penalty,
  and the split the shots are drawn from."""

  shots: tuple[int, ...] = DEFAULT_SHOTS
  seeds: int = DEFAULT_SEEDS
  l2_reg: float = DEFAULT_L2_REG
  train_split: str = 'train'


def parse_shots(text: Any) -> tuple[int, ...]:
  """'1,5,10,25' -> (1, 5, 10, 25); anything else (empty, zero, not a number) is a ValueError."""
  parts = [p.strip() for p in str(text).split(',') if p.strip()]
  if not parts or not all(p.isascii() and p.isdigit() and int(p) > 0 for p in parts):
    raise ValueError(  # isascii: '²' passes isdigit, then int() fails with its own message
      f"shots must be positive counts of images per class like '1,5,10,25', got {text!r}"
    )
  return tuple(sorted({int(p) for p in parts}))


def is_mean_key(key: str) -> bool:
  """Whether `key` of a probe's result is one of its mean errors (`top1_error_5shot`), the figures
  metrics.jsonl and TensorBoard record."""
  return key.startswith('top1_error_') and key.endswith('shot')


def errors_text(result: dict[str, Any]) -> str:
  """A probe's mean errors by shot count, '1-shot 36.11%, 5-shot 15.83%' (logs and summaries)."""
  shots = sorted(int(key[len('top1_error_') : -len('shot')]) for key in result if is_mean_key(key))
  return ', '.join(f'{k}-shot {100 * result[f"top1_error_{k}shot"]:.2f}%' for k in shots)


def ridge_error(
  train_x: np.ndarray,
  train_y: np.ndarray,
  test_x: np.ndarray,
  test_y: np.ndarray,
  num_classes: int,
  l2_reg: float,
) -> float:
  """Test top-1 error of the L2-regularised least-squares classifier fitted on (train_x, train_y):
  W = argmin |X W - T|^2 + l2_reg |W|^2 with T one-hot in {-1, +1}, solved in float64 in whichever
  of the primal (D x D) and dual (N x N) forms is smaller."""
  x = np.asarray(train_x, np.float64)
  mean, std = x.mean(axis=0), x.std(axis=0) + 1e-5

  def design(features: np.ndarray) -> np.ndarray:
    z = (np.asarray(features, np.float64) - mean) / std
    return np.concatenate([z, np.full((len(z), 1), BIAS_FEATURE)], axis=1)

  a = design(x)
  targets = 2.0 * np.eye(num_classes)[np.asarray(train_y)] - 1.0
  n, d = a.shape
  if n >= d:
    w = np.linalg.solve(a.T @ a + l2_reg * np.eye(d), a.T @ targets)
  else:
    w = a.T @ np.linalg.solve(a @ a.T + l2_reg * np.eye(n), targets)
  predictions = np.argmax(design(test_x) @ w, axis=1)
  return float(np.mean(predictions != np.asarray(test_y)))


def draw_shots(labels: np.ndarray, num_classes: int, shots: int, seed: int) -> np.ndarray:
  """Indices of `shots` examples of each class (all of a class that has fewer), drawn by a seeded
  permutation of each class's indices: the same seed's larger draws contain its smaller ones."""
  rng = np.random.default_rng(seed)
  per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
  return np.concatenate([idx[:shots] for idx in per_class]).astype(np.int64)


def probe_errors(
  train: tuple[np.ndarray, np.ndarray],
  test: tuple[np.ndarray, np.ndarray],
  num_classes: int,
  probe: Probe,
) -> dict[str, Any]:
  """The few-shot figures from features already computed: per k, the mean test error over the
  seeds (`top1_error_{k}shot`) and each seed's (`top1_error_{k}shot_seeds`)."""
  train_x, train_y = train
  test_x, test_y = test
  counts = np.bincount(train_y, minlength=num_classes)
  out: dict[str, Any] = {'num_examples': int(len(test_y)), 'num_train_examples': int(len(train_y))}
  for k in probe.shots:
    errors = []
    for seed in range(probe.seeds):
      idx = draw_shots(train_y, num_classes, k, seed)
      errors.append(
        ridge_error(train_x[idx], train_y[idx], test_x, test_y, num_classes, probe.l2_reg)
      )
    out[f'top1_error_{k}shot'] = float(np.mean(errors))
    out[f'top1_error_{k}shot_seeds'] = errors
    short = int(np.sum(counts < k))
    if short:
      out[f'classes_short_{k}shot'] = short
  return out


def jit_representation_fn(mesh: Mesh, apply_fn: Callable, preprocess: Any) -> Callable:
  """(variables, batch) -> {'features': the pooled features before the classifier, float32
  [B, D], 'label', 'mask'}, gathered on every device and process: the probe runs on the host."""

  def features(variables: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    images = preprocess(batch['image'], rng=None)
    _, state = apply_fn(variables, images, train=False, mutable=['intermediates'])
    pooled = state['intermediates']['pre_logits'][0].astype(jnp.float32)
    return {'features': pooled, 'label': batch['label'], 'mask': batch['mask']}

  return jax.jit(
    features, in_shardings=(replicated(mesh), batch_sharding(mesh)), out_shardings=replicated(mesh)
  )


def representations(
  features_fn: Callable,
  variables: Any,
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  split: str,
  preprocessor: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
  """(features [N, D], labels [N]) of every example of `split`, in the split's order."""
  feats, labels = [], []
  with runtime.eval_batches(config, split, 1, preprocessor) as batches:
    for local in batches:
      out = jax.device_get(
        features_fn(variables, device_batch(local, mesh, ('image', 'label', 'mask')))
      )
      mask = np.asarray(out['mask'], bool)
      feats.append(np.asarray(out['features'])[mask])
      labels.append(np.asarray(out['label'])[mask])
  if not feats:
    raise ValueError(f'split {split!r} of {config.data.name} is empty')
  return np.concatenate(feats), np.concatenate(labels).astype(np.int64)


def probe_config(
  experiment: runtime.Experiment, name: str | None, data_dir: str | None = None
) -> ml_collections.ConfigDict:
  """The run's config reading dataset `name` (None: the run's own) with its evaluation view.

  Unlike another test set (`other_datasets.on_other_dataset`) the classes may differ: the probe
  learns its own classifier. The channels must match what the network was trained on."""
  if name is None or (name == experiment.config.data.name and data_dir is None):
    return experiment.config.copy_and_resolve_references()
  config = experiment.config_reading(name, data_dir)
  config.model.num_classes = None  # a numbered image tree indexes no run's classes here
  return config


def run_probe(
  experiment: runtime.Experiment,
  variables: Any,
  probe: Probe,
  *,
  dataset: str | None = None,
  split: str | None = None,
  data_dir: str | None = None,
  batch_size: int | None = None,
  features_fn: Callable | None = None,
) -> dict[str, Any]:
  """Few-shot errors of `variables` on `dataset` (None: the run's own): shots drawn from
  `probe.train_split`, tested on `split` (default: the run's eval split for its own data, 'test'
  for another dataset)."""
  config = probe_config(experiment, dataset, data_dir)
  if batch_size:
    config.eval_batch_size = batch_size
  own = config.data.name == experiment.config.data.name and data_dir is None
  if not probe.train_split:  # the run's own train split for its data, 'train' for another's
    probe = dataclasses.replace(probe, train_split=str(config.data.train_split) if own else 'train')
  split = split or (str(config.data.eval_split) if own else 'test')
  train_source = sources.open_split(config, probe.train_split)
  test_source = sources.open_split(config, split)
  name = str(config.data.name)
  experiment.check_channels(name, test_source.native_shape[2])
  preprocessor = None if own else data.make_preprocessor(experiment.config)
  fn = features_fn or jit_representation_fn(
    experiment.mesh, experiment.model.apply, experiment.preprocess
  )
  args = (fn, variables, config, experiment.mesh)
  train = representations(*args, probe.train_split, preprocessor)
  test = representations(*args, split, preprocessor)
  classes = max(train_source.num_classes, test_source.num_classes)
  result = probe_errors(train, test, classes, probe)
  result.update(split=split, train_split=probe.train_split, seeds=probe.seeds, l2_reg=probe.l2_reg)
  if not own:
    result['dataset'] = name
  return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """`python -m resnet_jax.evaluate`'s few-shot flags."""
  parser.add_argument(
    '--fewshot',
    metavar='SHOTS',
    type=_shots_arg,
    help='few-shot linear probes of the features before the classifier instead, e.g. 1,5,10,25 '
    'images per class drawn from --train-split, tested on --split; --dataset may have other '
    'classes (BiT / big_vision fewshot_lsr: resnet_jax/fewshot.py)',
  )
  parser.add_argument(
    '--train-split',
    help="with --fewshot: the split the shots are drawn from (default: the run's own train "
    "split for its data, 'train' for --dataset)",
  )
  parser.add_argument(
    '--seeds',
    type=cli.positive_int,
    default=DEFAULT_SEEDS,
    help='with --fewshot: draws per shot count',
  )
  parser.add_argument(
    '--l2-reg',
    type=cli.positive_float,
    default=DEFAULT_L2_REG,
    help='with --fewshot: ridge penalty',
  )


def probe_of(args: argparse.Namespace) -> Probe | None:
  """The Probe the flags ask for; None without --fewshot (where its other flags are refused)."""
  if args.fewshot is None:
    if args.train_split or args.seeds != DEFAULT_SEEDS or args.l2_reg != DEFAULT_L2_REG:
      raise ValueError('--train-split, --seeds and --l2-reg go with --fewshot SHOTS')
    return None
  return Probe(args.fewshot, args.seeds, args.l2_reg, args.train_split or '')


def _shots_arg(text: str) -> tuple[int, ...]:
  try:
    return parse_shots(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None
