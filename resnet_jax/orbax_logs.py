"""What Orbax and tensorstore log around our checkpoints that is not news to the user.

Each filter is scoped to the operation that provokes the noise; anything else Orbax logs passes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

from etils import epath

ABSL = 'absl'  # Orbax logs through absl.logging, whose records go to the 'absl' logger


def drop_untracked_metric_notice(record: logging.LogRecord) -> bool:
  """A save between evaluations has no metric: Orbax's notice of it is expected."""
  return 'did not provide metrics' not in record.getMessage()


# What Orbax logs (as absl warnings) for every read-only restore of the model alone: they read as
# failures ('could not be restored') to the user of evaluate / predict, yet are the intended read.
_EXPECTED_READER_NOTICES = (
  'CheckpointManagerOptions.read_only=True, setting save_interval_steps=0',
  'Given directory is read only=',
  'was found in the checkpoint, but could not be restored',
)


def drop_expected_reader_notices(record: logging.LogRecord) -> bool:
  message = record.getMessage()
  return not any(notice in message for notice in _EXPECTED_READER_NOTICES)


class SaveErrors(logging.Filter):
  """Holds Orbax's error records (those with a traceback) while our saves may be in flight.

  Why: a save that fails in the background (disk full, a read-only disk) is logged by each of
  Orbax's save threads, with its traceback (four for one full disk), and then raised from the next
  save or wait; main prints that exception as the run's one `error:` line. Held records are
  dropped once a failure has been raised to our caller (`reporting`), and logged after all by
  `release` otherwise (a failure Orbax did not raise must not vanish). Warnings, and every record
  when RESNET_JAX_TRACEBACK is set, pass at once.
  """

  def __init__(self) -> None:
    super().__init__()
    self._held: list[logging.LogRecord] = []
    self._lock = threading.Lock()
    self._installed = False

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or not record.exc_info:
      return True
    if f'{os.sep}orbax{os.sep}' not in record.pathname or os.environ.get('RESNET_JAX_TRACEBACK'):
      return True
    with self._lock:
      self._held.append(record)
    return False

  def install(self) -> None:
    if not self._installed:
      logging.getLogger(ABSL).addFilter(self)
      self._installed = True

  @contextlib.contextmanager
  def reporting(self) -> Iterator[None]:
    """Around a call that raises a failed save's exception: its held records are then dropped."""
    try:
      yield
    except Exception:
      with self._lock:
        self._held.clear()
      # The failed save's abandoned writes (tensorstore's `write_fragment` coroutines) are
      # collected at exit with "coroutine ... was never awaited" after the run's `error:` line.
      warnings.filterwarnings(
        'ignore', message=r"coroutine '.*' was never awaited", category=RuntimeWarning
      )
      raise

  def release(self) -> None:
    """Stops holding; logs what is still held (failures that were never raised to us)."""
    absl_logger = logging.getLogger(ABSL)
    absl_logger.removeFilter(self)
    self._installed = False
    with self._lock:
      held, self._held = self._held, []
    for record in held:
      absl_logger.handle(record)


# Checkpoint directories a restore has read (as given, and resolved): the abandoned reads dropped.
_ABANDONED_READ_DIRS: set[str] = set()


def quiet_abandoned_reads(directory: epath.Path) -> None:
  """Keeps the one warning per damaged checkpoint the only report of it.

  When Orbax abandons a failed read, tensorstore's other reads of that checkpoint end later, on
  their own: as 'Event loop is closed' unraisable exceptions, and, whenever the garbage collector
  meets their asyncio tasks, as 'Task exception was never retrieved' tracebacks on the asyncio
  logger (even after the run has printed its final `error:` line). Both are dropped for reads
  under `directory`; every other unraisable exception and asyncio error still gets through.
  Hooks are installed once per process."""
  _ABANDONED_READ_DIRS.add(str(directory))
  if '://' not in str(directory):  # tensorstore names local files by their absolute path
    _ABANDONED_READ_DIRS.add(os.path.realpath(directory))
  previous = sys.unraisablehook
  if getattr(previous, '_resnet_jax_filter', False):
    return

  def hook(unraisable: Any) -> None:
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed':
      return
    previous(unraisable)

  hook._resnet_jax_filter = True  # type: ignore[attr-defined]
  sys.unraisablehook = hook
  logging.getLogger('asyncio').addFilter(_drop_unretrieved_checkpoint_reads)


def _drop_unretrieved_checkpoint_reads(record: logging.LogRecord) -> bool:
  exc = record.exc_info[1] if record.exc_info else None
  if exc is None or 'exception was never retrieved' not in str(record.msg):
    return True
  text = str(exc)
  return not any(directory in text for directory in _ABANDONED_READ_DIRS)
