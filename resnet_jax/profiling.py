"""`profile_steps`: a jax.profiler trace of a window of training steps (see validation's
`profile_window` for the 'START,STOP' spelling)."""

from __future__ import annotations

import logging
from typing import Any

import jax
from etils import epath

logger = logging.getLogger(__name__)


class StepTracer:
  """Traces the steps of `window` [start, stop) that this invocation runs.

  A run resumed inside the window is traced from its first step, and one that ends (or fails)
  inside it up to its last, so a trace is always written and the profiler is never left running
  (a started trace that is never stopped writes nothing and refuses every later trace in the
  process; stopping one that was never started raises).
  """

  def __init__(self, window: tuple[int, int] | None, directory: epath.Path):
    self.window, self.directory, self.first = window, directory, None

  def before(self, step: int) -> None:
    """Call before running step `step` (the state's step counter)."""
    if self.window and self.first is None and self.window[0] <= step < self.window[1]:
      jax.profiler.start_trace(str(self.directory))
      self.first = step

  def after(self, step: int, state: Any) -> None:
    """Call once `step` steps are done; ends the trace at the window's end."""
    if self.first is not None and step >= self.window[1]:
      self.stop(step, state)

  def stop(self, step: int, state: Any) -> None:
    """Ends a running trace (idempotent); one trace per invocation."""
    if self.first is None:
      return
    self.window, first, self.first = None, self.first, None
    try:
      jax.block_until_ready(state)
    except Exception:  # noqa: BLE001 -- a failed step's donated state: trace what ran
      pass
    jax.profiler.stop_trace()
    logger.info('wrote a profiler trace of steps %d-%d to %s', first, step, self.directory)
