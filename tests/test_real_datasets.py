"""The real dataset paths end to end: official-format archives -> `prepare` -> `resnet_jax.main`.

Miniature ImageNet and CIFAR-10 archives in the exact official layouts are prepared with the
command a user runs, through TFDS's own builders, then the paper recipes (`configs/r18.py` with
10-crop evaluation of the validation split, `configs/cifar.py`) train a few steps with the CLI.
"""

import importlib.util
import io
import os
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from resnet_jax.default_config import load_sibling_config
from tests import official_archives
from tests.runner import assert_ok, results, run_evaluate, run_main, run_prepare

# TFDS needs TensorFlow to prepare. Looked up, not imported: importing it at collection cost every
# pytest-xdist worker about 3 s of CPU, and only one worker runs these tests.
pytestmark = pytest.mark.skipif(
  importlib.util.find_spec('tensorflow') is None,
  reason='TensorFlow is the optional [tf] extra: pip install -e ".[tf]"',
)

NUM_VAL = 6


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def _prepare(root, name, *args):
  """`prepare NAME ARGS --data_dir root/tfds` must succeed; returns its stdout and the data_dir."""
  data_dir = str(root / 'tfds')
  proc = assert_ok(run_prepare(name, *args, '--data_dir', data_dir))
  return proc.stdout, data_dir


def _train(workdir, data_dir, config, *overrides):
  """A few steps of a paper recipe on prepared data, one device, through the CLI.

  Returns results.json and the CLI's stdout.
  """
  proc = assert_ok(
    run_main(
      workdir,
      f'--config.data.data_dir={data_dir}',
      '--config.batch_size=8',
      '--config.data.num_workers=0',
      *overrides,
      config=config,
      devices=1,
      fast_compile=True,
    )
  )
  return results(workdir), proc.stdout


@pytest.fixture(scope='module')
def imagenet(tmp_path_factory):
  """(data_dir, what the archives hold): imagenet2012 prepared from the two manual-download tars."""
  root = tmp_path_factory.mktemp('imagenet')
  manual = root / 'manual'
  manual.mkdir()
  written = official_archives.write_imagenet(str(manual), num_val=NUM_VAL)
  stdout, data_dir = _prepare(root, 'imagenet2012', '--manual_dir', str(manual))
  assert (
    stdout.splitlines()[-1]
    .strip()
    .startswith(
      'python -m resnet_jax.main --config=configs/r50.py --workdir=runs/r50 --config.data.data_dir='
    )
  )
  return data_dir, written


@pytest.fixture(scope='module')
def cifar10(tmp_path_factory):
  root = tmp_path_factory.mktemp('cifar10')
  archive = str(root / 'cifar-10-python.tar.gz')
  written = official_archives.write_cifar10_python(archive, per_batch=8, test=12)
  stdout, data_dir = _prepare(root, 'cifar10', '--from', archive)
  assert 'converting cifar-10-python.tar.gz' in stdout
  return data_dir, written


class TestPreparedImagenet:
  """The tests of the one prepared miniature ImageNet: one class, which pytest-xdist runs in one
  worker (see `pytest_xdist_make_scheduler` in conftest.py), so the module fixture `imagenet` is
  built once."""

  def test_imagenet2012_builder_output_matches_the_archives_and_the_recipes(self, imagenet):
    data_dir, written = imagenet
    builder = tfds.builder('imagenet2012', data_dir=data_dir)
    # The split names TFDS's builder creates from the two tars; every ImageNet recipe uses them.
    assert set(builder.info.splits) == {'train', 'validation'}
    for name in ('imagenet', 'r18', 'r34', 'r50', 'r101', 'r152'):
      for recipe in ('paper', 'modern'):
        config = load_sibling_config('configs/x.py', name).get_config(f'recipe={recipe}')
        assert config.data.eval_split in builder.info.splits
        assert config.data.train_split in builder.info.splits
    names = builder.info.features['label'].names
    val = builder.as_data_source('validation')
    by_file = {_text(val[i]['file_name']): names[val[i]['label']] for i in range(len(val))}
    assert by_file == {
      f'ILSVRC2012_val_{i + 1:08d}.JPEG': synset for i, synset in enumerate(written['validation'])
    }
    train = builder.as_data_source('train')
    records = {_text(train[i]['file_name']): train[i] for i in range(len(train))}
    assert {f: names[r['label']] for f, r in records.items()} == dict(written['train'])
    # TFDS's builder rewrites the known CMYK JPEG and the PNG named .JPEG as RGB JPEG (real data
    # too).
    encoded = builder.as_data_source('train', decoders={'image': tfds.decode.SkipDecoding()})
    raw = {_text(encoded[i]['file_name']): encoded[i]['image'] for i in range(len(encoded))}
    for fname in ('n01739381_1309.JPEG', 'n02105855_2933.JPEG'):
      img = Image.open(io.BytesIO(raw[fname]))
      assert (img.format, img.mode) == ('JPEG', 'RGB'), fname
    assert any(Image.open(io.BytesIO(b)).mode == 'L' for b in raw.values())  # grayscale kept as is

  @pytest.mark.slow
  def test_r18_paper_recipe_trains_and_10_crop_evaluates_the_validation_split(
    self, imagenet, tmp_path
  ):
    data_dir, _ = imagenet
    r, _ = _train(
      str(tmp_path / 'r18'),
      data_dir,
      'configs/r18.py',
      '--config.num_train_steps=2',
      '--config.eval_batch_size=4',
      '--config.data.image_size=32',
    )
    assert r['step'] == 2 and r['params'] == 11_689_512  # ResNet-18 with 1000 classes
    assert r['eval']['num_examples'] == NUM_VAL  # every validation image once (padded + masked)
    # Fig. 4's centre-crop validation error, beside the 10-crop figure of Tables 2-3.
    center = r['evals']['center_crop']
    assert (center['split'], center['crops'], center['num_examples']) == ('validation', 1, NUM_VAL)
    assert 0.0 <= r['eval']['top1_error'] <= 1.0 and np.isfinite(r['eval']['loss'])
    cfg = r['config']
    assert (cfg['data']['eval_split'], cfg['data']['eval_crops'], cfg['data']['augment']) == (
      'validation',
      10,
      'imagenet',
    )
    model, schedule = cfg['model'], cfg['schedule']
    assert (model['name'], model['stride_on'], schedule['boundaries_epochs']) == (
      'resnet18',
      '1x1',
      '30,60',
    )

  @pytest.mark.slow
  def test_real_labels_prepare_offline_and_evaluate_a_run_with_reals_rule(self, imagenet, tmp_path):
    """imagenet2012_real from the same ILSVRC2012_img_val.tar and a real.json (`--from`, no
    download); `evaluate --dataset=imagenet2012_real` on an ImageNet run gives the validation
    error on the original labels and ReaL's error, which this test recomputes from the run's own
    predictions: right when the top-1 class is in the image's set, empty sets left out."""
    import json

    import jax

    from resnet_jax import data, runtime
    from resnet_jax.train_step import eval_probabilities

    data_dir, written = imagenet
    names = tfds.builder('imagenet2012', data_dir=data_dir).info.features['label'].names
    original = [names.index(synset) for synset in written['validation']]
    # one set per validation image, in file order: its own label (+ another), none, every class
    sets = [[original[0]], [original[1], (original[1] + 1) % 1000], [], list(range(1000))]
    sets += [[(original[4] + 7) % 1000], [original[5]]]
    real_json = tmp_path / 'real.json'
    real_json.write_text(json.dumps(sets))
    manual = os.path.join(os.path.dirname(data_dir), 'manual')
    stdout, _ = _prepare(
      pathlib.Path(os.path.dirname(data_dir)),
      'imagenet2012_real',
      '--manual_dir',
      manual,
      '--from',
      str(real_json),
    )
    assert 'real.json: sha256 differs from the official download' in stdout
    assert stdout.splitlines()[-1].strip() == (
      'python -m resnet_jax.evaluate --workdir=runs/r50 --dataset=imagenet2012_real '
      f'--data-dir={data_dir}'
    )
    builder = tfds.builder('imagenet2012_real', data_dir=data_dir)
    val = builder.as_data_source('validation')
    by_file = {_text(val[i]['file_name']): i for i in range(len(val))}
    for k, labels in enumerate(sets):
      record = val[by_file[f'ILSVRC2012_val_{k + 1:08d}.JPEG']]
      assert sorted(int(c) for c in record['real_label']) == sorted(labels)
      assert record['original_label'] == original[k]

    workdir = str(tmp_path / 'run')
    _train(
      workdir,
      data_dir,
      'configs/imagenet.py:depth=18',
      '--config.num_train_steps=1',
      '--config.eval_batch_size=4',
      '--config.data.image_size=32',
      '--config.model.name=resnet8',
      '--config.model.shortcut=A',
    )
    got = run_evaluate(workdir, '--dataset=imagenet2012_real', '--crops=1', fast_compile=True)
    mine = run_evaluate(workdir, '--crops=1', fast_compile=True)
    assert (got['dataset'], got['split'], got['num_examples']) == (
      'imagenet2012_real',
      'validation',
      NUM_VAL,
    )
    assert got['top1_error'] == pytest.approx(mine['top1_error'])  # the original labels
    assert got['loss'] == pytest.approx(mine['loss'], rel=1e-5)

    trained = runtime.load_trained_model(workdir, {'data.data_dir': data_dir})
    config = trained.experiment.config
    batch = next(
      iter(
        data.create_eval_iterator(
          config,
          split='validation',
          local_batch_size=NUM_VAL,
          process_index=0,
          process_count=1,
        )
      )
    )
    probs = eval_probabilities(
      trained.experiment.model.apply,
      jax.device_put(trained.variables),
      batch['image'],
      trained.experiment.preprocess,
    )
    imagenet_val = tfds.builder('imagenet2012', data_dir=data_dir).as_data_source('validation')
    files = [_text(imagenet_val[i]['file_name']) for i in range(NUM_VAL)]
    top1 = np.argmax(np.asarray(probs), axis=-1)
    right, counted = 0, 0
    for f, prediction in zip(files, top1):
      labels = sets[int(f.split('_')[-1].split('.')[0]) - 1]
      counted += bool(labels)
      right += int(prediction) in labels
    assert got['real_num_examples'] == counted == 5
    assert got['real_top1_error'] == pytest.approx(1 - right / counted)


@pytest.mark.slow
def test_cifar_paper_recipe_trains_on_the_prepared_python_archive(cifar10, tmp_path):
  data_dir, _ = cifar10
  r, stdout = _train(
    str(tmp_path / 'cifar'),
    data_dir,
    'configs/cifar.py:val=8',
    '--config.num_train_steps=3',
    '--config.eval_batch_size=8',
  )
  # Model selection on 8 held-out training images; the test error is reported beside it.
  assert r['step'] == 3 and r['eval']['num_examples'] == 8
  assert (r['config']['data']['name'], r['config']['data']['eval_split']) == (
    'cifar10',
    'validation',
  )
  assert r['evals']['test']['num_examples'] == 12
  assert f'  test: test top-1 error {100 * r["evals"]["test"]["top1_error"]:.2f}%' in stdout
  assert (r['config']['data']['augment'], r['config']['schedule']['boundaries']) == (
    'cifar',
    '32000,48000',
  )


def test_prepared_cifar10_names_its_classes_and_a_run_records_them(cifar10):
  """TFDS reads CIFAR-10's names from the archive's batches.meta when it prepares it (mock data
  has none): the run's classes are then named, so evaluate and predict can compare and print
  them."""
  import resnet_jax.data as data  # pylint: disable=import-outside-toplevel
  from tests.runner import data_config  # pylint: disable=import-outside-toplevel

  data_dir, _ = cifar10
  config = data_config(name='cifar10', data_dir=data_dir, image_size=32, eval_split='test')
  info = data.get_dataset_info(config)
  assert info.class_names == tuple(official_archives.CIFAR10_NAMES)
