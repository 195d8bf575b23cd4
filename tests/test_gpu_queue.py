"""scripts/gpu_queue.py: the next GPU session's queue as one resumable command.

What a lent GPU needs of it: every item in its own process (a crash costs that item only), an
item that does not fit the time left is not started, queue.json on disk after every item (a
command killed at the device tool's limit keeps what finished), `--done` skips what an earlier
call finished, and `--collect` makes one summary. The logic runs on stand-in items (`python -c`)
and a stand-in device record through main()'s seam; a few real items run tiny on the CPU.
"""

import contextlib
import importlib.util
import io
import json
import os
import re
import sys
import time

import pytest

_ROOT = os.path.join(os.path.dirname(__file__), '..')
_SCRIPTS = os.path.join(_ROOT, 'scripts')


def _load(name: str):
  sys.path.insert(0, _SCRIPTS)
  spec = importlib.util.spec_from_file_location(name, os.path.join(_SCRIPTS, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


gq = _load('gpu_queue')

# A stand-in device record: what the probe child prints on a GPU machine.
_GPU = dict(platform='gpu', device_kind='Stand-in GPU', devices=1, jax_version='0')
_GPU_PROBE = ('-c', f'import json; print(json.dumps({_GPU!r}))')


def _item(name: str, code: str, expected_s: float = 1.0):
  return gq.Item(name, ('-c', code), ('-c', code), expected_s, 'stand-in')


def _logs(log, name: str) -> str:
  """Code that appends the item's name to `log`: which items ran, in which call."""
  return f'open({str(log)!r}, "a").write({name!r} + "\\n"); '


def _run(out, queue, *flags: str, probe=_GPU_PROBE) -> dict:
  assert gq.main(['--out', str(out), *flags], queue=tuple(queue), probe_argv=probe) == 0
  return json.loads((out / 'queue.json').read_text())


def _status(index: dict) -> dict:
  return {r['name']: r['status'] for r in index['items']}


def test_a_crash_costs_one_item_and_an_item_that_does_not_fit_is_skipped_for_the_next(
  tmp_path, capsys
):
  log = tmp_path / 'ran'
  queue = [
    _item('a', _logs(log, 'a') + 'print(\'{"images_per_sec": 5.0}\')'),
    _item('crash', _logs(log, 'crash') + 'raise MemoryError("out of memory: 76.6 GiB asked")'),
    _item('big', _logs(log, 'big'), expected_s=500),
    _item('small', _logs(log, 'small') + 'print("not json")', expected_s=2),
  ]
  index = _run(tmp_path / 'q', queue, '--budget-s', '60')
  assert log.read_text().split() == ['a', 'crash', 'small']
  assert _status(index) == {'a': 'ok', 'crash': 'failed', 'big': 'skipped', 'small': 'ok'}
  a, crash, big, small = index['items']
  assert a['result'] == {'images_per_sec': 5.0} and a['rc'] == 0 and a['wall_s'] > 0
  assert crash['rc'] == 1 and 'MemoryError: out of memory' in crash['stderr_tail']
  assert big['reason'].startswith('expected 500 s, ') and 'big: skipped' in capsys.readouterr().out
  assert small['result'] is None and small['stdout_tail'] == 'not json\n'
  assert index['complete'] and index['environment']['device_kind'] == 'Stand-in GPU'
  assert index['environment']['xla_flags'] == os.environ.get('XLA_FLAGS', '')
  commit = index['environment']['commit']  # None outside a git checkout
  assert commit is None or re.fullmatch(r'[0-9a-f]{40}(\+changes)?', commit), commit


def test_the_index_is_on_disk_before_and_after_every_item(tmp_path):
  """What a command killed at the device tool's limit leaves: finished items and the running one."""
  out = tmp_path / 'q'
  peek = (
    f'import json; d = json.load(open({str(out / "queue.json")!r})); '
    'print(json.dumps({"seen": [r["status"] for r in d["items"]]}))'
  )
  queue = [_item('first', 'pass'), _item('peek', peek), _item('last', 'pass')]
  index = _run(out, queue)
  assert index['items'][1]['result'] == {'seen': ['ok', 'running', 'pending']}
  assert not [f for f in os.listdir(out) if f.endswith('.tmp')]


def _gone(pid: int) -> bool:
  """No such process, or a zombie that init has not reaped yet."""
  state = f'/proc/{pid}/status'
  return not os.path.exists(state) or '\nState:\tZ' in open(state).read()


def _spawn(tmp_path, worker_code: str, then: str) -> str:
  """Item code that starts a worker process (its pid in tmp_path/worker.pid), then runs `then`."""
  (tmp_path / 'worker.py').write_text(worker_code)
  return (
    'import subprocess, sys, time; '
    f'w = subprocess.Popen([sys.executable, {str(tmp_path / "worker.py")!r}]); '
    f'open({str(tmp_path / "worker.pid")!r}, "w").write(str(w.pid)); ' + then
  )


def test_an_item_past_the_budget_is_ended_with_its_workers_and_the_rest_skipped(tmp_path):
  """SIGTERM to the item's whole process group first, and a grace until they have all exited (a
  worker may take a second to clean up), SIGKILL after it."""
  worker = (
    'import signal, sys, time\n'
    'def term(*_):\n  time.sleep(1)\n'
    f'  open({str(tmp_path / "term")!r}, "w").write("TERM"); sys.exit(0)\n'
    'signal.signal(signal.SIGTERM, term)\ntime.sleep(120)\n'
  )
  hang = _spawn(tmp_path, worker, 'time.sleep(120)')
  queue = [_item('hang', hang, expected_s=0.5), _item('after', 'pass', expected_s=0.5)]
  start = time.monotonic()
  index = _run(tmp_path / 'q', queue, '--budget-s', '4')
  assert time.monotonic() - start < 30  # not the item's 120 s
  hang_record, after = index['items']
  assert hang_record['status'] == 'timeout' and 3 < hang_record['wall_s'] < 15
  assert after['status'] == 'skipped' and after['reason'].startswith('the budget is spent')
  assert (tmp_path / 'term').read_text() == 'TERM'
  assert _gone(int((tmp_path / 'worker.pid').read_text()))


def test_workers_an_item_leaves_behind_are_ended_with_it(tmp_path):
  """An item that exits while its workers run on (a crash of the main process) leaves nothing
  on the GPU for the next item."""
  leave = _spawn(tmp_path, 'import time\ntime.sleep(120)\n', 'print("{}")')
  index = _run(tmp_path / 'q', [_item('leave', leave)])
  assert index['items'][0]['status'] == 'ok'
  assert _gone(int((tmp_path / 'worker.pid').read_text()))


def test_a_queue_stopped_by_sigterm_ends_its_item_and_says_so(tmp_path):
  """The device tool, or a user, stopping the queue: the running item (and its workers) must not
  run on, and queue.json must show what finished and what was cut off."""
  stop_parent = _spawn(
    tmp_path, 'import time\ntime.sleep(120)\n', 'import os, signal; os.kill(os.getppid(), '
    'signal.SIGTERM); time.sleep(120)'
  )  # fmt: skip
  queue = [_item('first', 'pass'), _item('stopped', stop_parent), _item('never', 'pass')]
  out = tmp_path / 'q'
  with pytest.raises(SystemExit) as stop:
    gq.main(['--out', str(out)], queue=tuple(queue), probe_argv=_GPU_PROBE)
  assert stop.value.code == 128 + 15
  index = json.loads((out / 'queue.json').read_text())
  assert _status(index) == {'first': 'ok', 'stopped': 'interrupted', 'never': 'pending'}
  assert not index['complete'] and _gone(int((tmp_path / 'worker.pid').read_text()))


def test_done_skips_what_an_earlier_call_finished_and_collect_makes_one_summary(tmp_path):
  log = tmp_path / 'ran'
  head = dict(
    date='d', tiny=False, platform='gpu', device_kind='Stand-in GPU', devices=1,
    jax_version='0', cpu_count=16, xla_flags='', end_to_end=None, wall_s=1.0,
  )  # fmt: skip

  def half(name: str) -> str:  # a gpu_report half: its report in the item's folder
    report = dict(head, rows=[{'name': f'row {name}', 'batch_size': 8, 'error': 'x'}])
    report['command'] = name
    return _logs(log, name) + (
      f'import json, sys; open(sys.argv[1] + "/gpu_report.json", "w").write(json.dumps({report!r}))'
    )

  queue = [
    gq.Item('r1', ('-c', half('r1'), '{out}'), (), 1, 'stand-in'),
    _item('fails', _logs(log, 'fails') + 'raise SystemExit(3)'),
    gq.Item('r2', ('-c', half('r2'), '{out}'), (), 400, 'stand-in'),
    _item('timing', _logs(log, 'timing') + 'print(\'{"images_per_sec": 7.5}\')'),
  ]
  q1, q2 = tmp_path / 'q1', tmp_path / 'q2'
  assert _status(_run(q1, queue, '--budget-s', '100')) == {
    'r1': 'ok', 'fails': 'failed', 'r2': 'skipped', 'timing': 'ok',
  }  # fmt: skip
  assert (q1 / 'r1' / 'gpu_report.json').exists()
  index = _run(q2, queue, '--done', str(q1))
  assert log.read_text().split() == ['r1', 'fails', 'timing', 'r2']  # q2 ran r2 alone
  assert _status(index)['r1'] == 'done earlier' and index['items'][0]['from'] == str(q1)
  # A third call told only of q2 still knows r1 finished (in q1): nothing left to run.
  assert set(_status(_run(tmp_path / 'q3', queue, '--done', str(q2))).values()) == {'done earlier'}

  out = tmp_path / 'all'
  assert gq.main(['--collect', str(q1), str(q2), '--out', str(out)], queue=tuple(queue)) == 0
  summary = json.loads((out / 'summary.json').read_text())
  got = {r['name']: (r['status'], r['part']) for r in summary['items']}
  assert got == {
    'r1': ('ok', str(q1)), 'fails': ('failed', str(q1)), 'r2': ('ok', str(q2)),
    'timing': ('ok', str(q1)),
  }  # fmt: skip
  merged = json.loads((out / 'gpu_report' / 'gpu_report.json').read_text())  # gpu_report --merge
  assert [r['name'] for r in merged['rows']] == ['row r1', 'row r2'] and merged['wall_s'] == 2.0
  md = (out / 'summary.md').read_text()
  assert '# GPU queue: 3 of 4 items ran to the end' in md
  assert re.search(r'\| timing \| ok \| [\d.]+ \| 1\.0 \| \S+q1 \| images_per_sec 7.5 \|', md)
  assert '| fails | failed |' in md and '## GPU report' in md and 'row r2' in md


def test_collect_flags_parts_from_different_devices(tmp_path, capsys):
  queue = [_item('a', 'pass')]
  _run(tmp_path / 'q1', queue)
  other = dict(_GPU, device_kind='Other GPU')
  _run(tmp_path / 'q2', queue, probe=('-c', f'import json; print(json.dumps({other!r}))'))
  dirs = [str(tmp_path / 'q1'), str(tmp_path / 'q2')]
  assert gq.main(['--collect', *dirs, '--out', str(tmp_path / 'all')], queue=tuple(queue)) == 0
  assert 'different devices (Other GPU, Stand-in GPU)' in capsys.readouterr().out


def test_collect_takes_each_item_from_the_call_where_it_went_best():
  """ok over failed over timed out over cut off; between equals, the later call (a rerun)."""
  summary = _load('gpu_queue_summary')
  calls = {
    'q1': {'a': 'ok', 'b': 'timeout', 'c': 'ok', 'd': 'failed', 'e': 'running'},
    'q2': {'a': 'done earlier', 'b': 'ok', 'c': 'ok', 'd': 'timeout', 'e': 'skipped'},
  }
  parts = [
    (d, {'items': [{'name': n, 'status': s} for n, s in items.items()]})
    for d, items in calls.items()
  ]
  got = {r['name']: (r['status'], r['part']) for r in summary._choose(parts, ['e', 'd', 'c'])}
  assert got == {
    'a': ('ok', 'q1'), 'b': ('ok', 'q2'), 'c': ('ok', 'q2'), 'd': ('failed', 'q1'),
    'e': ('running', 'q1'),
  }  # fmt: skip
  assert [r['name'] for r in summary._choose(parts, ['e', 'd', 'c'])] == ['e', 'd', 'c', 'a', 'b']


@pytest.mark.parametrize(
  'flags, message',
  [
    (['--only', 'a,nope'], "--only: unknown item 'nope'"),
    (['--budget-s', '0'], 'expected a positive number'),
    (['--done', 'missing'], 'cannot read missing/queue.json'),
    (['--collect', 'missing'], 'cannot read missing/queue.json'),
    (['--collect', 'q', '--only', 'a'], '--collect takes no --done or --only'),
  ],
)
def test_bad_input_is_one_error_line(tmp_path, monkeypatch, capsys, flags, message):
  monkeypatch.chdir(tmp_path)
  try:
    rc = gq.main(['--out', 'new', *flags], queue=(_item('a', 'pass'),), probe_argv=_GPU_PROBE)
  except SystemExit as e:
    rc = e.code
  err = capsys.readouterr().err
  assert rc == 1 and err.startswith('error: ') and message in err and len(err.splitlines()) == 1
  assert not (tmp_path / 'new').exists()


def test_refusals_that_protect_measurements(tmp_path, capsys):
  queue = (_item('a', 'pass'),)
  _run(tmp_path / 'q', queue)
  cases = [  # (flags, probe, message)
    (['--out', str(tmp_path / 'q')], _GPU_PROBE, 'holds a queue.json already'),
    (['--out', str(tmp_path / 't'), '--tiny', '--done', str(tmp_path / 'q')], _GPU_PROBE,
     'was a GPU queue'),
    (['--out', str(tmp_path / 'c')], ('-c', 'print(\'{"platform": "cpu"}\')'),
     'JAX runs on the CPU here'),
    (['--out', str(tmp_path / 'p')], ('-c', 'import jax_missing'), 'the device probe failed'),
  ]  # fmt: skip
  for flags, probe, message in cases:
    assert gq.main(flags, queue=queue, probe_argv=probe) == 1, flags
    err = capsys.readouterr().err
    assert err.startswith('error: ') and message in err and len(err.splitlines()) == 1, err
  for name in 'tcp':
    assert not (tmp_path / name / 'queue.json').exists()
  cpu = dict(_GPU, platform='cpu', device_kind='cpu')
  _run(tmp_path / 'tiny', queue, '--tiny', probe=('-c', f'import json; print(json.dumps({cpu!r}))'))
  dirs = [str(tmp_path / 'q'), str(tmp_path / 'tiny')]
  assert gq.main(['--collect', *dirs, '--out', str(tmp_path / 'all')], queue=queue) == 1
  assert capsys.readouterr().err == 'error: --collect mixes --tiny and GPU queues\n'


def test_the_queue_is_the_docs_list_and_every_command_parses():
  """Each real item names a script there is, with flags it takes and models it has, fits one
  call, and the docs' queue section shows its command (so a typo costs no GPU time)."""
  from resnet_jax.models import parse_name

  docs = open(os.path.join(_ROOT, 'docs', 'performance.md')).read()
  section = docs.split("### The next GPU session's queue")[1].split('\n## ')[0]
  names = [i.name for i in gq.QUEUE]
  assert len(set(names)) == len(names) and all(re.fullmatch(r'[a-z0-9_]+', n) for n in names)
  helps = {}
  for item in gq.QUEUE:
    assert 0 < item.expected_s <= 540 and item.basis, item
    assert item.argv[0] == item.tiny[0] and os.path.isfile(os.path.join(_ROOT, item.argv[0]))
    script = os.path.basename(item.argv[0])[:-3]
    if script not in helps:
      helps[script] = _help(script)
    for argv in (item.argv, item.tiny):
      flags = {a.split('=')[0] for a in argv if a.startswith('--')}
      assert flags <= helps[script], (item.name, flags - helps[script])
      if '--arch' in argv:
        parse_name(argv[argv.index('--arch') + 1])
    if script == 'benchmark_e2e':
      module = _load('benchmark_e2e')
      assert module.parse(list(item.argv[1:])).auto_augment != 'none'
    assert f'`{item.name}`' in section and ' '.join(item.argv) in section, item.name
  assert sum(i.expected_s for i in gq.QUEUE) <= 3 * 540  # three device calls


def _help(script: str) -> set[str]:
  module = _load(script)
  parse = getattr(module, 'parse', None) or module.main
  text = io.StringIO()
  with pytest.raises(SystemExit), contextlib.redirect_stdout(text):
    parse(['--help'])
  return set(re.findall(r'--[a-z][a-z0-9_-]*', text.getvalue()))


@pytest.mark.slow
def test_tiny_items_run_end_to_end_on_the_cpu(tmp_path):
  """Two real items, tiny, each in its own process: the CPU run of what the GPU will run."""
  out = tmp_path / 'q'
  rc = gq.main(['--out', str(out), '--tiny', '--only', 'grad_accum,e2e_trivial_wide'])
  assert rc == 0
  index = json.loads((out / 'queue.json').read_text())
  assert index['tiny'] and index['complete']
  env = index['environment']
  assert env['platform'] == 'cpu' and env['jax_version'] and env['python']
  accum, e2e = index['items']
  assert accum['status'] == 'ok' and e2e['status'] == 'ok', index['items']
  assert accum['result']['grad_accum_steps'] == 4 and accum['result']['images_per_sec'] > 0
  assert e2e['result']['auto_augment'] == 'trivial_wide' and e2e['result']['images_per_sec'] > 0
