"""He et al. 2015, Fig. 7: standard deviation of each 3x3 layer's responses on test images.

  python -m resnet_jax.analysis.responses --workdir=runs/t6/plain20 --workdir=runs/t6/residual20 \
      [--workdir=...] [--out=responses.png] [--split=test] [--max_examples=0]

"Response" = the output of the BatchNorm that follows a 3x3 conv: after BN, before the ReLU and
before the shortcut addition (the paper's definition). The stem conv counts when it is 3x3 (CIFAR
nets); a 7x7 stem and the 1x1 convs of bottlenecks and projections do not. The std is over every
element (examples x positions x channels) of the test set's responses, with inference-mode BN
(running statistics), so it measures how strongly each layer modifies the signal: the paper's
finding is that residual nets have smaller responses than their plain twins, and that deeper ResNets
have smaller ones still. Pre-activation nets have no BN directly after their convs and are refused.

Writes the two-panel plot (by layer index, and sorted by magnitude) and FILE.json with the values.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Sequence

from resnet_jax import cli

_CONV_RE = re.compile(r'conv(\d+)$')
_BLOCK_RE = re.compile(r'layer(\d+)_(\d+)$')


def response_layers(params: dict[str, Any]) -> list[tuple[str, ...]]:
  """Module paths of the BNs that directly follow a 3x3 conv, in forward order.

  Found from the parameters, not from module types: in the (post-activation) blocks conv<k> is
  followed by bn<k> (stem: conv1 -> bn1), so every 3x3 `conv<k>/kernel` with a sibling `bn<k>`.
  Scanned params (`layer{s}_scan`) are read in the unrolled layout: one entry per layer.
  """
  from resnet_jax.models import layout

  params = layout.to_unrolled(params)
  found = []

  def walk(tree: dict[str, Any], path: tuple[str, ...]) -> None:
    for name, sub in tree.items():
      if not isinstance(sub, dict):
        continue
      m = _CONV_RE.fullmatch(name)
      kernel = sub.get('kernel')
      if m and kernel is not None and tuple(kernel.shape[:2]) == (3, 3):
        bn = f'bn{m.group(1)}'
        if bn in tree:
          found.append(path + (bn,))
      else:
        walk(sub, path + (name,))

  walk(params, ())

  def order(path: tuple[str, ...]) -> tuple[int, int, int]:
    k = int(path[-1][2:])
    block = _BLOCK_RE.fullmatch(path[0]) if len(path) > 1 else None
    return (int(block.group(1)), int(block.group(2)), k) if block else (0, -1, k)

  return sorted(found, key=order)


def layer_stds(
  workdir: str, *, split: str | None = None, max_examples: int = 0, batch_size: int | None = None
) -> dict[str, Any]:
  """`workdir`'s newest weights' {'label', 'layers', 'std', ...} on its test images."""
  import jax
  import numpy as np

  from resnet_jax import data, runtime
  from resnet_jax.models import layout
  from resnet_jax.workdir import read_run_config

  if read_run_config(workdir).model.preact:
    raise ValueError(
      f'{workdir}: pre-activation nets have no BN right after each 3x3 conv; '
      'Fig. 7 is defined for the original (post-activation) blocks'
    )
  trained = runtime.load_trained_model(workdir)
  config = trained.experiment.config
  # Measured on the unrolled twin (same function): every layer is then its own module whose
  # output capture_intermediates records, whichever layout the run trained and saved.
  model = trained.experiment.model.clone(scan=False)
  variables = layout.to_unrolled(trained.variables)
  targets = response_layers(variables['params'])
  if not targets:
    raise ValueError(f'{workdir}: no BatchNorm after a 3x3 conv found in {config.model.name}')
  wanted = set(targets)

  @jax.jit
  def forward(variables, images):
    images = trained.experiment.preprocess(images, rng=None)  # uint8 batches -> model input
    _, state = model.apply(
      variables,
      images,
      train=False,
      mutable=['intermediates'],
      capture_intermediates=lambda mdl, method: method == '__call__' and tuple(mdl.path) in wanted,
    )
    out = {}
    for path in targets:
      node = state['intermediates']
      for name in path:
        node = node[name]
      out['/'.join(path)] = node['__call__'][0].astype(jax.numpy.float32)
    return out

  batch = batch_size or int(config.eval_batch_size)
  batches = data.create_eval_iterator(
    config, split=split, local_batch_size=batch, process_index=0, process_count=1, crops=1
  )
  sums = {'/'.join(p): np.zeros(3) for p in targets}  # count, sum, sum of squares (float64)
  seen = 0
  for b in batches:
    mask = np.asarray(b['mask'], bool)
    if max_examples:
      mask &= np.arange(len(mask)) + seen < max_examples
    if not mask.any():
      break
    acts = jax.device_get(forward(variables, np.asarray(b['image'])))
    for key, a in acts.items():
      a = np.asarray(a, np.float64)[mask]
      sums[key] += (a.size, a.sum(), np.square(a).sum())
    seen += int(mask.sum())
  stds = [float(np.sqrt(max(s[2] / s[0] - (s[1] / s[0]) ** 2, 0.0))) for s in sums.values()]
  from resnet_jax.models import parse_name

  spec = parse_name(config.model.name, config.model.block)
  residual, depth = bool(config.model.residual) and spec.residual, spec.depth
  return {
    'workdir': os.path.abspath(workdir),
    'label': f'{"ResNet" if residual else "plain"}-{depth}',
    'residual': residual,
    'depth': depth,
    'dataset': config.data.name,
    'split': split or config.data.eval_split,
    'num_examples': seen,
    'layers': list(sums),
    'std': stds,
  }


def plot_responses(results: Sequence[dict[str, Any]], out_path: str) -> str:
  """Fig. 7's two panels: std by layer index (top) and sorted in descending order (bottom)."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  fig, axes = plt.subplots(2, 1, figsize=(8, 7))
  depths = sorted({r['depth'] for r in results})
  cmap = plt.get_cmap('tab10')
  for r in results:
    colour = cmap(depths.index(r['depth']) % 10)
    style = '-' if r['residual'] else '--'
    xs = range(1, len(r['std']) + 1)
    axes[0].plot(xs, r['std'], style, color=colour, label=r['label'], lw=1.3)
    axes[1].plot(xs, sorted(r['std'], reverse=True), style, color=colour, label=r['label'], lw=1.3)
  axes[0].set_xlabel('layer index (original)')
  axes[1].set_xlabel('layer index (sorted by magnitude)')
  for ax in axes:
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel('std')
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8, ncol=2)
  datasets = ', '.join(sorted({r['dataset'] for r in results}))
  fig.suptitle(f'{datasets}: std of 3x3-layer responses (after BN, before ReLU/addition)')
  fig.tight_layout()
  fig.savefig(out_path, dpi=110)
  plt.close(fig)
  return out_path


def plot_formats() -> set[str]:
  """File extensions matplotlib can save a figure as (png, pdf, svg, ...)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg

  return set(FigureCanvasAgg.get_supported_filetypes())


def main(argv: list[str] | None = None) -> int:
  p = cli.ArgumentParser(prog='python -m resnet_jax.analysis.responses', description=__doc__)
  p.add_argument('--workdir', action='append', required=True, help='a run directory (repeatable)')
  p.add_argument(
    '--out',
    help='plot path, .png/.pdf/.svg/... (no extension: .png; default: responses.png beside the '
    'workdirs, in their '
    "common parent: a run's own directory is never written); values go to NAME.json",
  )
  p.add_argument('--split', help="dataset split (default: the run's eval split)")
  p.add_argument(
    '--max-examples', type=cli.non_negative_int, default=0, help='use at most this many (0: all)'
  )
  p.add_argument('--batch-size', type=cli.positive_int, help="default: the run's eval_batch_size")
  args = p.parse_args(argv)
  workdirs = [os.path.abspath(w) for w in args.workdir]
  parent = os.path.commonpath([os.path.dirname(w) for w in workdirs])
  out = args.out or os.path.join(parent, 'responses.png')
  out_dir = os.path.dirname(os.path.abspath(out))  # checked before minutes of forward passes
  if args.out and not os.path.isdir(out_dir):  # (the default's: the runs' parent, checked below)
    p.error(f'--out {out}: {out_dir} is not an existing directory')
  if os.path.isdir(out):
    p.error(f'--out {out} is a directory; name the plot file')
  ext = os.path.splitext(out)[1][1:].lower()
  formats = plot_formats()
  if not ext:  # matplotlib would write OUT.png while we named OUT
    out, ext = out + '.png', 'png'
  if ext not in formats:  # found by matplotlib only after the forward passes
    p.error(f'--out {out}: not a plot format matplotlib writes ({", ".join(sorted(formats))})')
  try:
    results = [
      layer_stds(w, split=args.split, max_examples=args.max_examples, batch_size=args.batch_size)
      for w in workdirs
    ]
  except (ValueError, FileNotFoundError) as e:
    cli.fail(e)
  plot_responses(results, out)
  json_path = os.path.splitext(out)[0] + '.json'
  with open(json_path, 'w') as f:
    json.dump(results, f, indent=2)
  for r in results:
    print(
      f'{r["label"]:>12}: {len(r["std"])} layers, mean std {sum(r["std"]) / len(r["std"]):.3f} '
      f'({r["num_examples"]} {r["split"]} images)'
    )
  print(f'wrote {out} and {json_path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
