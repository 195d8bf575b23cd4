"""Convert variable trees between the unrolled and the scanned parameter layouts of a ResNet.

Unrolled (``create_model(..., scan=False)``, torchvision-mappable): one module per block,
``layer{s}_{b}/...``. Scanned (``scan=True``): block 0 of each stage stays ``layer{s}_0`` and
blocks 1..n-1 are one module ``layer{s}_scan`` whose leaves are stacked on a new leading axis
(entry ``k`` is block ``k + 1``). Both layouts compute the same function.

The functions are pure and structural: they rewrite every dict level that holds ``layer{s}_{b}``
(or ``layer{s}_scan``) keys, wherever it sits in the pytree, so they apply equally to
``{'params', 'batch_stats'}``, to a bare params tree, and to optimizer states whose parts mirror
the params (optax's SGD momentum ``trace``, Adam's ``mu``/``nu``: tuples / NamedTuples of
param-shaped dicts), or a whole train state (any registered pytree node is walked through, its
non-dict fields kept). Leaves may be numpy arrays, jax arrays or ``jax.ShapeDtypeStruct`` (abstract
trees, e.g. a restore target); other leaves are left alone.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

UNROLLED = 'unrolled'
SCANNED = 'scanned'
LAYOUTS = (UNROLLED, SCANNED)
_BLOCK_RE = re.compile(r'layer(\d+)_(\d+)')
_SCAN_RE = re.compile(r'layer(\d+)_scan')


def model_layout(model: Any) -> str:
  """The layout a model's variables have: ``'scanned'`` iff built with ``scan=True``."""
  return SCANNED if getattr(model, 'scan', False) else UNROLLED


def detect_layout(tree: Any) -> str:
  """``'scanned'`` if any dict in ``tree`` has a ``layer{s}_scan`` key, else ``'unrolled'``.

  Nets with one block per stage (e.g. resnet8) have the same tree in both layouts; they read as
  ``'unrolled'``, and converting them either way is the identity.
  """
  found = []

  def visit(node: Any) -> None:
    if isinstance(node, Mapping):
      if any(isinstance(k, str) and _SCAN_RE.fullmatch(k) for k in node):
        found.append(True)
      for v in node.values():
        visit(v)
    elif isinstance(node, (list, tuple)):
      for v in node:
        visit(v)

  visit(tree)
  return SCANNED if found else UNROLLED


def _abstract(leaf: jax.ShapeDtypeStruct, shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
  """A reshaped abstract leaf; a fully replicated sharding fits any shape and is kept."""
  sharding = getattr(leaf, 'sharding', None)
  keep = sharding is not None and getattr(sharding, 'is_fully_replicated', False)
  return jax.ShapeDtypeStruct(shape, leaf.dtype, sharding=sharding if keep else None)


def _stack(leaves: Sequence[Any]) -> Any:
  first = leaves[0]
  if isinstance(first, jax.ShapeDtypeStruct):
    return _abstract(first, (len(leaves),) + tuple(first.shape))
  if isinstance(first, jax.Array):
    return jnp.stack(leaves)
  return np.stack([np.asarray(x) for x in leaves])


def _unstack(leaf: Any, n: int) -> list[Any]:
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return [_abstract(leaf, tuple(leaf.shape[1:])) for _ in range(n)]
  if np.shape(leaf)[:1] != (n,):
    raise ValueError(f'a scanned leaf has shape {np.shape(leaf)}; expected leading axis {n}')
  return [leaf[k] for k in range(n)]


def _tree_stack(trees: Sequence[Any]) -> Any:
  structures = {jax.tree.structure(t) for t in trees}
  if len(structures) != 1:
    raise ValueError('blocks 1.. of a stage differ in structure; they cannot be scanned')
  return jax.tree.map(lambda *xs: _stack(xs), *trees)


def _tree_unstack(tree: Any, n: int) -> list[Any]:
  leaves, treedef = jax.tree.flatten(tree)
  columns = [_unstack(leaf, n) for leaf in leaves]
  return [jax.tree.unflatten(treedef, [c[k] for c in columns]) for k in range(n)]


def _scan_length(tree: Any) -> int:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise ValueError('an empty layer{s}_scan subtree has no block count')
  return int(np.shape(leaves[0])[0])


def _rebuild(node: Any, fn) -> Any:
  """Apply ``fn`` to every Mapping (bottom-up) and keep every other container as it is: tuples,
  NamedTuples (optax states), lists and registered pytree nodes (e.g. a flax ``TrainState``)."""
  if isinstance(node, Mapping):
    return fn({k: _rebuild(v, fn) for k, v in node.items()})
  if node is None or isinstance(node, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
    return node
  children, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
  if jax.tree_util.treedef_is_leaf(treedef):
    return node
  return jax.tree_util.tree_unflatten(treedef, [_rebuild(c, fn) for c in children])


def _check_sizes(counts: dict[int, int], stage_sizes: Optional[Sequence[int]]) -> None:
  if stage_sizes is None:
    return
  for s, n in counts.items():
    if s < 1 or s > len(stage_sizes) or n != stage_sizes[s - 1]:
      raise ValueError(
        f'stage {s} has {n} blocks in the tree but the model has stage sizes {tuple(stage_sizes)}'
      )


def to_scanned(tree: Any, stage_sizes: Optional[Sequence[int]] = None) -> Any:
  """Unrolled -> scanned: stack ``layer{s}_1..`` of every stage into ``layer{s}_scan``.

  Stages with a single block keep only ``layer{s}_0`` (as ``ResNet(scan=True)`` does). A tree
  already scanned is returned unchanged. ``stage_sizes`` (e.g. ``model.stage_sizes``), when
  given, is checked against the blocks found.
  """

  def fn(d: dict) -> dict:
    blocks: dict[int, dict[int, Any]] = {}
    for k, v in d.items():
      m = _BLOCK_RE.fullmatch(k) if isinstance(k, str) else None
      if m:
        blocks.setdefault(int(m[1]), {})[int(m[2])] = v
    if not blocks:
      return d
    counts = {}
    for s, bs in blocks.items():
      if sorted(bs) != list(range(len(bs))):
        raise ValueError(f'stage {s} has blocks {sorted(bs)}: not numbered 0..n-1')
      counts[s] = len(bs)
      scan = d.get(f'layer{s}_scan')
      if scan is not None:  # already scanned: layer{s}_0 + the stacked blocks 1..n-1
        if len(bs) != 1:
          raise ValueError(f'layer{s}_scan beside unrolled blocks {sorted(bs)}')
        counts[s] += _scan_length(scan)
    _check_sizes(counts, stage_sizes)
    out = {}
    for k, v in d.items():
      m = _BLOCK_RE.fullmatch(k) if isinstance(k, str) else None
      if m is None:
        out[k] = v
      elif int(m[2]) == 0:
        out[k] = v
        rest = [blocks[int(m[1])][b] for b in range(1, len(blocks[int(m[1])]))]
        if rest:
          out[f'layer{m[1]}_scan'] = _tree_stack(rest)
    return out

  return _rebuild(tree, fn)


def to_unrolled(tree: Any, stage_sizes: Optional[Sequence[int]] = None) -> Any:
  """Scanned -> unrolled: split every ``layer{s}_scan`` back into ``layer{s}_1..``.

  A tree already unrolled is returned unchanged; ``stage_sizes`` is checked when given.
  """

  def fn(d: dict) -> dict:
    if not any(isinstance(k, str) and _SCAN_RE.fullmatch(k) for k in d):
      if stage_sizes is not None:
        _check_sizes(_unrolled_counts(d), stage_sizes)
      return d
    out = {}
    counts = _unrolled_counts(d)
    for k, v in d.items():
      m = _SCAN_RE.fullmatch(k) if isinstance(k, str) else None
      if m is None:
        out[k] = v
        continue
      s = int(m[1])
      if f'layer{s}_0' not in d:
        raise ValueError(f'{k} without layer{s}_0')
      n = _scan_length(v)
      for b, sub in enumerate(_tree_unstack(v, n), start=1):
        out[f'layer{s}_{b}'] = sub
      counts[s] = 1 + n
    _check_sizes(counts, stage_sizes)
    return _order(out)

  return _rebuild(tree, fn)


def _unrolled_counts(d: Mapping) -> dict[int, int]:
  counts: dict[int, int] = {}
  for k in d:
    m = _BLOCK_RE.fullmatch(k) if isinstance(k, str) else None
    if m:
      counts[int(m[1])] = counts.get(int(m[1]), 0) + 1
  return counts


def _order(d: dict) -> dict:
  """Blocks in (stage, block) order right where the first one sat; other keys keep theirs."""

  def key(item):
    m = _BLOCK_RE.fullmatch(item[0]) if isinstance(item[0], str) else None
    return (int(m[1]), int(m[2])) if m else None

  blocks = sorted((it for it in d.items() if key(it)), key=key)
  out, placed = {}, False
  for k, v in d.items():
    if key((k, v)) is None:
      out[k] = v
    elif not placed:
      out.update(blocks)
      placed = True
  return out


def convert_layout(tree: Any, layout: str, stage_sizes: Optional[Sequence[int]] = None) -> Any:
  """``tree`` in ``layout`` ('unrolled' | 'scanned'), whichever layout it holds now."""
  if layout == SCANNED:
    return to_scanned(tree, stage_sizes)
  if layout == UNROLLED:
    return to_unrolled(tree, stage_sizes)
  raise ValueError(f'layout must be one of {LAYOUTS}, got {layout!r}')


def for_model(tree: Any, model: Any) -> Any:
  """``tree`` in the layout of ``model`` (a ``ResNet``): what a restore path calls."""
  return convert_layout(tree, model_layout(model), getattr(model, 'stage_sizes', None))
