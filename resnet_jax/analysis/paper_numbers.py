"""The numbers of He et al. 2015/2016 that our summary tables print beside ours.

DESIGN.md, "Paper numbers".

Keyed by what a run *is* (dataset family, variant, depth, shortcut option), so a run only gets a
paper number when it is the paper's configuration: e.g. ImageNet ResNet-18 of Table 2 is option A,
so a ResNet-18 trained with option B has none.
"""

from __future__ import annotations

# CIFAR-10 test top-1 error (%), Table 6 (option A, single model, best of 5 runs for 110).
CIFAR10_TABLE6 = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}

# ImageNet validation top-1 error (%), 10-crop testing. (variant, depth, shortcut) -> error.
# Table 2 reports top-1 only; Table 3 also top-5 (IMAGENET_TOP5 below).
IMAGENET_TABLES = {
  ('plain', 18, None): (27.94, 'Table 2'),
  ('plain', 34, None): (28.54, 'Table 2'),
  ('residual', 18, 'A'): (27.88, 'Table 2'),
  ('residual', 34, 'A'): (25.03, 'Tables 2-3'),
  ('residual', 34, 'B'): (24.52, 'Table 3'),
  ('residual', 34, 'C'): (24.19, 'Table 3'),
  ('residual', 50, 'B'): (22.85, 'Table 3'),
  ('residual', 101, 'B'): (21.75, 'Table 3'),
  ('residual', 152, 'B'): (21.43, 'Table 3'),
}

# ImageNet validation top-5 error (%), 10-crop testing, Table 3 (same keys as IMAGENET_TABLES).
IMAGENET_TOP5 = {
  ('plain', 34, None): (10.02, 'Table 3'),
  ('residual', 34, 'A'): (7.76, 'Table 3'),
  ('residual', 34, 'B'): (7.46, 'Table 3'),
  ('residual', 34, 'C'): (7.40, 'Table 3'),
  ('residual', 50, 'B'): (6.71, 'Table 3'),
  ('residual', 101, 'B'): (6.05, 'Table 3'),
  ('residual', 152, 'B'): (5.71, 'Table 3'),
}

# Table 4: single-model ImageNet validation error (%), (top-1, top-5), with the fully-convolutional
# multi-scale testing of Sec. 3.4 (whole image, shorter side in {224, 256, 384, 480, 640}, scores
# averaged over scales), not 10-crop. (variant, depth, shortcut) -> ((top-1, top-5), source).
IMAGENET_TABLE4 = {
  ('residual', 34, 'B'): ((21.84, 5.71), 'Table 4'),
  ('residual', 34, 'C'): ((21.53, 5.60), 'Table 4'),
  ('residual', 50, 'B'): ((20.74, 5.25), 'Table 4'),
  ('residual', 101, 'B'): ((19.87, 4.60), 'Table 4'),
  ('residual', 152, 'B'): ((19.38, 4.49), 'Table 4'),
}

# He et al. 2016 ("Identity Mappings in Deep Residual Networks"), CIFAR test error (%) of the
# full pre-activation nets: Table 2 (ResNet-110, basic blocks) and Table 3 (bottleneck
# ResNet-164/1001, batch 128). Each number is the MEDIAN of 5 runs (the paper's footnote), not a
# mean. (dataset, depth, block) -> error.
PREACT_2016 = {
  ('cifar10', 110, 'basic'): (6.37, 'He et al. 2016, Table 2'),
  ('cifar10', 164, 'bottleneck'): (5.46, 'He et al. 2016, Table 3'),
  ('cifar10', 1001, 'bottleneck'): (4.92, 'He et al. 2016, Table 3'),
  ('cifar100', 164, 'bottleneck'): (24.33, 'He et al. 2016, Table 3'),
  ('cifar100', 1001, 'bottleneck'): (22.71, 'He et al. 2016, Table 3'),
}

_IMAGENET_NAMES = ('imagenet2012', 'imagenet', 'imagenet2012_subset')


def _imagenet_key(variant: str, depth: int, shortcut: str | None) -> tuple[str, int, str | None]:
  return (variant, depth, None if variant == 'plain' else (shortcut or 'B'))


def paper_top5_error(
  dataset: str, variant: str, depth: int, shortcut: str | None
) -> tuple[float, str] | None:
  """(10-crop top-5 error in %, source) of the paper's ImageNet run (Table 3), or None."""
  if dataset not in _IMAGENET_NAMES:
    return None
  return IMAGENET_TOP5.get(_imagenet_key(variant, depth, shortcut))


def paper_multiscale_error(
  dataset: str, variant: str, depth: int, shortcut: str | None
) -> tuple[tuple[float, float], str] | None:
  """((top-1, top-5) in %, source) of Table 4's multi-scale result for this net, or None."""
  if dataset not in _IMAGENET_NAMES:
    return None
  return IMAGENET_TABLE4.get(_imagenet_key(variant, depth, shortcut))


def _cifar_default_shortcut(block: str) -> str:
  from resnet_jax.models.names import ArchSpec, default_shortcut  # pylint: disable=import-outside-toplevel

  return default_shortcut(ArchSpec('cifar', 0, True, block))


def paper_error(
  dataset: str,
  variant: str,
  depth: int,
  shortcut: str | None,
  preact: bool = False,
  block: str = 'basic',
) -> tuple[float, str] | None:
  """(top-1 error in %, source) of the paper's run matching this configuration, or None."""
  if preact:  # He et al. 2016: residual nets whose projections are option B, basic ones A
    if variant != 'residual' or (shortcut or 'A') != _cifar_default_shortcut(block):
      return None
    return PREACT_2016.get((dataset, depth, block))
  if block != 'basic' and dataset not in _IMAGENET_NAMES:
    return None
  if dataset == 'cifar10' and variant == 'residual' and (shortcut or 'A') == 'A':
    err = CIFAR10_TABLE6.get(depth)
    return (err, 'Table 6') if err is not None else None
  if dataset in _IMAGENET_NAMES:
    return IMAGENET_TABLES.get(_imagenet_key(variant, depth, shortcut))
  return None


# Zagoruyko & Komodakis 2016 ("Wide Residual Networks"), CIFAR test error (%) of WRN-28-10 with
# flip/translation augmentation and mean/std normalisation, median of 5 runs, without and with
# dropout 0.3 between the convs. Figures as printed in the authors' README
# (github.com/szagoruyko/wide-residual-networks), which reproduces the paper's Table 5 (arXiv
# v4, "effect of dropout in residual block"; the table number is from our reading of v4, the
# figures from the README). (dataset, depth, widen, dropout_rate) -> error.
WRN_2016 = {
  ('cifar10', 28, 10, 0.0): (4.00, 'Zagoruyko & Komodakis 2016, Table 5'),
  ('cifar10', 28, 10, 0.3): (3.89, 'Zagoruyko & Komodakis 2016, Table 5'),
  ('cifar100', 28, 10, 0.0): (19.25, 'Zagoruyko & Komodakis 2016, Table 5'),
  ('cifar100', 28, 10, 0.3): (18.85, 'Zagoruyko & Komodakis 2016, Table 5'),
}


def wrn_paper_error(
  dataset: str, depth: int, widen: int, dropout_rate: float
) -> tuple[float, str] | None:
  """(top-1 error in %, source) of the WRN paper's run with this configuration, or None."""
  return WRN_2016.get((dataset, depth, widen, round(float(dropout_rate), 4)))
