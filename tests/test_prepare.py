"""`python -m resnet_jax.data.prepare`: official archives through TFDS's builders, and clear errors.

Every run is the command a user types (a subprocess) writing into a temporary data dir; nothing is
downloaded (a builder asking for a URL the --from archives do not provide is an error).
"""

import os
import subprocess

import numpy as np
import pytest

from resnet_jax.data import offline, prepare
from resnet_jax.default_config import load_sibling_config
from tests import official_archives
from tests.runner import ROOT, run_prepare

FASHION_DEBIAN = '/usr/share/datasets/fashion-mnist'


def assert_one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
  assert proc.returncode == 1, proc.stdout + proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
  assert 'tfds build' not in proc.stderr and 'pip install resnet_jax' not in proc.stderr
  return lines[0]


def read_split(data_dir: str, name: str, split: str) -> list[dict]:
  import tensorflow_datasets as tfds

  source = tfds.builder(name, data_dir=data_dir).as_data_source(split)
  return sorted((source[i] for i in range(len(source))), key=lambda r: r['id'])


@pytest.mark.parametrize(
  'args,fragments',
  [
    (('no_such_dataset_xyz',), ('unknown dataset',)),
    (('cifar10', '--from', '/nonexistent/cifar-10-python.tar.gz'), ('no such file',)),
    (
      ('imagenet2012', '--manual_dir', '/nonexistent'),
      ('ILSVRC2012_img_train.tar', '--manual_dir'),
    ),
    (('cifar10', '--bogus'), ('unrecognized arguments',)),
    (
      ('imagenet2012_real', '--manual_dir', '/nonexistent'),
      ('imagenet2012_real needs ILSVRC2012_img_val.tar', '--manual_dir'),
    ),
    (('imagenet2012_real', '--from', '/nonexistent/real.json'), ('no such file',)),
    ((), ('NAME',)),
  ],
)
def test_bad_input_is_one_error_line(tmp_path, args, fragments):
  assert_one_error_line(run_prepare(*args, '--data_dir', str(tmp_path)), *fragments)
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize('content', [b'not an archive', b''])
def test_a_file_that_is_no_archive_is_one_line(tmp_path, content):
  """tarfile's error lists every compression it tried on its own line: five lines of stderr."""
  (tmp_path / 'cifar-10-python.tar.gz').write_bytes(content)
  proc = run_prepare(
    'cifar10', '--from', str(tmp_path / 'cifar-10-python.tar.gz'), '--data_dir', str(tmp_path / 'd')
  )
  assert_one_error_line(proc, 'not a readable tar archive (not a gzip, bzip2, xz or plain tar')
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert not (tmp_path / 'd').exists()


def test_missing_tensorflow_says_how_to_install_it(tmp_path):
  # A `tensorflow` that fails to import, as in a venv without the [tf] extra.
  fake = tmp_path / 'no_tf' / 'tensorflow'
  fake.mkdir(parents=True)
  (fake / '__init__.py').write_text("raise ImportError('No module named tensorflow')\n")
  archive = str(tmp_path / 'cifar-10-binary.tar.gz')
  official_archives.write_cifar10_binary(archive)
  env = dict(os.environ, PYTHONPATH=str(tmp_path / 'no_tf'))
  proc = run_prepare('cifar10', '--from', archive, '--data_dir', str(tmp_path / 'd'), env=env)
  line = assert_one_error_line(proc, "pip install -e '.[tf]'", 'TensorFlow')
  assert 'tfds' not in line


def test_wrong_archive_is_one_error_line(tmp_path):
  pytest.importorskip('tensorflow')
  archive = str(tmp_path / 'cifar-100-python.tar.gz')
  official_archives.write_cifar100_python(archive, train=10, test=10)
  proc = run_prepare('cifar10', '--from', archive, '--data_dir', str(tmp_path / 'd'))
  assert_one_error_line(proc, 'cifar-10-batches-py', 'cifar-10-binary.tar.gz')


def test_cifar10_binary_archive_prepares_exactly_its_images(tmp_path):
  pytest.importorskip('tensorflow')
  archive = str(tmp_path / 'cifar-10-binary.tar.gz')
  expected = official_archives.write_cifar10_binary(archive)
  proc = run_prepare('cifar10', '--from', archive, '--data_dir', str(tmp_path / 'tfds'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.splitlines()[-1].strip() == (
    'python -m resnet_jax.main --config=configs/cifar.py --workdir=runs/cifar10 '
    f'--config.data.data_dir={tmp_path / "tfds"}'
  )
  import tensorflow_datasets as tfds

  builder = tfds.builder('cifar10', data_dir=str(tmp_path / 'tfds'))
  assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  assert builder.info.features['label'].names == official_archives.CIFAR10_NAMES
  train_batches = [f'data_batch_{i}' for i in range(1, 6)]
  for split, batches in (('train', train_batches), ('test', ['test_batch'])):
    records = read_split(str(tmp_path / 'tfds'), 'cifar10', split)
    data = np.concatenate([expected[b][0] for b in batches])
    data = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CIFAR rows are R, G, B planes
    np.testing.assert_array_equal(np.stack([r['image'] for r in records]), data)
    np.testing.assert_array_equal(
      [r['label'] for r in records], np.concatenate([expected[b][1] for b in batches])
    )
  again = run_prepare('cifar10', '--from', archive, '--data_dir', str(tmp_path / 'tfds'))
  assert again.returncode == 0 and 'already prepared' in again.stdout
  # --overwrite with a wrong archive stops before deleting what is prepared.
  (tmp_path / 'bogus.tar.gz').write_text('not an archive')
  wrong = run_prepare(
    'cifar10',
    '--from',
    str(tmp_path / 'bogus.tar.gz'),
    '--overwrite',
    '--data_dir',
    str(tmp_path / 'tfds'),
  )
  assert_one_error_line(wrong, 'not a readable tar archive')
  assert tfds.builder('cifar10', data_dir=str(tmp_path / 'tfds')).is_prepared()


def test_cifar100_python_archive_keeps_fine_and_coarse_labels_and_names(tmp_path):
  pytest.importorskip('tensorflow')
  archive = str(tmp_path / 'cifar-100-python.tar.gz')
  expected = official_archives.write_cifar100_python(archive, train=120, test=40)
  proc = run_prepare('cifar100', '--from', archive, '--data_dir', str(tmp_path / 'tfds'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '--config=configs/cifar.py:dataset=cifar100' in proc.stdout
  import tensorflow_datasets as tfds

  info = tfds.builder('cifar100', data_dir=str(tmp_path / 'tfds')).info
  assert info.features['label'].names[:2] == ['fine0', 'fine1']
  assert info.features['coarse_label'].names[19] == 'coarse19'
  for split in ('train', 'test'):
    data, fine, coarse = expected[split]
    records = read_split(str(tmp_path / 'tfds'), 'cifar100', split)
    np.testing.assert_array_equal(
      np.stack([r['image'] for r in records]), data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    )
    np.testing.assert_array_equal([r['label'] for r in records], fine)
    np.testing.assert_array_equal([r['coarse_label'] for r in records], coarse)


def test_cifar_pickles_that_would_run_code_are_refused(tmp_path):
  import io
  import pickle
  import tarfile

  class Evil:
    def __reduce__(self):
      return (os.system, ('echo pwned',))

  archive = str(tmp_path / 'cifar-10-python.tar.gz')
  with tarfile.open(archive, 'w:gz') as tar:
    payload = pickle.dumps({b'label_names': Evil()})
    info = tarfile.TarInfo('cifar-10-batches-py/batches.meta')
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))
  with pytest.raises(offline.PrepareError, match='posix.system|os.system|unexpected object'):
    offline.local_downloads('cifar10', [archive], str(tmp_path))


def test_fashion_mnist_idx_files_are_checked_against_what_tfds_reads(tmp_path):
  official_archives.write_idx(str(tmp_path), train=20, test=10)
  with pytest.raises(offline.PrepareError, match='60000'):
    offline.local_downloads('fashion_mnist', [str(tmp_path)], str(tmp_path))
  os.remove(tmp_path / 't10k-labels-idx1-ubyte.gz')
  with pytest.raises(offline.PrepareError, match='t10k-labels-idx1-ubyte.gz not found'):
    offline.local_downloads('fashion_mnist', [str(tmp_path)], str(tmp_path))


@pytest.mark.skipif(
  not os.path.isdir(FASHION_DEBIAN), reason='Debian dataset-fashion-mnist not installed'
)
def test_debian_fashion_mnist_files_map_to_the_tfds_urls():
  files = offline.local_downloads('fashion_mnist', [FASHION_DEBIAN], '/nonexistent')
  assert sorted(files) == sorted(offline.FASHION_URL + f + '.gz' for f in offline.FASHION_FILES)
  single = [os.path.join(FASHION_DEBIAN, f + '.gz') for f in offline.FASHION_FILES]
  assert offline.local_downloads('fashion_mnist', single, '/nonexistent') == files


def test_train_commands_name_the_recipe_and_data_dir():
  assert prepare.train_command('imagenet2012', 'imagenet2012', '/d') == (
    'python -m resnet_jax.main --config=configs/r50.py --workdir=runs/r50 --config.data.data_dir=/d'
  )
  assert prepare.train_command('fashion_mnist', 'fashion_mnist', None) == (
    'python -m resnet_jax.main --config=configs/fashion_mnist.py --workdir=runs/fashion_mnist'
  )
  command = prepare.train_command('imagenette', 'imagenette/320px-v2', None)
  assert '--config=configs/imagenet.py:depth=18,dataset=imagenette/320px-v2' in command
  assert '--config=configs/cifar.py:dataset=mnist' in prepare.train_command(
    'mnist', 'mnist', None, (28, 28, 1)
  )
  assert offline.imagenette_config(['/x/imagenette2-320.tgz']) == '320px-v2'
  for name in prepare.RECIPES:  # every printed config exists and loads
    config = prepare.train_command(name, name, None).split('--config=')[1].split()[0]
    path, _, arg = config.partition(':')
    module = load_sibling_config(os.path.join(ROOT, path), os.path.basename(path)[:-3])
    assert module.get_config(arg.replace('{tfds_name}', name) or None).data.name == name


@pytest.mark.parametrize('depth,plain', [(20, False), (56, True)])
def test_fashion_mnist_config_is_the_paper_cifar_recipe_scaled_to_steps(depth, plain):
  module = load_sibling_config(os.path.join(ROOT, 'configs/x.py'), 'fashion_mnist')
  c = module.get_config(f'depth={depth},steps=8000' + (',plain' if plain else ''))
  assert (c.model.name, c.model.residual, c.model.shortcut) == (f'resnet{depth}', not plain, 'A')
  assert (c.data.name, c.data.image_size, c.data.augment, c.data.eval_split) == (
    'fashion_mnist',
    28,
    'cifar',
    'test',
  )
  assert (c.batch_size, c.num_train_steps, c.schedule.base_lr, c.schedule.boundaries) == (
    128,
    8000,
    0.1,
    '4000,6000',
  )
  assert (c.optimizer.momentum, c.optimizer.weight_decay) == (0.9, 1e-4)
  full = module.get_config('preact,block=bottleneck,depth=164,val=5000')
  assert full.schedule.boundaries == '32000,48000' and full.schedule.warmup_steps == 400
  assert full.model.preact and full.model.block == 'bottleneck'
  assert full.data.eval_split == 'validation' and full.data.validation_size == 5000


def test_digits_overwrite_rebuilds_a_damaged_copy(tmp_path, capsys):
  """`prepare digits --overwrite` was silently ignored, so a damaged copy could not be rebuilt."""
  import glob

  from resnet_jax import data
  from tests.runner import data_config

  root = str(tmp_path)
  assert prepare.main(['digits', '--data-dir', root]) == 0
  (shard,) = glob.glob(os.path.join(root, 'digits', '1.0.0', 'digits-train.array_record-*'))
  with open(shard, 'r+b') as f:
    f.truncate(1000)
  with open(os.path.join(root, 'digits', '1.0.0', 'dataset_info.json'), 'w') as f:
    f.write('{')  # even a builder TFDS cannot construct
  assert prepare.main(['digits', '--data-dir', root, '--overwrite']) == 0
  assert f'removed {os.path.join(root, "digits", "1.0.0")}' in capsys.readouterr().out
  assert data.get_dataset_info(data_config(data_dir=root)).num_train_examples == 1437


def test_a_dataset_training_refuses_is_refused_before_download(tmp_path, capsys, monkeypatch):
  """`prepare bigearthnet` (multi-label) went on to download what training then refused."""
  import tensorflow_datasets as tfds

  def no_download(*args, **kwargs):
    raise AssertionError('download_and_prepare was called')

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', no_download)
  assert prepare.main(['bigearthnet', '--data-dir', str(tmp_path)]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "label 'labels' is a Sequence, not a ClassLabel" in err[0], err


@pytest.mark.parametrize(
  'content,needle',
  [
    ('{"a": 1}', 'not a list of label lists'),
    ('[[1, 2], [1000]]', 'not a list of label lists (class indices 0-999'),
    ('[[1], "x"]', 'not a list of label lists'),
    ('[[1], [2]', 'not JSON'),
  ],
)
def test_a_real_json_that_is_not_real_labels_is_one_line_before_tensorflow(
  tmp_path, content, needle
):
  """ReaL's labels file is checked before TensorFlow loads and before anything is written."""
  (tmp_path / 'real.json').write_text(content)
  data_dir = tmp_path / 'tfds'
  proc = run_prepare(
    'imagenet2012_real', '--from', str(tmp_path / 'real.json'), '--data_dir', str(data_dir)
  )
  assert_one_error_line(proc, needle, "ReaL's real.json")
  assert not data_dir.exists()


def test_test_sets_end_with_the_evaluate_command():
  assert prepare.evaluate_command('imagenet2012_real', '/d') == (
    'python -m resnet_jax.evaluate --workdir=runs/r50 --dataset=imagenet2012_real --data-dir=/d'
  )
  assert prepare.evaluate_command('cifar10_1', None) == (
    'python -m resnet_jax.evaluate --workdir=runs/cifar10 --dataset=cifar10_1'
  )
  assert prepare.evaluate_command('imagenet_a', None) == (
    'python -m resnet_jax.evaluate --workdir=runs/r50 --dataset=imagenet_a'
  )
