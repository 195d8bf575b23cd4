"""He et al. 2015, Sec. 4.2: CIFAR-10 ResNets / plain nets (Table 6, Fig. 6).

Recipe: batch 128, SGD momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at 32k and 48k
iterations, stop at 64k; 4-pixel pad + random 32x32 crop + flip, per-pixel mean subtraction;
ResNet-110 and deeper warm up at lr 0.01 for 400 iterations. BN statistics over groups of 64
(the paper's per-GPU batch on 2 GPUs), so results do not depend on the device count.
Config args: depth=20, plain, shortcut=A|B|C, preact, val=5000 (the 45k/5k split),
dataset=cifar10|cifar100, bn_group=64 (0: whole global batch), block=basic|bottleneck,
steps=64000 (a shorter or longer run with the same schedule shape: decays at 50 % and 75 %,
ResNet-110's warm-up 400/64k of it; --config.num_train_steps alone moves neither),
drop_path=0 (stochastic depth, Huang et al. 2016: the drop rate of the last block, 0.5 in the
paper (p_L = 0.5); block l of L drops with l / L of it, per example; model.drop_path_rate).
`block=bottleneck` gives the 9n+2-layer bottleneck nets of He et al. 2016 (ResNet-164/1001; the
shortcut then defaults to B, projections where the width grows, as in that paper).
Examples: python -m resnet_jax.main --config=configs/cifar.py:depth=110 --workdir=/tmp/r110
          python -m resnet_jax.main --config=configs/cifar.py:depth=164,preact,block=bottleneck ...
          python -m resnet_jax.main --config=configs/cifar.py:depth=110,drop_path=0.5 ...
"""

from resnet_jax.default_config import base_config, parse_arg, set_cifar_model, set_cifar_recipe


def get_config(arg: str | None = None):
  args = parse_arg(
    arg,
    depth=20,
    plain=False,
    shortcut='',
    preact=False,
    val=0,
    dataset='cifar10',
    bn_group=64,
    block='basic',
    steps=64_000,
    drop_path=0.0,
  )
  c = base_config()
  set_cifar_model(c.model, args)
  c.model.drop_path_rate = args.drop_path
  c.data.name = args.dataset
  c.data.num_classes = 100 if args.dataset == 'cifar100' else 10
  c.data.image_size = 32
  set_cifar_recipe(c, args, steps=args.steps)
  c.log_every_steps = max(1, min(100, args.steps // 64))
  c.eval_every_steps = max(1, args.steps // 32)  # the paper's 64k: every 2,000 steps
  c.checkpoint_every_steps = c.eval_every_steps
  return c
