"""Model summary: parameters, multiply-accumulates and output shape per stage.

  python -m resnet_jax.summary resnet50 [--plain] [--shortcut A|B|C] [--stride-on 1x1|3x3]
    [--stem 7x7|deep] [--avg-down] [--num-classes N] [--image-size N] [--preact]
    [--block basic|bottleneck] [--json] [--features [--output-stride 32|16|8]]

Any name of ``models.VALID_NAMES`` (ResNets, ResNeXts, Wide ResNets). ``--features`` summarises the
backbone (``features_only=True``: no classifier) and lists its C2-C5 feature maps with their
shapes and strides; ``--output-stride`` 16 / 8 dilates the last stages instead of striding them.

MACs are counted analytically: every ``nn.Conv`` and ``nn.Dense`` call is intercepted while the
model is traced abstractly (``jax.eval_shape``, no FLOPs spent), and contributes
``output elements x (kernel_h x kernel_w x in_channels / groups)`` (conv) or
``in_features x out_features`` (dense) multiply-accumulates for one image. BatchNorm, ReLU,
pooling and additions are not multiply-accumulates and are not counted (the paper's convention).
Parameter counts exclude BatchNorm running statistics (``batch_stats``; GroupNorm nets such as
BiT's ``resnetv2_50x1_bit`` have none). A weight-standardised conv counts as the conv it is.
"""

from __future__ import annotations

import json
import math
import re
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax import cli, default_config, runtime
from resnet_jax.models import parse_name
from resnet_jax.models.names import STEM_KINDS
from resnet_jax.models.stems import STEM_MODULES
from resnet_jax.train_step import count_params


def stage_of(top_level_name: str) -> str:
  """Group a top-level submodule name into its stage: 'stem', 'layer<k>' or 'head'."""
  m = re.fullmatch(r'(layer\d+)_\d+', top_level_name)
  if m:
    return m[1]
  if top_level_name in STEM_MODULES:
    return 'stem'
  return 'head'


def analyze(model: nn.Module, image_size: int, in_channels: int = 3) -> dict:
  """Per-stage output shape, params and MACs of ``model`` for one ``image_size`` square image.

  A scanned model (``scan=True``) is counted as its unrolled twin: the same function and
  parameters, but a scan body is traced once, so per-call interception would miss its repeats.
  """
  if getattr(model, 'scan', False):
    model = model.clone(scan=False)
  calls = []  # (module path, output shape, macs) for every submodule __call__, in call order

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != '__call__' or not module.path:
      return out
    macs = 0
    if isinstance(module, nn.Conv):
      kernel = math.prod(module.kernel_size)
      macs = math.prod(out.shape[1:]) * kernel * args[0].shape[-1] // module.feature_group_count
    elif isinstance(module, nn.Dense):
      macs = math.prod(out.shape[1:]) * args[0].shape[-1]
    calls.append((module.path, tuple(out.shape[1:]), macs))
    return out

  x = jax.ShapeDtypeStruct((1, image_size, image_size, in_channels), jnp.float32)
  with nn.intercept_methods(interceptor):
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)

  stages: dict[str, dict] = {}
  for path, shape, macs in calls:
    entry = stages.setdefault(stage_of(path[0]), {'output_shape': None, 'params': 0, 'macs': 0})
    entry['macs'] += macs
    if len(path) == 1:  # a direct child of the ResNet: its output is the stage output so far
      entry['output_shape'] = list(shape)
  for name, subtree in variables['params'].items():
    stages[stage_of(name)]['params'] += count_params(subtree)
  rows = [{'name': name, **entry} for name, entry in stages.items()]
  return {
    'params': count_params(variables['params']),
    'macs': sum(r['macs'] for r in rows),
    'stages': rows,
  }


def feature_maps(model: nn.Module, image_size: int, in_channels: int = 3) -> list[dict]:
  """Name, shape (H, W, C) and stride of each feature map a ``features_only`` backbone returns."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, in_channels), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  return [
    {'name': k, 'shape': list(v.shape[1:]), 'stride': image_size / v.shape[1]}
    for k, v in out.items()
  ]


def format_table(summary: dict) -> str:
  """Plain-text table, one row per stage plus a total."""
  lines = [f'{"stage":<8} {"output":>14} {"params":>14} {"MACs":>16}']
  for row in summary['stages']:
    shape = 'x'.join(str(d) for d in row['output_shape'])
    lines.append(f'{row["name"]:<8} {shape:>14} {row["params"]:>14,} {row["macs"]:>16,}')
  lines.append(f'{"total":<8} {"":>14} {summary["params"]:>14,} {summary["macs"]:>16,}')
  lines.append(f'({summary["macs"] / 1e9:.3f} G multiply-accumulates per image)')
  for f in summary.get('features', []):
    shape = 'x'.join(str(d) for d in f['shape'])
    lines.append(f'feature {f["name"]:<4} {shape:>14}  stride {f["stride"]:g}')
  return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = cli.ArgumentParser(
    prog='python -m resnet_jax.summary', description=__doc__.split('\n')[0]
  )
  parser.add_argument('name', nargs='?', help='model name, e.g. resnet50, resnet56, plain20')
  parser.add_argument('--arch', help='the model name, as the other commands spell it')
  parser.add_argument('--plain', action='store_true', help='the plain twin (no shortcuts)')
  parser.add_argument('--shortcut', choices=['A', 'B', 'C'])
  parser.add_argument('--stride-on', choices=['1x1', '3x3'])
  parser.add_argument(
    '--stem',
    choices=list(STEM_KINDS),
    help="deep: ResNet-C's three 3x3 convs (He et al. 2019); default: the name's own",
  )
  parser.add_argument(
    '--avg-down',
    action='store_true',
    default=None,
    help="ResNet-D's avg-pool projection shortcuts; default: the name's own (resnet50d)",
  )
  parser.add_argument(
    '--preact', action='store_true', help='pre-activation blocks (He et al. 2016)'
  )
  parser.add_argument(
    '--block',
    choices=['basic', 'bottleneck'],
    help='CIFAR block kind: bottleneck gives the 9n+2 nets (resnet164, resnet1001)',
  )
  parser.add_argument('--num-classes', type=cli.positive_int)
  parser.add_argument(
    '--image-size', type=cli.positive_int, help='default 224 (ImageNet names) or 32 (CIFAR)'
  )
  parser.add_argument(
    '--features',
    action='store_true',
    help='the backbone (features_only): C2-C5 shapes and strides, no classifier',
  )
  parser.add_argument(
    '--output-stride',
    type=int,
    default=32,
    choices=[32, 16, 8],
    help='16 / 8: dilate the last one / two stages instead of striding them',
  )
  parser.add_argument(
    '--json', action='store_true', help='print one JSON object instead of a table'
  )
  args = parser.parse_args(argv)
  if (args.name is None) == (args.arch is None):
    parser.error('name the model once: python -m resnet_jax.summary NAME (or --arch NAME)')
  args.name = args.name or args.arch

  try:
    spec = parse_name(args.name, args.block)
    config = default_config.base_config()
    config.model.update(
      name=args.name,
      num_classes=args.num_classes,
      residual=not args.plain,
      shortcut=args.shortcut,
      stride_on=args.stride_on,
      stem=args.stem,
      avg_down=args.avg_down,
      preact=True if args.preact else None,  # None: the name's own (pre-activation for wrn*)
      block=args.block,
      output_stride=args.output_stride,
      features_only=args.features,
      scan=False,  # one module per block: the per-layer table names them
    )
    model = runtime.build_model(config)
  except ValueError as e:
    parser.error(str(e))
  image_size = args.image_size or (224 if spec.family == 'imagenet' else 32)
  summary = analyze(model, image_size)
  if args.features:
    summary['features'] = feature_maps(model, image_size)
  header = {
    'name': args.name,
    'family': spec.family,
    'residual': model.residual,
    'shortcut': model.shortcut if model.residual else None,
    'stride_on': model.stride_on if model.block_cls.expansion > 1 else None,  # bottlenecks only
    'preact': model.block_cls.preact,
    'stem': {'imagenet': '7x7', 'deep': 'deep'}.get(model.stem, model.stem),
    'avg_down': model.avg_down,
    'norm': model.norm,  # 'group': GroupNorm + weight-standardised convs (BiT), no batch_stats
    'attention': model.attention,  # 'se': squeeze-and-excitation blocks, at 1/se_reduction
    'se_reduction': model.se_reduction if model.attention == 'se' else None,
    'block': spec.block,
    'groups': model.groups,
    'width_per_group': model.base_width,
    'widths': list(model.widths),
    'dropout_rate': model.dropout_rate,
    'output_stride': model.output_stride,
    'num_classes': None if model.features_only else model.num_classes,
    'image_size': image_size,
  }
  if args.json:
    print(json.dumps({**header, **summary}))
  else:
    print(', '.join(f'{k}={v}' for k, v in header.items()))
    print(format_table(summary))


if __name__ == '__main__':
  main()
