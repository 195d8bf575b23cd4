"""Miniature archives in the exact layouts of the official downloads (CIFAR, ImageNet, IDX).

Only the number of examples is small: file names, member paths, pickle keys, binary records and IDX
headers are those of the files users download, so `prepare` and TFDS's builders read them as they
read the real ones.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile

import numpy as np
from PIL import Image

CIFAR10_NAMES = [
  'airplane',
  'automobile',
  'bird',
  'cat',
  'deer',
  'dog',
  'frog',
  'horse',
  'ship',
  'truck',
]


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size, info.mode = len(payload), 0o644
  tar.addfile(info, io.BytesIO(payload))


def cifar_arrays(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(data [n, 3072] uint8 as CIFAR rows: R, G, B planes; fine labels; coarse labels)."""
  rng = np.random.default_rng(seed)
  data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
  labels = np.arange(n) % classes  # every class present
  rng.shuffle(labels)
  return data, labels.astype(np.int64), (labels // 5).astype(np.int64)


def write_cifar10_python(path: str, per_batch: int = 4, test: int = 6) -> dict[str, tuple]:
  """cifar-10-python.tar.gz: cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}."""
  out = {}
  with tarfile.open(path, 'w:gz') as tar:
    meta = {
      b'num_cases_per_batch': per_batch,
      b'label_names': [n.encode() for n in CIFAR10_NAMES],
      b'num_vis': 3072,
    }
    _add(tar, 'cifar-10-batches-py/batches.meta', pickle.dumps(meta, protocol=2))
    for i, name in enumerate([f'data_batch_{k}' for k in range(1, 6)] + ['test_batch']):
      n = test if name == 'test_batch' else per_batch
      data, labels, _ = cifar_arrays(n, 10, seed=i)
      batch = {
        b'batch_label': f'{name} of 6'.encode(),
        b'labels': [int(l) for l in labels],
        b'data': data,
        b'filenames': [f'img_{i}_{j}.png'.encode() for j in range(n)],
      }
      _add(tar, f'cifar-10-batches-py/{name}', pickle.dumps(batch, protocol=2))
      out[name] = (data, labels)
    _add(tar, 'cifar-10-batches-py/readme.html', b'<html></html>')
  return out


def write_cifar10_binary(path: str, per_batch: int = 4, test: int = 6) -> dict[str, tuple]:
  """cifar-10-binary.tar.gz: cifar-10-batches-bin/*.bin records of <label byte><3072 bytes>."""
  out = {}
  with tarfile.open(path, 'w:gz') as tar:
    _add(tar, 'cifar-10-batches-bin/batches.meta.txt', ('\n'.join(CIFAR10_NAMES) + '\n\n').encode())
    for i, name in enumerate([f'data_batch_{k}' for k in range(1, 6)] + ['test_batch']):
      n = test if name == 'test_batch' else per_batch
      data, labels, _ = cifar_arrays(n, 10, seed=i)
      records = np.concatenate([labels.astype(np.uint8)[:, None], data], axis=1)
      _add(tar, f'cifar-10-batches-bin/{name}.bin', records.tobytes())
      out[name] = (data, labels)
  return out


def write_cifar100_python(path: str, train: int = 200, test: int = 100) -> dict[str, tuple]:
  """cifar-100-python.tar.gz: cifar-100-python/{train,test,meta} with fine and coarse labels."""
  out = {}
  with tarfile.open(path, 'w:gz') as tar:
    meta = {
      b'fine_label_names': [f'fine{i}'.encode() for i in range(100)],
      b'coarse_label_names': [f'coarse{i}'.encode() for i in range(20)],
    }
    _add(tar, 'cifar-100-python/meta', pickle.dumps(meta, protocol=2))
    for i, (name, n) in enumerate((('train', train), ('test', test))):
      data, fine, coarse = cifar_arrays(n, 100, seed=10 + i)
      batch = {
        b'filenames': [b'x.png'] * n,
        b'batch_label': name.encode(),
        b'fine_labels': [int(l) for l in fine],
        b'coarse_labels': [int(l) for l in coarse],
        b'data': data,
      }
      _add(tar, f'cifar-100-python/{name}', pickle.dumps(batch, protocol=2))
      out[name] = (data, fine, coarse)
  return out


def write_idx(directory: str, train: int, test: int) -> None:
  """The four Fashion-MNIST IDX .gz files (magic, counts, 28x28), with `train`/`test` items."""
  rng = np.random.default_rng(0)
  for prefix, n in (('train', train), ('t10k', test)):
    with gzip.open(os.path.join(directory, f'{prefix}-images-idx3-ubyte.gz'), 'wb') as f:
      pixels = rng.integers(0, 256, n * 784, np.uint8).tobytes()
      f.write(struct.pack('>IIII', 2051, n, 28, 28) + pixels)
    with gzip.open(os.path.join(directory, f'{prefix}-labels-idx1-ubyte.gz'), 'wb') as f:
      f.write(struct.pack('>II', 2049, n) + (np.arange(n) % 10).astype(np.uint8).tobytes())


def _jpeg(rng: np.random.Generator, mode: str, size: tuple[int, int], fmt: str = 'JPEG') -> bytes:
  w, h = size
  channels = {'L': 1, 'RGB': 3, 'CMYK': 4}[mode]
  pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
  img = Image.fromarray(pixels[..., 0] if mode == 'L' else pixels, mode=mode)
  buf = io.BytesIO()
  img.save(buf, format=fmt)
  return buf.getvalue()


def imagenet_validation_labels(n: int) -> list[str]:
  """Synsets of ILSVRC2012_val_00000001..n, from the labels file TFDS's builder ships and reads."""
  import tensorflow_datasets as tfds

  path = tfds.core.tfds_path('datasets/imagenet2012/validation_labels.txt')
  return path.read_text().split()[:n]


def write_imagenet(manual_dir: str, num_val: int = 6, per_synset: int = 2) -> dict[str, list]:
  """ILSVRC2012_img_train.tar (per-synset tars) and ILSVRC2012_img_val.tar (first `num_val` images).

  Images have varied sizes; some are grayscale; one is a CMYK JPEG and one a PNG disguised as
  .JPEG under names TFDS's builder lists (it converts those two to RGB JPEG, as in the real data).
  """
  rng = np.random.default_rng(0)
  val_labels = imagenet_validation_labels(num_val)
  synsets = sorted(set(val_labels) | {'n01739381', 'n02105855'})
  special = {'n01739381_1309.JPEG': ('CMYK', 'JPEG'), 'n02105855_2933.JPEG': ('RGB', 'PNG')}
  sizes = [(40, 30), (31, 52), (64, 64), (50, 37), (33, 33)]
  train_files = []
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_train.tar'), 'w') as outer:
    for s_index, synset in enumerate(synsets):
      inner_buf = io.BytesIO()
      with tarfile.open(fileobj=inner_buf, mode='w') as inner:
        names = [f'{synset}_{1000 + k}.JPEG' for k in range(per_synset)]
        names += [n for n in special if n.startswith(synset)]
        for k, fname in enumerate(names):
          mode, fmt = special.get(fname, ('L' if (s_index + k) % 3 == 0 else 'RGB', 'JPEG'))
          _add(inner, fname, _jpeg(rng, mode, sizes[(s_index + k) % len(sizes)], fmt))
          train_files.append((fname, synset))
      _add(outer, f'{synset}.tar', inner_buf.getvalue())
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_val.tar'), 'w') as tar:
    for i in range(num_val):
      mode = 'L' if i % 4 == 1 else 'RGB'
      _add(tar, f'ILSVRC2012_val_{i + 1:08d}.JPEG', _jpeg(rng, mode, sizes[i % len(sizes)]))
  return {'train': train_files, 'validation': val_labels, 'synsets': synsets}
