"""The training losses: softmax cross-entropy (the paper's) and per-class sigmoid binary
cross-entropy ("ResNet strikes back", Wightman et al. 2021; timm's `BinaryCrossEntropy`).

Both take the step's labels as they come: class indices [B], or probability targets [B, classes]
from Mixup/CutMix (`mixing.py`), and smooth them the same way (`optax.smooth_labels`: 1 - a + a/K
on the label, a/K elsewhere, timm's on/off values for both losses). Evaluation does not use these:
its loss is the negative log of the softmax probability of the label (`train_step.metric_sums`)
under either training loss, so eval losses of runs trained with either one compare directly.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import optax

LOSSES = ('softmax_xent', 'sigmoid_bce')


def _targets(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
  targets = labels if labels.ndim == logits.ndim else jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return targets


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy, optionally against smoothed one-hot targets.

  `labels` [B] are class indices; [B, classes] are probability targets (Mixup/CutMix), smoothed
  the same way, as torch's `CrossEntropyLoss(label_smoothing=...)` smooths them.
  """
  return optax.softmax_cross_entropy(logits, _targets(logits, labels, label_smoothing))


def binary_cross_entropy(
  logits: jax.Array,
  labels: jax.Array,
  label_smoothing: float = 0.0,
  target_threshold: float | None = None,
  sum_classes: bool = False,
) -> jax.Array:
  """Per-example sigmoid binary cross-entropy, each class an independent yes/no.

  timm's `BinaryCrossEntropy`: targets as in `cross_entropy`, then with `target_threshold`
  binarised (> threshold: 1, else 0, so a Mixup partner that holds 30 % of the image is a
  positive at threshold 0.2); `binary_cross_entropy_with_logits` per class, whose batch mean is
  timm's `reduction='mean'` over batch and classes (per example: the mean over classes), or
  with `sum_classes` (timm's `--bce-sum`) the sum over classes.
  """
  targets = _targets(logits, labels, label_smoothing)
  if target_threshold is not None:
    targets = (targets > target_threshold).astype(targets.dtype)
  per_class = optax.sigmoid_binary_cross_entropy(logits, targets)
  return per_class.sum(-1) if sum_classes else per_class.mean(-1)


@dataclasses.dataclass(frozen=True)
class Loss:
  """The train step's loss: (logits [B, K], labels [B] or [B, K]) -> the batch's mean loss."""

  name: str = 'softmax_xent'
  label_smoothing: float = 0.0
  target_threshold: float | None = None
  sum_classes: bool = False

  def __post_init__(self):
    if self.name not in LOSSES:
      raise ValueError(f'loss must be one of {LOSSES}, got {self.name!r}')

  def __call__(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
    if self.name == 'softmax_xent':
      return cross_entropy(logits, labels, self.label_smoothing).mean()
    return binary_cross_entropy(
      logits, labels, self.label_smoothing, self.target_threshold, self.sum_classes
    ).mean()


def from_config(config: ml_collections.ConfigDict) -> Loss:
  """`config.loss` with its label smoothing and BCE options (checked by `validation`)."""
  return Loss(
    name=config.get('loss', 'softmax_xent'),
    label_smoothing=float(config.label_smoothing),
    target_threshold=config.get('bce_target_threshold'),
    sum_classes=bool(config.get('bce_sum_classes', False)),
  )
