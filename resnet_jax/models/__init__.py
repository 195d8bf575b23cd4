"""ResNet models: ``create_model(name, **options)`` and the building blocks behind it."""
from resnet_jax.models import layout
from resnet_jax.models.layers import BatchNorm, conv, shortcut
from resnet_jax.models.resnet import (
  IMAGENET_DEPTHS,
  VALID_NAMES,
  ArchSpec,
  BasicBlock,
  Bottleneck,
  PreActBasicBlock,
  PreActBottleneck,
  ResNet,
  create_model,
  parse_name,
)

__all__ = [
  "ArchSpec",
  "BasicBlock",
  "BatchNorm",
  "Bottleneck",
  "IMAGENET_DEPTHS",
  "PreActBasicBlock",
  "PreActBottleneck",
  "ResNet",
  "VALID_NAMES",
  "conv",
  "create_model",
  "layout",
  "parse_name",
  "shortcut",
]
