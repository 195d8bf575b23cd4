"""Registry: each experiment of He et al. 2015 (and the follow-ups) as one exact sweep.

Ablations are config arguments of the existing experiment files, never forked configs: every
entry names a base config, the grid, and the `--config.*` overrides. Use it through the sweep:

  python scripts/sweep.py --experiment=table6 --workdir=runs/table6
  python configs/paper.py            # prints every experiment's full command
  python configs/paper.py table3     # one of them

(`--experiment` fills --config/--depths/--variants/--shortcuts; flags given explicitly win.)
"""

from __future__ import annotations

import dataclasses
import sys


@dataclasses.dataclass(frozen=True)
class Experiment:
  paper: str  # which table / figure it reproduces
  config: str  # base config with its fixed args
  depths: str
  variants: str = 'residual,plain'
  shortcuts: str = ''
  overrides: tuple[str, ...] = ()
  note: str = ''

  def command(self, workdir: str) -> str:
    parts = [
      'python scripts/sweep.py',
      f'--config={self.config}',
      f'--workdir={workdir}',
      f'--depths={self.depths}',
      f'--variants={self.variants}',
    ]
    if self.shortcuts:
      parts.append(f'--shortcuts={self.shortcuts}')
    return ' '.join(parts + list(self.overrides))


EXPERIMENTS: dict[str, Experiment] = {
  'table6': Experiment(
    'CIFAR-10 Table 6 / Fig. 6 (plain vs residual, option A)',
    'configs/cifar.py',
    '20,32,44,56,110',
    note="Table 6 gives ResNet test errors; Fig. 6 the plain nets' training curves.",
  ),
  'table6_1202': Experiment(
    'CIFAR-10 Table 6: ResNet-1202 (19.4M params)', 'configs/cifar.py', '1202', 'residual'
  ),
  'fig6_val': Experiment(
    "CIFAR-10 45k/5k split (the paper's held-out validation for hyper-parameters)",
    'configs/cifar.py:val=5000',
    '20,32,44,56,110',
  ),
  'table2': Experiment(
    'ImageNet Table 2 / Fig. 4 (plain vs residual, option A)',
    'configs/imagenet.py:recipe=paper,shortcut=A',
    '18,34',
  ),
  'table3_34': Experiment(
    'ImageNet Table 3: ResNet-34 shortcut options A/B/C',
    'configs/imagenet.py:recipe=paper',
    '34',
    'residual',
    'A,B,C',
  ),
  'table3_deep': Experiment(
    'ImageNet Table 3: bottleneck ResNet-50/101/152 (option B)',
    'configs/imagenet.py:recipe=paper,shortcut=B',
    '50,101,152',
    'residual',
  ),
  'preact110': Experiment(
    'He et al. 2016 (Identity Mappings) Table 2: pre-activation ResNet-110 on CIFAR-10',
    'configs/cifar.py:preact',
    '110',
    'residual',
  ),
  'preact_bottleneck': Experiment(
    'He et al. 2016 Table 3: pre-activation bottleneck ResNet-164 / ResNet-1001 on CIFAR-10',
    'configs/cifar.py:preact,block=bottleneck',
    '164,1001',
    'residual',
    note='9n+2-layer bottleneck nets (1.7M / 10.2M weights), projection shortcuts; add '
    'dataset=cifar100 to the config args for the CIFAR-100 column.',
  ),
  'modern_r50': Experiment(
    'ResNet-50, modern recipe (cosine, warm-up, label smoothing, Nesterov, bf16, v1.5)',
    'configs/imagenet.py:recipe=modern',
    '50',
    'residual',
  ),
  'digits': Experiment(
    'The embedded digits degradation experiment of docs/results.md',
    'configs/digits.py',
    '8,20,32,56',
    overrides=(
      '--config.num_train_steps=1000',
      '--config.schedule.name=piecewise',
      '--config.schedule.boundaries=500,750',
      '--config.log_every_steps=20',
      '--config.eval_every_steps=100',
      '--config.checkpoint_every_steps=500',
      # As run on 2026-11-23: before the demo gained translations and scanned blocks became the
      # default (a scanned net draws other initial weights from the same seed).
      '--config.data.augment=none',
      '--config.model.scan=false',
    ),
  ),
}


def get(name: str) -> Experiment:
  if name not in EXPERIMENTS:
    raise ValueError(f'unknown experiment {name!r}; known: {", ".join(EXPERIMENTS)}')
  return EXPERIMENTS[name]


def main(argv: list[str]) -> int:
  """`python configs/paper.py [NAME ...]`: print the commands; an unknown NAME is one `error:`
  line and exit 1 (it was a traceback), before anything is printed."""
  try:
    experiments = [(key, get(key)) for key in argv or list(EXPERIMENTS)]
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  for key, e in experiments:
    print(f'# {key}: {e.paper}' + (f'\n# {e.note}' if e.note else ''))
    print(e.command(f'runs/{key}') + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
