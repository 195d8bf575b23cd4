"""One command for the accelerator picture: JAX train/eval throughput, compile times, MFU, end to
end, and PyTorch on the same device in the same run, each JAX figure with its ratio to torch's best.

  python scripts/gpu_report.py --out DIR          # GPU: the full matrix, about 10-20 minutes
  python scripts/gpu_report.py --out DIR --tiny   # any machine: tiny models, the same code (CI)

On a GPU it measures: ResNet-50 train step, modern recipe (bf16, whole-batch BN, Nesterov, label
smoothing) at batch 256 and at the largest batch that fits; ResNet-50 paper recipe (float32, ghost
BN of 32) at 256; CIFAR ResNet-20 and ResNet-110 (paper recipe) at batch 128; ResNet-50 bf16 eval;
end to end (`benchmark_e2e`: Grain workers on this machine's cores decoding natural-image JPEGs,
transfer, step); and torchvision's resnet50 (channels_last, SGD momentum 0.9, weight decay 1e-4,
bf16 autocast for the bf16 rows) eager and `torch.compile`. Without a GPU it runs a tiny version
(resnet8 at 8x8, a few steps; torch only if installed) in well under a minute.
Writes DIR/gpu_report.json and DIR/gpu_report.md. XLA_FLAGS is left as the user set it (on one
H100 the latency-hiding scheduler measured no faster; docs/performance.md).
"""

from __future__ import annotations

import ast
import os
import platform
import shutil
import sys
import time

_SCRIPTS = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.join(_SCRIPTS, '..')
sys.path.insert(0, _ROOT)
sys.path.insert(0, _SCRIPTS)


import gpu_report_lib as lib  # pylint: disable=g-import-not-at-top,wrong-import-position
import gpu_report_output as output  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from resnet_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position


def nvidia_present() -> bool:
  return os.path.exists('/dev/nvidiactl') or shutil.which('nvidia-smi') is not None


ROW_KEYS = ('modern', 'paper', 'eval', 'cifar')


def plan(tiny: bool) -> list[dict]:
  """The measurement matrix: one dict per train/eval row."""
  if tiny:  # the same rows with one CIFAR net: the code paths, not the numbers
    r50, cifar, size, batch, big = 'resnet8', ['resnet8'], 8, 8, [16]
  else:
    r50, cifar, size, batch, big = 'resnet50', ['resnet20', 'resnet110'], 224, 256, [512, 768, 1024]
  rows = [
    {
      'key': 'modern',
      'name': f'{r50} train, modern recipe, bf16',
      'recipe': 'modern',
      'model': r50,
      'batch': batch,
      'size': size,
      'kind': 'train',
      'torch': 'imagenet',
      'grow': big,
    },
    {
      'key': 'paper',
      'name': f'{r50} train, paper recipe, f32',
      'recipe': 'paper',
      'model': r50,
      'batch': batch,
      'size': size,
      'kind': 'train',
      'torch': 'imagenet',
    },
    {
      'key': 'eval',
      'name': f'{r50} eval, bf16',
      'recipe': 'modern',
      'model': r50,
      'batch': batch,
      'size': size,
      'kind': 'eval',
      'torch': 'imagenet',
    },
  ]
  for name in cifar:
    rows.append(
      {
        'key': 'cifar',
        'name': f'{name} train (CIFAR), paper recipe, f32',
        'recipe': 'cifar',
        'model': name,
        'batch': 128 if not tiny else 8,
        'size': 32 if not tiny else 8,
        'kind': 'train',
        'torch': 'cifar',
      }
    )
  return rows


def run_row(
  row: dict, steps: int, deadline: float, torch_result: dict | None, profile: bool = False
) -> list[dict]:
  out = []
  res = lib.jax_row(row, steps, profile)
  res['name'] = row['name']
  peak = lib.peak_tflops(res['device_kind'], res['dtype'])
  if peak and res.get('tflops'):
    res['mfu'] = round(res['tflops'] / peak, 4)
    res['peak_tflops'] = peak
  if torch_result:
    res.update(torch_result)
    best = max(
      [
        v
        for k, v in res.items()
        if k.startswith('torch_') and k.endswith('images_per_sec') and isinstance(v, (int, float))
      ]
      or [0]
    )
    if best:
      res['ratio_jax_over_best_torch'] = round(res['images_per_sec'] / best, 3)
  out.append(res)
  for b in row.get('grow', []):  # the largest batch that fits (stop at the first failure)
    if time.time() > deadline:
      break
    try:
      big = lib.jax_row(dict(row, batch=b), steps)
    except Exception as e:  # pylint: disable=broad-except  # out of memory: the previous one fits
      out.append(
        {
          'name': f'{row["name"]}, batch {b}',
          'batch_size': b,
          'error': str(e).splitlines()[0][:200],
        }
      )
      break
    big['name'] = f'{row["name"]}, batch {b}'
    if peak and big.get('tflops'):
      big['mfu'] = round(big['tflops'] / peak, 4)
    out.append(big)
  return out


def parse_override(text: str) -> tuple[str, object]:
  """'model.scan=false' -> ('model.scan', False): a Python literal, else the string."""
  key, sep, value = text.partition('=')
  if not sep or not key:
    raise ValueError(f'--set wants KEY=VALUE, got {text!r}')
  lowered = {'true': True, 'false': False, 'none': None}
  if value.lower() in lowered:
    return key, lowered[value.lower()]
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value


def log(start: float, message: str) -> None:
  """Progress on stderr, so that a long GPU run can be followed."""
  print(f'[{time.time() - start:7.1f} s] {message}', file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
  from absl import flags as absl_flags  # pylint: disable=import-outside-toplevel

  absl_flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags: use defaults
  p = cli.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--out', required=True, help='directory for gpu_report.md and gpu_report.json')
  p.add_argument('--tiny', action='store_true', help='tiny CPU version (the default without a GPU)')
  p.add_argument(
    '--steps', type=cli.positive_int, default=None, help='timed steps per row (GPU 30, tiny 2)'
  )
  p.add_argument('--budget-s', type=float, default=1150, help='skip optional rows after this')
  p.add_argument('--no-torch', action='store_true')
  p.add_argument('--no-e2e', action='store_true')
  p.add_argument(
    '--rows',
    default=','.join(ROW_KEYS),
    help=f'comma-separated subset of {",".join(ROW_KEYS)} (empty: none), to split the report '
    'over several shorter runs',
  )
  p.add_argument('--no-grow', action='store_true', help='do not search for the largest batch')
  p.add_argument(
    '--profile', action='store_true', help="trace each row's first batch: device time by kernel"
  )
  p.add_argument(
    '--set',
    action='append',
    default=[],
    metavar='KEY=VALUE',
    help='override a config value in every row, e.g. model.scan=false (an A/B of one setting)',
  )
  p.add_argument(
    '--merge',
    nargs='+',
    metavar='JSON',
    help='combine the gpu_report.json of several partial runs into one report in --out',
  )
  args = p.parse_args(argv)
  keys = [k for k in args.rows.split(',') if k]
  if any(k not in ROW_KEYS for k in keys):
    p.error(f'--rows: unknown row in {args.rows!r} (choose from {",".join(ROW_KEYS)})')
  try:
    overrides = dict(parse_override(o) for o in args.set)
  except ValueError as e:
    p.error(str(e))
  try:  # before anything is measured (or merged): a bad --out must not lose the figures
    os.makedirs(args.out, exist_ok=True)
  except OSError as e:
    print(f'error: cannot create --out {args.out}: {e.strerror}', file=sys.stderr)
    return 1
  if args.merge:
    return output.merge_reports(args.merge, args.out)
  tiny = args.tiny or not nvidia_present()
  steps = args.steps or (2 if tiny else 30)
  selected = [
    dict(r, grow=[] if args.no_grow else r.get('grow', []), overrides=overrides) for r in plan(tiny)
  ]
  selected = [r for r in selected if r['key'] in keys]
  try:
    for row in selected:
      lib.recipe_config(row)
  except ValueError as e:
    p.error(str(e))
  start = time.time()
  deadline = start + args.budget_s
  use_torch = not args.no_torch and lib.torch_available()
  # PyTorch first, before JAX initialises its backend and takes most of the GPU's memory; its
  # cache is emptied afterwards. One process, one device, one run.
  torch_results = {}
  for row in selected if use_torch else []:
    if row.get('torch'):
      try:
        torch_results[row['name']] = lib.torch_row(row, steps)
      except Exception as e:  # pylint: disable=broad-except
        torch_results[row['name']] = {'torch_error': f'{type(e).__name__}: {str(e)[:200]}'}
      log(start, f'torch {row["name"]}: {torch_results[row["name"]]}')
  lib.release_torch_memory()
  platform_name = jax.devices()[0].platform
  if not tiny and platform_name == 'cpu':
    print(
      'error: an NVIDIA GPU is present but JAX runs on the CPU: install jax[cuda12] or '
      'jax[cuda13] (or pass --tiny)',
      file=sys.stderr,
    )
    return 1
  rows = []

  def snapshot(rows: list[dict], e2e: dict | None, complete: bool) -> dict:
    dev = jax.devices()[0]
    return {
      'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
      'complete': complete,  # False: written after a row, in case the run is cut off
      'tiny': tiny,
      'platform': platform_name,
      'device_kind': dev.device_kind,
      'devices': jax.device_count(),
      'jax_version': jax.__version__,
      'torch_version': lib.torch_version() if use_torch else None,
      'torch_error': None if args.no_torch else lib.torch_import_error(),
      'cpu_count': os.cpu_count(),
      'python': platform.python_version(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'overrides': overrides,
      'command': ' '.join(['python', 'scripts/gpu_report.py'] + list(argv or sys.argv[1:])),
      'wall_s': round(time.time() - start, 1),
      'rows': list(rows),
      'end_to_end': e2e,
    }

  for row in selected:
    if time.time() > deadline:
      rows.append(
        {'name': row['name'], 'batch_size': row['batch'], 'error': 'skipped: time budget'}
      )
      continue
    done = len(rows)
    try:
      rows.extend(run_row(row, steps, deadline, torch_results.get(row['name']), args.profile))
    except Exception as e:  # pylint: disable=broad-except  # one failed row must not lose the rest
      rows.append(
        {
          'name': row['name'],
          'batch_size': row['batch'],
          'error': f'{type(e).__name__}: {str(e).splitlines()[0][:200]}',
        }
      )
    for r in rows[done:]:  # every batch of a grown row: the log alone must hold the figures
      log(start, f'jax {r["name"]}: {r}')
    output.write_report(snapshot(rows, None, complete=False), args.out, quiet=True)
  e2e = None
  if not args.no_e2e:
    try:
      e2e = lib.end_to_end(tiny)
    except Exception as e:  # pylint: disable=broad-except
      e2e = {'error': f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'}
    log(start, f'end to end: {e2e}')
  output.write_report(snapshot(rows, e2e, complete=True), args.out)
  return 0


if __name__ == '__main__':
  sys.exit(main())
