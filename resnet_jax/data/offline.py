"""Official archives a user already has, handed to TFDS's own builders in place of a download.

`local_downloads(name, paths, workdir)` maps each URL the TFDS builder of `name` downloads to a
local file; `offline_download_manager(builder, url_map)` makes the builder's download manager
return those files (still extracted by TFDS's own extractor) and refuse any other URL, so the
prepared dataset is what `tfds` would write from a download. The CIFAR python (pickle) archives,
which TFDS does not read, are rewritten losslessly into the binary layout its builder reads (same
bytes, same order)."""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import pickle
import struct
import tarfile
from typing import Any, Callable, Iterator, Sequence

import numpy as np


class PrepareError(ValueError):
  """Bad input to `prepare` (unknown name, missing or wrong archive): a one-line message."""


CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz'
CIFAR100_URL = 'https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz'
FASHION_URL = 'http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/'
IMAGENETTE_URL = 'https://s3.amazonaws.com/fast-ai-imageclas/'
REAL_LABELS_URL = (
  'https://raw.githubusercontent.com/google-research/reassessed-imagenet/master/real.json'
)
# IDX file -> (magic number, number of items) that TFDS's (fashion_)mnist builder reads exactly.
FASHION_FILES = {
  'train-images-idx3-ubyte': (2051, 60_000),
  'train-labels-idx1-ubyte': (2049, 60_000),
  't10k-images-idx3-ubyte': (2051, 10_000),
  't10k-labels-idx1-ubyte': (2049, 10_000),
}
# The CIFAR archives: python (pickle) member prefix -> binary layout written for TFDS.
_CIFAR = {
  'cifar10': dict(
    url=CIFAR10_URL,
    py='cifar-10-batches-py/',
    bin='cifar-10-batches-bin/',
    splits={f'data_batch_{i}': f'data_batch_{i}.bin' for i in range(1, 6)}
    | {'test_batch': 'test_batch.bin'},
    meta='batches.meta',
    names={'label_names': 'batches.meta.txt'},
    labels=(b'labels',),
  ),
  'cifar100': dict(
    url=CIFAR100_URL,
    py='cifar-100-python/',
    bin='cifar-100-binary/',
    splits={'train': 'train.bin', 'test': 'test.bin'},
    meta='meta',
    names={
      'coarse_label_names': 'coarse_label_names.txt',
      'fine_label_names': 'fine_label_names.txt',
    },
    labels=(b'coarse_labels', b'fine_labels'),
  ),
}
_NUMPY_GLOBALS = {
  ('numpy.core.multiarray', '_reconstruct'),
  ('numpy._core.multiarray', '_reconstruct'),
  ('numpy', 'ndarray'),
  ('numpy', 'dtype'),
  ('_codecs', 'encode'),
}


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles the CIFAR batches (dicts, lists, numpy arrays) and nothing that could run code."""

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in _NUMPY_GLOBALS:
      raise PrepareError(
        f'unexpected object {module}.{name} in a CIFAR pickle: not an official archive'
      )
    return super().find_class(module, name)


def _load_pickle(data: bytes, what: str) -> dict:
  try:
    return _ArrayUnpickler(io.BytesIO(data), encoding='bytes').load()
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
    if isinstance(e, PrepareError):
      raise
    raise PrepareError(f'{what} is not a CIFAR python batch ({type(e).__name__}: {e})') from e


def _open_tar(path: str) -> tarfile.TarFile:
  try:
    return tarfile.open(path)
  except (tarfile.TarError, OSError) as e:
    # tarfile's auto mode lists each compression it tried, one line each: one reason instead.
    tried = 'could not be opened successfully' in str(e)
    reason = 'not a gzip, bzip2, xz or plain tar file' if tried else ' '.join(str(e).split())
    raise PrepareError(f'{path} is not a readable tar archive ({reason})') from e


def _cifar_python_to_binary(name: str, src: str, out_dir: str) -> str:
  """Rewrites a cifar-10/100-python archive as the -binary tar TFDS's builder reads; returns it."""
  spec = _CIFAR[name]
  out = os.path.join(out_dir, os.path.basename(spec['url'])[: -len('.gz')])  # an uncompressed .tar
  with _open_tar(src) as tar, tarfile.open(out, 'w') as dst:

    def member(fname: str) -> bytes:
      try:
        f = tar.extractfile(spec['py'] + fname)
      except KeyError:
        f = None
      if f is None:
        raise PrepareError(
          f'{src} has no {spec["py"]}{fname}: not the official {name} python archive'
        )
      return f.read()

    def add(fname: str, payload: bytes) -> None:
      info = tarfile.TarInfo(spec['bin'] + fname)
      info.size, info.mode = len(payload), 0o644
      dst.addfile(info, io.BytesIO(payload))

    meta = _load_pickle(member(spec['meta']), f'{src}:{spec["meta"]}')
    for key, fname in spec['names'].items():
      names = meta.get(key.encode())
      if names is None:
        raise PrepareError(f'{src}:{spec["meta"]} has no {key!r}: not the official {name} archive')
      add(fname, ''.join(f'{n.decode() if isinstance(n, bytes) else n}\n' for n in names).encode())
    for py_name, bin_name in spec['splits'].items():
      batch = _load_pickle(member(py_name), f'{src}:{py_name}')
      data = np.asarray(batch.get(b'data'), dtype=np.uint8)
      labels = [np.asarray(batch.get(k, []), dtype=np.uint8) for k in spec['labels']]
      if data.ndim != 2 or data.shape[1] != 3072 or any(len(l) != len(data) for l in labels):
        raise PrepareError(
          f'{src}:{py_name}: expected data [N, 3072] and {len(labels)} label '
          f'list(s) of N, got data {data.shape}'
        )
      add(bin_name, np.concatenate([l[:, None] for l in labels] + [data], axis=1).tobytes())
  return out


def _cifar_archive(name: str, src: str, out_dir: str | None) -> str | None:
  """The binary archive for `name` from either official CIFAR archive (python or binary);
  `out_dir=None`: check the archive's layout only."""
  if not os.path.isfile(src):
    raise PrepareError(f'--from {src}: not a file (expected {_expected(name)})')
  spec = _CIFAR[name]
  with _open_tar(src) as tar:
    names = set(tar.getnames())
  if any(n.startswith(spec['bin']) for n in names):
    missing = [
      f
      for f in list(spec['splits'].values()) + list(spec['names'].values())
      if spec['bin'] + f not in names
    ]
    if missing:
      raise PrepareError(f'{src} lacks {spec["bin"]}{missing[0]}: not the official {name} archive')
    return src
  if any(n.startswith(spec['py']) for n in names):
    if out_dir is None:
      return None
    print(f'converting {os.path.basename(src)} (python pickles) to the binary layout TFDS reads')
    return _cifar_python_to_binary(name, src, out_dir)
  raise PrepareError(
    f'{src} holds neither {spec["py"]} nor {spec["bin"]}: expected {_expected(name)}'
  )


# The datasets whose official archives `prepare --from` converts offline (imagenet2012_real takes
# ReaL's real.json beside the val tar; imagenet2012 its tars from --manual_dir).
FROM_ARCHIVES = ('cifar10', 'cifar100', 'fashion_mnist', 'imagenette')


def _expected(name: str) -> str:
  return {
    'cifar10': 'cifar-10-python.tar.gz or cifar-10-binary.tar.gz',
    'cifar100': 'cifar-100-python.tar.gz or cifar-100-binary.tar.gz',
    'fashion_mnist': 'the four Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, '
    'train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, '
    't10k-labels-idx1-ubyte.gz) or the directory holding them',
    'imagenette': 'an imagenette2.tgz / imagenette2-320.tgz / imagenette2-160.tgz archive',
    'imagenet2012_real': "ReaL's real.json (github.com/google-research/reassessed-imagenet), "
    'with ILSVRC2012_img_val.tar in --manual_dir',
  }[name]


def _check_real_labels(path: str) -> None:
  """real.json: one list of ImageNet class indices (0-999) per validation image, in file order."""
  import json  # pylint: disable=import-outside-toplevel

  try:
    with open(path, encoding='utf-8') as f:
      labels = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise PrepareError(f'--from {path}: not JSON ({e}): expected {_expected("imagenet2012_real")}')
  bad = not isinstance(labels, list) or not labels
  if not bad:
    bad = not all(
      isinstance(entry, list) and all(type(c) is int and 0 <= c < 1000 for c in entry)  # noqa: E721
      for entry in labels
    )
  if bad:
    raise PrepareError(
      f'--from {path}: not a list of label lists (class indices 0-999, one list per validation '
      f'image): expected {_expected("imagenet2012_real")}'
    )


def check_real_labels_cover(path: str, val_tar: str) -> None:
  """real.json has one label list per image of ``val_tar``: TFDS's builder looks each image up by
  its index, so a shorter file failed mid-build with a bare KeyError, a longer one went unseen."""
  import json  # pylint: disable=import-outside-toplevel

  with open(path, encoding='utf-8') as f:  # read and checked by _check_real_labels already
    count = len(json.load(f))
  try:
    with tarfile.open(val_tar) as tar:
      images = sum(1 for member in tar if member.isfile())
  except (OSError, tarfile.TarError) as e:
    raise PrepareError(f'{val_tar} is not a readable tar archive ({e})') from None
  if count != images:
    raise PrepareError(
      f'--from {path} has {count:,} label lists but {val_tar} holds {images:,} validation '
      f'images: expected one list per image ({_expected("imagenet2012_real")})'
    )


def _idx_header(path: str) -> tuple[int, int]:
  opener: Callable[..., Any] = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      magic, count = struct.unpack('>II', f.read(8))
  except (OSError, EOFError, struct.error) as e:
    raise PrepareError(f'{path} is not an IDX file ({e})') from e
  return magic, count


def _fashion_files(paths: Sequence[str]) -> dict[str, str]:
  """URL -> local IDX file (gzipped or not) for the four Fashion-MNIST files, headers checked."""
  found: dict[str, str] = {}
  for p in paths:
    candidates = [os.path.join(p, f) for f in sorted(os.listdir(p))] if os.path.isdir(p) else [p]
    if not os.path.exists(p):
      raise PrepareError(
        f'--from {p}: no such file or directory (expected {_expected("fashion_mnist")})'
      )
    for c in candidates:
      base = os.path.basename(c)
      stem = base[:-3] if base.endswith('.gz') else base
      if stem in FASHION_FILES and (stem not in found or c.endswith('.gz')):
        found[stem] = c
  missing = [f'{s}.gz' for s in FASHION_FILES if s not in found]
  if missing:
    raise PrepareError(
      f'--from {", ".join(paths)}: {missing[0]} not found (expected {_expected("fashion_mnist")})'
    )
  for stem, (magic, count) in FASHION_FILES.items():
    got_magic, got_count = _idx_header(found[stem])
    if got_magic != magic or got_count != count:
      raise PrepareError(
        f'{found[stem]}: IDX header says magic {got_magic}, {got_count} items; '
        f"TFDS's fashion_mnist builder reads the official file (magic {magic}, "
        f'{count} items)'
      )
  return {FASHION_URL + stem + '.gz': path for stem, path in found.items()}


def imagenette_config(paths: Sequence[str]) -> str | None:
  """The imagenette builder config ('full-size-v2', '320px-v2', ...) an archive name implies."""
  if not paths:
    return None
  base = os.path.basename(paths[0].rstrip('/'))
  for suffix, config in (('-320.tgz', '320px'), ('-160.tgz', '160px'), ('.tgz', 'full-size')):
    if base.endswith(suffix):
      return config + ('-v2' if base.startswith('imagenette2') else '')
  raise PrepareError(f'--from {paths[0]}: expected {_expected("imagenette")}')


def local_downloads(name: str, paths: Sequence[str], out_dir: str | None) -> dict[str, str] | None:
  """URL -> local file for the official archive(s) in `paths` (a converted copy under `out_dir`).

  With `out_dir=None` it only checks the archives (layout, headers) and converts nothing: the
  check that runs before TensorFlow is imported, so a wrong archive fails in a second.
  """
  if name in _CIFAR:
    if len(paths) != 1:
      raise PrepareError(f'{name}: --from takes one archive ({_expected(name)})')
    archive = _cifar_archive(name, paths[0], out_dir)
    return None if archive is None else {_CIFAR[name]['url']: archive}
  if name == 'fashion_mnist':
    return _fashion_files(paths)
  if name == 'imagenette':
    if len(paths) != 1 or not os.path.isfile(paths[0]):
      raise PrepareError(f'--from {", ".join(paths)}: expected one file, {_expected(name)}')
    return {IMAGENETTE_URL + os.path.basename(paths[0]): paths[0]}
  if name == 'imagenet2012_real':
    if len(paths) != 1 or not os.path.isfile(paths[0]):
      raise PrepareError(f'--from {", ".join(paths)}: expected one file, {_expected(name)}')
    _check_real_labels(paths[0])
    return {REAL_LABELS_URL: paths[0]}
  raise PrepareError(
    f'{name}: --from is not supported (it takes {", ".join(FROM_ARCHIVES)} archives and '
    "imagenet2012_real's real.json; imagenet2012 reads its tars from --manual_dir)"
  )


def _map_tree(fn: Callable[[Any], Any], tree: Any) -> Any:
  if isinstance(tree, dict):
    return {k: _map_tree(fn, v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return type(tree)(_map_tree(fn, v) for v in tree)
  return fn(tree)


@contextlib.contextmanager
def offline_download_manager(
  builder: Any, url_map: dict[str, str], report: Callable[[str], None] = print
) -> Iterator[None]:
  """While active, `builder`'s download manager serves `url_map` and refuses any other URL.

  The files still go through TFDS's extractor (`dl_manager.extract`), and their checksums are
  compared with the ones TFDS registers for the URL (reported, not enforced: a repackaged archive,
  e.g. Debian's recompressed Fashion-MNIST, has the same content in a different wrapper).
  """
  from tensorflow_datasets.core.download import checksums  # pylint: disable=g-import-not-at-top

  make = builder._make_download_manager  # pylint: disable=protected-access

  def make_offline(*args: Any, **kwargs: Any) -> Any:
    manager = make(*args, **kwargs)
    registered = getattr(manager, '_url_infos', {})

    def local(url: Any) -> str:
      url = getattr(url, 'url', url)
      if url not in url_map:
        raise PrepareError(
          f'{builder.name} wants {url}, which the --from archive(s) do not provide'
        )
      path = url_map[url]
      expected = registered.get(url)
      if expected is not None:
        got = checksums.compute_url_info(path).checksum
        if got == expected.checksum:
          report(f'{os.path.basename(path)}: sha256 matches the official download ({url})')
        else:
          report(
            f'{os.path.basename(path)}: sha256 differs from the official download ({url}): a '
            'repackaged copy (e.g. Debian recompresses), or not the official file'
          )
      return path

    manager.download = lambda urls: _map_tree(local, urls)
    manager.download_and_extract = lambda urls: manager.extract(manager.download(urls))
    return manager

  builder._make_download_manager = make_offline  # pylint: disable=protected-access
  try:
    yield
  finally:
    del builder._make_download_manager  # pylint: disable=protected-access
