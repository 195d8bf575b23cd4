"""Where training numbers go: `metrics.jsonl`, TensorBoard event files and a progress line.

Only process 0 writes (every process computes the same global metrics). `metrics.jsonl` is
appended and flushed at each point so a crash loses nothing that was logged; on resume, points
past the restored step are dropped first so the file reads like one uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax


class MetricWriter:
  """Appends `{"step", "split", ...}` records to metrics.jsonl and scalars to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def truncate_after(self, step: int) -> None:
    """Drops records logged after `step` (they belong to work lost in an interruption)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [l for l in f if l.strip()]
    kept = []
    for line in lines:
      try:
        if json.loads(line)['step'] <= step:
          kept.append(line)
      except (json.JSONDecodeError, KeyError):  # a line torn by a crash mid-write
        continue
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def write(self, step: int, split: str, values: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), 'split': split}
    record.update({k: _plain(v) for k, v in values.items()})
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    for k, v in record.items():
      if k not in ('step', 'split') and isinstance(v, (int, float)) and math.isfinite(v):
        self._tb.add_scalar(f'{split}/{k}', v, step)
    self._tb.flush()

  def write_text(self, tag: str, text: str) -> None:
    if self.enabled:
      self._tb.add_text(tag, text, 0)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _plain(v: Any) -> Any:
  if hasattr(v, 'item'):
    v = v.item()
  return v


class Progress:
  """One line per logging point: step, loss, error, img/s and ETA (stderr, process 0)."""

  def __init__(self, total_steps: int, start_step: int, enabled: bool):
    self.total, self.start, self.enabled = total_steps, start_step, enabled
    self.t0 = time.time()

  def update(self, step: int, loss: float, top1_error: float, images_per_sec: float) -> None:
    if not self.enabled:
      return
    done = step - self.start
    elapsed = time.time() - self.t0
    eta = elapsed / done * (self.total - step) if done > 0 else float('nan')
    print(f'step {step}/{self.total} ({100 * step / self.total:.0f}%)  loss {loss:.4f}  '
          f'top1_err {100 * top1_error:.2f}%  {images_per_sec:,.0f} img/s  '
          f'ETA {_hms(eta)}', file=sys.stderr, flush=True)


def _hms(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'
