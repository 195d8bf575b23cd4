"""Evaluation: every example of a split counted exactly once, on any devices/hosts/batch size.

`run_evaluation` is what the training loop calls; `python -m resnet_jax.evaluate --workdir=DIR
[--split=NAME] [--crops=1|10]` restores a run's newest checkpoint and prints one JSON object with
`loss`, `top1_error`, `top5_error`, `num_examples`. The input pipeline pads the last batch and
marks padding with `mask=False`; the eval step sums only masked-in examples, so nothing is dropped
or counted twice. `--scales` is He et al. 2015 Table 4's whole-image multi-scale testing
(`resnet_jax.multiscale`); `--precise-bn N` first recomputes the BN statistics over N training
batches (`resnet_jax.precise_bn`), in memory only: the workdir is never written. `--weights ema`
evaluates the run's average of its weights (`resnet_jax.ema`) instead of the weights themselves.
On a dataset with label sets (`--dataset=imagenet2012_real`: ReaL, Beyer et al. 2020) the JSON
also has `real_top1_error` over the images that have a ReaL label, and `real_num_examples`.
`--fewshot 1,5,10,25` reports few-shot linear probes of the features instead
(`resnet_jax.fewshot`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from resnet_jax import cli, data, fewshot, multiscale, precise_bn, runtime
from resnet_jax.data import image_folder, sources
from resnet_jax.data.device_preprocess import make_device_preprocess
from resnet_jax.other_datasets import on_other_dataset, scored_on
from resnet_jax.train_step import (
  batch_sharding,
  device_batch,
  eval_probabilities,
  jit_eval_step,
  metric_sums,
  replicated,
)
from resnet_jax.workdir import read_run_config


def label_set_sums(probs: jax.Array, label_set: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """ReaL accuracy's sums (Beyer et al. 2020): the top-1 prediction is right when it is any of
  the image's labels in `label_set` (bool [B, classes]); images with an empty set (ReaL's
  annotators kept no label) and padding (mask False) are left out."""
  counted = jnp.any(label_set, axis=-1) & mask
  top1 = jnp.argmax(probs, axis=-1)
  right = jnp.take_along_axis(label_set, top1[:, None], axis=-1)[:, 0] & counted
  return {'set_count': jnp.sum(counted), 'set_top1_right': jnp.sum(right)}


def jit_label_set_eval_step(mesh: Mesh, apply_fn: Callable, *, preprocess: Any) -> Callable:
  """`jit_eval_step`'s sums plus `label_set_sums`, for batches that carry 'label_set'."""

  def step(variables: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    probs = eval_probabilities(apply_fn, variables, batch['image'], preprocess)
    sums = metric_sums(probs, batch['label'], batch['mask'])
    return {**sums, **label_set_sums(probs, batch['label_set'], batch['mask'])}

  return jax.jit(
    step, in_shardings=(replicated(mesh), batch_sharding(mesh)), out_shardings=replicated(mesh)
  )


def _finish(totals: Any, split: str | None, config) -> dict[str, float]:
  if totals is None:
    raise ValueError(f'split {split!r} of {config.data.name} is empty')
  totals = jax.device_get(totals)
  count = float(totals['count'])
  result = {
    'loss': float(totals['loss']) / count,
    'top1_error': float(totals['top1_errors']) / count,
    'top5_error': float(totals['top5_errors']) / count,
    'num_examples': int(round(count)),
  }
  if 'set_count' in totals:
    counted = int(totals['set_count'])
    result['real_top1_error'] = 1.0 - int(totals['set_top1_right']) / max(counted, 1)
    result['real_num_examples'] = counted
  return result


def run_evaluation(
  eval_step: Callable,
  variables: Any,
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  *,
  split: str | None = None,
  crops: int = 1,
  preprocessor: Any = None,
) -> dict[str, float]:
  """Mean loss and top-1/top-5 error over the whole split (crops: 1 or 10).

  `eval_step(variables, batch)` is `train_step.jit_eval_step(...)`: it returns metric sums.
  `preprocessor`: the host's geometry (default: `config.data`'s).
  """
  totals = None
  with runtime.eval_batches(config, split, crops, preprocessor) as batches:
    for local in batches:
      keys = ('image', 'label', 'mask') + (('label_set',) if 'label_set' in local else ())
      sums = eval_step(variables, device_batch(local, mesh, keys))
      totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  return _finish(totals, split, config)


def run_multiscale_evaluation(
  apply_fn: Callable,
  variables: Any,
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  *,
  scales: list[int],
  stride: int,
  split: str | None = None,
  crops: int = 1,
  preprocess: Any = None,
  preprocessor: Any = None,
) -> dict[str, float]:
  """He et al. 2015 Table 4: the whole image at shorter side S, softmax averaged over `scales`.

  `stride`: the net's total stride (`multiscale.network_stride(model)`); images are batched by
  shape, the longer side moved to a whole number of strides (see `resnet_jax.multiscale`).
  crops: 1, or 2 (the image and its horizontal flip). `preprocess`: the run's
  `DevicePreprocess` (its normaliser is applied at each input shape; an object without a
  `normalizer` leaves the pixel values as they are). `preprocessor`: the host's geometry
  (default: `config.data`'s).
  """
  split = split or str(config.data.eval_split)
  source = sources.open_split(config, split)
  preprocess = preprocess or make_device_preprocess(config)
  n_dev = mesh.devices.size
  per_example = multiscale.whole_image_probabilities(
    apply_fn,
    variables,
    source.records,
    preprocessor or data.make_preprocessor(config),
    mesh,
    config,
    scales=scales,
    stride=stride,
    global_batch=math.ceil(config.eval_batch_size / n_dev) * n_dev,
    normalizer=getattr(preprocess, 'normalizer', None),
    crops=crops,
  )
  return _finish(multiscale.metric_totals(per_example, mesh, len(source)), split, config)


def evaluate_workdir(
  workdir: str,
  *,
  split: str | None = None,
  crops: int | None = None,
  batch_size: int | None = None,
  scales: list[int] | None = None,
  precise_bn_batches: int | None = None,
  data_dir: str | None = None,
  dataset: str | None = None,
  weights: str = 'model',
  probe: fewshot.Probe | None = None,
) -> dict[str, Any]:
  """Evaluates the newest good checkpoint of a training run, without writing to its workdir.

  `scales`: Table 4's whole-image multi-scale testing. `precise_bn_batches`: first recompute the
  BN statistics over that many training batches (`resnet_jax.precise_bn`), in memory only.
  `data_dir`: where the dataset is now, when it is not where the run read it (moved, another
  machine, a relative path from another directory). `dataset`: another TFDS dataset with the
  run's label space (CIFAR-10.1's `cifar10_1` for a CIFAR-10 run, `imagenet_v2` for ImageNet),
  read through the run's own evaluation preprocessing and normalisation; 'image_folder' with
  `data_dir`: the tree at `data_dir` (the run's own data is still read where it was), such as
  ImageNet-V2's numbered folders extracted alone. `weights`: 'model' or
  'ema' (the average a run with `ema_decay` > 0 kept; the JSON then says `"weights": "ema"`).
  `probe`: few-shot linear probes of the features instead (`resnet_jax.fewshot`; `dataset` may
  then have other classes; None for a probe's train split: 'train', the run's own for its data).
  """
  if probe is not None and (crops or scales):
    raise ValueError('--fewshot reads one centre view per image: leave out --crops and --scales')
  # --dataset image_folder --data-dir ROOT: a tree to test on (ImageNet-V2 extracted); the run's
  # own data stays where it was read
  tree = dataset == image_folder.NAME and data_dir is not None
  if dataset == image_folder.NAME and data_dir is None:  # before the run's data is opened
    if read_run_config(workdir).data.name != dataset:
      raise ValueError('--dataset image_folder reads the tree at --data-dir ROOT: add it')
  if (
    data_dir is not None
    and '://' not in data_dir
    and not os.path.isdir(os.path.expanduser(data_dir))
  ):
    # a reader makes nothing: digits, prepared on first use, would be written there
    raise ValueError(f'--data-dir {data_dir} is not a directory: name where the data is now')
  overrides = {'eval_batch_size': batch_size} if batch_size else {}
  if data_dir is not None and not tree:
    overrides['data.data_dir'] = data_dir
  trained = runtime.load_trained_model(workdir, overrides, weights=weights)
  experiment = trained.experiment
  config, mesh = experiment.config, experiment.mesh
  other = dataset is not None and (dataset != config.data.name or tree)
  preprocessor, eval_config, columns = None, config, None
  if other and probe is None:  # a test set of the run's classes (a probe may read other classes)
    preprocessor = data.make_preprocessor(config)  # the run's geometry, on the other images
    eval_config, columns = on_other_dataset(experiment, dataset, split, data_dir if tree else None)
  variables = jax.device_put(trained.variables, replicated(mesh))
  if precise_bn_batches is not None:
    variables = precise_bn.precise_bn_for_experiment(experiment, variables, precise_bn_batches)
  if probe is not None:
    result = fewshot.run_probe(
      experiment,
      variables,
      probe,
      dataset=dataset if other else None,
      split=split,
      data_dir=data_dir if tree else None,
    )
    return _annotated(result, trained.step, weights, precise_bn_batches)
  split = split or eval_config.data.eval_split
  label_sets = sources.open_split(eval_config, split).label_sets
  if scales and label_sets:
    raise ValueError(
      f'--scales is not supported on {eval_config.data.name} (its ReaL label sets are counted by '
      'the 1/2/10-crop evaluation only): leave --scales out'
    )
  apply_fn = scored_on(experiment.model.apply, columns)
  if scales:
    result = run_multiscale_evaluation(
      apply_fn,
      variables,
      eval_config,
      mesh,
      scales=scales,
      stride=multiscale.network_stride(experiment.model),
      split=split,
      crops=crops or 1,
      preprocess=experiment.preprocess,
      preprocessor=preprocessor,
    )
    result['scales'] = scales
  else:
    make_step = jit_label_set_eval_step if label_sets else jit_eval_step
    eval_step = make_step(mesh, apply_fn, preprocess=experiment.preprocess)
    result = run_evaluation(
      eval_step,
      variables,
      eval_config,
      mesh,
      split=split,
      crops=crops or config.data.eval_crops,
      preprocessor=preprocessor,
    )
  if eval_config is not config:
    result['dataset'] = str(eval_config.data.name)
  if columns is not None:
    result['classes_scored'] = len(columns)
  result['split'] = split
  return _annotated(result, trained.step, weights, precise_bn_batches)


def _annotated(result: dict, step: Any, weights: str, precise_bn_batches: int | None) -> dict:
  """`result` with what was evaluated: the checkpoint's step, the weights, precise BN's batches."""
  result['step'] = int(step)
  if weights != 'model':
    result['weights'] = weights
  if precise_bn_batches is not None:
    result['precise_bn_batches'] = int(precise_bn_batches)
  return result


def _scales(text: str) -> list[int]:
  parts = [x for x in text.split(',') if x.strip()]
  if not parts or not all(x.strip().isdigit() and int(x) > 0 for x in parts):
    raise argparse.ArgumentTypeError(f'expected positive sizes like 224,256,384, got {text!r}')
  return [int(x) for x in parts]


def main(argv: Sequence[str] | None = None) -> None:
  parser = cli.ArgumentParser(
    prog='python -m resnet_jax.evaluate', description=__doc__.split('\n\n')[0]
  )
  parser.add_argument('--workdir', required=True, help='training run directory (read only)')
  parser.add_argument('--split', help="split to evaluate (default: the run's eval split)")
  parser.add_argument(
    '--crops',
    type=int,
    choices=[1, 2, 10],
    help="crops per image: 1, 2 (with its flip), or 10 (the paper's 10-crop testing); "
    'with --scales 1 or 2',
  )
  parser.add_argument('--batch-size', type=cli.positive_int, help='global eval batch size')
  parser.add_argument(
    '--scales',
    type=_scales,
    help='He et al. 2015 Table 4 testing, e.g. 224,256,384,480,640: the whole image with its '
    'shorter side at each scale, softmax averaged over the scales',
  )
  parser.add_argument(
    '--precise-bn',
    type=cli.positive_int,
    metavar='N',
    help='recompute the BN statistics as the average over N training batches first '
    '(in memory only)',
  )
  parser.add_argument(
    '--data-dir',
    help="the dataset's TFDS data_dir, when it is no longer where the run read it "
    "(default: the run's config.data.data_dir)",
  )
  parser.add_argument(
    '--dataset',
    help="another TFDS dataset with the run's classes, e.g. cifar10_1 (CIFAR-10.1), "
    "imagenet_v2, or imagenet2012_real (adds ReaL's error), or some of them, scored on those "
    "(imagenet_a, imagenet_r), read with the run's evaluation preprocessing; --split defaults "
    "to 'test' ('validation' for imagenet2012_real). image_folder: the tree at --data-dir ROOT "
    "(the run's own data stays where it was), e.g. ImageNet-V2 extracted as ROOT/SPLIT/0..999 "
    'or ImageNet-A as ROOT/SPLIT/<wnid>',
  )
  parser.add_argument(
    '--weights',
    choices=['model', 'ema'],
    default='model',
    help="the run's weights (model, the default) or their exponential moving average (ema, "
    'kept by a run trained with --config.ema_decay > 0)',
  )
  fewshot.add_arguments(parser)
  args = parser.parse_args(argv)
  try:
    result = evaluate_workdir(
      args.workdir,
      split=args.split,
      crops=args.crops,
      batch_size=args.batch_size,
      scales=args.scales,
      precise_bn_batches=args.precise_bn,
      data_dir=args.data_dir,
      dataset=args.dataset,
      weights=args.weights,
      probe=fewshot.probe_of(args),
    )
  except (ValueError, FileNotFoundError, PermissionError) as e:  # one clear line, no traceback
    cli.fail(e)
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    # e.g. --scales 3000: the whole image at that size does not fit, which is the user's choice
    cli.fail(
      f'out of device memory ({cli.first_line(e, 200)}): use a smaller --batch-size or smaller '
      '--scales'
    )
  if jax.process_index() == 0:
    print(json.dumps(result))


if __name__ == '__main__':
  main()
