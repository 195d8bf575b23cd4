"""The workdir's two promises, in-process: a write is all or nothing (`write_atomic`), and one
live run holds a workdir at a time (`WorkdirLock`)."""

import os

import pytest

from resnet_jax import workdir


def test_a_failed_write_keeps_the_old_file_whole_and_leaves_no_temporary(tmp_path):
  """A reader (or a crash) sees the old file or the new one, never half of one: content that
  fails midway (here a lone surrogate that UTF-8 cannot encode) leaves the old file untouched."""
  path = tmp_path / 'results.json'
  workdir.write_atomic(path, '{"step": 1}\n')
  with pytest.raises(UnicodeEncodeError):
    workdir.write_atomic(path, '{"step": 2, "note": "\ud800"}\n')
  assert path.read_text() == '{"step": 1}\n'
  assert os.listdir(tmp_path) == ['results.json']  # no temporary left behind
  workdir.write_atomic(path, b'{"step": 3}\n')
  assert path.read_bytes() == b'{"step": 3}\n' and os.listdir(tmp_path) == ['results.json']


def test_the_write_goes_through_a_sibling_that_is_renamed_over_the_file(tmp_path, monkeypatch):
  """The new content never appears under the file's own name before it is complete: it is
  written to a temporary in the same directory (same filesystem: the rename is atomic)."""
  path = tmp_path / 'config.json'
  path.write_text('old')
  renamed = []
  cls = type(workdir.epath.Path(path))
  real_replace = cls.replace

  def replace(self, target):
    assert path.read_text() == 'old'  # the file keeps its old content until the rename
    renamed.append((self.parent, self.name, self.read_text(), str(target)))
    return real_replace(self, target)

  monkeypatch.setattr(cls, 'replace', replace)
  workdir.write_atomic(path, 'new')
  [(parent, name, content, target)] = renamed
  assert parent == path.parent and name != path.name and content == 'new'
  assert target == str(path) and path.read_text() == 'new'


def test_a_second_holder_of_a_live_workdir_is_refused_with_the_holders_pid(tmp_path):
  """flock(LOCK_EX): one live run per workdir; the refusal names the holder. Released (or its
  process gone), the workdir can be taken again."""
  first = workdir.WorkdirLock(tmp_path)
  assert first.acquire()
  second = workdir.WorkdirLock(tmp_path)
  with pytest.raises(workdir.WorkdirError, match=rf'in use by a live run \(pid {os.getpid()} '):
    second.acquire()
  first.release()
  with workdir.WorkdirLock(tmp_path) as again:
    with pytest.raises(workdir.WorkdirError, match='in use'):
      workdir.WorkdirLock(tmp_path).acquire()
  assert again._file is None  # the context manager released it
  assert workdir.WorkdirLock(tmp_path).acquire()
