"""Input-pipeline throughput: examples/s and host cores of the real train/eval pipelines.

Runs on generated JPEG datasets in TFDS ArrayRecord format (`resnet_jax.data.generated`: crops of
real photographs), so it measures the same path as CIFAR-10 (small images, pad/crop/flip) and
ImageNet (JPEG bytes, reduced-size decode, scale augmentation, crop, flip) without any download;
or, with `--dataset NAME --data_dir DIR`, the same pipelines on a prepared TFDS dataset:

  python scripts/benchmark_input.py                     # cifar + imagenet pipelines, workers 0,1,2
  python scripts/benchmark_input.py --workers=0,2,4,8 --json
  python scripts/benchmark_input.py --compare-old       # also the old float32-on-host pipeline
  python scripts/benchmark_input.py --dataset imagenet2012 --data_dir ~/tensorflow_datasets \\
      --pipelines imagenet_train,imagenet_eval_10crop
  python scripts/benchmark_input.py --smoke             # a few tiny batches (CI)
  python scripts/benchmark_input.py --dataset image_folder --data_dir ROOT   # ROOT/train/<class>/
  python scripts/benchmark_input.py --write-tree DIR    # the generated ImageNet-like JPEGs as a
      # tree DIR/<split>/<class>/<i>.jpg (the same bytes), to time image_folder against ArrayRecord

Every row reports examples/s and the host CPU seconds the pipeline burned (main process + Grain
workers, from the OS's accounting), hence `examples_per_core_sec` and
`cores_per_7500_images_per_sec`:
how many such cores feed one H100 at the 7,500 images/s target. `impl`: 'new' is the product's
pipeline (uint8 on the host; normalisation and colour on the device, not timed here, it is part of
the step); 'old' is the frozen pre-uint8 path (`scripts/legacy_augment.py`: float32 normalised on
the host), measured on the same records in the same run.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time

_SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_SCRIPTS, '..'))
sys.path.insert(0, _SCRIPTS)
# Grain worker processes unpickle the legacy preprocessor by module name: let them import it too.
os.environ['PYTHONPATH'] = os.pathsep.join(
  [_SCRIPTS, os.path.join(_SCRIPTS, '..')] + [p for p in [os.environ.get('PYTHONPATH')] if p]
)

import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from host_cpu import CpuClock, rates  # pylint: disable=g-import-not-at-top,wrong-import-position

import resnet_jax.data as data  # pylint: disable=g-import-not-at-top,wrong-import-position
from resnet_jax import cli, default_config  # pylint: disable=wrong-import-position
from resnet_jax.data import auto_augment as auto_augment_lib  # pylint: disable=wrong-import-position
from resnet_jax.data import generated, pipeline, sources  # pylint: disable=wrong-import-position
from resnet_jax.data import views as augment_views  # pylint: disable=wrong-import-position

# name: (generated config, augment, image_size, batch size, smoke config)
PIPELINES = {
  'cifar_train': ('cifar', 'cifar', 32, 128, 'tiny'),
  'imagenet_train': ('imagenet', 'imagenet', 224, 32, 'tiny'),
  'inception_train': ('imagenet', 'inception', 224, 32, 'tiny'),
  'imagenet_eval_10crop': ('imagenet', 'imagenet', 224, 8, 'tiny'),
}


def make_config(
  dataset: str,
  augment: str,
  image_size: int,
  data_dir: str | None,
  workers: int,
  prefetch: int,
  decoder: str = 'pil',
  auto_augment: str = 'none',
  interpolation: str = 'bilinear',
) -> ml_collections.ConfigDict:
  """The product's base config with this measurement's data fields."""
  config = default_config.base_config()
  config.data.update(
    name=dataset,
    data_dir=data_dir,
    train_split='train',
    eval_split='test',
    image_size=image_size,
    augment=augment,
    normalize='per_pixel_mean',
    num_workers=workers,
    prefetch=prefetch,
    decoder=decoder,
    auto_augment=auto_augment,
    interpolation=interpolation,
  )
  return config


def legacy_preprocessor(config: ml_collections.ConfigDict):
  """The old per-example path (float32 normalised + PCA on the host) with this data's statistics."""
  import legacy_augment  # pylint: disable=g-import-not-at-top

  host = pipeline.make_preprocessor(config)
  norm = pipeline.make_normalization(config)
  pre = legacy_augment.Preprocessor(
    host.augment,
    host.image_size,
    host.channels,
    legacy_augment.Normalizer(norm.normalizer.mean, norm.normalizer.std),
    norm.pca_eigvals,
    norm.pca_eigvecs,
  )
  pre.output_dtype = np.float32  # the eval iterator pads with this dtype
  return pre


def write_tree(root: str, data_dir: str, config_name: str = 'imagenet') -> int:
  """Writes the generated dataset's JPEG bytes as an image-folder tree; returns the image count."""
  generated.prepare(config_name, data_dir)
  config = make_config(f'generated_jpegs/{config_name}', 'imagenet', 224, data_dir, 0, 1)
  count = 0
  for split in ('train', 'test'):
    records = sources.open_split(config, split).records
    for i in range(len(records)):
      record = records[i]
      directory = os.path.join(root, split, f'class_{int(record["label"]):03d}')
      os.makedirs(directory, exist_ok=True)
      with open(os.path.join(directory, f'{i:07d}.jpg'), 'wb') as f:
        f.write(bytes(record['image']))
      count += 1
  return count


def buffered_batches(prefetch: int, num_workers: int) -> int:
  """How many batches the pipeline can hold computed ahead of its consumer: without workers the
  read threads' buffer; with workers, per worker, its read buffer, its queue to the main process
  and the main process's buffer for it (Grain's mp_prefetch), `prefetch` batches each."""
  prefetch, workers = max(1, int(prefetch or 1)), pipeline.worker_count(num_workers)
  return prefetch if workers == 0 else 3 * prefetch * workers


def min_timed_batches(prefetch: int, num_workers: int) -> int:
  """Timed batches needed for a figure: twice what the buffers hold. A window that ends before
  the buffers empty times batches computed before it (`--batches 2` once read 249,537
  examples/s); at twice their size, at most half the timed batches can be such."""
  return 2 * buffered_batches(prefetch, num_workers)


def measure(
  config: ml_collections.ConfigDict,
  batch_size: int,
  num_batches: int,
  warmup: int,
  eval_crops: int | None,
  preprocessor=None,
) -> dict[str, float]:
  """Examples/s and CPU seconds over `num_batches` batches, after `warmup` batches plus as many as
  the prefetch buffers hold (worker start-up is not timed). `num_batches` must be at least
  `min_timed_batches`: batches computed ahead, before the window, are a bounded share of it."""
  buffered = buffered_batches(config.data.prefetch, config.data.num_workers)
  warmup += buffered
  if eval_crops is None:
    it = data.create_train_iterator(
      config,
      local_batch_size=batch_size,
      process_index=0,
      process_count=1,
      seed=0,
      preprocessor=preprocessor,
    )
  else:  # the train split is the larger one: one pass covers the timed batches without restarts
    num_train = len(sources.open_split(config, 'train'))  # an image tree may have no 'test'
    available = data.num_eval_batches(num_train, batch_size, 1)
    warmup = max(0, min(warmup, available - num_batches))
    num_batches = min(num_batches, available - warmup)
    least = min_timed_batches(config.data.prefetch, config.data.num_workers)
    if num_batches < least:  # a small split (generated or --smoke): say so beside the figure
      print(
        f'note: the split gives {num_batches} timed batches with {config.data.num_workers} '
        f'workers, fewer than {least}: batches computed before the window may inflate this row',
        file=sys.stderr,
      )
    it = iter(
      data.create_eval_iterator(
        config,
        split='train',
        local_batch_size=batch_size,
        process_index=0,
        process_count=1,
        crops=eval_crops,
        preprocessor=preprocessor,
      )
    )
  clock = CpuClock()
  try:
    for _ in range(warmup):
      next(it)
    cpu0, start = clock.read(), time.perf_counter()
    nbytes = 0
    for _ in range(num_batches):
      nbytes += next(it)['image'].nbytes
    wall = time.perf_counter() - start
    cpu = CpuClock.spent(cpu0, clock.read())
  finally:
    if hasattr(it, 'close'):
      it.close()
  examples = num_batches * batch_size
  return {
    **rates(examples, wall, cpu),
    'timed_batches': num_batches,
    'bytes_per_example': nbytes // examples,
    'cpu_includes_workers': clock.includes_workers,
  }


def main(argv: list[str] | None = None) -> int:
  from absl import flags as absl_flags  # pylint: disable=import-outside-toplevel

  absl_flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags: use defaults
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    '--workers',
    default=None,
    help='comma-separated Grain worker counts (default 0,1,2; 0 with --smoke; -1: one per core)',
  )
  parser.add_argument(
    '--pipelines', default=','.join(PIPELINES), help=f'subset of {list(PIPELINES)}'
  )
  parser.add_argument(
    '--batches',
    type=cli.positive_int,
    default=None,
    help='timed batches per measurement (default: 20, or twice what the prefetch buffers hold '
    'if more; fewer than that is refused)',
  )
  parser.add_argument(
    '--warmup', type=cli.non_negative_int, default=3, help='untimed batches first (worker start-up)'
  )
  parser.add_argument('--prefetch', type=cli.non_negative_int, default=2)
  parser.add_argument(
    '--rounds',
    type=cli.positive_int,
    default=1,
    help='repeat every (pipeline, impl, workers) measurement, interleaved',
  )
  parser.add_argument(
    '--compare-old',
    action='store_true',
    help='also time the old float32-on-host pipeline on the same records',
  )
  parser.add_argument(
    '--impls',
    default=None,
    help="'new', 'old' or 'new,old' (default new; new,old with --compare-old)",
  )
  parser.add_argument(
    '--decoders',
    default='pil',
    help="JPEG decoders of the new pipeline's training crops: pil,opencv",
  )
  parser.add_argument(
    '--auto-augment',
    '--auto_augment',
    default='none',
    type=auto_augment_lib.cli_type,
    help="config.data.auto_augment of the new pipeline's training crops",
  )
  parser.add_argument(
    '--interpolations',
    default='bilinear',
    help='config.data.interpolation values of the new pipeline, each its own row: '
    'bilinear,bicubic,random',
  )
  parser.add_argument(
    '--dataset',
    default=None,
    help='a prepared TFDS dataset (e.g. imagenet2012) instead of generated JPEGs',
  )
  parser.add_argument(
    '--data_dir',
    default=None,
    help='TFDS data dir (default: a temp dir for the generated datasets, '
    "TFDS's default with --dataset)",
  )
  parser.add_argument(
    '--write-tree',
    '--write_tree',
    default=None,
    help='write the generated ImageNet-like JPEGs as DIR/<split>/<class>/<i>.jpg and exit '
    '(then time them with --dataset image_folder --data_dir DIR)',
  )
  parser.add_argument(
    '--smoke', action='store_true', help='tiny images, few batches: checks it runs'
  )
  parser.add_argument(
    '--json', action='store_true', help='print one JSON object instead of a table'
  )
  args = parser.parse_args(argv)

  try:
    workers = [int(w) for w in (args.workers or ('0' if args.smoke else '0,1,2')).split(',') if w]
  except ValueError:
    workers = []
  if not workers or min(workers) < -1:  # -1: one per core, as config.data.num_workers
    parser.error(f'--workers takes comma-separated integers >= -1, got {args.workers!r}')
  names = [n for n in args.pipelines.split(',') if n]
  unknown = set(names) - set(PIPELINES)
  if unknown:
    parser.error(f'unknown pipelines {sorted(unknown)}; choose from {list(PIPELINES)}')
  data_dir = args.data_dir
  if data_dir is None and not args.dataset:
    data_dir = os.path.join(tempfile.gettempdir(), 'resnet_jax_bench_tfds')
  if args.write_tree:
    count = write_tree(args.write_tree, data_dir or tempfile.gettempdir())
    print(f'wrote {count} images under {args.write_tree}')
    return 0
  least = max(min_timed_batches(args.prefetch, w) for w in workers)
  if args.batches is not None and args.batches < least:
    parser.error(
      f'--batches {args.batches} is too few to time: the prefetch buffers hold up to '
      f'{least // 2} batches computed ahead (--prefetch {args.prefetch}, --workers '
      f'{max(workers, key=pipeline.worker_count)}); give at least {least}'
    )
  if args.smoke:
    batches, warmup = least, 1
  else:
    batches, warmup = args.batches or max(20, least), args.warmup
  decoders = [d for d in args.decoders.split(',') if d]
  if set(decoders) - {'pil', 'opencv'}:
    parser.error(f'--decoders: choose from pil,opencv, got {args.decoders!r}')
  interpolations = [i for i in args.interpolations.split(',') if i]
  if not interpolations or set(interpolations) - set(augment_views.INTERPOLATIONS):
    parser.error(
      f'--interpolations: choose from {",".join(augment_views.INTERPOLATIONS)}, '
      f'got {args.interpolations!r}'
    )
  chosen = (args.impls or ('new,old' if args.compare_old else 'new')).split(',')
  if not chosen or set(chosen) - {'new', 'old'}:
    parser.error(f'--impls: choose from new,old, got {args.impls!r}')
  impls = ([('new', d, i) for d in decoders for i in interpolations] if 'new' in chosen else []) + (
    [('old', 'pil', 'bilinear')] if 'old' in chosen else []
  )
  results = []
  for name in names:
    dataset, augment, size, batch_size, smoke_dataset = PIPELINES[name]
    if args.smoke:
      dataset, size, batch_size = smoke_dataset, min(size, 32), 4
    if args.dataset:
      dataset_name = args.dataset
    else:
      generated.prepare(dataset, data_dir)
      dataset_name = f'generated_jpegs/{dataset}'
    crops = 10 if name.endswith('10crop') else None
    for _ in range(max(1, args.rounds)):
      for w in workers:
        for impl, decoder, interpolation in impls:
          config = make_config(
            dataset_name,
            augment,
            size,
            data_dir,
            w,
            args.prefetch,
            decoder,
            args.auto_augment,
            interpolation,
          )
          try:
            pre = legacy_preprocessor(config) if impl == 'old' else None
            r = measure(config, batch_size, batches, warmup, crops, pre)
          except (data.DatasetNotFoundError, ValueError) as e:
            print(f'error: {e}', file=sys.stderr)
            return 1
          results.append(
            {
              'pipeline': name,
              'impl': impl,
              'decoder': decoder,
              'interpolation': interpolation,
              'auto_augment': args.auto_augment if impl == 'new' else 'none',
              'workers': w,
              'batch_size': batch_size,
              'image_size': size,
              'dataset': dataset_name,
              **r,
            }
          )
          if not args.json:
            per_core, need = r['examples_per_core_sec'], r['cores_per_7500_images_per_sec']
            used = '-' if r['cores_used'] is None else f'{r["cores_used"]:.2f}'
            print(
              f'{name:22s} {impl:3s} {decoder:6s} {interpolation:8s} workers={w:<3d} '
              f'batch={batch_size:<4d} '
              f'{r["examples_per_sec"]:9.1f} ex/s  {used:>5s} cores  '
              f'{"-" if per_core is None else f"{per_core:.1f}":>8s} ex/s/core  '
              f'{"-" if need is None else f"{need:.1f}":>7s} cores/7500',
              flush=True,
            )
  cpu = platform.processor() or 'cpu'
  report = {
    'machine': f'{platform.machine()} {os.cpu_count()} CPUs ({cpu})',
    'python': platform.python_version(),
    'smoke': args.smoke,
    'loadavg': list(os.getloadavg()),
    'results': results,
  }
  if args.json:
    print(json.dumps(report))
  return 0


if __name__ == '__main__':
  sys.exit(main())
