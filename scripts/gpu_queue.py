"""The next GPU session's measurement queue as one resumable command.

  python scripts/gpu_queue.py --out DIR [--budget-s 560] [--only a,b] [--done PREV ...] [--tiny]
  python scripts/gpu_queue.py --collect DIR [DIR ...] --out ALL

A lent GPU comes for 30 minutes, at most 10 a command, and a machine idle for ~30 s between
commands is given back bare. So each item of QUEUE runs as its own process (a crash or an
out-of-memory costs that item only) with the budget's time left as its timeout; an item whose
expected time does not fit in what is left is skipped for the next that fits; DIR/queue.json is
rewritten atomically before and after every item (a command killed at its limit keeps what
finished); and `--done PREV` (a DIR of an earlier command, carried back onto the machine) skips
what finished there, so three device calls run the whole queue. `--collect` gathers the DIRs into
ALL/summary.md and ALL/summary.json, the two gpu_report halves merged by `gpu_report.py --merge`.
`--tiny` runs each item's tiny variant (the CPU; tests/test_gpu_queue.py). The calls to make are
in docs/performance.md, "The next GPU session's queue".

This process never touches the GPU (a JAX client here would hold its memory for the whole
queue): the device and versions are read once by a child, with gpu_report's helpers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

_SCRIPTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(_SCRIPTS)
sys.path.insert(0, ROOT)
sys.path.insert(0, _SCRIPTS)

import gpu_queue_run as runner  # noqa: E402  # pylint: disable=wrong-import-position
import gpu_queue_summary as summary  # noqa: E402  # pylint: disable=wrong-import-position

from resnet_jax import cli, workdir  # noqa: E402  # pylint: disable=wrong-import-position


@dataclasses.dataclass(frozen=True)
class Item:
  """One measurement: `argv` runs as `python ARGV...` in the repository root, '{out}' standing
  for the item's own folder under DIR; `tiny` is the same script on tiny inputs (the CPU).
  `expected_s` is its wall time on one H100, start-up included, and `basis` where that comes
  from: measured figures, or an estimate made from them (most items never ran on a GPU)."""

  name: str
  argv: tuple[str, ...]
  tiny: tuple[str, ...]
  expected_s: float
  basis: str


def _a(text: str) -> tuple[str, ...]:
  return tuple(text.split())


_COMPILE = 'the modern bf16 row compiled in 19.9 s and the paper f32 row in 24.8 s on the H100'
_R50_TINY = '--batch-size 4 --image-size 32 --dtype bfloat16 --steps 2 --warmup 1 --no-inference'


def _arch(name: str, what: str) -> Item:
  return Item(
    name,
    _a(
      f'scripts/benchmark.py --arch {name} --batch-size 256 --dtype bfloat16 --no-inference --json'
    ),
    _a(f'scripts/benchmark.py --arch {name} {_R50_TINY} --json'),
    60,
    f'estimate: {what}; resnet50 bf16 compiled in 19.9 s on the H100 (2026-11-24), plus the '
    "process's start-up and 22 steps of about 45 ms",
  )


# docs/performance.md's list, in its order.
QUEUE: tuple[Item, ...] = (
  Item(
    'report_r1',
    _a('scripts/gpu_report.py --out {out} --rows modern,paper,eval --no-e2e'),
    _a('scripts/gpu_report.py --out {out} --tiny --rows modern,paper,eval --no-e2e'),
    470,
    'estimate: the whole report took 761.6 s on an H100 (2026-11-24, second session); these rows '
    'are 6 of its 8 JAX compiles (168.5 of 205.3 s) and 3 of its 5 torch eager + compile twins',
  ),
  Item(
    'report_r2',
    _a('scripts/gpu_report.py --out {out} --rows cifar'),
    _a('scripts/gpu_report.py --out {out} --tiny --rows cifar'),
    300,
    'estimate: the rest of the 761.6 s report: 2 JAX compiles (36.8 s), 2 torch twins and the '
    'end-to-end run (150 steps at 5,816 img/s, its compile, workers and generated JPEGs)',
  ),
  Item(
    'recipe',
    _a(
      'scripts/benchmark_recipe.py --arch resnet50 --batch-size 256 --image-size 176 --steps 30 '
      '--rounds 3 --json'
    ),
    _a(
      'scripts/benchmark_recipe.py --arch resnet8 --batch-size 8 --image-size 8 --steps 2 '
      '--rounds 1 --json'
    ),
    140,
    f'estimate: 4 float32 compiles ({_COMPILE}, 2026-11-24) and 364 steps at 176 px',
  ),
  Item(
    'grad_accum',
    _a(
      'scripts/benchmark.py --arch resnet50 --batch-size 256 --dtype bfloat16 --bn-group 64 '
      '--grad-accum-steps 4 --no-inference --json'
    ),
    _a(
      'scripts/benchmark.py --arch resnet8 --batch-size 32 --image-size 8 --dtype bfloat16 '
      '--bn-group 2 --grad-accum-steps 4 --steps 2 --warmup 1 --no-inference --json'
    ),
    60,
    f'estimate: {_COMPILE} (2026-11-24), x1.5 with accumulation as on the CPU (158 vs 108 s), '
    'plus start-up',
  ),
  Item(
    'grad_accum_off',
    _a(
      'scripts/benchmark.py --arch resnet50 --batch-size 256 --dtype bfloat16 --bn-group 64 '
      '--no-inference --json'
    ),
    _a(
      'scripts/benchmark.py --arch resnet8 --batch-size 32 --image-size 8 --dtype bfloat16 '
      '--bn-group 2 --steps 2 --warmup 1 --no-inference --json'
    ),
    45,
    f'estimate: {_COMPILE} (2026-11-24), plus start-up',
  ),
  Item(
    'e2e_trivial_wide',
    _a(
      'scripts/benchmark_e2e.py --augment inception --auto-augment trivial_wide --decoder opencv '
      '--image-size 176 --steps 150 --json'
    ),
    _a(
      'scripts/benchmark_e2e.py --smoke --augment inception --auto-augment trivial_wide '
      '--decoder opencv --json'
    ),
    100,
    "estimate: the report's end-to-end row (2026-11-24: 150 steps at 5,816 img/s, 7 s) plus its "
    "step's 19.9 s compile, the workers' start and the generated JPEGs (not timed apart)",
  ),
  Item(
    'optimizers',
    _a(
      'scripts/benchmark_optimizers.py --arch resnet50 --batch-size 256 --image-size 224 '
      '--steps 30 --json'
    ),
    _a(
      'scripts/benchmark_optimizers.py --arch resnet8 --batch-size 8 --image-size 8 '
      '--num-classes 10 --steps 2 --json'
    ),
    150,
    f'estimate: 4 float32 train-step compiles ({_COMPILE}, 2026-11-24), 4 update-only compiles '
    'and 31 steps of each',
  ),
  _arch('resnet50d', 'the deep stem adds convolutions at full resolution'),
  _arch('seresnet50', 'squeeze-and-excitation adds pooled gates to every block'),
  _arch('resnetrs50', 'ResNet-RS: the deep stem and squeeze-and-excitation'),
  _arch('resnetv2_50x1_bit', 'BiT: GroupNorm and weight-standardised convolutions'),
  Item(
    'e2e_rsb',
    _a(
      'scripts/benchmark_e2e.py --augment inception --auto-augment rand-m7-mstd0.5-inc1 '
      '--interpolation random --decoder opencv --steps 150 --json'
    ),
    _a(
      'scripts/benchmark_e2e.py --smoke --augment inception --auto-augment rand-m7-mstd0.5-inc1 '
      '--interpolation random --decoder opencv --json'
    ),
    100,
    "estimate: as e2e_trivial_wide, at 224 px (the report's end-to-end row: 7 s of steps, "
    'a 19.9 s compile)',
  ),
)

# The child that reads the device once (gpu_report's own helpers, JAX's first device).
PROBE = (
  '-c',
  'import sys; sys.path.insert(0, "scripts"); import gpu_queue_run; gpu_queue_run.probe()',
)
FINISHED = ('ok', 'failed')  # what --done skips; a timed-out or skipped item runs again


def _load_done(paths: list[str], tiny: bool) -> dict[str, str]:
  """Item name -> the DIR where it finished, from earlier commands' queue.json."""
  done = {}
  for path in paths:
    index = summary.load_index(path)
    if index['tiny'] != tiny:
      raise ValueError(f'--done {path} was a {"tiny" if index["tiny"] else "GPU"} queue')
    for record in index['items']:
      if record['status'] in FINISHED:
        done[record['name']] = path
      elif record['status'] == 'done earlier':
        done[record['name']] = record['from']
  return done


def _records(queue: tuple[Item, ...], args) -> list[dict]:
  """The index's item records before the run: 'pending', or 'done earlier' with where."""
  records = []
  for item in queue:
    argv = [a.replace('{out}', os.path.join(args.out, item.name)) for a in _argv(item, args.tiny)]
    record = {'name': item.name, 'command': ' '.join(['python', *argv])}
    record.update(expected_s=item.expected_s, basis=item.basis, status='pending')
    if item.name in args.done:
      record.update(status='done earlier', **{'from': args.done[item.name]})
    records.append(record)
  return records


def run_queue(args, queue: tuple[Item, ...], probe_argv: tuple[str, ...]) -> int:
  """Runs the pending items in order within the budget; DIR/queue.json after every change."""
  start = time.monotonic()
  deadline = start + args.budget_s

  def log(message: str) -> None:
    print(f'[{time.monotonic() - start:6.1f} s] {message}', flush=True)

  try:
    env = runner.environment(probe_argv)
  except (RuntimeError, subprocess.TimeoutExpired) as e:
    return _fail(str(e))
  if env['platform'] == 'cpu' and not args.tiny:
    return _fail(
      'JAX runs on the CPU here (no GPU, or jax without its CUDA plugin): the queue times '
      'ResNet-50 at batch 256; pass --tiny for the CPU variant of each item'
    )
  log(f'{env.get("nvidia_smi") or env["device_kind"]}; jax {env["jax_version"]}')
  items = _records(queue, args)
  index = {
    'tiny': args.tiny,
    'budget_s': args.budget_s,
    'command': ' '.join(['python', 'scripts/gpu_queue.py', *args.argv]),
    'environment': env,
    'complete': False,  # True once the command went through every item (it was not cut off)
    'items': items,
  }

  def save() -> None:
    index['wall_s'] = round(time.monotonic() - start, 1)
    workdir.write_atomic(os.path.join(args.out, 'queue.json'), json.dumps(index, indent=1) + '\n')

  save()
  for item, record in zip(queue, items):
    if record['status'] != 'pending':
      log(f'{item.name}: finished in {record["from"]}')
      continue
    left = deadline - time.monotonic()
    if left <= 0 or (not args.tiny and item.expected_s > left):
      reason = 'the budget is spent' if left <= 0 else f'expected {item.expected_s:.0f} s'
      record.update(status='skipped', reason=f'{reason}, {max(left, 0):.0f} s left')
      log(f'{item.name}: skipped ({record["reason"]})')
      continue
    record.update(status='running', started=time.strftime('%H:%M:%S UTC', time.gmtime()))
    save()
    log(f'{item.name}: running' + ('' if args.tiny else f' (expected {item.expected_s:.0f} s)'))
    try:
      record.update(
        runner.run_item(_argv(item, args.tiny), os.path.join(args.out, item.name), left)
      )
    except BaseException:  # Ctrl-C or SIGTERM: the item's group is ended; say so, then stop
      record['status'] = 'interrupted'
      save()
      raise
    save()
    log(f'{item.name}: {record["status"]}, rc {record["rc"]}, {record["wall_s"]} s')
  index['complete'] = True
  save()
  left = [r['name'] for r in items if r['status'] not in FINISHED + ('done earlier',)]
  log(f'queue.json in {args.out}; not finished: {", ".join(left) or "none"}')
  return 0


def _argv(item: Item, tiny: bool) -> tuple[str, ...]:
  return item.tiny if tiny else item.argv


def _fail(message: str) -> int:
  print(f'error: {message}', file=sys.stderr)
  return 1


def main(argv: list[str] | None = None, queue: tuple[Item, ...] = QUEUE, probe_argv=PROBE) -> int:
  """`queue` and `probe_argv`: the tests' seam (stand-in items, a stand-in device record)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  p = cli.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    '--out',
    required=True,
    help="a new folder for queue.json and the items' folders (with --collect: ALL)",
  )
  p.add_argument(
    '--budget-s',
    type=cli.positive_float,
    default=560,
    help="seconds for the whole queue: each item's timeout is what is left, and an item "
    'expected to take longer is not started (a device call is limited to 600)',
  )
  p.add_argument('--only', default=None, help='comma-separated item names (default: every item)')
  p.add_argument(
    '--done',
    action='append',
    default=[],
    metavar='PREV',
    help='the --out of an earlier call: skip what finished there (repeatable)',
  )
  p.add_argument(
    '--tiny',
    action='store_true',
    help="each item's tiny variant, for the CPU (the H100 expectations do not apply)",
  )
  p.add_argument(
    '--collect',
    nargs='+',
    metavar='DIR',
    help="gather the calls' DIRs into ALL/summary.md and summary.json",
  )
  args = p.parse_args(argv)
  args.argv = argv
  names = [i.name for i in queue]
  if args.collect:
    if args.done or args.only:
      p.error('--collect takes no --done or --only')
    return summary.collect(args.collect, args.out, names)
  if args.only is not None:
    only = [n for n in args.only.split(',') if n]
    unknown = [n for n in only if n not in names]
    if unknown or not only:
      p.error(
        f'--only: unknown item {unknown[0] if unknown else "(none)"!r} (items: {", ".join(names)})'
      )
    queue = tuple(i for i in queue if i.name in only)
  if os.path.abspath(args.out) in {os.path.abspath(d) for d in args.done}:
    p.error('--out must be a new folder, not one of --done')
  try:
    args.done = _load_done(args.done, args.tiny)
  except ValueError as e:
    return _fail(str(e))
  if os.path.exists(os.path.join(args.out, 'queue.json')):
    return _fail(f'{args.out} holds a queue.json already: name a new --out (and this as --done)')
  try:
    os.makedirs(args.out, exist_ok=True)
  except OSError as e:
    return _fail(f'cannot create --out {args.out}: {e.strerror}')
  previous = signal.signal(signal.SIGTERM, _terminate)  # so that run_item ends its item first
  try:
    return run_queue(args, queue, probe_argv)
  finally:
    signal.signal(signal.SIGTERM, previous)


def _terminate(signum, frame) -> None:
  raise SystemExit(128 + signum)


if __name__ == '__main__':
  sys.exit(main())
