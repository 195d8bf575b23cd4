"""Host CPU accounting of a timed window, shared by benchmark_input.py and benchmark_e2e.py: CPU
seconds of this process and its Grain workers, and the cores and per-core rates they give."""

from __future__ import annotations

import os
import time

TARGET_IMAGES_PER_SEC = 7500  # one H100's ResNet-50 bf16 train step (issue 15's goal)
MIN_CPU_S = 0.05


class CpuClock:
  """CPU seconds (user + system) of this process and its live children (Grain workers)."""

  def __init__(self):
    try:
      import psutil  # pylint: disable=g-import-not-at-top

      self._proc = psutil.Process()
    except ImportError:  # main process only; reported as cpu_includes_workers=false
      self._proc = None

  @property
  def includes_workers(self) -> bool:
    return self._proc is not None

  def read(self) -> dict[int, float]:
    if self._proc is None:
      return {os.getpid(): time.process_time()}
    out = {}
    for p in [self._proc] + self._proc.children(recursive=True):
      try:
        t = p.cpu_times()
        out[p.pid] = t.user + t.system
      except Exception:  # pylint: disable=broad-except  # a worker that just exited
        pass
    return out

  @staticmethod
  def spent(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def cores(cpu: float, wall: float) -> float | None:
  """CPU seconds per wall second, or None where `cpu` is too short to measure. The OS counts CPU
  time in 10 ms ticks: below MIN_CPU_S one tick more or less is a large share (one tick over a
  0.3 ms window read as 39 cores on a 2-core machine). benchmark_e2e uses this rule too."""
  return round(cpu / wall, 2) if cpu >= MIN_CPU_S else None


def rates(examples: int, wall: float, cpu: float) -> dict[str, float | None]:
  """Throughput and CPU figures of one timed window; the CPU figures are None where `cores` is."""
  used = cores(cpu, wall)
  per_core = examples / cpu if used is not None else None
  return {
    'examples_per_sec': round(examples / wall, 1),
    'cpu_s': round(cpu, 3),
    'cores_used': used,
    'examples_per_core_sec': None if per_core is None else round(per_core, 1),
    'cores_per_7500_images_per_sec': (
      None if per_core is None else round(TARGET_IMAGES_PER_SEC / per_core, 2)
    ),
  }
