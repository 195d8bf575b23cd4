"""Image-folder trees walked as a researcher would (2026-11-25): damaged images named wherever
decoding finds them, and ImageNet-V2's numbered class folders."""

import contextlib
import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import resnet_jax.data as data
from resnet_jax import multiscale
from resnet_jax.data import folder_index, pipeline, sources
from tests.test_image_folder import (  # cache, tree: the fixtures (the user cache here, a tree)
  _photos,
  _save,
  cache,  # noqa: F401
  folder_config,
  make_tree,
  tiny_run_config,
  tree,  # noqa: F401
)


def _damage_the_middle(path: str) -> None:
  """Random bytes in the middle of a JPEG's entropy-coded data (a bad sector, a flipped
  transfer): the headers and the EOI marker stay whole, so only a full decode finds it."""
  original = bytearray(open(path, 'rb').read())
  start = original.find(b'\xff\xda')
  middle = (start + len(original)) // 2
  for seed in range(200):
    damaged = bytearray(original)
    n = (len(original) - start) // 4
    damaged[middle : middle + n] = np.random.default_rng(seed).bytes(n)
    try:
      Image.open(io.BytesIO(bytes(damaged))).load()
    except OSError:
      break
  else:
    raise AssertionError('no damage PIL notices')
  assert damaged.endswith(b'\xff\xd9') and damaged[:2] == b'\xff\xd8'
  with open(path, 'wb') as f:
    f.write(bytes(damaged))


def _big_photo_tree(root: str) -> str:
  """make_tree with larger JPEGs (80 x 112), whose compressed data has a middle to damage."""
  make_tree(root)
  for photo, name in zip(_photos(), ('img0.jpg', 'img1.jpg', 'img2.jpg')):
    big = np.asarray(Image.fromarray(photo).resize((112, 80)))
    _save(os.path.join(root, 'train', 'n02', name), big, 'JPEG')
    _save(os.path.join(root, 'val', 'n10', name.replace('img', 'v').upper()), big, 'JPEG')
  return root


def _expect_damaged(path, call):
  with pytest.raises(sources.DatasetDamagedError) as e:
    call()
  message = str(e.value)
  assert path in message and 'broken data stream' in message and '\n' not in message, message


def test_mid_file_damage_passes_the_read_and_is_named_where_decoding_finds_it(tmp_path):
  """The cheap check when a file is read sees a whole JPEG; decoding fails later (the statistics,
  a training batch, an eval batch): each names the file, not only PIL's 'broken data stream'."""
  root = _big_photo_tree(str(tmp_path / 'tree'))
  config = folder_config(root)
  train = sources.open_split(config, 'train').records
  paths = [train.path(i) for i in range(len(train))]
  damaged = os.path.join(root, 'train', 'n02', 'img1.jpg')
  _damage_the_middle(damaged)
  assert train[paths.index(damaged)]['label'] == 1  # read and checked without complaint
  _expect_damaged(damaged, lambda: pipeline.make_normalization(config))
  pre = data.make_preprocessor(config)
  transform = pipeline._TrainTransform(pre)  # pylint: disable=protected-access
  record = train[paths.index(damaged)]
  _expect_damaged(damaged, lambda: transform(record, np.random.default_rng(0)))
  evaluation = pipeline._EvalExample(train, pre, 1, None)  # pylint: disable=protected-access
  _expect_damaged(damaged, lambda: evaluation(paths.index(damaged)))
  assert evaluation(0)['mask']  # the others still decode
  slots = np.asarray([[paths.index(damaged), 32, 48]], np.int64)  # Table 4's whole image
  whole = multiscale._Slot(train, pre, slots)  # pylint: disable=protected-access
  _expect_damaged(damaged, lambda: whole(0))


def test_mid_file_damage_is_named_from_a_grain_worker(tmp_path):
  """Found by a Grain worker process during evaluation (data.num_workers=1), hours into a run."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  root = _big_photo_tree(str(tmp_path / 'tree'))
  damaged = os.path.join(root, 'val', 'n10', 'V1.JPG')
  _damage_the_middle(damaged)
  config = folder_config(root, num_workers=1)
  batches = iter(
    data.create_eval_iterator(
      config, split='val', local_batch_size=4, process_index=0, process_count=1
    )
  )
  with contextlib.closing(batches):  # no worker outlives the test
    _expect_damaged(damaged, lambda: list(batches))


def test_records_carry_their_path_and_tfds_records_do_not_change(tree):
  source = sources.open_split(folder_config(tree), 'train')
  assert source.records[0]['path'] == os.path.join(tree, 'train', 'n01', 'alpha.PNG')
  digits = sources.open_split(folder_config(None, name='digits'), 'train')
  assert sorted(digits.records[0]) == ['image', 'label']


def test_an_empty_file_and_a_text_file_say_what_they_are(tree):
  source = sources.open_split(folder_config(tree), 'train')
  empty, text = (os.path.join(tree, 'train', 'n02', n) for n in ('img1.jpg', 'img2.jpg'))
  open(empty, 'wb').close()
  with open(text, 'w') as f:
    f.write('<html>404 Not Found</html>')
  for path, reason in ((empty, 'the file is empty'), (text, "it begins b'<html>404 Not Fo")):
    with pytest.raises(sources.DatasetDamagedError) as e:
      source.records[[source.records.path(i) for i in range(20)].index(path)]  # pylint: disable=expression-not-assigned
    assert path in str(e.value) and reason in str(e.value) and 'BytesIO' not in str(e.value)


# ImageNet-V2 (Recht et al. 2019) is distributed as folders 0 ... 999, folder k holding class k
# of ImageNet's sorted WordNet ids; torchvision's ImageFolder sorts the names as strings.
WNIDS = [f'n{k:02d}' for k in range(12)]  # 12 classes: '10' and '11' sort before '2' as strings


def _numbered_tree(root: str, train=WNIDS, v2=range(12), split='v2') -> str:
  photos = _photos()
  for k, name in enumerate(train or ()):
    _save(os.path.join(root, 'train', name, 'a.jpg'), photos[k % 8], 'JPEG')
  for k in v2:
    _save(os.path.join(root, split, str(k), f'{k}.jpeg'), photos[k % 8], 'JPEG')
  return root


def _labels_by_file(source) -> dict[str, int]:
  records = source.records
  return {os.path.basename(records.path(i)): records[i]['label'] for i in range(len(records))}


def test_numbered_folders_are_class_indices_of_the_sorted_train_classes(tmp_path):
  """Folder k is train's k-th class: the label ImageNet-V2's folders mean (not the position of
  'k' among the names sorted as strings, which ImageFolder gives)."""
  root = _numbered_tree(str(tmp_path))
  v2 = sources.open_split(folder_config(root, eval_split='v2'), 'v2')
  assert v2.num_classes == 12
  assert _labels_by_file(v2) == {f'{k}.jpeg': k for k in range(12)}
  assert sorted(str(k) for k in range(12))[2] == '10'  # ImageFolder's label 2 for folder 10


def test_numbered_train_classes_keep_matching_by_name(tmp_path):
  """When train's folders are numbered too, the names are the classes (train's own ImageFolder
  order, string-sorted), as for any other names: a trained model's labels stay right."""
  root = _numbered_tree(str(tmp_path), train=[str(k) for k in range(12)])
  v2 = sources.open_split(folder_config(root, eval_split='v2'), 'v2')
  order = sorted(str(k) for k in range(12))
  assert _labels_by_file(v2) == {f'{k}.jpeg': order.index(str(k)) for k in range(12)}


def test_numbered_folders_may_be_fewer_than_the_train_classes(tmp_path):
  """As with names, a split may hold some of the classes: folder k is still class k."""
  root = _numbered_tree(str(tmp_path), v2=(0, 4, 11))
  v2 = sources.open_split(folder_config(root, eval_split='v2'), 'v2')
  assert v2.num_classes == 12 and _labels_by_file(v2) == {'0.jpeg': 0, '4.jpeg': 4, '11.jpeg': 11}


@pytest.mark.parametrize(
  'v2,beyond',
  [
    (range(1, 13), '(12: 1 in all)'),  # counted from 1
    (range(14), '(12, 13: 2 in all)'),  # more numbers than train classes
  ],
)
def test_numbered_folders_must_be_below_the_train_class_count(tmp_path, v2, beyond):
  root = _numbered_tree(str(tmp_path), v2=v2)
  with pytest.raises(data.DatasetNotFoundError) as e:
    sources.open_split(folder_config(root, eval_split='v2'), 'v2')
  message = str(e.value)
  assert "ImageNet-V2's layout) of the 12 classes of train split 'train'" in message, message
  assert f'so they must be below 12 {beyond}: number them from 0' in message, message
  assert '\n' not in message


def test_zero_padded_or_mixed_names_are_names(tmp_path):
  """'07' is not how ImageNet-V2 writes 7: such folders are matched by name as any other."""
  root = _numbered_tree(str(tmp_path), v2=range(12))
  os.rename(os.path.join(root, 'v2', '7'), os.path.join(root, 'v2', '07'))
  with pytest.raises(data.DatasetNotFoundError, match=r'does not \(0, 07, 1, 10, 11, \.\.\.'):
    sources.open_split(folder_config(root, eval_split='v2'), 'v2')


def test_a_numbered_split_without_a_train_split_indexes_the_models_classes(tmp_path):
  """ImageNet-V2 extracted alone (no train split): folder k is class k of the model's classes
  (config.model.num_classes, which evaluate --dataset sets to the run's); unknown, the N folders
  must be 0..N-1, all there."""
  root = _numbered_tree(str(tmp_path), train=None)
  v2 = sources.open_split(folder_config(root, eval_split='v2'), 'v2')
  assert v2.num_classes == 12 and v2.cache_dir is None
  assert _labels_by_file(v2) == {f'{k}.jpeg': k for k in range(12)}
  shutil.rmtree(os.path.join(root, 'v2', '5'))
  folder_index.MEMORY.clear()
  with pytest.raises(data.DatasetNotFoundError, match=r'exactly 0\.\.10 \(missing 5; 1 in all\)'):
    sources.open_split(folder_config(root, eval_split='v2'), 'v2')
  config = folder_config(root, eval_split='v2')
  config.model.num_classes = 1000
  v2 = sources.open_split(config, 'v2')
  assert v2.num_classes == 1000 and _labels_by_file(v2)['11.jpeg'] == 11
  config.model.num_classes = 11
  with pytest.raises(data.DatasetNotFoundError, match=r"model's 11 classes, so they must be below"):
    sources.open_split(config, 'v2')


def test_a_named_split_alone_is_labelled_by_its_own_sorted_folders(tmp_path):
  """A split with named class folders and no train split beside it (ImageNet-A/R extracted
  alone): its sorted folder names are its classes, which `evaluate --dataset` matches to the
  run's by name (it was refused: nothing gave the folders a meaning then)."""
  root = _numbered_tree(str(tmp_path), train=None, v2=range(3))
  for k, name in ((0, 'n20'), (1, 'n03'), (2, 'n11')):
    os.rename(os.path.join(root, 'v2', str(k)), os.path.join(root, 'v2', name))
  alone = sources.open_split(folder_config(root, eval_split='v2'), 'v2')
  assert alone.num_classes == 3 and alone.class_names == ('n03', 'n11', 'n20')
  assert _labels_by_file(alone) == {'1.jpeg': 0, '2.jpeg': 1, '0.jpeg': 2}


def test_a_missing_split_is_reported_before_a_missing_train_split(tmp_path):
  """`evaluate --dataset image_folder` without --split asks for 'test': say that, and how to
  name the split in evaluate, rather than that the tree has no train split."""
  root = _numbered_tree(str(tmp_path), train=None)
  with pytest.raises(data.DatasetNotFoundError) as e:
    sources.open_split(folder_config(root, eval_split='test'), 'test')
  assert "no split 'test' (its subdirectories: v2)" in str(e.value)
  assert '--config.data.eval_split=v2, or evaluate --split=v2' in str(e.value)
  with pytest.raises(data.DatasetNotFoundError, match=r"no split 'train' .*train_split=v2\)$"):
    sources.open_split(folder_config(root), 'train')  # training: train's own message


def test_evaluate_a_run_on_imagenet_v2_extracted_alone(tree, tmp_path):
  """`evaluate --dataset image_folder --data-dir V2ROOT --split v2`: a tree of numbered folders
  only, read with the run's preprocessing while the run's own data stays where it was; the
  same images as the run's train split give the same numbers."""
  from resnet_jax import evaluate, train

  config = tiny_run_config(tree)
  run = str(tmp_path / 'run')
  train.train_and_evaluate(config, run)
  v2 = str(tmp_path / 'imagenet_v2')
  for k, name in enumerate(('n01', 'n02', 'n10')):  # train's sorted classes
    shutil.copytree(os.path.join(tree, 'train', name), os.path.join(v2, 'v2', str(k)))
  own = evaluate.evaluate_workdir(run, split='train', crops=1)
  other = evaluate.evaluate_workdir(run, split='v2', crops=1, dataset='image_folder', data_dir=v2)
  assert other['dataset'] == 'image_folder' and other['num_examples'] == 20
  assert other['top1_error'] == own['top1_error'] and np.isclose(other['loss'], own['loss'])
  same = evaluate.evaluate_workdir(run, split='train', crops=1, dataset='image_folder')
  assert same == own  # the run's own tree: --dataset image_folder alone changes nothing
  shutil.rmtree(os.path.join(v2, 'v2', '1'))  # some of the classes: still class k in folder k
  folder_index.MEMORY.clear()
  fewer = evaluate.evaluate_workdir(run, split='v2', dataset='image_folder', data_dir=v2)
  assert fewer['num_examples'] == 14
  shutil.copytree(os.path.join(v2, 'v2', '2'), os.path.join(v2, 'v2', '3'))
  folder_index.MEMORY.clear()
  with pytest.raises(
    ValueError, match=r"indices \(ImageNet-V2's layout\) of the model's 3 classes"
  ):
    evaluate.evaluate_workdir(run, split='v2', dataset='image_folder', data_dir=v2)
  os.makedirs(os.path.join(v2, 'train'))  # a tree with a train split of 4 classes of its own
  for k in range(4):
    shutil.copytree(os.path.join(tree, 'train', 'n01'), os.path.join(v2, 'train', f'c{k}'))
  folder_index.MEMORY.clear()
  with pytest.raises(
    ValueError, match=r'image_folder has 4 classes .*a tree: class folders 0\.\.2 as'
  ):
    evaluate.evaluate_workdir(run, split='train', dataset='image_folder', data_dir=v2)


def test_evaluate_dataset_image_folder_needs_the_tree(tmp_path):
  """A run trained on another dataset: the tree is named by --data-dir, refused before the run's
  own data (maybe ImageNet) is opened."""
  import json

  from resnet_jax import evaluate

  run = tmp_path / 'run'
  run.mkdir()
  config = folder_config(None, name='imagenet2012').to_dict()
  (run / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ValueError, match='--dataset image_folder reads the tree at --data-dir ROOT'):
    evaluate.evaluate_workdir(str(run), split='v2', dataset='image_folder')


def test_a_tfds_run_on_its_test_split_extracted_as_numbered_folders(tmp_path):
  """A run trained on a TFDS dataset, evaluated on the same test images written out as folders
  named by their label (ImageNet-V2's layout, some classes absent): the same numbers as on
  TFDS, through `evaluate --dataset image_folder --data-dir`."""
  from absl import flags

  from resnet_jax import evaluate, train
  from resnet_jax.data import generated

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  tfds_dir = str(tmp_path / 'tfds')
  generated.prepare('tiny', tfds_dir)  # 5 classes of generated photo crops, no download
  config = folder_config(tfds_dir, name='generated_jpegs/tiny', eval_split='test')
  config.model.name, config.batch_size, config.eval_batch_size = 'resnet8', 4, 4
  config.num_train_steps, config.progress_bar, config.data.eval_crops = 1, False, 1
  run = str(tmp_path / 'run')
  train.train_and_evaluate(config, run)
  test = sources.open_split(config, 'test').records
  v2 = tmp_path / 'v2'
  for i in range(len(test)):
    folder = v2 / 'imagenetv2-format' / str(test[i]['label'])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f'{i}.jpeg').write_bytes(bytes(test[i]['image']))
  assert len(os.listdir(v2 / 'imagenetv2-format')) < 5
  own = evaluate.evaluate_workdir(run, split='test')
  split = 'imagenetv2-format'
  tree = evaluate.evaluate_workdir(run, split=split, dataset='image_folder', data_dir=str(v2))
  assert tree.pop('dataset') == 'image_folder' and tree.pop('split') == split
  own.pop('split')
  assert tree == own
