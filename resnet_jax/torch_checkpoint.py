"""Read PyTorch ``.pth`` weight files without torch, and without running any code they contain.

``torch.save`` pickles the object (for weights, a ``state_dict``: an ``OrderedDict`` of name ->
tensor) and keeps each tensor's storage as raw bytes beside the pickle. Two layouts exist:

- the zip archive (torch >= 1.6, every current torchvision file): ``<name>/data.pkl`` (the pickle),
  ``<name>/data/<key>`` (one record of raw bytes per storage), ``<name>/byteorder`` (``little`` or
  ``big``; absent in files from before torch 2.1, which means little) and a few version records;
- the legacy stream (torch < 1.6, or ``_use_new_zipfile_serialization=False``): five pickles in a
  row (a magic number, the protocol version 1001, a ``sys_info`` dict, the object, the list of
  storage keys), then each storage as an int64 element count and its bytes, always little-endian.

In both, a tensor is pickled as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
requires_grad, backward_hooks)`` and a storage is a persistent id
``('storage', torch.<Type>Storage, key, location, numel[, view_metadata])``. The unpickler here
resolves only those names (plus ``collections.OrderedDict``, ``_rebuild_parameter`` and the
storage types), each to a function of this module that builds a numpy array: any other global, a
class that would run code (``os.system``, ``builtins.eval``, a pickled ``nn.Module``) is refused
with one error before anything is called. Tensors come back as numpy arrays of their own dtype
(float32/64, float16, bfloat16 via ml_dtypes, int8..int64, uint8, bool), honouring the storage
offset, size and stride (views and non-contiguous tensors) and the file's byte order.
"""

from __future__ import annotations

import collections
import contextvars
import io
import pickle
import struct
import sys
import zipfile
from typing import Any, Callable, NamedTuple

import ml_dtypes
import numpy as np

# torch.<Name>Storage -> element dtype (torch.UntypedStorage holds raw bytes).
STORAGE_DTYPES = {
  'FloatStorage': np.dtype(np.float32),
  'DoubleStorage': np.dtype(np.float64),
  'HalfStorage': np.dtype(np.float16),
  'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
  'LongStorage': np.dtype(np.int64),
  'IntStorage': np.dtype(np.int32),
  'ShortStorage': np.dtype(np.int16),
  'CharStorage': np.dtype(np.int8),
  'ByteStorage': np.dtype(np.uint8),
  'BoolStorage': np.dtype(np.bool_),
  'UntypedStorage': np.dtype(np.uint8),
}
# A tensor may hold more elements than its storage only by repeating it (stride 0, `expand`):
# allowed up to this many more, so a crafted file cannot make the reader allocate without bound;
# and up to MAX_REPEATED_PER_FILE more in all the tensors of one file together (many expands of
# one small storage, each under the first limit, add up).
MAX_REPEATED_ELEMENTS = 2**24
MAX_REPEATED_PER_FILE = 2**27  # 512 MiB of float32
# What is left of MAX_REPEATED_ELEMENTS in the pickle being read (``_pickle_at`` sets it).
_repeat_budget: contextvars.ContextVar[list[int]] = contextvars.ContextVar('_repeat_budget')
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # torch/serialization.py's MAGIC_NUMBER
LEGACY_PROTOCOL_VERSION = 1001
TORCHSCRIPT_HINT = (
  'a TorchScript archive (torch.jit.save), not a state_dict: '
  'save model.state_dict() with torch.save instead'
)


class CheckpointError(ValueError):
  """A file this reader refuses (unsafe, damaged, or not a weights file); the message says why."""


class StorageType(NamedTuple):
  """What ``torch.<Name>Storage`` unpickles to: only its element dtype matters here."""

  name: str
  dtype: np.dtype


def _rebuild_tensor_v2(
  storage: np.ndarray,
  storage_offset: int,
  size: tuple,
  stride: tuple,
  requires_grad: Any = False,
  backward_hooks: Any = None,
  metadata: Any = None,
) -> np.ndarray:
  """torch's tensor constructor, checked: the view must lie inside its storage."""
  del requires_grad, backward_hooks, metadata  # no effect on the values
  if not isinstance(storage, np.ndarray) or storage.ndim != 1:
    raise CheckpointError(f'a tensor is built from {type(storage).__name__}, not a storage')
  size, stride = tuple(size), tuple(stride)
  ints = [storage_offset, *size, *stride]
  if len(size) != len(stride) or not all(type(v) is int and v >= 0 for v in ints):
    raise CheckpointError(
      f'bad tensor geometry: offset {storage_offset}, size {size}, stride {stride}'
    )
  if 0 in size:
    return np.zeros(size, storage.dtype)
  numel = int(np.prod(size, dtype=object))
  if numel > storage.size + MAX_REPEATED_ELEMENTS:
    raise CheckpointError(
      f'a tensor of size {size}, stride {stride} repeats its storage of {storage.size} elements '
      f'into {numel * storage.itemsize / 2**20:,.0f} MiB (stride 0): weights never do; refused'
    )
  budget = _repeat_budget.get([MAX_REPEATED_PER_FILE])
  budget[0] -= max(numel - storage.size, 0)
  if budget[0] < 0:
    raise CheckpointError(
      f'its tensors repeat their storages (stride 0) into more than {MAX_REPEATED_PER_FILE:,} '
      'extra elements in all: weights never do; refused'
    )
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise CheckpointError(
      f'a tensor of size {size}, stride {stride} at offset {storage_offset} reads past its '
      f'storage of {storage.size} elements (a damaged file)'
    )
  view = np.lib.stride_tricks.as_strided(
    storage[storage_offset:],
    shape=size,
    strides=[s * storage.itemsize for s in stride],
    writeable=False,
  )
  return np.array(view, order='C')  # an own, contiguous copy


def _rebuild_parameter(
  data: np.ndarray, requires_grad: Any, backward_hooks: Any, state: Any = None
) -> np.ndarray:
  """``nn.Parameter``: the tensor itself (gradient flags and attributes carry no values)."""
  del requires_grad, backward_hooks, state
  if not isinstance(data, np.ndarray):
    raise CheckpointError(f'a parameter wraps {type(data).__name__}, not a tensor')
  return data


class _Frozen(type):
  """The metaclass of the placeholder classes below: pickle's BUILD cannot set a class's
  attributes, so a crafted file cannot change the placeholder that later loads use."""

  def __setattr__(cls, name: str, value: Any) -> None:
    raise AttributeError(f'{name}: read-only')


class Namespace(metaclass=_Frozen):
  """What ``argparse.Namespace`` unpickles to: a training checkpoint's ``args`` (torchvision's
  reference trainer and timm's ``train.py`` save them beside the weights). Its values are kept
  as a dict; nothing of argparse is imported or called."""

  __slots__ = ('values',)

  def __setstate__(self, state: Any) -> None:
    if not isinstance(state, dict):
      raise CheckpointError(f'argparse.Namespace with state {type(state).__name__}')
    object.__setattr__(self, 'values', dict(state))


def _ordered_dict(*args: Any) -> collections.OrderedDict:
  if args and not isinstance(args[0], (list, tuple, dict)):
    raise CheckpointError(f'OrderedDict of {type(args[0]).__name__}')
  return collections.OrderedDict(*args[:1])


class _Sealed:
  """A resolved global: calls ``fn`` and has nothing pickle's BUILD could set (no ``__dict__``,
  no settable attribute), so a crafted file cannot change, say, a function's ``__defaults__``."""

  __slots__ = ('_fn',)

  def __init__(self, fn: Callable[..., Any]):
    object.__setattr__(self, '_fn', fn)

  def __setattr__(self, name: str, value: Any) -> None:
    raise AttributeError(f'{name}: read-only')

  def __call__(self, *args: Any) -> Any:
    return self._fn(*args)


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
  ('collections', 'OrderedDict'): _Sealed(_ordered_dict),
  ('torch._utils', '_rebuild_tensor_v2'): _Sealed(_rebuild_tensor_v2),
  ('torch._utils', '_rebuild_parameter'): _Sealed(_rebuild_parameter),
  ('torch._utils', '_rebuild_parameter_with_state'): _Sealed(_rebuild_parameter),
  ('argparse', 'Namespace'): Namespace,
  **{('torch', name): StorageType(name, dtype) for name, dtype in STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only ``ALLOWED_GLOBALS`` (to this module's own functions); refuses the rest."""

  def __init__(self, stream: io.BytesIO, persistent_load: Callable[[Any], Any]):
    super().__init__(stream, encoding='utf-8')
    self._persistent_load = persistent_load

  def find_class(self, module: str, name: str) -> Any:
    found = ALLOWED_GLOBALS.get((module, name))
    if found is None:
      raise CheckpointError(
        f'it references {module}.{name}, which a weights-only state_dict never needs '
        '(torch.load without weights_only could run code from this file): refused unread'
      )
    return found

  def persistent_load(self, pid: Any) -> Any:
    return self._persistent_load(pid)


def _parse_storage_id(pid: Any) -> tuple[np.dtype, str, int, Any]:
  """('storage', StorageType, key, location, numel[, view_metadata]) -> (dtype, key, numel,
  view_metadata); raises for anything else (a legacy pickled module's source, say)."""
  if not isinstance(pid, tuple) or not pid or pid[0] not in ('storage', b'storage'):
    kind = pid[0] if isinstance(pid, tuple) and pid else type(pid).__name__
    raise CheckpointError(
      f'it holds a persistent object of kind {kind!r}, not a storage '
      '(a pickled module rather than a state_dict?)'
    )
  if len(pid) not in (5, 6) or not isinstance(pid[1], StorageType):
    raise CheckpointError(f'malformed storage reference {pid[:4]!r}')
  key, numel = pid[2], pid[4]
  if isinstance(key, bytes):
    key = key.decode('ascii')
  if not isinstance(key, str) or type(numel) is not int or numel < 0:
    raise CheckpointError(f'malformed storage reference {pid[:5]!r}')
  return pid[1].dtype, key, numel, pid[5] if len(pid) == 6 else None


def _to_native(raw: bytes, dtype: np.dtype, big_endian: bool) -> np.ndarray:
  """Raw storage bytes as a 1-D array of ``dtype`` in this machine's byte order."""
  if dtype.itemsize > 1 and big_endian != (sys.byteorder == 'big'):
    swapped = np.frombuffer(raw, np.dtype(f'u{dtype.itemsize}')).byteswap()
    return swapped.view(dtype)
  return np.frombuffer(raw, dtype)


def _load_zip(archive: zipfile.ZipFile) -> Any:
  names = archive.namelist()
  pickles = [n for n in names if n.endswith('/data.pkl') and n.count('/') == 1]
  if any(n.endswith('/constants.pkl') or '/code/' in n for n in names):
    raise CheckpointError(TORCHSCRIPT_HINT)
  if len(pickles) != 1:
    raise CheckpointError('a zip file without the one <name>/data.pkl of torch.save')
  prefix = pickles[0][: -len('data.pkl')]
  byteorder = b'little'
  if f'{prefix}byteorder' in names:
    byteorder = archive.read(f'{prefix}byteorder').strip()
    if byteorder not in (b'little', b'big'):
      raise CheckpointError(f'unknown byteorder {byteorder[:20]!r}')
  storages: dict[str, np.ndarray] = {}

  def persistent_load(pid: Any) -> np.ndarray:
    dtype, key, numel, _ = _parse_storage_id(pid)
    if key not in storages:
      name, nbytes = f'{prefix}data/{key}', numel * dtype.itemsize
      try:
        info = archive.getinfo(name)
      except KeyError:
        raise CheckpointError(f'its storage record {name} is missing') from None
      if info.file_size < nbytes:  # checked before reading: no zip bomb is inflated
        raise CheckpointError(
          f'its storage record {name} has {info.file_size} bytes, {nbytes} expected (truncated)'
        )
      with archive.open(info) as f:
        raw = f.read(nbytes)
      storages[key] = _to_native(raw, dtype, byteorder == b'big')
    elif storages[key].dtype != dtype:
      raise CheckpointError(f'storage {key} is read as two dtypes')
    return storages[key]

  return _pickle_at(io.BytesIO(archive.read(pickles[0])), persistent_load)


def _no_persistent(pid: Any) -> Any:
  del pid
  raise CheckpointError('unexpected persistent object in a header pickle')


def _pickle_at(stream: io.BytesIO, persistent_load: Callable[[Any], Any]) -> Any:
  """Unpickles the object that starts at ``stream``'s position and moves past it."""
  token = _repeat_budget.set([MAX_REPEATED_PER_FILE])  # one budget for all its tensors
  try:
    return _RestrictedUnpickler(stream, persistent_load).load()
  except CheckpointError:
    raise
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f'its pickle is damaged ({type(e).__name__}: {e})') from None
  finally:
    _repeat_budget.reset(token)


def _load_legacy(data: bytes) -> Any:
  stream = io.BytesIO(data)
  if _pickle_at(stream, _no_persistent) != LEGACY_MAGIC_NUMBER:
    raise CheckpointError("not a torch.save file (a pickle without torch's magic number)")
  version = _pickle_at(stream, _no_persistent)
  if version != LEGACY_PROTOCOL_VERSION:
    raise CheckpointError(f'unknown legacy torch.save protocol {version!r}')
  _pickle_at(stream, _no_persistent)  # sys_info: the writer's byte order and type sizes
  # Tensors are built (copied) while unpickling, but the storages follow the object: a first pass
  # learns each storage's dtype and size, a second one builds the tensors from the read storages.
  start = stream.tell()
  storages: dict[str, np.ndarray] = {}

  def persistent_load(pid: Any) -> np.ndarray:
    dtype, key, numel, view = _parse_storage_id(pid)
    if key not in storages and numel * dtype.itemsize > len(data):
      raise CheckpointError(f'storage {key} of {numel} elements is larger than the file')
    root = storages.setdefault(key, np.zeros(numel, dtype))
    if root.dtype != dtype or root.size != numel:
      raise CheckpointError(f'storage {key} is read as two dtypes or sizes')
    if view is None:
      return root
    _, offset, length = view  # a view of part of the root storage (torch < 0.4 files)
    if not (
      type(offset) is int and type(length) is int and 0 <= offset <= offset + length <= numel
    ):
      raise CheckpointError(f'bad storage view {view!r}')
    return root[offset : offset + length]

  _pickle_at(stream, persistent_load)
  keys = _pickle_at(stream, _no_persistent)
  if not isinstance(keys, list) or set(keys) != set(storages):
    raise CheckpointError('its storage list does not match the storages its tensors use')
  for key in keys:
    root = storages[key]
    header = stream.read(8)
    stored = struct.unpack('<q', header)[0] if len(header) == 8 else -1
    raw = stream.read(root.nbytes)
    if stored != root.size or len(raw) != root.nbytes:
      raise CheckpointError(f'storage {key} is truncated or has the wrong size')
    root[:] = _to_native(raw, root.dtype, big_endian=False)  # legacy data are always little-endian
  stream.seek(start)
  result = _pickle_at(stream, persistent_load)
  return result


def load(path: str) -> Any:
  """The object a ``.pth`` file holds, tensors as numpy arrays; raises ``CheckpointError`` (a
  ``ValueError`` whose message starts with ``path``) for a file it cannot or will not read."""
  try:
    with open(path, 'rb') as f:
      head = f.read(512)
      if zipfile.is_zipfile(f):
        with zipfile.ZipFile(f) as archive:
          return _load_zip(archive)
      if len(head) >= 262 and head[257:262] == b'ustar':
        raise CheckpointError(
          'a tar archive (torch < 0.4 wrote these): load it with torch.load and re-save its '
          'state_dict with a current torch.save'
        )
      if head.startswith(b'PK\x03\x04'):  # a zip's first entry, but no central directory
        raise CheckpointError(
          'a truncated or damaged zip archive (its end, the central directory, is missing): '
          'an interrupted download or copy? fetch the file again'
        )
      if head.startswith(b'version https://git-lfs'):
        raise CheckpointError(
          'a Git LFS pointer, not the weights: fetch the file itself (git lfs pull, or the '
          "hub's download link)"
        )
      if head.lstrip()[:1] == b'<':
        raise CheckpointError('an HTML or XML page, not weights: did a download return a web page?')
      if not head.startswith(b'\x80'):
        raise CheckpointError(
          'not a torch.save file (neither a zip archive nor a pickle), nor a safetensors file'
        )
      f.seek(0)
      return _load_legacy(f.read())
  except FileNotFoundError:
    raise CheckpointError(f'{path}: no such file') from None
  except CheckpointError as e:
    raise CheckpointError(f'{path}: {e}') from None
  except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
    raise CheckpointError(f'{path}: a damaged zip archive ({e})') from None
  except OSError as e:  # a directory, no permission, an I/O error
    raise CheckpointError(f'{path}: cannot read it ({e.strerror or e})') from None
