"""Training-set statistics for normalisation and PCA colour augmentation, computed once and cached.

The paper subtracts the per-pixel mean of the training images; 'mean_std' needs per-channel
mean/std; the AlexNet colour augmentation needs the eigen-decomposition of the RGB covariance. All
are computed from the (eval-preprocessed, single centre crop) training split: every example for
small datasets, an evenly spaced sample for large ones, and cached in memory and as `.npz` beside
the TFDS data.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import logging
import os
import zipfile
from typing import Callable, Sequence

import numpy as np

from resnet_jax.workdir import write_atomic

MAX_EXAMPLES_SMALL = 60_000  # CIFAR-sized sets: use every training image (the paper's exact mean)
MAX_EXAMPLES_LARGE = 10_000  # ImageNet-sized images: an evenly spaced sample is plenty for a mean
_MEMORY: dict[str, dict[str, np.ndarray]] = {}


def compute_stats(
  records: Sequence[dict], to_uint8: Callable[[object], np.ndarray], max_examples: int
) -> dict[str, np.ndarray]:
  """Per-pixel mean, per-channel mean/std, scalar std around the per-pixel mean, RGB covariance."""
  n = len(records)
  idx = np.unique(np.linspace(0, n - 1, num=min(n, max_examples)).round().astype(np.int64))
  total = total_sq = None
  cross = None
  for i in idx:
    x = to_uint8(records[int(i)]['image']).astype(np.float64)
    if total is None:
      total, total_sq = np.zeros_like(x), np.zeros_like(x)
      cross = np.zeros((x.shape[-1],) * 2)
    total += x
    total_sq += x * x
    flat = x.reshape(-1, x.shape[-1]) / 255.0
    cross += flat.T @ flat / flat.shape[0]
  count = float(len(idx))
  pixel_mean = total / count
  pixel_var = np.maximum(total_sq / count - pixel_mean**2, 0.0)
  channel_mean = pixel_mean.mean(axis=(0, 1))
  channel_var = np.maximum((total_sq / count).mean(axis=(0, 1)) - channel_mean**2, 0.0)
  m = channel_mean / 255.0
  cov = cross / count - np.outer(m, m)
  eigvals, eigvecs = np.linalg.eigh(cov)
  return {
    'pixel_mean': pixel_mean.astype(np.float32),
    'pixel_std': np.float32(max(np.sqrt(pixel_var.mean()), 1e-3)),
    'channel_mean': channel_mean.astype(np.float32),
    'channel_std': np.maximum(np.sqrt(channel_var), 1e-3).astype(np.float32),
    'pca_eigvals': np.maximum(eigvals, 0.0).astype(np.float32),
    'pca_eigvecs': eigvecs.astype(np.float32),
    'num_examples': np.int64(len(idx)),
  }


def _source_digest(function: Callable) -> str:
  try:
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:12]
  except (OSError, TypeError):  # no source at hand (a frozen install): the version alone
    return ''


# Part of every cache key: a change to compute_stats makes the statistics cached beside the
# datasets (kept across runs and sessions) stale, and a new key recomputes them.
VERSION = f'1.{_source_digest(compute_stats)}'


def cached_stats(
  key: dict, cache_dir: str | None, compute: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
  """`compute()` once per `key` (JSON-able: the data and its preprocessing); cached on disk."""
  digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
  if digest in _MEMORY:
    return _MEMORY[digest]
  path = os.path.join(cache_dir, f'resnet_jax_stats_{digest}.npz') if cache_dir else None
  stats = None
  if path and os.path.exists(path):
    try:
      with np.load(path) as f:
        stats = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # truncated: recompute
      logging.warning('ignoring unreadable stats cache %s: %s', path, e)
  if stats is None:
    stats = compute()
    if path:
      try:  # atomic: concurrent processes may compute the same stats
        buffer = io.BytesIO()
        np.savez(buffer, **stats)
        write_atomic(path, buffer.getvalue())
      except OSError as e:  # read-only data dir: keep the in-memory copy only
        logging.info('could not cache dataset statistics in %s: %s', cache_dir, e)
  _MEMORY[digest] = stats
  return stats
