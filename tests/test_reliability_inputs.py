"""Bad input is refused up front with one clear line (issue 13, in-process where the CLI adds
nothing): config values, bn_group_size vs devices, convert --out, torch versions, predict images."""

import os
import struct
import subprocess
import sys
import types
import zlib

import numpy as np
import pytest
from PIL import Image

from resnet_jax import convert, predict, train, validation
from tests.runner import (
  ROOT,
  assert_one_line_error,
  digits_config,
  env_with_devices,
  run_cli,
  run_evaluate,
  run_main,
)


@pytest.mark.parametrize(
  'overrides,needle',
  [
    ({'log_every_steps': 0}, 'log_every_steps must be positive'),
    ({'max_to_keep': 0}, 'keep no checkpoint'),
    ({'max_to_keep': -1}, 'max_to_keep must be positive'),
    ({'data.eval_crops': 3}, 'eval_crops must be 1 or 10'),
    ({'eval_batch_size': 0}, 'eval_batch_size must be positive'),
    ({'schedule.base_lr': -0.1}, 'base_lr must be non-negative'),
    ({'optimizer.weight_decay': -1e-4}, 'weight_decay must be non-negative'),
    ({'schedule.warmup_steps': -5}, 'warmup_steps'),
    ({'label_smoothing': 1.0}, 'label_smoothing'),
    ({'data.random_erasing': 1.5}, r'data.random_erasing must be in \[0, 1\]'),
    (
      {'data.repeated_augmentations': 33},
      r'repeated_augmentations must be in \[1, batch_size 32\]',
    ),
    ({'data.repeated_augmentations': 0}, r'repeated_augmentations must be in \[1, batch_size 32\]'),
    ({'data.eval_image_size': -224}, 'eval_image_size must be non-negative'),
    ({'data.num_workers': -2}, 'num_workers must be >= 0, or -1'),
    ({'model.bn_group_size': 3}, 'straddle devices'),  # 8 per device
    ({'model.bn_group_size': 0}, 'bn_group_size must be positive'),
    ({'num_train_steps': -5}, 'num_train_steps must be positive, or -1'),  # was: trained epochs
    ({'num_train_steps': 0}, 'num_train_steps must be positive, or -1'),
  ],
)
def test_validate_config_refuses(overrides, needle):
  with pytest.raises(validation.ConfigError, match=needle):
    validation.validate_config(digits_config(**overrides))


@pytest.mark.parametrize('group', [None, 1, 2, 4, 8, 16, 32, 64])
def test_bn_groups_that_do_not_straddle_devices_are_accepted(group):
  """Batch 32 on 4 devices (8 each): divisors of 8, whole devices (16, 32) and a group larger
  than the batch (one group, as models/layers.BatchNorm treats it) are all fine."""
  validation.validate_config(digits_config(**{'model.bn_group_size': group}))


def test_bn_group_rules():
  ok = validation.validate_bn_groups
  ok(32, 256, 8)  # the paper: 32 per GPU
  ok(64, 256, 8)  # two whole devices
  with pytest.raises(validation.ConfigError, match='per-device batch 24'):
    ok(32, 192, 8)  # issue 15's example: 24 per device, groups of 32 straddle
  with pytest.raises(validation.ConfigError, match='e.g. 4'):
    ok(6, 64, 8)  # neither divides 8 nor is a multiple of it
  with pytest.raises(validation.ConfigError):
    ok(24, 64, 2)  # 32 per device: 24 neither divides it nor is a multiple of it


def test_bad_config_writes_nothing(tmp_path):
  workdir = tmp_path / 'never'
  with pytest.raises(validation.ConfigError):
    train.train_and_evaluate(digits_config(max_to_keep=0), str(workdir))
  assert not workdir.exists()


@pytest.mark.parametrize(
  'content,needle',
  [
    ('{"model": ', 'not valid JSON'),
    ('[1, 2]', 'holds a list'),
    # hand edits of the wrong type were a TypeError traceback from ml_collections
    ('{"batch_size": "16"}', "wrong type .*'batch_size'"),
    ('{"model": "resnet8"}', "wrong type .*'model'"),
    ('{"schedule": {"base_lr": "x"}}', 'wrong type .*x'),
  ],
)
def test_damaged_config_json_is_named(tmp_path, content, needle):
  (tmp_path / 'config.json').write_text(content)
  with pytest.raises(ValueError, match=needle) as e:
    train.train_and_evaluate(digits_config(num_train_steps=2), str(tmp_path))
  assert 'config.json' in str(e.value)
  assert (tmp_path / 'config.json').read_text() == content  # untouched


# ---- convert --out (item 1) and torch versions (security) ---------------------------------------


def _convert_resnet18(weights, out, env=None):
  """`python -m resnet_jax.convert --arch resnet18 --torchvision-weights W --out OUT`."""
  return run_cli(
    'resnet_jax.convert',
    *('--arch', 'resnet18', '--torchvision-weights', str(weights), '--out', str(out)),
    env=env,
    timeout=300,
  )


def test_convert_refuses_existing_non_empty_out(tmp_path):
  precious = tmp_path / 'out' / 'precious.txt'
  precious.parent.mkdir()
  precious.write_text('keep me')
  proc = _convert_resnet18(tmp_path / 'w.pth', precious.parent)
  assert proc.returncode == 1, proc.stderr
  assert 'Traceback' not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: --out') and 'not empty' in last, last
  assert precious.read_text() == 'keep me' and os.listdir(precious.parent) == ['precious.txt']


def test_convert_refuses_a_file_as_out_or_its_parent_and_bad_in_channels(tmp_path, capsys):
  """A file as --out read 'already exists and is not empty'; a file as its parent, and
  --in-channels 0, were tracebacks (after loading the weights); -1 an Orbax 'zero size' error."""
  (tmp_path / 'afile').write_text('keep me')
  weights = tmp_path / 'w.pth'  # never read: refused first
  cases = {
    ('--out', str(tmp_path / 'afile')): 'afile is a file: choose a new directory',
    ('--out', str(tmp_path / 'afile' / 'sub')): 'afile is a file, not a directory',
    ('--out', str(tmp_path / 'new'), '--in-channels', '0'): 'expected a positive integer',
    ('--out', str(tmp_path / 'new'), '--in-channels', '-1'): 'expected a positive integer',
  }
  for extra, needle in cases.items():
    with pytest.raises(SystemExit) as e:
      convert.main(['--arch', 'resnet18', '--torchvision-weights', str(weights), *extra])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and needle in err[0], err
  assert sorted(os.listdir(tmp_path)) == ['afile'] and (tmp_path / 'afile').read_text() == 'keep me'


def test_convert_writes_through_a_temporary_sibling(tmp_path, monkeypatch):
  variables = {'params': {'w': np.ones((2, 3), np.float32)}, 'batch_stats': {}}
  out = tmp_path / 'converted'
  out.mkdir()  # an empty --out is accepted and replaced
  convert.save_to_new_dir(str(out), variables)
  assert sorted(os.listdir(tmp_path)) == ['converted']  # no temporary left behind
  from resnet_jax import pretrained

  np.testing.assert_array_equal(
    pretrained.load_model_variables(str(out))['params']['w'], variables['params']['w']
  )

  def fail(path, variables):
    os.makedirs(path)
    raise OSError('disk full')

  monkeypatch.setattr(pretrained, 'save_model_variables', fail)
  with pytest.raises(OSError):
    convert.save_to_new_dir(str(tmp_path / 'other'), variables)
  assert sorted(os.listdir(tmp_path)) == ['converted']  # neither a partial --out nor a temporary


def test_torch_is_never_used_to_read_weights(monkeypatch):
  """Weights are read by resnet_jax.torch_checkpoint, not torch.load: an installed torch, even one
  too old to load safely (< 2.6, CVE-2025-32434), is never called."""
  fake = types.ModuleType('torch')
  fake.__version__ = '2.5.1'

  def load(*args, **kwargs):
    raise AssertionError('torch.load was called')

  fake.load = load
  monkeypatch.setitem(sys.modules, 'torch', fake)
  weights = os.path.join(ROOT, 'tests', 'fixtures', 'tiny_resnet18.pth')
  assert convert.load_torch_state_dict(weights)['fc.weight'].shape == (10, 512)


class _RunsCode:
  def __reduce__(self):
    return (os.system, ('touch PWNED',))


def test_pickle_that_runs_code_is_refused_without_running(tmp_path, monkeypatch):
  torch = pytest.importorskip('torch', reason='torch is an optional extra')
  monkeypatch.chdir(tmp_path)
  path = tmp_path / 'evil.pth'
  torch.save({'fc.weight': torch.zeros(2, 2), 'x': _RunsCode()}, str(path))
  with pytest.raises(ValueError, match='weights-only'):
    convert.load_torch_state_dict(str(path))
  assert not (tmp_path / 'PWNED').exists()


# ---- predict: images it cannot or should not decode ---------------------------------------------


def _png(path, width, height, idat=b''):
  """A PNG with the given header size; `idat` is whatever (possibly nothing) follows."""

  def chunk(kind, body):
    return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))

  header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
  path.write_bytes(
    b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', idat) + chunk(b'IEND', b'')
  )
  return str(path)


def test_bad_images_are_one_line_each(tmp_path, capsys):
  text = tmp_path / 'notes.txt'
  text.write_text('not an image')
  good = tmp_path / 'good.jpg'
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), np.uint8)).save(good)
  truncated = tmp_path / 'truncated.jpg'
  truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
  bomb = _png(tmp_path / 'bomb.png', 100_000, 100_000, zlib.compress(b'\0' * 1000))
  big = _png(tmp_path / 'big.png', 10_000, 10_000, zlib.compress(b'\0' * 1000))
  cases = {
    str(text): 'not an image',
    str(truncated): 'truncated',
    bomb: 'decompression bomb',
    big: '10000x10000',
    str(tmp_path / 'missing.png'): 'no such file',
  }
  for path, needle in cases.items():
    with pytest.raises(SystemExit) as e:
      predict.main(['--arch', 'resnet18', '--checkpoint', str(tmp_path / 'nowhere'), path])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and needle in err[0], err


def test_bad_labels_file_and_sizes_are_one_line(tmp_path, capsys):
  """--labels that is missing, binary or of the wrong length, and a size that is not positive:
  each was a traceback (or a PIL message about '-7x-5' images) after the weights were read."""
  import jax

  from resnet_jax import pretrained
  from resnet_jax.models import create_model

  model = create_model('resnet8', num_classes=10)
  variables = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), train=False)
  weights = tmp_path / 'weights'
  pretrained.save_model_variables(weights, variables)
  image = tmp_path / 'photo.png'
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8)).save(image)
  (tmp_path / 'three.txt').write_text('a\nb\nc\n')
  base = ['--arch', 'resnet8', '--checkpoint', str(weights), '--image-size', '32']
  cases = {
    ('--labels', str(tmp_path / 'missing.txt')): 'missing.txt',
    ('--labels', str(image)): 'cannot read it',
    ('--labels', str(tmp_path / 'three.txt')): '3 names, the model has 10 classes',
    ('--image-size', '0'): 'expected a positive integer',
    ('--image-size', '-4'): 'expected a positive integer',
  }
  for extra, needle in cases.items():
    with pytest.raises(SystemExit) as e:
      predict.main(base + list(extra) + [str(image)])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and needle in err[0], err
  predict.main(base + [str(image)])  # and the good command prints the top 5
  assert len(capsys.readouterr().out.strip().splitlines()) == 5


@pytest.mark.slow
def test_predict_on_a_run_of_another_model_is_one_line_and_quiet(tmp_path):
  """--arch that is not the run's model was a traceback; Orbax's notices of the reader's
  intended partial read ('Item "progress" ... could not be restored') preceded every answer."""
  workdir = str(tmp_path / 'run')
  proc = run_main(
    workdir,
    '--config.data.name=synthetic',
    '--config.batch_size=8',
    '--config.eval_batch_size=8',
    '--config.num_train_steps=2',
    config='configs/cifar.py:depth=8',
    devices=1,
    fast_compile=True,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  image = tmp_path / 'photo.jpg'
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8)).save(image)
  env = env_with_devices(1, fast_compile=True)
  args = ['--checkpoint', workdir, str(image)]
  bad = run_cli('resnet_jax.predict', '--arch', 'resnet20', *args, env=env)
  assert_one_line_error(bad, 'trained resnet8, not --arch resnet20')
  assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
  good = run_cli('resnet_jax.predict', '--arch', 'resnet8', *args, env=env)
  assert good.returncode == 0 and len(good.stdout.strip().splitlines()) == 5, good.stderr
  assert good.stderr.strip() == '', good.stderr


@pytest.mark.slow
def test_predict_on_a_training_run_sees_what_its_evaluation_sees(tmp_path):
  """A workdir's model gets the run's own input (size, channels, per-pixel mean), not the ImageNet
  transform of converted weights: a digits run was refused ('expects 1-channel input') and a
  3-channel run got 224-pixel crops normalised with ImageNet's statistics. Predicting every test
  digit, saved as a PNG, now makes exactly the mistakes `evaluate` counts."""
  from sklearn.datasets import load_digits

  workdir = str(tmp_path / 'run')
  proc = run_main(
    workdir,
    '--config.num_train_steps=30',
    '--config.batch_size=32',
    devices=1,
    fast_compile=True,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  evaluated = run_evaluate(workdir, fast_compile=True)
  digits = load_digits()
  paths, labels = [], []
  for i in range(0, len(digits.images), 5):  # the test split
    path = tmp_path / f'{i}.png'
    Image.fromarray(np.rint(digits.images[i] * 255 / 16).astype(np.uint8)).save(path)
    paths.append(str(path))
    labels.append(int(digits.target[i]))
  env = env_with_devices(1, fast_compile=True)
  out = run_cli('resnet_jax.predict', '--arch', 'resnet8', '--checkpoint', workdir, *paths, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  top1 = [int(lines[k + 1].rsplit('(', 1)[1].rstrip(')')) for k in range(0, len(lines), 6)]
  assert len(top1) == 360
  wrong = sum(p != y for p, y in zip(top1, labels))
  assert wrong == round(evaluated['top1_error'] * 360) and wrong < 300  # and above chance
  size = run_cli(
    'resnet_jax.predict',
    '--arch',
    'resnet8',
    '--checkpoint',
    workdir,
    '--image-size',
    '8',
    paths[0],
  )
  assert_one_line_error(size, 'is a training run, whose own evaluation input is used')


def test_extreme_aspect_ratio_is_preprocessed_in_bounded_memory(tmp_path):
  """A 1x20000 PNG: the full eval resize would be 256 x 5,120,000 pixels (5.5 GB as floats)."""
  path = tmp_path / 'thin.png'
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (1, 20000, 3), np.uint8)).save(path)
  code = (
    'from resnet_jax import predict; '
    f'x = predict.preprocess(predict.open_image({str(path)!r})); '
    'assert x.shape == (224, 224, 3), x.shape; '
    # VmHWM, this process's own peak: ru_maxrss would include the forking parent's (pytest's)
    "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
  )
  proc = subprocess.run(
    [sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert int(proc.stdout.split()[-1]) < 1_000_000  # KiB: well under 1 GB


def test_preprocess_of_ordinary_images_is_unchanged():
  """The bounded path is only taken for extreme shapes: ordinary photos are resized whole, then
  cropped, exactly as torchvision does (tests/test_convert.py checks against torchvision)."""
  rng = np.random.default_rng(1)
  for w, h in [(500, 375), (375, 500), (300, 1000), (257, 1023)]:
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))
    nw, nh = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
    left, top = int(round((nw - 224) / 2)), int(round((nh - 224) / 2))
    ref = (
      np.asarray(
        image.resize((nw, nh), Image.BILINEAR).crop((left, top, left + 224, top + 224)), np.float32
      )
      / 255
    )
    ref = (ref - predict.IMAGENET_MEAN) / predict.IMAGENET_STD
    np.testing.assert_array_equal(predict.preprocess(image), ref)


class _PoisonedIterator:
  """The real digits iterator, with NaN images in the batches of the given (1-based) steps."""

  def __init__(self, inner, poisoned_steps):
    self.inner, self.poisoned, self.count = inner, set(poisoned_steps), 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = dict(next(self.inner))
    self.count += 1
    # Hosts send uint8, which cannot hold NaN: every batch goes as float32 (the step then
    # compiles for float32 input), the poisoned one all NaN.
    batch['image'] = batch['image'].astype(np.float32)
    if self.count in self.poisoned:
      batch['image'][:] = np.nan
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)

  def close(self):
    self.inner.close()


def test_skip_mode_still_succeeds_when_only_some_steps_are_skipped(tmp_path, caplog):
  from resnet_jax import data

  config = digits_config(
    num_train_steps=6,
    log_every_steps=3,
    checkpoint_every_steps=0,
    on_nonfinite='skip',
    progress_bar=False,
    eval_every_steps=0,
  )
  inner = data.create_train_iterator(
    config, local_batch_size=32, process_index=0, process_count=1, seed=0
  )
  result = train.train_and_evaluate(config, str(tmp_path), train_iter=_PoisonedIterator(inner, {2}))
  assert result['step'] == 6 and 'skipped 1 non-finite update' in caplog.text
