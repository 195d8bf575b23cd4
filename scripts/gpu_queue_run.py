"""How scripts/gpu_queue.py runs an item and reads the environment, apart from what the queue is.

Each item is its own process in its own process group, so that a crash, an out-of-memory or a
timeout ends that item (its Grain and torch.compile workers too) and nothing else. The device is
read by a child (`probe`): a JAX client in the queue's own process would hold the GPU's memory
for the whole queue.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TAIL = 4000  # characters of stderr (and of stdout without JSON) kept per item
_GRACE_S = 10  # between SIGTERM and SIGKILL of an item that ran out of time


def probe() -> None:
  """Prints the device record as one JSON line (run in a child: it starts JAX's backend)."""
  import gpu_report  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  dev = jax.devices()[0]
  print(
    json.dumps(
      {
        'platform': dev.platform,
        'device_kind': dev.device_kind,
        'devices': jax.device_count(),
        'jax_version': jax.__version__,
        'torch_version': gpu_report.lib.torch_version(),
        'torch_error': gpu_report.lib.torch_import_error(),
        'nvidia_present': gpu_report.nvidia_present(),
      }
    )
  )


def _tail(path: str, chars: int = _TAIL) -> str:
  with open(path, 'rb') as f:
    f.seek(max(0, os.path.getsize(path) - chars))
    return f.read().decode('utf-8', 'replace')


def _last_json(text: str) -> dict | None:
  """The scripts' convention: the last stdout line is one JSON object."""
  lines = [line for line in text.splitlines() if line.strip()]
  try:
    value = json.loads(lines[-1]) if lines else None
  except ValueError:
    return None
  return value if isinstance(value, dict) else None


def _end_group(proc: subprocess.Popen) -> None:
  """Ends the item's process group (its Grain workers, torch.compile's workers too): SIGTERM to
  all of them while the item runs, a grace for them to exit, then SIGKILL to what is left; and
  returns once none runs, so that the next item starts on a GPU they have let go of."""
  if proc.poll() is None:
    try:
      os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
      pass
    _wait_group(proc, _GRACE_S)
  try:  # what is left: the item after the grace, or workers it left behind when it exited
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  _wait_group(proc, _GRACE_S)
  proc.wait()


def _wait_group(proc: subprocess.Popen, seconds: float) -> None:
  deadline = time.monotonic() + seconds
  while (proc.poll() is None or _group_alive(proc.pid)) and time.monotonic() < deadline:
    time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
  """Whether a process of the group still runs (zombies hold no memory); Linux's /proc."""
  try:
    pids = [p for p in os.listdir('/proc') if p.isdigit()]
  except OSError:
    return False
  for pid in pids:
    try:
      with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rpartition(')')[2].split()  # after the command name: state, ppid, pgrp
    except OSError:  # it exited meanwhile
      continue
    if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != 'Z':
      return True
  return False


def run_item(argv: tuple[str, ...], folder: str, timeout_s: float) -> dict:
  """Runs one item in its own process group; its record (status, rc, wall_s, result, tails)."""
  if any('{out}' in a for a in argv):
    os.makedirs(folder, exist_ok=True)
  cmd = [sys.executable] + [a.replace('{out}', folder) for a in argv]
  env = dict(os.environ, PYTHONUNBUFFERED='1')  # a killed item's log is whole up to its end
  with tempfile.TemporaryDirectory(prefix='gpu_queue_') as tmp:
    out, err = os.path.join(tmp, 'stdout'), os.path.join(tmp, 'stderr')
    with open(out, 'wb') as o, open(err, 'wb') as e:
      start = time.monotonic()
      proc = subprocess.Popen(
        cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=o, stderr=e, env=env, process_group=0
      )
      timed_out = False
      try:
        proc.wait(timeout=max(timeout_s, 0.001))
      except subprocess.TimeoutExpired:
        timed_out = True
      finally:  # also on Ctrl-C or SIGTERM of the queue: no item outlives it
        _end_group(proc)
      wall = time.monotonic() - start
    stdout, stderr = _tail(out, 1 << 20), _tail(err)
  result = _last_json(stdout)
  status = 'timeout' if timed_out else 'ok' if proc.returncode == 0 else 'failed'
  record = {'status': status, 'rc': proc.returncode, 'wall_s': round(wall, 2), 'result': result}
  if result is None:
    record['stdout_tail'] = stdout[-_TAIL:]
  record['stderr_tail'] = stderr
  if os.path.isdir(folder):
    record['files'] = sorted(os.listdir(folder))
  return record


def environment(probe_argv: tuple[str, ...]) -> dict:
  """The environment, once per command: the child's device record, `nvidia-smi -L`, XLA_FLAGS."""
  env = {
    'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
    'cpu_count': os.cpu_count(),
    'python': platform.python_version(),
    'nvidia_smi': None,
  }
  if shutil.which('nvidia-smi'):
    smi = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, timeout=60)
    env['nvidia_smi'] = smi.stdout.strip() or smi.stderr.strip()
  env['commit'] = None  # outside a git checkout (a copy of the tree)
  if shutil.which('git'):
    git = lambda *a: subprocess.run(['git', *a], cwd=ROOT, capture_output=True, text=True)
    head, changed = git('rev-parse', 'HEAD'), git('status', '--porcelain', '--untracked-files=no')
    if head.returncode == 0:  # '+changes': the tree differs from the commit
      env['commit'] = head.stdout.strip() + ('+changes' if changed.stdout.strip() else '')
  child = subprocess.run(
    [sys.executable, *probe_argv], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  device = _last_json(child.stdout)
  if child.returncode or device is None:
    lines = (child.stderr or child.stdout).strip().splitlines() or ['no output']
    raise RuntimeError(f'the device probe failed (rc {child.returncode}): {lines[-1][:300]}')
  return {**env, **device}
