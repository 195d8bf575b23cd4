"""Input-pipeline throughput: examples/s of the real train/eval pipelines per Grain worker count.

Runs on generated JPEG datasets in TFDS ArrayRecord format (`resnet_jax.data.generated`), so it
measures the same path as CIFAR-10 (small decoded-by-TFDS images, pad/crop/flip) and ImageNet (JPEG
bytes, reduced-size decode, scale augmentation, crop, flip, PCA colour) without any download:

  python scripts/benchmark_input.py                     # cifar + imagenet pipelines, workers 0,1,2
  python scripts/benchmark_input.py --workers=0,2,4,8 --json
  python scripts/benchmark_input.py --smoke             # a few tiny batches (CI)

The answer to "how many cores feed one GPU": a ResNet-50 step on one modern GPU consumes ~2-3k
images/s, so divide that by the per-worker examples/s of the imagenet row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position

import resnet_jax.data as data  # pylint: disable=g-import-not-at-top,wrong-import-position
from resnet_jax.data import generated  # pylint: disable=g-import-not-at-top,wrong-import-position

# name: (generated config, augment, image_size, batch size, smoke config)
PIPELINES = {
    "cifar_train": ("cifar", "cifar", 32, 128, "tiny"),
    "imagenet_train": ("imagenet", "imagenet", 224, 32, "tiny"),
    "inception_train": ("imagenet", "inception", 224, 32, "tiny"),
    "imagenet_eval_10crop": ("imagenet", "imagenet", 224, 8, "tiny"),
}


def make_config(dataset: str, augment: str, image_size: int, data_dir: str, workers: int,
                prefetch: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"data": dict(
      name=f"generated_jpegs/{dataset}", data_dir=data_dir, train_split="train", eval_split="test",
      validation_size=0, image_size=image_size, num_classes=10, augment=augment,
      normalize="per_pixel_mean", num_workers=workers, prefetch=prefetch)})


def measure(config: ml_collections.ConfigDict, batch_size: int, num_batches: int, warmup: int,
            eval_crops: int | None) -> float:
  """Examples/s over `num_batches` batches, after `warmup` batches plus as many as the prefetch buffers
  hold (so neither worker start-up nor batches computed ahead of time inflate the rate)."""
  buffered = int(config.data.prefetch) * (int(config.data.num_workers) + 1)
  warmup += buffered
  if eval_crops is None:
    it = data.create_train_iterator(config, local_batch_size=batch_size, process_index=0, process_count=1,
                                    seed=0)
  else:  # the train split is the larger one: one pass covers the timed batches without restarting workers
    it = iter(data.create_eval_iterator(config, split="train", local_batch_size=batch_size, process_index=0,
                                        process_count=1, crops=eval_crops))
  try:
    for _ in range(warmup):
      next(it)
    start = time.perf_counter()
    for _ in range(num_batches):
      next(it)
    return num_batches * batch_size / (time.perf_counter() - start)
  finally:
    if hasattr(it, "close"):
      it.close()


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workers", default=None, help="comma-separated Grain worker counts (default 0,1,2; "
                      "0 with --smoke)")
  parser.add_argument("--pipelines", default=",".join(PIPELINES), help=f"subset of {list(PIPELINES)}")
  parser.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
  parser.add_argument("--warmup", type=int, default=3, help="untimed batches first (worker start-up)")
  parser.add_argument("--prefetch", type=int, default=2)
  parser.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "resnet_jax_bench_tfds"),
                      help="where the generated TFDS datasets are prepared (once)")
  parser.add_argument("--smoke", action="store_true", help="tiny images, 2 batches: checks it runs")
  parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
  args = parser.parse_args(argv)

  workers = [int(w) for w in (args.workers or ("0" if args.smoke else "0,1,2")).split(",") if w != ""]
  names = [n for n in args.pipelines.split(",") if n]
  unknown = set(names) - set(PIPELINES)
  if unknown:
    parser.error(f"unknown pipelines {sorted(unknown)}; choose from {list(PIPELINES)}")
  batches, warmup = (2, 1) if args.smoke else (args.batches, args.warmup)
  results = []
  for name in names:
    dataset, augment, size, batch_size, smoke_dataset = PIPELINES[name]
    if args.smoke:
      dataset, size, batch_size = smoke_dataset, min(size, 32), 4
    generated.prepare(dataset, args.data_dir)
    for w in workers:
      config = make_config(dataset, augment, size, args.data_dir, w, args.prefetch)
      crops = 10 if name.endswith("10crop") else None
      rate = measure(config, batch_size, batches, warmup, crops)
      results.append({"pipeline": name, "workers": w, "batch_size": batch_size, "image_size": size,
                      "examples_per_sec": round(rate, 1)})
      if not args.json:
        print(f"{name:22s} workers={w:<3d} batch={batch_size:<4d} {rate:10.1f} examples/s", flush=True)
  report = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs ({platform.processor() or 'cpu'})",
            "python": platform.python_version(), "smoke": args.smoke, "results": results}
  if args.json:
    print(json.dumps(report))
  return 0


if __name__ == "__main__":
  sys.exit(main())
