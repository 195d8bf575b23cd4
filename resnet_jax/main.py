"""Train (or resume) a ResNet: python -m resnet_jax.main --config=CONFIG[:ARGS] --workdir=DIR

Examples:
  python -m resnet_jax.main --config=configs/digits.py --workdir=workdirs/digits
  python -m resnet_jax.main --config=configs/cifar.py:depth=56,plain --workdir=runs/plain56
  python -m resnet_jax.main --config=configs/r50.py:recipe=modern,batch=1024 --workdir=runs/r50
  python -m resnet_jax.main --config=configs/r18.py --workdir=runs/r18 --config.data.data_dir=DIR

Configs (configs/): digits.py (offline demo), cifar.py, fashion_mnist.py, wrn.py, imagenet.py
and r18.py ... r152.py, resnetrs.py, finetune.py, bit.py. Text after ':' selects a variant (see
each file's docstring);
--config.KEY=VALUE overrides any field (all fields: resnet_jax/default_config.py).
Rerunning the same command with the same --workdir resumes the run. Outputs in DIR:
metrics.jsonl, tensorboard/, checkpoints/, config.json and, at the end, results.json.
"""

from __future__ import annotations

from resnet_jax.preemption import StopRequest

# Installed before anything slow is imported: SIGTERM or Ctrl-C during start-up (importing JAX,
# restoring) stops the run cleanly instead of killing it mid-initialisation.
_STOP = StopRequest()
if __name__ == '__main__':
  _STOP.install()

# pylint: disable=wrong-import-position
import inspect
import logging
import os
import sys
import threading

from absl import app, flags
from ml_collections import config_flags

from resnet_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
config_flags.DEFINE_config_file(
  'config',
  None,
  'Experiment config file, e.g. configs/r50.py or configs/cifar.py:depth=56,plain.',
  lock_config=True,
)
flags.DEFINE_string(
  'coordinator_address',
  None,
  'HOST:PORT of process 0, for multi-process runs (jax.distributed.initialize).',
)
flags.DEFINE_integer('num_processes', None, 'Number of processes of a multi-process run.')
flags.DEFINE_integer('process_id', None, "This process's index in [0, num_processes).")
flags.DEFINE_integer(
  'initialization_timeout',
  None,
  'Seconds a multi-process run waits for all its processes to join before giving up with one '
  "line (jax.distributed.initialize's initialization_timeout; default JAX's, 300).",
  lower_bound=1,
)
flags.DEFINE_bool(
  'distributed',
  None,
  'Call jax.distributed.initialize() with no arguments (cluster auto-detection: '
  'SLURM, TPU pods, ...). Default: only when the coordinator flags are given or '
  'SLURM runs several tasks.',
)

# OSError: a disk that fills up or turns read-only mid-run, a workdir entry of the wrong kind
# (tensorboard/ a file): the error names the path, and the checkpoints saved so far stay usable.
_ERRORS_SHOWN_AS_ONE_LINE = (ValueError, OSError)


def initialize_distributed() -> None:
  """Starts JAX's multi-controller runtime when this is one process of several."""
  import jax

  explicit = FLAGS.coordinator_address or FLAGS.num_processes or FLAGS.process_id is not None
  auto = FLAGS.distributed
  if auto is None:
    auto = int(os.environ.get('SLURM_NTASKS', '1')) > 1
  if not (explicit or auto):
    return
  # Cross-process collectives between CPU devices (tests, CPU clusters) go through gloo.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  timeout = FLAGS.initialization_timeout or _jax_initialization_timeout()
  # When a process never joins, JAX's own timeout aborts this one from C++ (a fatal stack trace,
  # exit 134), with no exception to turn into one line: the watchdog ends it first, with one.
  watchdog = None
  if not os.environ.get('RESNET_JAX_TRACEBACK'):
    watchdog = threading.Timer(timeout, _never_joined, args=(timeout,))
    watchdog.daemon = True
    watchdog.start()
  options = {'initialization_timeout': timeout + (_JAX_BACKSTOP_S if watchdog else 0)}
  try:
    if explicit:
      jax.distributed.initialize(
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
        **options,
      )
    else:
      jax.distributed.initialize(**options)
  except (ValueError, RuntimeError) as e:  # bad flags; the coordinator or a peer never came
    if os.environ.get('RESNET_JAX_TRACEBACK'):
      raise
    print(
      f'error: cannot start the multi-process run: {cli.first_line(e)} (give --coordinator_address='
      'HOST:PORT, --num_processes=N and --process_id=I, or none of them on a cluster JAX '
      'detects)',
      file=sys.stderr,
    )
    sys.exit(1)
  finally:
    if watchdog is not None:
      watchdog.cancel()


_JAX_BACKSTOP_S = 30  # JAX's own timeout, after the watchdog's: only if the watchdog never ran


def _jax_initialization_timeout() -> int:
  """JAX's default wait for every process to join (300 s in JAX 0.10)."""
  import jax

  parameter = inspect.signature(jax.distributed.initialize).parameters['initialization_timeout']
  return int(parameter.default)


def _never_joined(timeout: int) -> None:
  """The watchdog's end of a run whose processes did not all join within `timeout` seconds."""
  who = (
    f'process {FLAGS.process_id} of {FLAGS.num_processes}'
    if FLAGS.num_processes
    else 'this process'
  )
  print(
    f'error: cannot start the multi-process run: not every process joined within {timeout} s '
    f'({who}; start them all with the same --coordinator_address and --num_processes, or give '
    'them longer with --initialization_timeout=SECONDS)',
    file=sys.stderr,
    flush=True,
  )
  sys.stdout.flush()
  os._exit(1)  # pylint: disable=protected-access  # the main thread is blocked inside JAX


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _usage_error(f'unexpected arguments: {" ".join(argv[1:])}')
  if FLAGS.workdir is None:
    _usage_error('--workdir is required')
  try:
    config = FLAGS.config  # a file that failed to load is a proxy raising on first use
    if config is not None:
      config.get('batch_size')
  except Exception as e:  # noqa: BLE001 -- any failure of the user's config file: one line
    print(f'error: {_config_load_error(e)}', file=sys.stderr)
    sys.exit(1)
  if config is None:
    _usage_error('--config is required')
  logging.getLogger('absl').setLevel(logging.INFO)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
  for noisy in ('absl', 'orbax', 'jax._src', 'tensorflow_datasets'):
    logging.getLogger(noisy).setLevel(logging.WARNING)

  import jax

  from resnet_jax import train

  initialize_distributed()
  if jax.process_index() == 0:
    logging.info(
      'JAX %s: %d processes, %d devices (%s)',
      jax.__version__,
      jax.process_count(),
      jax.device_count(),
      jax.devices()[0].platform,
    )
  try:
    results = train.train_and_evaluate(config, FLAGS.workdir, stop=_STOP.install())
  except _ERRORS_SHOWN_AS_ONE_LINE + (train.NonFiniteLossError, jax.errors.JaxRuntimeError) as e:
    # A peer's failure reaches a multi-process run as a JaxRuntimeError, or wrapped by Orbax in
    # a ValueError when it happens during a save.
    peer = jax.process_count() > 1 and _is_peer_failure(e)
    if (isinstance(e, jax.errors.JaxRuntimeError) and not peer) or os.environ.get(
      'RESNET_JAX_TRACEBACK'
    ):
      raise
    message = str(e)
    if peer:
      message = (
        f'process {jax.process_index()} of {jax.process_count()}: another process did not '
        f'take part ({cli.first_line(e)}); it probably failed or was killed: see its output'
      )
    print(f'error: {message}', file=sys.stderr, flush=True)
    if peer and _peer_is_gone(e):
      # Its end of JAX's shutdown barrier never comes: a normal exit waited for the heartbeat
      # timeout (~100 s) and then aborted with a fatal C++ stack trace (exit 134). Saves and the
      # input pipeline were closed by train_and_evaluate; metrics are flushed at each point.
      sys.stdout.flush()
      os._exit(1)  # pylint: disable=protected-access
    sys.exit(1)
  if results.get('stopped'):
    if jax.process_index() == 0:
      where = 'before training started' if results['step'] is None else f'at step {results["step"]}'
      print(f'stopped {where} on request: rerun the same command to resume', file=sys.stderr)
    return
  if jax.process_index() == 0 and 'eval' in results:
    ev = results['eval']
    print(
      f'done: step {results["step"]}, {results["eval_split"]} top-1 error '
      f'{100 * ev["top1_error"]:.2f}% ({ev["num_examples"]} examples), results in '
      f'{os.path.join(FLAGS.workdir, "results.json")}'
    )
    for name, ev in results.get('evals', {}).items():
      print(evaluator_line(name, ev))


def evaluator_line(name: str, ev: dict) -> str:
  """The `done:` summary's line for extra evaluator `name`'s results.json figures; a few-shot
  probe's has an error per shot count and no `top1_error`."""
  from resnet_jax.fewshot import errors_text  # jax is loaded by now

  where = f'{ev["dataset"]} {ev["split"]}' if ev.get('dataset') else ev['split']
  if 'train_split' in ev:  # a few-shot probe (resnet_jax.fewshot)
    return (
      f'  {name}: {ev["train_split"]} -> {where} few-shot top-1 error {errors_text(ev)} '
      f'({ev["num_examples"]} test examples)'
    )
  real = (
    f', ReaL top-1 error {100 * ev["real_top1_error"]:.2f}% ({ev["real_num_examples"]})'
    if 'real_top1_error' in ev
    else ''
  )
  return (
    f'  {name}: {where} top-1 error {100 * ev["top1_error"]:.2f}% '
    f'({ev["num_examples"]} examples){real}'
  )


# A cross-process step that failed because of another process: gloo's collectives (CPU) and
# JAX's coordination service. Seen: a timeout waiting for a process that failed at start-up
# ('Gloo context initialization failed: DEADLINE_EXCEEDED ... CoordinationServiceError'), a
# read error from one killed mid-run ('Gloo AllGather failed: ... Connection reset by peer').
# NCCL (GPU): only its remote-error text (ncclRemoteError), as XLA raised it when a peer died:
# 'NCCL operation async_err failed: remote process exited or there was a network error'
# (https://github.com/jax-ml/jax/issues/19307). NCCL's other failures ('unhandled system error',
# 'unhandled cuda error': set-up and driver faults in jax-ml/jax#22747, #17399) keep their
# traceback.
_NCCL_REMOTE_ERROR = 'remote process exited or there was a network error'
_PEER_COLLECTIVES = ('Gloo', 'CoordinationServiceError', _NCCL_REMOTE_ERROR)
_PEER_GONE = ('Connection reset by peer', 'Connection closed by peer', _NCCL_REMOTE_ERROR)


def _is_peer_failure(e: Exception) -> bool:
  """A cross-process collective or rendezvous that failed because of another process (which has
  typically exited with its own error, e.g. a bad flag or a missing file on its host)."""
  return any(s in str(e) for s in _PEER_COLLECTIVES)


def _peer_is_gone(e: Exception) -> bool:
  """The other process's connection closed: it exited or was killed (not waiting at exit)."""
  return _is_peer_failure(e) and any(s in str(e) for s in _PEER_GONE)


def _usage_error(message: str) -> None:
  """One line, not absl's page of every flag: the usage is in the line itself."""
  print(
    f'error: {message} (usage: python -m resnet_jax.main --config=CONFIG[:ARGS] --workdir=DIR)',
    file=sys.stderr,
  )
  sys.exit(1)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing; config errors (a misspelled --config.key, a bad config arg) in one line."""
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    print(f'error: {_one_line(e)}', file=sys.stderr)
    sys.exit(1)
  except Exception as e:  # noqa: BLE001 -- the config file itself failed to load
    print(f'error: {_config_load_error(e)}', file=sys.stderr)
    sys.exit(1)


def _config_load_error(e: BaseException) -> str:
  """One line for a --config file that is missing, unparsable or raises while loading."""
  while e.__cause__ is not None and not isinstance(e, SyntaxError):
    e = e.__cause__
  if isinstance(e, SyntaxError):
    return f'cannot load --config file {e.filename}: line {e.lineno}: {e.msg}'
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  reason = lines[-1] if lines else type(e).__name__
  if isinstance(e, OSError):
    return f'cannot load the --config file: {reason}'
  return f'cannot load the --config file: {type(e).__name__}: {reason}'


def _one_line(e: Exception) -> str:
  """The informative line of a config_flags error (they embed tracebacks and escaped quotes)."""
  text = str(e).replace("\\'", "'").replace('\\n', '\n').strip()
  if len(text) > 1 and text[0] == text[-1] and text[0] in '\'"':  # repr() of the message
    text = text[1:-1]
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  if isinstance(e, AttributeError) and 'get_config' in text:
    return 'cannot load the --config file: it defines no get_config()'
  if isinstance(e, AttributeError) and lines:  # misspelled --config.key
    return f'unknown config key {lines[0].strip(chr(39))!r}' + (
      f' ({lines[1]})' if len(lines) > 1 else ''
    )
  last = lines[-1] if lines else repr(e)
  return last.split(': ', 1)[1] if last.startswith(('ValueError: ', 'KeyError: ')) else last


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
