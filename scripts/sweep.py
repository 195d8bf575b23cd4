r"""Depth x variant (x shortcut x seed) sweeps: run every grid point, then tabulate and plot.

  python scripts/sweep.py --config=configs/cifar.py --workdir=runs/t6 --depths=20,32,44,56,110 \
      --variants=residual,plain [--shortcuts=A,B,C] [--seeds=0,1] [--parallel=4 --devices=0,1,2,3] \
      [--config.key=value ...]
  python scripts/sweep.py --experiment=table6 --workdir=runs/t6     # from configs/paper.py

Each run trains in DIR/<variant><depth>[_<shortcut>][_s<seed>]/ via `python -m resnet_jax.main`;
finished runs (results.json) are skipped and partial ones resume, so rerunning the same command
continues a sweep. Then DIR/summary.json, DIR/summary.md and DIR/curves.png are written from
whatever runs exist. Exit status 1 if any run failed (the others still ran and are reported).
"""

from __future__ import annotations

import argparse
import os
import sys

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, _ROOT)

from resnet_jax import cli  # noqa: E402
from resnet_jax.analysis import sweep, sweep_report  # noqa: E402  (after the path insert)
from resnet_jax.default_config import load_config_module  # noqa: E402
from resnet_jax.workdir import CONFIG_FILE  # noqa: E402


def load_registry():
  """configs/paper.py, the list of the paper's experiments."""
  return load_config_module(os.path.join(_ROOT, 'configs', 'paper.py'))


def _parser() -> cli.ArgumentParser:
  p = cli.ArgumentParser(prog='python scripts/sweep.py', description=__doc__)
  p.add_argument(
    '--config', help='base config, e.g. configs/cifar.py or configs/imagenet.py:recipe=paper'
  )
  p.add_argument('--workdir', required=True, help='sweep directory (one sub-directory per run)')
  p.add_argument('--depths', help='comma-separated depths, e.g. 20,32,56')
  p.add_argument('--variants', help="comma-separated, among 'residual' and 'plain' (default both)")
  p.add_argument('--shortcuts', help='sweep shortcut options too, e.g. A,B,C (residual runs only)')
  p.add_argument('--seeds', help='sweep seeds too, e.g. 0,1,2 (tables show mean +- std)')
  p.add_argument('--experiment', help='fill the grid from configs/paper.py, e.g. table6')
  p.add_argument(
    '--parallel',
    type=cli.positive_int,
    help='runs at a time (default: one per --devices group, else 1: sequential)',
  )
  p.add_argument(
    '--devices',
    help='device groups, one per parallel slot, exported as '
    "CUDA_VISIBLE_DEVICES: '0,1,2,3' (one GPU each) or '0+1,2+3' (two each)",
  )
  p.add_argument(
    '--rerun-finished',
    action='store_true',
    help='relaunch finished runs too (e.g. after raising num_train_steps)',
  )
  p.add_argument('--report-only', action='store_true', help='only (re)write the summary files')
  p.add_argument(
    '--train-window',
    type=cli.positive_int,
    default=5,
    help='final train error = mean of this many last train points',
  )
  return p


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  p = _parser()
  args, rest = p.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith('--config.')]
  if bad:
    p.error(f'unrecognised arguments: {" ".join(bad)} (only --config.key=value are passed on)')
  if args.experiment:
    try:
      exp = load_registry().get(args.experiment)
    except ValueError as e:
      p.error(str(e))
    args.config = args.config or exp.config
    args.depths = args.depths or exp.depths
    args.variants = args.variants or exp.variants
    args.shortcuts = args.shortcuts or exp.shortcuts or None
    keys = {o.split('=', 1)[0] for o in rest}
    rest = [o for o in exp.overrides if o.split('=', 1)[0] not in keys] + rest
  if not args.report_only and not (args.config and args.depths):
    p.error('--config and --depths are required (or --experiment)')
  if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
    p.error(f'--workdir {args.workdir} is a file, not a directory')
  if args.report_only and not os.path.isdir(args.workdir):
    p.error(f'--report-only: no sweep directory {args.workdir}')
  if os.path.exists(os.path.join(args.workdir, CONFIG_FILE)):  # its summary would say 'no runs'
    p.error(
      f'--workdir {args.workdir} is a training run, not a sweep directory (one run per '
      'sub-directory): give its parent'
    )
  return args, rest


def _int_list(parser: argparse.ArgumentParser, flag: str, text: str | None, low: int) -> list[int]:
  values = sweep._csv(text)
  if not all(v.lstrip('-').isdigit() and int(v) >= low for v in values):
    parser.error(f'{flag} takes comma-separated integers >= {low}, got {text!r}')
  return [int(v) for v in values]


def plan(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[sweep.RunSpec]:
  """The grid, checked before anything runs or is written: each grid point's config must load
  and name a model (a typo in --config, its args or --depths failed every run, one by one)."""
  try:
    runs = sweep.plan_runs(
      _int_list(parser, '--depths', args.depths, 1),
      sweep._csv(args.variants or 'residual,plain'),
      sweep._csv(args.shortcuts) or None,
      _int_list(parser, '--seeds', args.seeds, 0) or None,
    )
  except ValueError as e:
    parser.error(str(e))
  from resnet_jax.models import parse_name  # noqa: PLC0415  (JAX only once the flags are good)

  path = args.config.partition(':')[0]
  try:
    module = load_config_module(path)
  except Exception as e:  # noqa: BLE001 -- any failure of the user's config file: one line
    parser.error(f'cannot load --config {path}: {type(e).__name__}: {e}')
  if not hasattr(module, 'get_config'):
    parser.error(f'--config {path} defines no get_config()')
  for spec in runs:
    arg = spec.config_arg(args.config)
    try:
      config = module.get_config(arg.partition(':')[2] or None)
      parse_name(str(config.model.name), config.model.get('block'))
    except Exception as e:  # noqa: BLE001 -- a bad config arg or depth
      parser.error(f'{spec.name} ({arg}): {e}')
  return runs


def main(argv: list[str]) -> int:
  parser, (args, overrides) = _parser(), parse_args(argv)
  failed: list[str] = []
  if not args.report_only:
    runs = plan(parser, args)
    devices = [g.replace('+', ',') for g in sweep._csv(args.devices)] or None
    parallel = args.parallel or (len(devices) if devices else 1)
    if devices and len(devices) < parallel:
      parser.error(f'--devices lists {len(devices)} device groups for --parallel={parallel}')
    status = sweep.run_sweep(
      runs,
      args.config,
      args.workdir,
      overrides,
      parallel=parallel,
      devices=devices,
      rerun_finished=args.rerun_finished,
    )
    failed = [name for name, rc in status.items() if rc != 0]
  paths = sweep_report.write_report(args.workdir, train_window=args.train_window)
  print(f'[sweep] wrote {", ".join(paths)}')
  if failed:
    print(f'[sweep] {len(failed)} run(s) did not finish: {", ".join(failed)}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
