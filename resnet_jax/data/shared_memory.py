"""Shared memory of Grain's worker processes, released as each batch arrives and at close.

Why a module of its own: it leans on two private internals of Grain (0.2.18: the batches' shared
memory arrays and their deletion thread pool), each looked up defensively, so a Grain that moves
them brings back only its own later release and the resource_tracker's warning at exit.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grain

try:  # private: only used to release shared memory early (see _unlink_now); optional
  from grain._src.python.ipc import shared_memory_array
except ImportError:  # another Grain layout: Grain's own (later) release applies
  shared_memory_array = None


def _leaves(tree: Any) -> Iterator[Any]:
  if isinstance(tree, dict):
    tree = tree.values()
  elif not isinstance(tree, (list, tuple)):
    yield tree
    return
  for item in tree:
    yield from _leaves(item)


def _unlink_now(batch: Any) -> Any:
  """Unlinks the shared memory behind a batch from Grain's worker processes as soon as it arrives.

  Why: Grain unlinks a segment when its array is garbage collected, on a thread multiprocessing
  stops at exit; a batch still referenced then (the last one, or one a failed run's traceback
  holds) or still queued for deletion is left to Python's resource_tracker, which warns 'There
  appear to be N leaked shared_memory objects' after the run's last line. Unlinking removes only
  the name: the array's mapping stays valid until the array is freed, as with any unlinked file.
  """
  for leaf in _leaves(batch):  # a dict of arrays, or the arrays of multiscale's size pass
    shm = getattr(leaf, 'shm', None)
    if shm is not None and getattr(leaf, '_unlink_on_del', False):
      leaf._unlink_on_del = False  # pylint: disable=protected-access  # its __del__ only closes
      shm.unlink()
  return batch


def _finish_pending_unlinks() -> None:
  """Waits for Grain's deletion thread to unlink the batches dropped from its buffers at close.

  Its pool has one thread (process_prefetch's `enable_async_del(1)`) taking tasks in order, so
  once a no-op submitted now has run, every deletion queued before it has run too.
  """
  array_class = getattr(shared_memory_array, 'SharedMemoryArray', None)
  pool = getattr(array_class, '_del_thread_pool', None)
  if pool is not None:
    pool.apply(int)


class Released(grain.IterDataset):
  """`mp_prefetch`'s batches with their shared memory unlinked on arrival and at close."""

  def __iter__(self) -> grain.DatasetIterator:
    return _ReleasedIterator(self._parent.__iter__())


class _ReleasedIterator(grain.DatasetIterator):
  def __next__(self) -> Any:
    return _unlink_now(next(self._parent))

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)

  def close(self) -> None:
    if self._closed:
      return
    super().close()  # stops the workers; the batches in the buffers go to the deletion thread
    _finish_pending_unlinks()
