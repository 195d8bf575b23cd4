"""The evaluators a training run runs, declared in its config (big_vision style).

Every run has its main evaluator, `eval`: `data.eval_split` with `data.eval_crops` every
`eval_every_steps` and at the end. It is the one `results.json`'s `eval`, the `done:` line and
`keep_best` use. `config.evals` adds named ones, each with its own split, views and cadence,
because one figure rarely answers every question of a run: He et al. 2015 plot centre-crop
validation error during training (Fig. 4) but report 10-crop (Tables 2-3) and multi-scale
(Table 4) numbers, and a run that holds out a validation split still wants its test error.

    c.evals.center_crop = dict(crops=1)                     # every eval_every_steps
    c.evals.test = dict(split='test', every_steps=0)        # only at the end
    c.evals.multiscale = dict(scales='224,256,384,480,640', batch_size=32, every_steps=0)
    c.evals.v2 = dict(dataset='imagenet_v2', every_steps=0)  # another test set, same classes
    c.evals.real = dict(dataset='imagenet2012_real', every_steps=0)  # + ReaL's error

Fields (all optional): `split` (default `data.eval_split`), `crops` (1, 2 = centre and its
flip, 10 = the paper's; with `scales` 1 or 2), `scales` (Table 4's whole-image testing at these
shorter sides, `resnet_jax.multiscale`), `every_steps` (default `eval_every_steps`; <= 0: only at
the end), `batch_size` (default `eval_batch_size`), `dataset` (another prepared TFDS test set
with the run's classes and channels, read through the run's own evaluation preprocessing, as
`evaluate --dataset` reads it: CIFAR-10.1, ImageNet-V2, ReaL; its split defaults to 'test',
ReaL's to 'validation'). With `shots` ('1,5,10,25') it is a few-shot linear probe of the
features instead (`resnet_jax.fewshot`: also `seeds`, `l2_reg`, `train_split`; `dataset` may
then have other classes). Each one's records go to metrics.jsonl with `"split": NAME` and to
TensorBoard under NAME/, and its final figures to `results.json`'s `evals`.

With `ema_decay` > 0 every evaluator also measures the average of the weights (`resnet_jax.ema`):
its records go to metrics.jsonl as `"split": "NAME_ema"` (the main one's: `eval_ema`) beside the
model's, which keep their meaning, and its final figures to results.json's `eval_ema` (the main
one) and `evals.NAME_ema`. Names ending in `_ema` are therefore reserved.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import ml_collections

from resnet_jax import data, fewshot, multiscale, runtime
from resnet_jax.ema import SUFFIX as EMA_SUFFIX
from resnet_jax.evaluate import (
  jit_label_set_eval_step,
  run_evaluation,
  run_multiscale_evaluation,
)
from resnet_jax.other_datasets import default_split, on_other_dataset, scored_on
from resnet_jax.train_step import jit_eval_step, model_variables
from resnet_jax.validation import ConfigError

logger = logging.getLogger(__name__)

MAIN = 'eval'
RESULT_KEYS = ('loss', 'top1_error', 'top5_error', 'num_examples')
LABEL_SET_KEYS = ('real_top1_error', 'real_num_examples')  # datasets with label sets (ReaL)
_FIELDS = ('split', 'crops', 'scales', 'every_steps', 'batch_size', 'dataset')
_PROBE_FIELDS = ('shots', 'seeds', 'l2_reg', 'train_split')  # a few-shot probe (fewshot.py)
_RESERVED = ('train', MAIN, 'config')


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """One evaluation of the run: what it measures (split, views) and when (every_steps)."""

  name: str
  split: str
  crops: int
  scales: tuple[int, ...]
  every_steps: int  # <= 0: only at the end
  batch_size: int
  dataset: str | None = None  # None: the run's own
  probe: fewshot.Probe | None = None  # a few-shot linear probe instead of the classifier

  def due(self, step: int, at_end: bool) -> bool:
    return at_end or (self.every_steps > 0 and step % self.every_steps == 0)

  def describe(self) -> str:
    if self.probe is not None:
      shots = ','.join(map(str, self.probe.shots))
      where = (
        f'{self.dataset + " " if self.dataset else ""}{self.probe.train_split} -> {self.split}'
      )
      return f'{where}, {shots}-shot linear probe, {self.probe.seeds} seeds'
    views = f'{self.crops} crop{"s" if self.crops > 1 else ""}'
    if self.scales:
      views = f'scales {",".join(map(str, self.scales))}, {views}'
    return f'{self.dataset + " " if self.dataset else ""}{self.split}, {views}'

  def summary(self, result: dict[str, Any]) -> dict[str, Any]:
    """The figures results.json keeps, with what they were measured on."""
    out = record_of(result)
    if self.probe is not None:
      out.update({k: v for k, v in result.items() if k.endswith('_seeds')})
      out.update(split=self.split, train_split=self.probe.train_split, seeds=self.probe.seeds)
      out.update(l2_reg=self.probe.l2_reg)
      return {**out, **({'dataset': self.dataset} if self.dataset else {})}
    out.update(split=self.split, crops=self.crops)
    if self.scales:
      out['scales'] = list(self.scales)
    if self.dataset:
      out['dataset'] = self.dataset
    if 'classes_scored' in result:
      out['classes_scored'] = result['classes_scored']
    return out


def record_of(result: dict[str, Any]) -> dict[str, Any]:
  """The figures of one evaluation that metrics.jsonl and results.json record."""
  out = {k: result[k] for k in RESULT_KEYS + LABEL_SET_KEYS if k in result}
  out.update({k: v for k, v in result.items() if fewshot.is_mean_key(k)})  # a probe's errors
  return out


def from_config(config: ml_collections.ConfigDict) -> list[Evaluator]:
  """The main evaluator, then `config.evals` in name order; a bad entry is a ConfigError."""
  evaluators = [
    Evaluator(
      MAIN,
      str(config.data.eval_split),
      int(config.data.eval_crops),
      (),
      int(config.eval_every_steps),
      int(config.eval_batch_size),
    )
  ]
  for name in sorted(config.evals.keys()):
    evaluators.append(_parse(name, config.evals[name], config))
  return evaluators


def _parse(name: str, spec: Any, config: ml_collections.ConfigDict) -> Evaluator:
  where = f'evals.{name}'
  if name in _RESERVED or not name.isidentifier() or name.endswith(EMA_SUFFIX):
    raise ConfigError(
      f'{where}: the name must be an identifier other than {", ".join(_RESERVED)}, not ending '
      f'in {EMA_SUFFIX} (the EMA figures are named so)'
    )
  if not isinstance(spec, (dict, ml_collections.ConfigDict)):
    raise ConfigError(f'{where} must be a dict of {", ".join(_FIELDS)}, got {spec!r}')
  spec = dict(spec.items())
  unknown = sorted(set(spec) - set(_FIELDS + _PROBE_FIELDS))
  if unknown:
    raise ConfigError(
      f'{where}: unknown field(s) {", ".join(unknown)}; valid: {", ".join(_FIELDS)} (a few-shot '
      f'probe: {", ".join(_PROBE_FIELDS)})'
    )
  dataset = spec.get('dataset') or None
  if dataset is not None and not isinstance(dataset, str):
    raise ConfigError(f'{where}.dataset must be a TFDS dataset name, got {dataset!r}')
  if dataset == str(config.data.name):
    dataset = None  # the run's own: its split default and config
  split = spec.get('split') or (default_split(dataset) if dataset else str(config.data.eval_split))
  if not isinstance(split, str):
    raise ConfigError(f'{where}.split must be a split name, got {split!r}')
  scales = _scales(spec.get('scales') or '', where)
  crops = _int(spec, 'crops', 1, where)
  allowed = (1, 2) if scales else (1, 2, 10)
  if crops not in allowed:
    raise ConfigError(
      f'{where}.crops must be {" or ".join(map(str, allowed))}'
      f'{" with scales" if scales else ""}, got {crops}'
    )
  batch_size = _int(spec, 'batch_size', int(config.eval_batch_size), where)
  if batch_size < 1:
    raise ConfigError(f'{where}.batch_size must be positive, got {batch_size}')
  every = _int(spec, 'every_steps', int(config.eval_every_steps), where)
  probe = _probe(spec, where, dataset, config)
  if probe is not None and ('crops' in spec or scales):
    raise ConfigError(f'{where}: a few-shot probe (shots) reads one centre view: drop crops/scales')
  return Evaluator(name, split, crops, scales, every, batch_size, dataset, probe)


def _probe(
  spec: dict[str, Any], where: str, dataset: str | None, config: ml_collections.ConfigDict
) -> fewshot.Probe | None:
  """The few-shot probe `spec` asks for (its `shots`), None for a classifier evaluation."""
  given = sorted(set(spec) & set(_PROBE_FIELDS))
  if not given:
    return None
  if 'shots' not in spec:
    raise ConfigError(f'{where}: {", ".join(given)} belong to a few-shot probe: add shots')
  try:
    shots = fewshot.parse_shots(spec['shots'])
  except ValueError as e:
    raise ConfigError(f'{where}.{e}') from None
  seeds = _int(spec, 'seeds', fewshot.DEFAULT_SEEDS, where)
  l2_reg = spec.get('l2_reg', fewshot.DEFAULT_L2_REG)
  if seeds < 1:
    raise ConfigError(f'{where}.seeds must be positive, got {seeds}')
  if isinstance(l2_reg, bool) or not isinstance(l2_reg, (int, float)) or not 0 < l2_reg < math.inf:
    raise ConfigError(f'{where}.l2_reg must be a positive number, got {l2_reg!r}')
  train_split = spec.get('train_split') or ('train' if dataset else str(config.data.train_split))
  if not isinstance(train_split, str):
    raise ConfigError(f'{where}.train_split must be a split name, got {train_split!r}')
  return fewshot.Probe(shots, seeds, float(l2_reg), train_split)


def _int(spec: dict[str, Any], key: str, default: int, where: str) -> int:
  value = spec.get(key, default)
  if isinstance(value, bool) or not isinstance(value, int):
    raise ConfigError(f'{where}.{key} must be an integer, got {value!r}')
  return value


def _scales(text: Any, where: str) -> tuple[int, ...]:
  parts = [p.strip() for p in str(text).split(',') if p.strip()]
  if not all(p.isdigit() and int(p) > 0 for p in parts):
    raise ConfigError(f"{where}.scales must be positive sizes like '224,256,384', got {text!r}")
  return tuple(int(p) for p in parts)


def check_sources(schedule: list[Evaluator], experiment: runtime.Experiment) -> None:
  """Opens every extra evaluator's split (another dataset's: its classes and channels checked
  too), so a misspelt or unprepared one fails before the run starts, not at its end."""
  for evaluator in schedule[1:]:
    if evaluator.probe is not None:  # other classes allowed: the probe fits its own classifier
      config = fewshot.probe_config(experiment, evaluator.dataset)
      data.sources.open_split(config, evaluator.probe.train_split)
      test = data.sources.open_split(config, evaluator.split)
      experiment.check_channels(str(config.data.name), test.native_shape[2])
      continue
    if evaluator.dataset is None:
      data.sources.open_split(experiment.config, evaluator.split)
      continue
    config, _ = on_other_dataset(experiment, evaluator.dataset, evaluator.split)
    if evaluator.scales and data.sources.open_split(config, evaluator.split).label_sets:
      raise ConfigError(
        f'evals.{evaluator.name}: scales are not supported on {evaluator.dataset} (its label '
        'sets are counted by the 1/2/10-crop evaluation only)'
      )


class EvalRunner:
  """Runs evaluators on the run's variables; the single-view eval steps are compiled once."""

  def __init__(self, experiment: runtime.Experiment):
    self._experiment = experiment
    self._eval_step = jit_eval_step(
      experiment.mesh, experiment.model.apply, preprocess=experiment.preprocess
    )
    self._label_set_step = None  # built for the first dataset with label sets (ReaL)
    # (batch size, dataset, split) -> (config, the run's classes scored: None for all)
    self._configs: dict[tuple[int, str | None, str], tuple[ml_collections.ConfigDict, Any]] = {}
    self._subset_steps: dict[tuple[int, ...], Any] = {}  # eval steps of subsets (ImageNet-A/R)
    self._preprocessor = None  # the run's host geometry, for another dataset's images
    self._features_fn = None  # the few-shot probes' representation step

  def run(self, evaluator: Evaluator, variables: Any) -> dict[str, Any]:
    """Mean loss and top-1/top-5 error of `variables` over the evaluator's whole split (a
    probe's: its few-shot errors)."""
    experiment = self._experiment
    if evaluator.probe is not None:
      if self._features_fn is None:
        self._features_fn = fewshot.jit_representation_fn(
          experiment.mesh, experiment.model.apply, experiment.preprocess
        )
      return fewshot.run_probe(
        experiment,
        variables,
        evaluator.probe,
        dataset=evaluator.dataset,
        split=evaluator.split,
        batch_size=evaluator.batch_size,
        features_fn=self._features_fn,
      )
    config, columns = self._config(evaluator.batch_size, evaluator.dataset, evaluator.split)
    preprocessor, step = None, self._eval_step
    apply_fn = scored_on(experiment.model.apply, columns)
    if columns is not None:  # compiled once per subset
      if columns not in self._subset_steps:
        self._subset_steps[columns] = jit_eval_step(
          experiment.mesh, apply_fn, preprocess=experiment.preprocess
        )
      step = self._subset_steps[columns]
    if evaluator.dataset is not None:
      if self._preprocessor is None:
        self._preprocessor = data.make_preprocessor(experiment.config)
      preprocessor = self._preprocessor
      if data.sources.open_split(config, evaluator.split).label_sets:
        if self._label_set_step is None:
          self._label_set_step = jit_label_set_eval_step(
            experiment.mesh, experiment.model.apply, preprocess=experiment.preprocess
          )
        step = self._label_set_step
    if evaluator.scales:
      result = run_multiscale_evaluation(
        apply_fn,
        variables,
        config,
        experiment.mesh,
        scales=list(evaluator.scales),
        stride=multiscale.network_stride(experiment.model),
        split=evaluator.split,
        crops=evaluator.crops,
        preprocess=experiment.preprocess,
        preprocessor=preprocessor,
      )
    else:
      result = run_evaluation(
        step,
        variables,
        config,
        experiment.mesh,
        split=evaluator.split,
        crops=evaluator.crops,
        preprocessor=preprocessor,
      )
    if columns is not None:  # a subset of the run's classes (ImageNet-A/R), as evaluate's JSON
      result['classes_scored'] = len(columns)
    return result

  def _config(
    self, batch_size: int, dataset: str | None, split: str
  ) -> tuple[ml_collections.ConfigDict, tuple[int, ...] | None]:
    """The run's config with this eval batch size (the pipelines read it from the config),
    reading `dataset` (another test set) when given, and the run's classes it is scored on."""
    config = self._experiment.config
    if batch_size == config.eval_batch_size and dataset is None:
      return config, None
    key = (batch_size, dataset, split)
    if key not in self._configs:
      copy, columns = (
        on_other_dataset(self._experiment, dataset, split)
        if dataset is not None
        else (ml_collections.ConfigDict(config.to_dict()), None)
      )
      copy.eval_batch_size = batch_size
      self._configs[key] = (copy, columns)
    return self._configs[key]


def weights_of(state: Any, name: str) -> list[tuple[str, Any]]:
  """[(record name, variables)] an evaluator measures: the model's, then the EMA's if kept."""
  out = [(name, model_variables(state))]
  if hasattr(state, 'ema'):
    out.append((name + EMA_SUFFIX, state.ema))
  return out


def log_result(
  evaluator: Evaluator, step: int, result: dict[str, Any], name: str | None = None
) -> None:
  if evaluator.probe is not None:
    logger.info(
      '%s at step %d on %s (%d test examples): top-1 error %s',
      name or evaluator.name,
      step,
      evaluator.describe(),
      result['num_examples'],
      fewshot.errors_text(result),
    )
    return
  logger.info(
    '%s at step %d on %s (%d examples): top-1 error %.2f%%, top-5 error %.2f%%, loss %.4f',
    name or evaluator.name,
    step,
    evaluator.describe(),
    result['num_examples'],
    100 * result['top1_error'],
    100 * result['top5_error'],
    result['loss'],
  )
  if 'real_top1_error' in result:
    logger.info(
      '%s: ReaL top-1 error %.2f%% (%d examples with a ReaL label)',
      name or evaluator.name,
      100 * result['real_top1_error'],
      result['real_num_examples'],
    )
