"""The file index of an image tree's split, and where derived data of trees is cached.

Listing 1.28M files on a network file system takes minutes and the tree may be read-only, so
the index (classes, every image in torchvision's order, each directory with its modification
time) is cached in a user cache directory (`$RESNET_JAX_CACHE_DIR`, else
`$XDG_CACHE_HOME/resnet_jax`, else `~/.cache/resnet_jax`) keyed by the tree's real path, and used
again while the modification times of every directory it listed are unchanged (adding, removing
or renaming a file changes its directory's).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from typing import Any

import numpy as np

from resnet_jax.workdir import write_atomic

CACHE_DIR_NAME = 'image_folder'  # under cache_root(): indexes and statistics of trees
# torchvision.datasets.folder.IMG_EXTENSIONS, compared case-insensitively as torchvision does.
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
INDEX_VERSION = 2
MEMORY: dict[str, dict[str, np.ndarray]] = {}  # split dir -> index, revalidated on every open


def cache_root() -> str:
  """Where derived data of image trees goes (never into the tree itself)."""
  explicit = os.environ.get('RESNET_JAX_CACHE_DIR')
  if explicit:
    return os.path.expanduser(explicit)
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'resnet_jax')


def digest(*parts: Any) -> str:
  h = hashlib.sha256()
  for part in parts:
    h.update(part.tobytes() if isinstance(part, np.ndarray) else str(part).encode())
    h.update(b'\0')
  return h.hexdigest()[:16]


def subdirectories(directory: str) -> list[str]:
  """Sorted names of the subdirectories (symlinks to directories count), as `find_classes`."""
  return sorted(e.name for e in os.scandir(directory) if e.is_dir())


def _walk(class_dir: str) -> tuple[list[tuple[str, list[str]]], list[str], list[int]]:
  """([(dir, sorted image names)] sorted by dir, every dir listed, its mtime before listing)."""
  found, dirs, mtimes, seen = [], [], [], set()
  stack = [class_dir]
  while stack:
    directory = stack.pop()
    st = os.stat(directory)
    if (st.st_dev, st.st_ino) in seen:  # a symlink loop: torchvision's os.walk would not end
      continue
    seen.add((st.st_dev, st.st_ino))
    dirs.append(directory)
    mtimes.append(st.st_mtime_ns)
    names = []
    with os.scandir(directory) as entries:
      for entry in entries:
        if entry.is_dir():
          stack.append(entry.path)
        elif entry.name.lower().endswith(IMG_EXTENSIONS):
          names.append(entry.name)
    found.append((directory, sorted(names)))
  return sorted(found), dirs, mtimes


def scan(split_dir: str) -> dict[str, np.ndarray]:
  """The index of one split: its classes, every image (class, path under the class directory)
  in torchvision's order, and each directory listed with its modification time."""
  classes = subdirectories(split_dir)
  names, labels, dirs, mtimes = [], [], [split_dir], [os.stat(split_dir).st_mtime_ns]
  for label, name in enumerate(classes):
    class_dir = os.path.join(split_dir, name)
    found, class_dirs, class_mtimes = _walk(class_dir)
    dirs += class_dirs
    mtimes += class_mtimes
    before = len(names)
    for directory, files in found:
      prefix = os.path.relpath(directory, class_dir)
      names += [f if prefix == '.' else os.path.join(prefix, f) for f in files]
    labels += [label] * (len(names) - before)
  encoded = [n.encode('utf-8', 'surrogateescape') for n in names]
  index = {
    'version': np.int64(INDEX_VERSION),
    'classes': np.asarray(classes, dtype=str),
    'blob': np.frombuffer(b''.join(encoded), np.uint8),
    'ends': np.cumsum([len(e) for e in encoded], dtype=np.int64),
    'labels': np.asarray(labels, np.int32),
    'dirs': np.asarray([os.path.relpath(d, split_dir) for d in dirs], dtype=str),
    'mtimes': np.asarray(mtimes, np.int64),
  }
  files = digest(*(index[k] for k in ('classes', 'blob', 'ends', 'labels')))
  return {**index, 'files': np.asarray(files)}


def _still_valid(index: dict[str, np.ndarray], split_dir: str) -> bool:
  if int(index.get('version', -1)) != INDEX_VERSION:
    return False
  try:
    now = [os.stat(os.path.join(split_dir, str(d))).st_mtime_ns for d in index['dirs']]
  except OSError:
    return False
  return np.array_equal(np.asarray(now, np.int64), index['mtimes'])


def cached_scan(split_dir: str) -> dict[str, np.ndarray]:
  """`scan(split_dir)`, from memory or the user cache while no listed directory changed."""
  real = os.path.realpath(split_dir)
  path = os.path.join(cache_root(), CACHE_DIR_NAME, f'index-{digest(real)}.npz')
  index = MEMORY.get(real)
  if index is None and os.path.exists(path):
    try:
      with np.load(path) as f:
        index = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError) as e:  # truncated, or another version: scan again
      logging.warning('ignoring unreadable image folder index %s: %s', path, e)
  if index is not None and _still_valid(index, real):
    MEMORY[real] = index
    return index
  index = scan(real)
  MEMORY[real] = index
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **index)
    write_atomic(path, buffer.getvalue())
  except OSError as e:  # an unwritable cache: scan again next time
    logging.info('could not cache the image folder index in %s: %s', path, e)
  return index
