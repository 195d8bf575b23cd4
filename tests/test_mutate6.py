"""Rules of last session's code (few-shot linear probes, evaluate's and the evals' few-shot paths,
configs/bit.py's train_split and validation_size args with read_when_built, the stems' strides)
that mutation audit 6 (a one-line change to each, one at a time; docs/mutation-audit-6.md) found
no test for: each test below fails on that change and passes on the code. The GPU queue scripts'
are in test_mutate6_queue.py."""

import argparse
import contextlib
import os

import ml_collections
import numpy as np
import pytest

from resnet_jax import evaluate, evaluators, fewshot, multiscale, runtime, validation
from resnet_jax.data import sources
from resnet_jax.default_config import load_config_module, load_sibling_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, 'configs', 'x.py')
bit = load_config_module(os.path.join(ROOT, 'configs', 'bit.py'))


def _with_evals(config, **evals):
  c = config.copy_and_resolve_references()
  for name, spec in evals.items():
    c.evals[name] = spec
  return c


# ----------------------------------------------------------- few-shot probes: fewshot.py (F1-F45)


def test_the_default_probe_is_bits():
  """BiT / big_vision fewshot_lsr: 1, 5, 10, 25 shots and an L2 penalty of 1024; 3 seeds here,
  also what `evaluate --fewshot` draws without --seeds."""
  assert fewshot.Probe() == fewshot.Probe((1, 5, 10, 25), 3, 1024.0, 'train')
  assert _probe_of('--fewshot', '1,5').seeds == 3


def test_shots_are_a_sorted_set_and_an_empty_list_is_refused():
  assert fewshot.parse_shots('10, 1,5,1') == (1, 5, 10)
  for bad in ('', ' , ', '1,\u00b2'):  # '²' is a digit to str.isdigit, not to int()
    with pytest.raises(ValueError, match='positive counts'):
      fewshot.parse_shots(bad)


def test_a_class_is_short_only_below_k_images_and_a_class_without_any_counts():
  """BiT's shots: a class with fewer than k training images uses all it has; `classes_short`
  counts those, including the last class when the train split has none of it."""
  train_y = np.array([0] * 5 + [1] * 3)  # class 2: no training image
  train_x = np.eye(3)[train_y] * 4.0
  test_y = np.array([0, 1, 2])
  out = fewshot.probe_errors(
    (train_x, train_y), (np.eye(3) * 4.0, test_y), 3, fewshot.Probe((3,), 1)
  )
  assert out['classes_short_3shot'] == 1  # class 2; class 1 has exactly 3


def test_the_probes_l2_penalty_is_the_one_it_was_given():
  """Each seed's error is the ridge error of its draw at the probe's own `l2_reg`, in the dual
  form (2 shots of 3 classes, 16 features) and the primal (10 shots, 4 features)."""
  rng = np.random.default_rng(5)
  for shots, d in [(2, 16), (10, 4)]:
    train_y = np.repeat(np.arange(3), 12)
    train_x = rng.normal(size=(36, d)) + np.eye(3, d)[train_y]
    test_y = rng.integers(0, 3, 300)
    test_x = rng.normal(size=(300, d)) + np.eye(3, d)[test_y]
    idx = fewshot.draw_shots(train_y, 3, shots, 0)
    errs = {
      l2: fewshot.ridge_error(train_x[idx], train_y[idx], test_x, test_y, 3, l2)
      for l2 in (1e-3, 1.0, 1024.0)
    }
    assert len(set(errs.values())) == 3  # the penalty matters on these images
    for l2, err in errs.items():
      probe = fewshot.Probe((shots,), 1, l2)
      out = fewshot.probe_errors((train_x, train_y), (test_x, test_y), 3, probe)
      assert out[f'top1_error_{shots}shot'] == err


def test_an_empty_split_is_named(monkeypatch):
  @contextlib.contextmanager
  def nothing(*args, **kwargs):
    yield iter(())

  monkeypatch.setattr(runtime, 'eval_batches', nothing)
  config = ml_collections.ConfigDict({'data': {'name': 'digits'}})
  with pytest.raises(ValueError, match="split 'train\\[:0\\]' of digits is empty"):
    fewshot.representations(None, None, config, None, 'train[:0]')


def _probe_of(*argv):
  parser = argparse.ArgumentParser()
  fewshot.add_arguments(parser)
  return fewshot.probe_of(parser.parse_args(argv))


def test_the_few_shot_flags_reach_the_probe_and_are_refused_without_fewshot():
  assert _probe_of('--fewshot', '5', '--l2-reg', '8', '--train-split', 'train[:10]') == (
    fewshot.Probe((5,), 3, 8.0, 'train[:10]')
  )
  for argv in (('--l2-reg', '8'), ('--train-split', 'train[:10]')):
    with pytest.raises(ValueError, match='go with --fewshot SHOTS'):
      _probe_of(*argv)


@pytest.fixture(scope='module')
def experiment():
  """A digits run's experiment (1-channel 8 x 8 images, 10 classes), nothing trained."""
  config = load_sibling_config(CONFIGS, 'digits').get_config('depth=8,steps=4,batch=16')
  return runtime.build_experiment(config)


class _Split:
  def __init__(self, classes: int, channels: int):
    self.num_classes, self.native_shape = classes, (8, 8, channels)


def _fake_data(monkeypatch, classes=None, channels=1):
  """sources.open_split and fewshot.representations stood in: which splits, configs and
  preprocessors the probe reads; 4 images per class (classes: {split: count})."""
  reads = []
  classes = classes or {}

  def open_split(config, split):
    return _Split(classes.get(split, 10), channels)

  def representations(fn, variables, config, mesh, split, preprocessor=None):
    reads.append(dict(split=split, config=config, preprocessor=preprocessor))
    n = classes.get(split, 10)
    y = np.repeat(np.arange(n), 4)
    return np.eye(n, 12)[y] * 3.0, y

  monkeypatch.setattr(sources, 'open_split', open_split)
  monkeypatch.setattr(fewshot, 'representations', representations)
  return reads


def test_the_probe_reads_the_features_of_the_runs_preprocessed_images(experiment):
  """The representation is the classifier's input on the images as the run evaluates them
  (uint8 batch -> the run's device preprocessing -> the net), not on raw pixels."""
  import jax

  model = experiment.model
  n = experiment.mesh.size  # one image per device
  images = np.random.default_rng(0).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
  variables = model.init(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32), train=False)
  fn = fewshot.jit_representation_fn(experiment.mesh, model.apply, experiment.preprocess)
  batch = {'image': images, 'label': np.arange(n), 'mask': np.ones(n, bool)}
  got = fn(variables, batch)
  x = experiment.preprocess(images, rng=None)
  _, state = model.apply(variables, x, train=False, mutable=['intermediates'])
  np.testing.assert_allclose(
    got['features'], state['intermediates']['pre_logits'][0], rtol=1e-5, atol=1e-6
  )
  assert got['label'].tolist() == list(range(n))


def test_a_probe_of_the_runs_own_data_reads_its_train_and_eval_splits(monkeypatch, experiment):
  """Without --train-split / --split: the run's own train split (a run on a slice probes that
  slice) and its eval split, through its own preprocessing; the evaluator's batch size."""
  reads = _fake_data(monkeypatch)
  config = experiment.config
  monkeypatch.setitem(config.data, 'train_split', 'train[:80%]')
  monkeypatch.setitem(config.data, 'eval_split', 'train[80%:]')
  probe = _probe_of('--fewshot', '1')
  out = fewshot.run_probe(experiment, None, probe, batch_size=24, features_fn=print)
  assert [r['split'] for r in reads] == ['train[:80%]', 'train[80%:]']
  assert (out['train_split'], out['split']) == ('train[:80%]', 'train[80%:]')
  assert {r['config'].eval_batch_size for r in reads} == {24} and 'dataset' not in out
  assert {r['preprocessor'] for r in reads} == {None}
  schedule = evaluators.from_config(_with_evals(config, fs={'shots': '1'}))
  assert schedule[-1].probe.train_split == 'train[:80%]'


def test_another_dataset_is_read_whole_from_its_train_and_test_splits(monkeypatch, experiment):
  """Another dataset: its 'train' and 'test' (its own defaults, not the run's slices), all of its
  train split (no validation_size held out), its own classes, the run's preprocessing."""
  reads = _fake_data(monkeypatch, classes={'train': 3, 'test': 3})
  config = experiment.config
  monkeypatch.setitem(config.data, 'train_split', 'train[:80%]')
  monkeypatch.setitem(config.data, 'validation_size', 100)
  monkeypatch.setitem(config.model, 'num_classes', 10)  # the run's, not the other dataset's
  out = fewshot.run_probe(
    experiment, None, fewshot.Probe((1,), 1, train_split=''), dataset='other', features_fn=print
  )
  assert [r['split'] for r in reads] == ['train', 'test'] and out['dataset'] == 'other'
  for r in reads:
    assert r['config'].data.validation_size == 0 and r['config'].model.num_classes is None
    assert r['preprocessor'] is not None
  schedule = evaluators.from_config(_with_evals(config, fs={'shots': '1', 'dataset': 'other'}))
  assert schedule[-1].probe.train_split == 'train'


def test_the_runs_own_dataset_named_again_is_its_own_data(monkeypatch, experiment):
  """`dataset=` the run's own name (no data_dir): the run's config as it is, its held-out
  validation examples and its class count kept."""
  config = experiment.config
  monkeypatch.setitem(config.data, 'validation_size', 100)
  monkeypatch.setitem(config.model, 'num_classes', 10)
  own = fewshot.probe_config(experiment, str(config.data.name))
  assert own.to_dict() == config.to_dict()
  moved = fewshot.probe_config(experiment, str(config.data.name), '/elsewhere')
  assert moved.data.data_dir == '/elsewhere'


def test_a_probe_refuses_a_dataset_with_other_channels(monkeypatch, experiment):
  """Digits' 1-channel features of RGB images mean nothing: refused, when the probe runs and
  before training starts (an `evals` entry)."""
  _fake_data(monkeypatch, channels=3)
  with pytest.raises(ValueError, match='other has 3-channel images .* 1-channel ones'):
    fewshot.run_probe(experiment, None, fewshot.Probe((1,), 1), dataset='other', features_fn=print)
  schedule = evaluators.from_config(
    _with_evals(experiment.config, fs={'shots': '1', 'dataset': 'other'})
  )
  with pytest.raises(ValueError, match='other has 3-channel images'):
    evaluators.check_sources(schedule, experiment)


def test_a_test_class_the_train_split_lacks_is_counted_short(monkeypatch, experiment):
  """Classes are the larger of the two splits' counts: a test class with no training image
  is one the probe was given no shot of."""
  _fake_data(monkeypatch, classes={'train': 3, 'test': 4})
  out = fewshot.run_probe(
    experiment, None, fewshot.Probe((1,), 1), dataset='other', split='test', features_fn=print
  )
  assert out['classes_short_1shot'] == 1


# -------------------------------------- evaluate's and the evals' few-shot paths (E1-E10, V1-V12)


def test_evaluate_fewshot_refuses_scales_before_reading_the_run(tmp_path):
  with pytest.raises(ValueError, match='--fewshot reads one centre view .* --scales'):
    evaluate.evaluate_workdir(str(tmp_path / 'no_run'), scales=(32,), probe=fewshot.Probe())


def test_evaluate_on_the_runs_own_data_named_or_moved_is_its_own_evaluation(tmp_path):
  """`--dataset digits` on a digits run is no other dataset: the same JSON as without it (no
  'dataset' key). `--fewshot --data-dir NEW` on a run whose data moved probes the run's own data
  (its own splits, no 'dataset' key), as the classifier evaluation does."""
  from resnet_jax import train
  from tests.test_train_loop import ArrayBatches

  config = load_sibling_config(CONFIGS, 'digits').get_config('depth=8,steps=2,batch=16')
  config.update_from_flattened_dict({'data.data_dir': str(tmp_path / 'a'), 'progress_bar': False})
  run = str(tmp_path / 'run')
  train.train_and_evaluate(config, run, train_iter=ArrayBatches(16))
  named = evaluate.evaluate_workdir(run, dataset='digits')
  assert named == evaluate.evaluate_workdir(run) and 'dataset' not in named
  (tmp_path / 'a').rename(tmp_path / 'b')
  probe = fewshot.Probe((1,), 1, train_split='')
  moved = evaluate.evaluate_workdir(run, data_dir=str(tmp_path / 'b'), probe=probe)
  assert 'dataset' not in moved and (moved['train_split'], moved['split']) == ('train', 'test')
  assert moved['num_examples'] == 360 and not (tmp_path / 'a').exists()


@pytest.mark.parametrize(
  'spec, match',
  [
    ({'shots': '5', 'l2_reg': 0.0}, 'l2_reg must be a positive number'),
    ({'shots': '5', 'l2_reg': float('nan')}, 'l2_reg must be a positive number'),
    ({'shots': '5', 'l2_reg': True}, 'l2_reg must be a positive number'),
    ({'shots': '5', 'scales': '8,10'}, 'one centre view: drop crops/scales'),
  ],
)
def test_a_probes_penalty_must_be_a_positive_number_and_it_takes_no_scales(experiment, spec, match):
  """A ridge penalty of 0 (or NaN) is no ridge (a singular system in the dual form); True is
  not a number someone meant. Scales are several views: a probe reads one."""
  with pytest.raises(validation.ConfigError, match=match):
    evaluators.from_config(_with_evals(experiment.config, bad=spec))


def test_a_probes_log_line_gives_its_errors_in_percent(caplog):
  probe = fewshot.Probe(shots=(1, 5), seeds=2)
  evaluator = evaluators.Evaluator('fs', 'test', 1, (), 0, 8, None, probe)
  with caplog.at_level('INFO', logger=evaluators.logger.name):
    evaluators.log_result(evaluator, 4, {'num_examples': 9, 'top1_error_1shot': 0.5,
                                         'top1_error_5shot': 0.125})  # fmt: skip
  assert 'top-1 error 1-shot 50.00%, 5-shot 12.50%' in caplog.text


def test_an_evals_probe_runs_at_its_own_batch_size(monkeypatch, experiment):
  seen = {}
  monkeypatch.setattr(fewshot, 'run_probe', lambda *a, **kw: seen.update(kw) or {})
  probe = fewshot.Probe(shots=(1,), seeds=1)
  evaluator = evaluators.Evaluator('fs', 'test', 1, (), 0, 24, None, probe)
  evaluators.EvalRunner(experiment).run(evaluator, None)
  assert seen['batch_size'] == 24


# ---------------------------------------------------------------- runtime.eval_batches (R1-R7)


def test_eval_batches_give_each_process_its_share_of_whole_device_batches(monkeypatch):
  """`eval_batch_size` rounded up to whole devices, split across the processes (each reads its
  share, with its index), and closed on exit, an exception included: no Grain worker outlives a
  failed evaluation. Two processes of two devices each stood in (jax's counts)."""
  import jax

  from resnet_jax import data

  calls, closed = [], []

  class Batches:
    def __iter__(self):
      return self

    def __next__(self):
      raise StopIteration

    def close(self):
      closed.append(True)

  def create_eval_iterator(config, **kwargs):
    calls.append(kwargs)
    return Batches()

  monkeypatch.setattr(data, 'create_eval_iterator', create_eval_iterator)
  monkeypatch.setattr(jax, 'device_count', lambda: 4)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  config = ml_collections.ConfigDict({'eval_batch_size': 10})
  geometry = object()
  with pytest.raises(KeyError):
    with runtime.eval_batches(config, 'test[:50]', 10, geometry):
      raise KeyError('a failed step')
  assert calls == [
    dict(split='test[:50]', local_batch_size=6, process_index=1, process_count=2, crops=10,
         preprocessor=geometry)
  ]  # fmt: skip
  assert closed == [True]


# ------------------------------------------------------- configs/bit.py's args (C1-C10, W1-W5)


@pytest.mark.parametrize('arg', ['validation_size=-1', 'image_size=-8'])
def test_every_count_arg_of_the_bit_config_refuses_a_negative_value(arg):
  """validation_size=-1 would hold out no examples yet read as a choice; image_size=-8 a crop of
  no size. Refused before any data is read, like steps=-1."""
  with pytest.raises(ValueError, match=f'{arg.split("=")[0]} must be >= 0'):
    bit.get_config(arg)


def test_read_when_built_guards_any_section_it_names():
  """default_config's contract: {section: {field: value}, 'by': who}; a config file that read a
  model field while it was built is protected like configs/bit.py's data fields."""
  c = bit.get_config('train_examples=1000,image_area=1024')
  c.read_when_built = {'model': {'name': str(c.model.name)}, 'by': 'configs/mine.py'}
  validation.validate_config(c)
  c.model.name = 'resnetv2_101x1_bit'
  with pytest.raises(validation.ConfigError, match=r'model\.name was set to .*configs/mine\.py'):
    validation.validate_config(c)


def test_a_config_without_read_when_built_still_validates():
  """A config made without today's base_config() (a config file of its own, an older field set)
  lacks the field: nothing was read when it was built, nothing to refuse, as for the loss
  fields validate_config reads with .get."""
  c = bit.get_config('train_examples=1000,image_area=1024')
  del c['read_when_built']
  validation.validate_config(c)


# ------------------------------------------------------------- the stems' strides (S1-S8)


def test_every_stem_has_a_stride_and_an_unknown_one_asks_for_stride():
  """multiscale.network_stride knows each stem create_model builds; a net it cannot read (a
  stem of its own) gets the one-line 'pass stride=' answer, not a KeyError."""
  from resnet_jax.models import stems

  assert set(stems.STEM_STRIDES) == set(stems.STEMS)

  class Custom:
    stem = 'patchify'

    def stage_geometry(self):
      return [(1, 1, 1)]

  with pytest.raises(ValueError, match='cannot tell the total stride of Custom: pass stride='):
    multiscale.network_stride(Custom())


def test_groupnorm_is_refused_for_a_cifar_bottleneck_net_too():
  """The CIFAR bottleneck nets (He et al. 2016's ResNet-164) also start with a 16-channel stem."""
  from resnet_jax.models import create_model

  with pytest.raises(ValueError, match="GroupNorm's 32 groups .* ImageNet-family"):
    create_model('resnet164', block='bottleneck', norm='group', weight_standardization=True)
