"""Fine-tune an ImageNet ResNet, ResNeXt or Wide ResNet (converted torchvision weights) elsewhere.

First convert the weights (see README, "Pretrained weights"), then point `init_from` at them:
  python -m resnet_jax.convert --arch resnet18 --torchvision-weights resnet18-f37072fd.pth \
      --out /tmp/r18_tv --in-channels 1
  python -m resnet_jax.main --config=configs/finetune.py:arch=resnet18 \
      --config.init_from=/tmp/r18_tv --workdir=/tmp/ft
(`--in-channels 1`: digits, the default dataset, is grayscale; for an RGB dataset leave it out and
add `dataset=NAME` to the config args.)
Every weight is restored except the classifier head when the number of classes differs (it is
re-initialised). Recipe: SGD momentum 0.9 (Nesterov), lr 0.01 (10x smaller than training from
scratch), linear warm-up over 5% of the steps + cosine, weight decay 1e-4 on kernels only, standard
Inception-crop augmentation on natural-image datasets; images are normalised with the dataset's
per-channel mean/std.
Config args: arch=resnet50 (resnet18/34/50/101/152, resnext50_32x4d, resnext101_32x8d,
resnext101_64x4d, wide_resnet50_2, wide_resnet101_2), dataset=digits (or any TFDS name),
steps=300, batch=64, lr=0.01, image_size=0 (0: 32 for digits, else 224), bf16,
frozen_bn (BatchNorm keeps the pretrained statistics), frozen_affine (BN scale/bias get no
update either: with frozen_bn, torchvision's FrozenBatchNorm2d), frozen_stages=-1 (k >= 0: the
stem and stages 1..k get no gradient and no update, as detection fine-tuning does),
output_stride=32 (16 / 8: dilated last stages).
"""

from resnet_jax.default_config import base_config, parse_arg


def get_config(arg: str | None = None):
  args = parse_arg(
    arg,
    arch='resnet50',
    dataset='digits',
    steps=300,
    batch=64,
    lr=0.01,
    image_size=0,
    bf16=False,
    frozen_bn=False,
    frozen_affine=False,
    frozen_stages=-1,
    output_stride=32,
  )
  digits = args.dataset == 'digits'
  c = base_config()
  c.model.name = args.arch
  c.model.shortcut = 'B'  # torchvision's layout: v1.5 bottlenecks, projection shortcuts
  c.model.stride_on = '3x3'
  c.model.frozen_bn = args.frozen_bn
  c.model.frozen_bn_affine = args.frozen_affine
  c.model.frozen_stages = args.frozen_stages
  c.model.output_stride = args.output_stride
  c.data.name = args.dataset
  c.data.image_size = args.image_size or (32 if digits else 224)
  c.data.augment = 'none' if digits else 'inception'
  c.data.normalize = 'mean_std'
  c.batch_size = args.batch
  c.eval_batch_size = 360 if digits else 250
  c.num_train_steps = args.steps
  c.dtype = 'bfloat16' if args.bf16 else 'float32'
  c.schedule.name = 'cosine'
  c.schedule.base_lr = args.lr
  c.schedule.warmup = 'linear'
  c.schedule.warmup_steps = max(1, args.steps // 20)
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 1e-4
  c.optimizer.weight_decay_mask = 'kernels'
  c.log_every_steps = 50
  c.eval_every_steps = max(1, args.steps // 3)
  c.checkpoint_every_steps = max(1, args.steps // 3)
  return c
