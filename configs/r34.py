"""ResNet-34 on ImageNet: configs/imagenet.py with depth=34 (other args pass through)."""

from resnet_jax.default_config import load_sibling_config


def get_config(arg: str | None = None):
  return load_sibling_config(__file__, 'imagenet').get_config(f'depth=34,{arg or ""}')
