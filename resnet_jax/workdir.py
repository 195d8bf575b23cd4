"""A run's directory: where it is (local or remote), its config.json, and atomic writes.

Every workdir path goes through `etils.epath` (what Orbax uses), so `gs://bucket/run` stays a
bucket path instead of becoming `./gs:/bucket/run`, and local paths are made absolute once, here.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from typing import Any, Sequence

import ml_collections
from etils import epath

from resnet_jax import cli
from resnet_jax.default_config import base_config

CONFIG_FILE = 'config.json'
RESULTS_FILE = 'results.json'
CLASS_NAMES_FILE = 'class_names.json'  # what each label of the run names, in label order


def as_path(workdir: str | epath.PathLike) -> epath.Path:
  """The workdir as an `epath.Path`: remote URIs untouched, local paths absolute."""
  text = str(workdir)
  if '://' in text:
    return epath.Path(text)
  return epath.Path(text).expanduser().resolve()


def write_atomic(path: str | epath.PathLike, content: str | bytes) -> None:
  """Writes `content` to a sibling temporary file, then renames it over `path`.

  A reader (or a crash) sees either the old file or the new one, never half of one. The temporary
  name is unique to the writer, so processes writing the same file at once cannot mix.
  """
  path = epath.Path(path)
  tmp = path.parent / f'.{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp'
  try:
    if isinstance(content, bytes):
      tmp.write_bytes(content)
    else:
      tmp.write_text(content)
    tmp.replace(path)
  except BaseException:  # only a failed write leaves a temporary file (no stat per good write)
    if tmp.exists():
      tmp.unlink()
    raise


def write_json(path: epath.Path, value: Any) -> None:
  write_atomic(path, json.dumps(value, indent=2) + '\n')


class WorkdirError(ValueError):
  """A workdir that cannot be used as asked (not a run, damaged config.json, ...)."""


def read_results(workdir: str | epath.PathLike) -> dict[str, Any] | None:
  """The run's results.json, or None when it is missing or unreadable (no dict with `step` and
  `eval`): such a run is not finished. Training evaluates and writes it again, the sweep trains the
  run again, and its report counts it unfinished instead of stopping at one damaged file."""
  try:
    results = json.loads((as_path(workdir) / RESULTS_FILE).read_text())
  except (OSError, ValueError):
    return None
  return results if isinstance(results, dict) and {'step', 'eval'} <= results.keys() else None


def read_class_names(workdir: str | epath.PathLike) -> list[str] | None:
  """The names of the run's classes in label order, as training recorded them; None when it
  recorded none (numbered or synthetic classes, or a run from before the file was written)."""
  path = as_path(workdir) / CLASS_NAMES_FILE
  if not path.exists():
    return None
  try:
    names = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise WorkdirError(f'{path} is not valid JSON ({e}): restore it or delete it') from None
  if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
    raise WorkdirError(f'{path} is not a list of names: restore it or delete it')
  return names


def check_recorded_class_names(workdir: str | epath.PathLike, names: Sequence[str] | None) -> None:
  """Refuses to resume or evaluate a run on data whose classes are named otherwise than the run
  recorded (a tree's folders renamed, added or removed): its labels would silently mean other
  classes."""
  recorded = read_class_names(workdir)
  if recorded is None or names is None or list(names) == recorded:
    return
  was, now = recorded + ['(none)'] * len(names), list(names) + ['(none)'] * len(recorded)
  k = next(i for i, (a, b) in enumerate(zip(was, now)) if a != b)
  raise WorkdirError(
    f'workdir {as_path(workdir)} holds a run whose class {k} is {was[k]!r} ({CLASS_NAMES_FILE}); '
    f'the data names it {now[k]!r}: its labels would mean other classes. Restore the class '
    'folders (or train in another --workdir)'
  )


def write_run_record(
  workdir: epath.Path, config: ml_collections.ConfigDict, class_names: Sequence[str] | None
) -> None:
  """config.json, and class_names.json when the labels have names (predict and evaluate then
  name the classes, and a resume checks them, without the data)."""
  write_json(workdir / CONFIG_FILE, json.loads(config.to_json_best_effort()))
  if class_names is not None:
    write_json(workdir / CLASS_NAMES_FILE, list(class_names))


def read_run_config(workdir: str | epath.PathLike) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was started with, on top of today's defaults.

  Fields added since the run was written take their `base_config()` default, so older workdirs
  keep evaluating and resuming. A missing or damaged config.json is a WorkdirError naming it.
  """
  path = as_path(workdir) / CONFIG_FILE
  if not path.exists():
    raise WorkdirError(f'{as_path(workdir)} is not a training run (no {CONFIG_FILE})')
  try:
    saved = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise WorkdirError(
      f'{path} is not valid JSON ({e}); restore it from a backup or use another --workdir'
    ) from None
  if not isinstance(saved, dict):
    raise WorkdirError(f'{path} holds a {type(saved).__name__}, not a config object')
  try:
    return merge_onto_defaults(saved)
  except (TypeError, ValueError) as e:  # a hand edit: '"batch_size": "16"', '"model": "resnet8"'
    raise WorkdirError(
      f'{path} has a value of the wrong type ({cli.first_line(e)}); fix it or restore the file '
      'from a backup'
    ) from None


def merge_onto_defaults(saved: dict[str, Any]) -> ml_collections.ConfigDict:
  """`saved` (a config as JSON) laid over `base_config()`; unknown keys are kept as they are."""
  config = base_config()
  _merge(config, saved)
  return config


def _merge(config: ml_collections.ConfigDict, saved: dict[str, Any]) -> None:
  for key, value in saved.items():
    if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
      _merge(config[key], value)
    elif key in config and config[key] is not None and value is not None:
      config[key] = type(config[key])(value) if isinstance(config[key], float) else value
    else:
      with config.ignore_type():
        config[key] = value


LOCK_FILE = '.lock'


class WorkdirLock:
  """An exclusive lock on a workdir, held by the live trainer (process 0) for its whole run.

  `flock` on `workdir/.lock`: the kernel drops it when the holder exits, however it exits
  (kill -9 included), so a dead run never leaves it stuck. The file names the holder (host, pid)
  for the error a second run prints; it is left in place (deleting it would race a new holder).
  Remote workdirs (gs://...) and platforms without `fcntl` (Windows) are not locked.
  """

  def __init__(self, workdir: str | epath.PathLike):
    self.path = as_path(workdir) / LOCK_FILE
    self._file = None

  def acquire(self) -> bool:
    """Takes the lock; False when locking is unsupported here. WorkdirError when it is held."""
    try:
      import fcntl  # pylint: disable=import-outside-toplevel  # POSIX only
    except ImportError:
      return False
    if '://' in str(self.path):
      return False
    f = open(self.path, 'a+')  # pylint: disable=consider-using-with  # held until release()
    try:
      fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      holder = f.read().strip() or 'another process'
      f.close()
      raise WorkdirError(
        f'workdir {self.path.parent} is in use by a live run ({holder}): wait '
        'for it to finish or stop it, or use another --workdir'
      ) from None
    f.seek(0)
    f.truncate()
    f.write(f'pid {os.getpid()} on host {socket.gethostname()}\n')
    f.flush()
    self._file = f
    return True

  def release(self) -> None:
    if self._file is not None:
      self._file.close()  # closing the descriptor releases the flock
      self._file = None

  def __enter__(self) -> 'WorkdirLock':
    self.acquire()
    return self

  def __exit__(self, *exc: Any) -> None:
    self.release()
