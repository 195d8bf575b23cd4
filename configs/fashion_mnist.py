"""Fashion-MNIST (60k train / 10k test, 28x28 grayscale) with the paper's CIFAR nets and recipe.

The plain-vs-residual depth experiment of He et al. 2015 Sec. 4.2 on a real 60,000-image dataset
small enough for a CPU: CIFAR-family nets (3x3 conv 16 stem, stages 16/32/64, option-A shortcuts),
batch 128, SGD momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at 50% and 75% of training
(the paper's 32k/48k of 64k), 28x28x1 input with pad (3 px: the paper's 4 px scaled to 28) + random
crop + flip, per-pixel mean subtraction. BN statistics over groups of 64, as configs/cifar.py.
Config args: depth=20, plain, shortcut=A|B|C, preact, block=basic|bottleneck, val=0 (hold out that
many train images as 'validation'), bn_group=64 (0: whole global batch), steps=64000 (the schedule
scales with it, for a CPU budget).
Prepare the data once: python -m resnet_jax.data.prepare fashion_mnist [--from DIR_OF_IDX_FILES]
Examples:
  python -m resnet_jax.main --config=configs/fashion_mnist.py:depth=56,steps=8000 --workdir=/tmp/f56
  python scripts/sweep.py --config=configs/fashion_mnist.py:steps=8000 --workdir=/tmp/fm \\
      --depths=20,56 --variants=residual,plain
"""

from resnet_jax.default_config import base_config, parse_arg, set_cifar_model, set_cifar_recipe


def get_config(arg: str | None = None):
  args = parse_arg(
    arg,
    depth=20,
    plain=False,
    shortcut='',
    preact=False,
    block='basic',
    val=0,
    bn_group=64,
    steps=64_000,
  )
  c = base_config()
  set_cifar_model(c.model, args)
  c.data.name = 'fashion_mnist'
  c.data.image_size = 28
  set_cifar_recipe(c, args, steps=args.steps)
  c.log_every_steps = max(1, min(100, args.steps // 64))
  c.eval_every_steps = max(1, args.steps // 16)  # 16 points of the test-error curve
  c.checkpoint_every_steps = c.eval_every_steps
  return c
