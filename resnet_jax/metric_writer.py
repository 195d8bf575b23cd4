"""Where training numbers go: `metrics.jsonl`, TensorBoard event files and a progress line.

Only process 0 writes (every process computes the same global metrics). `metrics.jsonl` is
appended and flushed at each point so a crash loses nothing that was logged; on resume, points
past the restored step are dropped first so the file reads like one uninterrupted run.

Object stores (gs://, s3://) cannot append: gcsfs silently turns mode 'a' into 'w' (each point
would replace the file), TensorFlow's GCS file system re-uploads on close. On such a workdir the
writer keeps the file's lines in memory and rewrites the whole object at each point, so the
object always holds every point in the local file's format.
"""

from __future__ import annotations

import json
import math
import platform
import sys
from typing import Any

import jax
from etils import epath

from resnet_jax.workdir import write_atomic


def _summary_writer_class() -> type:
  """tensorboardX's SummaryWriter, imported without PyTorch.

  tensorboardX imports torch whenever it is installed (GPU machines usually have it), only to
  accept torch tensors, which we never pass: 1.3 s and a few hundred MB on every start. Hiding
  torch for that one import keeps it out; a torch imported earlier or later is unaffected.
  """
  if 'torch' in sys.modules or 'tensorboardX' in sys.modules:
    from tensorboardX import SummaryWriter  # noqa: PLC0415

    return SummaryWriter
  sys.modules['torch'] = None  # `import torch` raises ImportError while this is set
  try:
    from tensorboardX import SummaryWriter  # noqa: PLC0415
  finally:
    del sys.modules['torch']
  return SummaryWriter


class MetricWriter:
  """Appends `{"step", "split", ...}` records to metrics.jsonl and scalars to TensorBoard."""

  def __init__(self, workdir: str | epath.Path, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = epath.Path(workdir) / 'metrics.jsonl'
    self._remote = is_remote(workdir)
    self._lines: list[str] | None = None  # remote only: the object's lines, read once
    self._tb = None
    if self.enabled:
      self._tb = _summary_writer_class()(str(epath.Path(workdir) / 'tensorboard'))

  def truncate_after(self, step: int) -> None:
    """Drops records logged after `step` (they belong to work lost in an interruption)."""
    if not self.enabled or not self.path.exists():
      return
    lines = _read_lines(self.path)
    kept = []
    for line in lines:
      try:
        if json.loads(line)['step'] <= step:
          kept.append(line)
      except (json.JSONDecodeError, KeyError, TypeError):  # torn by a crash mid-write, or a
        continue  # hand edit that is no record ('[]', '"step": "4"'): not a point of this run
    if len(kept) != len(lines):
      write_atomic(self.path, ''.join(kept))
    if self._remote:
      self._lines = kept

  def write(self, step: int, split: str, values: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), 'split': split}
    record.update({k: _plain(v) for k, v in values.items()})
    line = json.dumps(record) + '\n'
    if self._remote:
      if self._lines is None:
        self._lines = _read_lines(self.path)
      self._lines.append(line)
      self.path.write_text(''.join(self._lines))  # one object write: never a partial file
    else:
      with self.path.open('a') as f:
        f.write(line)
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


def is_remote(workdir: str | epath.PathLike) -> bool:
  """True for object-store URIs (gs://, s3://, ...), where files cannot be appended to."""
  text = str(workdir)
  return '://' in text and not text.startswith('file://')


def _read_lines(path: epath.Path) -> list[str]:
  if not path.exists():
    return []
  return [l + '\n' for l in path.read_text().splitlines() if l.strip()]


def _plain(v: Any) -> Any:
  if hasattr(v, 'item'):
    v = v.item()
  return v


class Progress:
  """One line per logging point: step, loss, error, img/s and ETA (stderr, process 0).

  Rates and the ETA count only training steps: compilation, evaluation and checkpointing are
  timed out of them, so the first line is not dragged down by compilation.
  """

  def __init__(self, total_steps: int, start_step: int, enabled: bool, batch_size: int = 0):
    self.total, self.enabled, self.batch_size = total_steps, enabled, batch_size
    self._steps, self._seconds = 0, 0.0

  def update(self, step: int, loss: float, top1_error: float, steps: int, seconds: float) -> None:
    """`steps` training steps just took `seconds` (training only) and ended at `step`."""
    self._steps += steps
    self._seconds += seconds
    if not self.enabled:
      return
    per_step = self._seconds / max(self._steps, 1)
    rate = steps * self.batch_size / max(seconds, 1e-9)
    print(
      f'step {step}/{self.total} ({100 * step / self.total:.0f}%)  loss {loss:.4f}  '
      f'top-1 error {100 * top1_error:.2f}%  {rate:,.0f} img/s  '
      f'ETA {_hms(per_step * (self.total - step))}',
      file=sys.stderr,
      flush=True,
    )


def _hms(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def environment() -> dict[str, Any]:
  """Versions and hardware a result was measured with (recorded in results.json)."""
  from importlib import metadata  # pylint: disable=import-outside-toplevel

  versions = {}
  for package in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain', 'numpy'):
    try:
      versions[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      versions[package] = None
  device = jax.devices()[0]
  return {
    'versions': versions,
    'python': platform.python_version(),
    'platform': device.platform,
    'device_kind': device.device_kind,
    'device_count': jax.device_count(),
    'local_device_count': jax.local_device_count(),
    'process_count': jax.process_count(),
    'host': platform.node(),
  }
