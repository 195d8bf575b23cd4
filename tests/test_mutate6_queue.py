"""The GPU queue scripts' rules (scripts/gpu_queue.py, gpu_queue_run.py, gpu_queue_summary.py)
that mutation audit 6 (docs/mutation-audit-6.md; the rest of its tests are in test_mutate6.py)
found no test for: each test below fails on that one-line change and passes on the code."""

import re
import sys

import pytest

from tests.test_gpu_queue import _GPU, _GPU_PROBE, _item, _logs, _run, _status, gq

# --------------------------------------------------------------- scripts/gpu_queue.py (Q1-Q43)


def test_tiny_items_ignore_the_h100_expectations(tmp_path):
  """--tiny runs each item's CPU variant: an item expected to take 500 s on the H100 is not
  skipped for a 5 s budget (the expectations do not apply), only the budget's end stops it."""
  cpu = dict(_GPU, platform='cpu', device_kind='cpu')
  probe = ('-c', f'import json; print(json.dumps({cpu!r}))')
  index = _run(tmp_path / 'q', [_item('big', 'pass', expected_s=500)], '--tiny', '--budget-s', '5',
               probe=probe)  # fmt: skip
  assert _status(index) == {'big': 'ok'}


def test_done_chains_name_the_call_where_the_item_finished(tmp_path):
  """A third call told of the second only: the items the second skipped as done earlier still
  point at the first call's folder, where their results are."""
  queue = [_item('a', 'pass'), _item('b', 'pass', expected_s=400)]
  q1, q2, q3 = tmp_path / 'q1', tmp_path / 'q2', tmp_path / 'q3'
  assert _status(_run(q1, queue, '--budget-s', '100')) == {'a': 'ok', 'b': 'skipped'}
  _run(q2, queue, '--done', str(q1))
  index = _run(q3, queue, '--done', str(q2))
  assert {r['name']: r['from'] for r in index['items']} == {'a': str(q1), 'b': str(q2)}


def test_only_runs_the_named_items_and_an_empty_list_is_refused(tmp_path, monkeypatch, capsys):
  log = tmp_path / 'ran'
  queue = [_item(n, _logs(log, n)) for n in 'abc']
  index = _run(tmp_path / 'q', queue, '--only', 'c,a')
  assert log.read_text().split() == ['a', 'c'] and list(_status(index)) == ['a', 'c']
  monkeypatch.chdir(tmp_path)
  for flags in (['--only', ','], ['--collect', 'q', '--done', 'q']):
    with pytest.raises(SystemExit) as e:
      gq.main(['--out', 'new', *flags], queue=tuple(queue), probe_argv=_GPU_PROBE)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith('error: ') and len(err.splitlines()) == 1, err
  assert not (tmp_path / 'new').exists()


def test_the_last_log_line_counts_done_earlier_items_as_finished(tmp_path, capsys):
  queue = [_item('a', 'pass')]
  _run(tmp_path / 'q1', queue)
  capsys.readouterr()
  _run(tmp_path / 'q2', queue, '--done', str(tmp_path / 'q1'))
  assert capsys.readouterr().out.splitlines()[-1].endswith('not finished: none')


def test_an_items_result_is_its_last_line_only_when_that_is_a_json_object(tmp_path):
  """The scripts' convention: the last stdout line is one JSON object; a list or a number there
  is not a result (summary reads keys from it): the stdout tail is kept instead."""
  queue = [_item('list', 'print("[1, 2]")'), _item('obj', 'print(\'{"x": 1}\')')]
  lst, obj = _run(tmp_path / 'q', queue)['items']
  assert lst['result'] is None and lst['stdout_tail'] == '[1, 2]\n'
  assert obj['result'] == {'x': 1} and 'stdout_tail' not in obj


def test_an_item_that_exits_cleanly_on_sigterm_at_its_timeout_is_still_timed_out(tmp_path):
  """Ended by the budget, not finished: 'timeout', so that the next call runs it again (--done
  skips only ok and failed), even when the item catches SIGTERM and exits 0. Its output up to
  then is kept (the item runs unbuffered)."""
  code = (
    'import signal, sys, time\n'
    'signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n'
    'print("started")\ntime.sleep(60)\n'
  )
  index = _run(tmp_path / 'q', [_item('slow', code, expected_s=0.5)], '--budget-s', '2')
  record = index['items'][0]
  assert (record['status'], record['rc']) == ('timeout', 0)
  assert record['stdout_tail'] == 'started\n'


def test_a_killed_items_output_is_kept_up_to_its_end(tmp_path, monkeypatch):
  """An item killed outright (SIGKILL, the out-of-memory killer) keeps what it printed: items run
  unbuffered, whatever the queue's own environment says."""
  monkeypatch.delenv('PYTHONUNBUFFERED', raising=False)
  code = 'import os, signal\nprint("step 1 done")\nos.kill(os.getpid(), signal.SIGKILL)\n'
  record = _run(tmp_path / 'q', [_item('killed', code)])['items'][0]
  assert (record['status'], record['rc']) == ('failed', -9)
  assert record['stdout_tail'] == 'step 1 done\n'


def test_the_environment_marks_a_tree_with_uncommitted_changes(tmp_path, monkeypatch):
  """The commit a figure was measured at, '+changes' when the tracked files differ from it."""
  import subprocess

  runner = sys.modules['gpu_queue_run']
  git = lambda *a: subprocess.run(
    ['git', '-c', 'user.name=t', '-c', 'user.email=t@t', *a], cwd=tmp_path, check=True,
    capture_output=True,
  )  # fmt: skip
  git('init', '-q')
  (tmp_path / 'f').write_text('1')
  git('add', 'f')
  git('commit', '-q', '-m', 'c')
  monkeypatch.setattr(runner, 'ROOT', str(tmp_path))
  assert re.fullmatch(r'[0-9a-f]{40}', runner.environment(_GPU_PROBE)['commit'])
  (tmp_path / 'f').write_text('2')
  assert re.fullmatch(r'[0-9a-f]{40}\+changes', runner.environment(_GPU_PROBE)['commit'])


def test_a_device_probe_that_exits_with_an_error_is_refused(tmp_path, capsys):
  """Its JSON line may be a half-started backend's: a failing probe stops the queue."""
  probe = ('-c', f'import json, sys; print(json.dumps({_GPU!r})); sys.exit(3)')
  assert gq.main(['--out', str(tmp_path / 'q')], queue=(_item('a', 'pass'),), probe_argv=probe) == 1
  err = capsys.readouterr().err
  assert err.startswith('error: the device probe failed (rc 3)') and len(err.splitlines()) == 1


def test_an_items_record_lists_the_files_it_wrote_in_its_folder(tmp_path):
  code = 'import sys; open(sys.argv[1] + "/trace.json", "w").write("{}")'
  queue = [gq.Item('w', ('-c', code, '{out}'), (), 1, 'stand-in')]
  assert _run(tmp_path / 'q', queue)['items'][0]['files'] == ['trace.json']


def test_the_summary_table_reads_as_the_calls_went():
  """summary.md: the device as nvidia-smi names it (no UUID), the commit with '+ changes', no
  different-devices warning for one device, a cut-off item said so, and a failed item's last
  stderr line (its '|' escaped, so the table keeps its columns)."""
  summary = sys.modules['gpu_queue_summary']
  env = dict(_GPU, nvidia_smi='GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1234)', date='d')
  env['commit'] = 'a' * 40 + '+changes'
  part = dict(dir='q1', environment=env, budget_s=560, wall_s=9.0)
  items = [
    dict(name='cut', status='running', part='q1', command='python scripts/x.py'),
    dict(name='bad', status='failed', part='q1', command='python scripts/x.py',
         stderr_tail='Traceback\nValueError: a | b\n'),
  ]  # fmt: skip
  merged = dict(rc=1, error='error: no rows')
  md = summary.markdown(
    dict(date='d', tiny=False, parts=[part], items=items, gpu_report=merged), None
  )
  assert '| q1 | d | GPU 0: NVIDIA H100 80GB HBM3 | 0 |' in md
  assert '| aaaaaaaaaa + changes |' in md and 'different devices' not in md
  assert '| cut | cut off (the command was killed) |' in md
  assert md.count('\n| bad | failed |') == 1 and '| ValueError: a \\| b |' in md
  assert 'The gpu_report parts did not merge: error: no rows' in md


def test_a_folder_whose_queue_json_is_not_an_index_is_one_error_line(tmp_path, capsys):
  (tmp_path / 'odd').mkdir()
  (tmp_path / 'odd' / 'queue.json').write_text('{"items": []}')
  for flags in (['--done', str(tmp_path / 'odd')], ['--collect', str(tmp_path / 'odd')]):
    rc = gq.main(['--out', str(tmp_path / 'new'), *flags], queue=(_item('a', 'pass'),),
                 probe_argv=_GPU_PROBE)  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1 and err == f'error: {tmp_path / "odd" / "queue.json"} is not a gpu_queue index\n'
