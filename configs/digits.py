"""The embedded offline demo: a small CIFAR-style ResNet on the 1,797 scikit-learn digits (8x8).

Runs on a laptop CPU in a few minutes; no download. Config args (comma-separated):
  depth=14     any 6n+2 (CIFAR family; 9n+2 with block=bottleneck)
  plain        the plain twin (no shortcuts)
  shortcut=A   A | B | C (default B with block=bottleneck)
  preact       pre-activation blocks (He et al. 2016)
  block=basic  basic | bottleneck
  steps=800    training steps
  batch=64     global batch size
Example: python -m resnet_jax.main --config=configs/digits.py:depth=20,plain --workdir=/tmp/d
"""

from resnet_jax.default_config import base_config, parse_arg, set_cifar_model


def get_config(arg: str | None = None):
  args = parse_arg(
    arg, depth=14, plain=False, shortcut='', steps=800, batch=64, preact=False, block='basic'
  )
  c = base_config()
  set_cifar_model(c.model, args)
  c.data.name = 'digits'
  c.data.image_size = 8
  # Random 1-pixel translations (no flips: a mirrored digit is another symbol); without them the
  # net fits the 1,437 training digits within a few hundred steps and stops improving.
  c.data.augment = 'translate'
  c.data.normalize = 'per_pixel_mean'
  c.batch_size = args.batch
  c.eval_batch_size = 360
  c.num_train_steps = args.steps
  c.schedule.name = 'cosine'
  c.schedule.base_lr = 0.1
  c.schedule.warmup_steps = 50
  c.schedule.warmup = 'linear'
  c.optimizer.weight_decay = 5e-4
  c.log_every_steps = 100
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  return c
