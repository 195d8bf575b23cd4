"""Zagoruyko & Komodakis 2016: CIFAR Wide ResNets WRN-{depth}-{k} (pre-activation basic blocks).

Recipe (the paper's Sec. 3 / the authors' train_cifar.sh): batch 128, SGD Nesterov momentum 0.9,
weight decay 5e-4 (on every weight), lr 0.1 multiplied by 0.2 at epochs 60, 120 and 160, 200
epochs; flip + 4-pixel translation augmentation, mean/std normalisation (the "meanstd" numbers
of paper_numbers.WRN_2016); dropout 0.3 between the convs of every block (the paper's best CIFAR
runs; dropout=0 for the runs without). BN statistics over the whole batch of 128.
Config args: depth=28, k=10, dropout=0.3, dataset=cifar10|cifar100, val=0 (45k/5k split: 5000).
Example: python -m resnet_jax.main --config=configs/wrn.py:depth=16,k=8 --workdir=/tmp/wrn16_8
"""

from resnet_jax.default_config import base_config, parse_arg


def get_config(arg: str | None = None):
  args = parse_arg(arg, depth=28, k=10, dropout=0.3, dataset='cifar10', val=0)
  c = base_config()
  c.model.name = f'wrn{args.depth}_{args.k}'
  c.model.preact = True  # the architecture (create_model's preact=None would pick it too)
  c.model.shortcut = 'B'  # a bare 1x1 projection where the shape changes
  c.model.dropout_rate = args.dropout
  c.data.name = args.dataset
  c.data.num_classes = 100 if args.dataset == 'cifar100' else 10
  c.data.image_size = 32
  c.data.augment = 'cifar'
  c.data.normalize = 'mean_std'
  c.data.validation_size = args.val
  c.data.eval_split = 'validation' if args.val else 'test'
  c.batch_size = 128
  c.num_epochs = 200.0
  c.num_train_steps = -1
  c.schedule.name = 'piecewise'
  c.schedule.base_lr = 0.1
  c.schedule.boundaries_epochs = '60,120,160'
  c.schedule.decay_factor = 0.2
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4
  c.optimizer.weight_decay_mask = 'all'
  c.log_every_steps = 100
  c.eval_every_steps = 2000
  c.checkpoint_every_steps = 2000
  return c
