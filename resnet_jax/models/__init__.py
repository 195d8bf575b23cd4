"""ResNet, ResNeXt and Wide ResNet models: ``create_model(name, **options)`` and their blocks."""

from resnet_jax.models import backbone, layout
from resnet_jax.models.blocks import BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck
from resnet_jax.models.factory import create_model
from resnet_jax.models.layers import BatchNorm, conv, shortcut
from resnet_jax.models.names import IMAGENET_DEPTHS, VALID_NAMES, ArchSpec, parse_name
from resnet_jax.models.resnet import ResNet

__all__ = [
  'ArchSpec',
  'BasicBlock',
  'BatchNorm',
  'Bottleneck',
  'IMAGENET_DEPTHS',
  'PreActBasicBlock',
  'PreActBottleneck',
  'ResNet',
  'VALID_NAMES',
  'backbone',
  'conv',
  'create_model',
  'layout',
  'parse_name',
  'shortcut',
]
