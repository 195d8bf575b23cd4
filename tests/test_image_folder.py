"""`data.name='image_folder'`: an extracted tree ROOT/<split>/<class>/<image>, read as torchvision's
`ImageFolder` reads it (class order, file rule), trained and evaluated in place, never written."""

import io
import os
import shutil
import stat

import numpy as np
import pytest
from PIL import Image

import resnet_jax.data as data
from resnet_jax.data import folder_index, pipeline, sources
from tests.runner import assert_one_line_error, data_config, run_main


def _photos() -> list[np.ndarray]:
  """Small crops of the two photographs scikit-learn ships (china.jpg, flower.jpg)."""
  from sklearn.datasets import load_sample_images

  crops = []
  for photo in load_sample_images().images:
    for top, left in ((0, 0), (150, 200), (300, 400), (100, 500)):
      crops.append(np.asarray(photo[top : top + 40 : 2, left : left + 56 : 2], np.uint8))
  return crops  # 8 crops, 20 x 28 x 3


def _save(path: str, array: np.ndarray, fmt: str, mode: str | None = None) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img = Image.fromarray(array)
  img = img.convert(mode) if mode else img
  img.save(path, format=fmt)


# The class directories of the train split, created in this (unsorted) order.
TRAIN_CLASSES = ('n02', 'n01', 'n10')


def make_tree(root: str) -> str:
  """train: 3 classes of JPEG/PNG photos (one greyscale, one CMYK JPEG, one RGBA PNG as ImageNet
  and web trees have), upper-case extensions, a nested folder, a symlink and files that are no
  images; val: two of the classes, so its class positions differ from train's."""
  photos = _photos()
  train = os.path.join(root, 'train')
  for c, name in enumerate(TRAIN_CLASSES):
    for i in range(4):
      _save(os.path.join(train, name, f'img{i}.jpg'), photos[(c * 3 + i) % 8], 'JPEG')
  _save(os.path.join(train, 'n02', 'grey.JPEG'), photos[5], 'JPEG', 'L')
  _save(os.path.join(train, 'n02', 'cmyk.jpeg'), photos[6], 'JPEG', 'CMYK')
  _save(os.path.join(train, 'n01', 'alpha.PNG'), photos[7], 'PNG', 'RGBA')
  _save(os.path.join(train, 'n10', 'sub', 'deep.png'), photos[1], 'PNG')
  for i, sub in enumerate(('c', 'a', 'b')):  # sibling folders: listed in the file system's order
    _save(os.path.join(train, 'n10', 'nested', sub, 'x.png'), photos[i], 'PNG')
  os.symlink(os.path.join(train, 'n01', 'img0.jpg'), os.path.join(train, 'n10', 'linked.jpg'))
  for junk in ('n01/notes.txt', 'n01/.DS_Store', 'n10/sub/labels.csv'):
    with open(os.path.join(train, junk), 'w') as f:
      f.write('not an image')
  with open(os.path.join(root, 'README'), 'w') as f:  # a file beside the splits: ignored
    f.write('ImageNet')
  val = os.path.join(root, 'val')
  for i, name in enumerate(('n10', 'n02')):
    for j in range(2):
      _save(os.path.join(val, name, f'v{j}.JPEG'), photos[(i + 2 * j) % 8], 'JPEG')
  return root


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> str:
  """The user cache (index and statistics) in this test's own directory."""
  directory = str(tmp_path / 'user_cache')
  monkeypatch.setenv('RESNET_JAX_CACHE_DIR', directory)
  folder_index.MEMORY.clear()
  return directory


@pytest.fixture
def tree(tmp_path) -> str:
  return make_tree(str(tmp_path / 'imagenet'))


def folder_config(root: str, **overrides):
  fields = dict(
    name='image_folder',
    data_dir=root,
    train_split='train',
    eval_split='val',
    image_size=16,
    augment='inception',
    normalize='mean_std',
  )
  return data_config(**{**fields, **overrides})


def tiny_run_config(root: str, steps: int = 1):
  """folder_config for a few training steps of ResNet-8 at batch 4, one eval crop."""
  config = folder_config(root)
  config.model.name, config.batch_size, config.eval_batch_size = 'resnet8', 4, 4
  config.num_train_steps, config.progress_bar, config.data.eval_crops = steps, False, 1
  return config


def _paths(source: sources.SplitSource, split_dir: str) -> list[str]:
  records = source.records
  return [os.path.relpath(records.path(i), split_dir) for i in range(len(records))]


def test_classes_and_files_follow_torchvision_image_folder(tree):
  """Classes: sorted subdirectory names of train (`find_classes`); files: torchvision's image
  extensions in any case, recursively, symlinks followed, sorted by directory then name."""
  source = sources.open_split(folder_config(tree), 'train')
  assert source.num_classes == 3 and source.encoded and source.native_shape == (None, None, 3)
  assert _paths(source, os.path.join(tree, 'train')) == [
    'n01/alpha.PNG', 'n01/img0.jpg', 'n01/img1.jpg', 'n01/img2.jpg', 'n01/img3.jpg',
    'n02/cmyk.jpeg', 'n02/grey.JPEG', 'n02/img0.jpg', 'n02/img1.jpg', 'n02/img2.jpg',
    'n02/img3.jpg',
    'n10/img0.jpg', 'n10/img1.jpg', 'n10/img2.jpg', 'n10/img3.jpg', 'n10/linked.jpg',
    'n10/nested/a/x.png', 'n10/nested/b/x.png', 'n10/nested/c/x.png', 'n10/sub/deep.png',
  ]  # fmt: skip
  labels = [source.records[i]['label'] for i in range(len(source))]
  assert labels == [0] * 5 + [1] * 6 + [2] * 9
  with open(os.path.join(tree, 'train', 'n10', 'sub', 'deep.png'), 'rb') as f:
    assert source.records[19]['image'] == f.read()  # the file's bytes, decoded by the pipeline


def _tfds_imagenet_wnids() -> list[str]:
  """The class names TFDS's imagenet2012 builder gives its labels 0-999, from the file it reads."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

  path = tfds.core.tfds_path(imagenet_common._LABELS_FNAME)  # pylint: disable=protected-access
  return path.read_text().split()


def test_imagenet_class_order_is_tfds_imagenet2012s():
  """Sorted WordNet ids are TFDS imagenet2012's label order (and torchvision's/timm's weights'):
  a tree of ImageNet's 1,000 class folders gets the labels a prepared imagenet2012 has."""
  wnids = _tfds_imagenet_wnids()
  assert len(wnids) == 1000 and wnids == sorted(wnids) and wnids[0] == 'n01440764'


def test_imagenet_wnid_folders_get_tfds_labels(tmp_path):
  wnids = _tfds_imagenet_wnids()
  photo = _photos()[0]
  for wnid in reversed(wnids):  # created last to first: the order on disk must not matter
    os.makedirs(os.path.join(tmp_path, 'train', wnid))
  for wnid in (wnids[0], wnids[417], wnids[999]):
    _save(os.path.join(tmp_path, 'train', wnid, 'a.JPEG'), photo, 'JPEG')
    _save(os.path.join(tmp_path, 'val', wnid, 'a.JPEG'), photo, 'JPEG')
  for wnid in wnids:  # every class needs an image
    if not os.listdir(os.path.join(tmp_path, 'train', wnid)):
      _save(os.path.join(tmp_path, 'train', wnid, 'b.JPEG'), photo[:4, :4], 'JPEG')
  source = sources.open_split(folder_config(str(tmp_path)), 'val')
  assert source.num_classes == 1000
  assert [source.records[i]['label'] for i in range(3)] == [0, 417, 999]


def test_another_split_is_labelled_by_class_name_not_position(tree):
  val = sources.open_split(folder_config(tree), 'val')
  assert _paths(val, os.path.join(tree, 'val')) == [
    'n02/v0.JPEG',
    'n02/v1.JPEG',
    'n10/v0.JPEG',
    'n10/v1.JPEG',
  ]
  assert [val.records[i]['label'] for i in range(4)] == [1, 1, 2, 2]  # train's n02, n10
  assert val.num_classes == 3


def test_validation_size_holds_out_training_images(tree):
  config = folder_config(tree, validation_size=5, eval_split='validation')
  train = sources.open_split(config, 'train')
  held = sources.open_split(config, 'validation')
  assert (len(train), len(held)) == (15, 5)
  keep, out = sources.holdout_indices(20, 5)
  full = sources.open_split(folder_config(tree), 'train').records
  assert [held.records[i]['image'] for i in range(5)] == [full[int(j)]['image'] for j in out]
  assert [train.records[i]['label'] for i in range(15)] == [full[int(j)]['label'] for j in keep]


def _expect_not_found(config, split, *needles):
  with pytest.raises(data.DatasetNotFoundError) as e:
    sources.open_split(config, split)
  message = str(e.value)
  assert '\n' not in message, message
  for needle in needles:
    assert needle in message, message
  return message


def test_missing_split_names_the_subdirectories_and_the_flag(tree):
  _expect_not_found(
    folder_config(tree), 'validation', "no split 'validation'", 'train, val',
    '--config.data.eval_split=val',
  )  # fmt: skip


def test_root_that_is_no_directory(tree, tmp_path):
  _expect_not_found(folder_config(str(tmp_path / 'nowhere')), 'train', 'does not exist')
  _expect_not_found(folder_config(os.path.join(tree, 'README')), 'train', 'is not a directory')
  _expect_not_found(folder_config(None), 'train', '--config.data.data_dir=ROOT')


def test_empty_class_directory_is_named(tree):
  os.makedirs(os.path.join(tree, 'train', 'n05'))
  with open(os.path.join(tree, 'train', 'n05', 'list.txt'), 'w') as f:
    f.write('no images here')
  _expect_not_found(folder_config(tree), 'train', os.path.join(tree, 'train', 'n05'), 'no image')


def test_a_misspelt_name_points_to_image_folder(tree):
  _expect_not_found(folder_config(tree, name='imagefolder'), 'train', "'image_folder' (a tree")


def test_a_class_only_in_the_eval_split_is_refused(tree):
  _save(os.path.join(tree, 'val', 'n99', 'x.jpg'), _photos()[0], 'JPEG')
  _expect_not_found(folder_config(tree), 'val', 'n99', "train split 'train' does not")


def test_a_missing_split_is_one_error_line_from_the_cli(tree, tmp_path):
  proc = run_main(
    str(tmp_path / 'run'),
    f'--config.data.data_dir={tree}',
    '--config.data.name=image_folder',
    '--config.data.eval_split=validation',
    '--config.data.image_size=16',
    devices=1,
  )
  assert_one_line_error(proc, "no split 'validation'", '--config.data.eval_split=val')


@pytest.mark.parametrize(
  'name,damage',
  [
    ('n02/img1.jpg', 'truncate'),
    ('n02/img1.jpg', 'empty'),
    ('n02/img1.jpg', 'html'),
    ('n02/img1.jpg', 'delete'),
    ('n10/sub/deep.png', 'truncate'),
  ],
)
def test_a_file_that_cannot_be_read_mid_run_names_the_file(tree, name, damage):
  source = sources.open_split(folder_config(tree), 'train')
  path = os.path.join(tree, 'train', name)
  index = _paths(source, os.path.join(tree, 'train')).index(name)
  if damage == 'delete':
    os.remove(path)
  else:
    size = os.path.getsize(path)
    with open(path, 'r+b') as f:
      if damage == 'html':
        f.write(b'<html><body>404</body></html>')
      # 'truncate': the headers stay whole, the end of the compressed data is cut (a copy
      # interrupted late): only decoding finds it
      f.truncate({'truncate': size - 40, 'empty': 0, 'html': 30}[damage])
  source.records[index - 1]  # pylint: disable=pointless-statement  -- its neighbours still read
  with pytest.raises(sources.DatasetDamagedError) as e:
    source.records[index]  # pylint: disable=expression-not-assigned
  assert path in str(e.value) and '\n' not in str(e.value)


def test_jpeg_with_bytes_after_its_end_still_reads(tree):
  path = os.path.join(tree, 'train', 'n01', 'img2.jpg')
  with open(path, 'ab') as f:
    f.write(b'camera maker trailer' * 8)
  source = sources.open_split(folder_config(tree), 'train')
  assert source.records[3]['image'].endswith(b'trailer')


def _batches(config, n, state=None):
  it = data.create_train_iterator(
    config, local_batch_size=4, process_index=0, process_count=1, seed=3
  )
  if state is not None:
    it.set_state(state)
  out = [next(it) for _ in range(n)]
  return out, it.get_state()


def test_train_iterator_is_deterministic_and_resumes_exactly(tree):
  config = folder_config(tree)
  first, _ = _batches(config, 5)
  again, _ = _batches(config, 5)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  assert first[0]['image'].shape == (4, 16, 16, 3)
  _, state = _batches(config, 2)
  resumed, _ = _batches(config, 3, state)
  for a, b in zip(first[2:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])


def test_the_tree_is_never_written_and_statistics_are_cached_elsewhere(tree, cache):
  def files():
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(tree) for f in fs)

  before = files()
  for d, dirs, _ in os.walk(tree):
    for name in dirs:
      os.chmod(os.path.join(d, name), stat.S_IRUSR | stat.S_IXUSR)
  os.chmod(tree, stat.S_IRUSR | stat.S_IXUSR)
  try:
    config = folder_config(tree)
    stats = pipeline.make_normalization(config)
    assert files() == before
    cached = [f for _, _, fs in os.walk(cache) for f in fs]
    assert any(f.startswith('resnet_jax_stats_') for f in cached), cached
    assert any(f.startswith('index-') for f in cached), cached
    assert np.all(stats.normalizer.std > 1.0)  # channel std of photographs in 0-255
  finally:
    for d, dirs, _ in os.walk(tree):
      os.chmod(d, stat.S_IRWXU)
      for name in dirs:
        os.chmod(os.path.join(d, name), stat.S_IRWXU)


def test_file_index_is_reused_until_the_tree_changes(tree, monkeypatch):
  config = folder_config(tree)
  assert len(sources.open_split(config, 'train')) == 20
  folder_index.MEMORY.clear()  # as a new process
  scans = []
  real_scan = folder_index.scan
  monkeypatch.setattr(folder_index, 'scan', lambda d: scans.append(d) or real_scan(d))
  assert len(sources.open_split(config, 'train')) == 20 and not scans  # from the user cache
  _save(os.path.join(tree, 'train', 'n10', 'sub', 'new.jpg'), _photos()[2], 'JPEG')
  assert len(sources.open_split(config, 'train')) == 21 and len(scans) == 1  # nested dir changed
  os.remove(os.path.join(tree, 'train', 'n01', 'img3.jpg'))
  assert len(sources.open_split(config, 'train')) == 20 and len(scans) == 2


def test_records_pickle_small(tree):
  import pickle

  records = sources.open_split(folder_config(tree), 'train').records
  copy = pickle.loads(pickle.dumps(records))
  assert [copy[i]['image'] for i in range(20)] == [records[i]['image'] for i in range(20)]
  assert not any(isinstance(v, (list, dict)) and len(v) > 3 for v in vars(records).values())


def test_greyscale_cmyk_and_rgba_files_decode_to_rgb(tree):
  config = folder_config(tree)
  pre = data.make_preprocessor(config)
  records = sources.open_split(config, 'train').records
  for i in (0, 5, 6):  # alpha.PNG, cmyk.jpeg, grey.JPEG
    assert pre.eval(records[i]['image']).shape == (16, 16, 3)
  grey = pre.eval(records[6]['image']).astype(int)
  assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])
  assert Image.open(io.BytesIO(records[5]['image'])).mode == 'CMYK'


def test_a_few_training_steps_and_evaluate(tree, tmp_path):
  from resnet_jax import evaluate, train

  config = folder_config(tree)
  config.model.name, config.batch_size, config.eval_batch_size = 'resnet8', 4, 4
  config.num_train_steps, config.progress_bar = 3, False
  config.evals.train_images = dict(split='train', crops=2, every_steps=0)  # an extra evaluator
  result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert result['eval']['num_examples'] == 4 and np.isfinite(result['eval']['loss'])
  assert result['evals']['train_images']['num_examples'] == 20
  again = evaluate.evaluate_workdir(str(tmp_path / 'run'))
  assert again['top1_error'] == result['eval']['top1_error'] and again['num_examples'] == 4
  precise = evaluate.evaluate_workdir(str(tmp_path / 'run'), precise_bn_batches=2)
  assert precise['num_examples'] == 4 and precise['precise_bn_batches'] == 2


def test_a_symlink_loop_is_listed_once(tree):
  """os.walk(followlinks=True), torchvision's listing, never ends on a folder linked into itself
  (a tree assembled with symlinks); here each folder is listed once."""
  os.symlink(os.path.join(tree, 'train', 'n01'), os.path.join(tree, 'train', 'n01', 'again'))
  source = sources.open_split(folder_config(tree), 'train')
  assert len(source) == 20 and not any('again' in p for p in _paths(source, tree))


def test_same_samples_and_labels_as_torchvisions_image_folder(tree, tv):  # pylint: disable=unused-argument
  """torchvision's own `ImageFolder` (the `tv` fixture makes torchvision importable) lists the
  same files in the same order with the same labels; for another split, labels are its
  `class_to_idx` of the train split, looked up by folder name."""
  from torchvision.datasets.folder import ImageFolder

  theirs = ImageFolder(os.path.join(tree, 'train'))
  ours = sources.open_split(folder_config(tree), 'train')
  assert [ours.records.path(i) for i in range(len(ours))] == [p for p, _ in theirs.samples]
  assert [ours.records[i]['label'] for i in range(len(ours))] == theirs.targets
  val = ImageFolder(os.path.join(tree, 'val'))
  ours_val = sources.open_split(folder_config(tree), 'val')
  expected = [theirs.class_to_idx[os.path.basename(os.path.dirname(p))] for p, _ in val.samples]
  assert [ours_val.records[i]['label'] for i in range(len(ours_val))] == expected
  assert ours_val.records.path(0) == val.samples[0][0]


def _script(name: str):
  import importlib.util

  path = os.path.join(os.path.dirname(__file__), '..', 'scripts', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'{name}_script', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_benchmark_e2e_runs_on_a_tree_with_a_val_split(tree, capsys):
  import json

  args = ['--smoke', '--dataset', 'image_folder', '--data_dir', tree, '--json']
  assert _script('benchmark_e2e').main(args + ['--eval-split', 'val']) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result['dataset'] == 'image_folder' and result['images_per_sec'] > 0


def test_benchmark_input_measures_a_tree(tmp_path, capsys):
  """`scripts/benchmark_input.py --write-tree DIR` writes its generated JPEGs as a tree, byte for
  byte, and `--dataset image_folder --data_dir DIR` times the train and 10-crop pipelines on it
  (both read the train split, so a tree of train only will do)."""
  import json

  module = _script('benchmark_input')
  root = str(tmp_path / 'tree')
  assert module.write_tree(root, str(tmp_path / 'tfds'), 'tiny') == 34  # 24 train + 10 test
  tfds_config = module.make_config(
    'generated_jpegs/tiny', 'imagenet', 32, str(tmp_path / 'tfds'), 0, 1
  )
  records = sources.open_split(tfds_config, 'train').records
  tfds_images = sorted(bytes(records[i]['image']) for i in range(len(records)))
  tree = sources.open_split(folder_config(root), 'train').records
  assert sorted(tree[i]['image'] for i in range(len(tree))) == tfds_images
  shutil.rmtree(os.path.join(root, 'test'))  # a tree of one split is enough to time
  args = ['--dataset', 'image_folder', '--data_dir', root, '--smoke', '--json']
  assert module.main(args + ['--pipelines', 'imagenet_train,imagenet_eval_10crop']) == 0
  rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])['results']
  assert [r['pipeline'] for r in rows] == ['imagenet_train', 'imagenet_eval_10crop']
  assert all(r['dataset'] == 'image_folder' and r['examples_per_sec'] > 0 for r in rows)
