"""SIGTERM/SIGINT at any moment of a run: finish cleanly instead of dying mid-write.

`StopRequest` turns the first SIGTERM (preemption) or Ctrl-C into a flag the training loop polls:
it saves after the current step and exits 0, and a signal that arrives during start-up or after
the last step lets the run stop (or finish) normally. A second Ctrl-C exits at once with 130:
what is on disk then is what a kill -9 leaves (complete checkpoints only). This module imports
nothing heavy, so `main` installs it before JAX starts.
"""

from __future__ import annotations

import os
import signal
from typing import Any


class StopRequest:
  """Records stop signals; installed for a whole run (start-up, loop, final save)."""

  def __init__(self) -> None:
    self.requested = False
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  def install(self) -> 'StopRequest':
    """Installs the handlers (main thread only; elsewhere the run just keeps default handlers)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. a notebook worker thread)
        return self
    return self

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self.requested and signum == signal.SIGINT:
      # os.write: no buffered I/O inside a signal handler.
      os.write(
        2,
        b'error: interrupted twice: exiting now; the newest finished checkpoint is '
        b'kept and a rerun resumes from it\n',
      )
      os._exit(130)  # pylint: disable=protected-access
    if not self.requested:
      os.write(
        2,
        f'received signal {signum}: the run stops after saving a checkpoint (Ctrl-C '
        'again to exit at once)\n'.encode(),
      )
    self.requested, self.signum = True, signum

  def uninstall(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def __enter__(self) -> 'StopRequest':
    return self.install()

  def __exit__(self, *exc: Any) -> None:
    self.uninstall()
