"""He et al. 2015, Sec. 3.4 / 4.1: ImageNet ResNets and plain nets (Tables 2-3, Fig. 4).

recipe=paper: batch 256, SGD momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at epochs 30
and 60 (the paper's plateaus), 60e4 iterations (other batches, from batch= or
--config.batch_size: lr x batch/256 and as many epochs, 60e4 x 256/batch iterations); scale
augmentation [256, 480] + 224 crop + flip, per-pixel mean, PCA colour; BN statistics over groups
of 32 (the paper's per-GPU batch); v1 blocks (stride on the 1x1) unless stride_on=3x3.
recipe=modern: the now-standard ResNet-50 recipe (Goyal et al. / torchvision): lr 0.1 x batch/256,
5-epoch linear warm-up + cosine, label smoothing 0.1, Nesterov, decay on kernels only, Inception
crop, zero-init last BN, bfloat16, v1.5 blocks, 90 epochs.
recipe=torchvision: the hyper-parameters of torchvision's "new recipe" (ResNet-50's
ResNet50_Weights.IMAGENET1K_V2, 80.858 % top-1) that this pipeline has. Source: torchvision's
references/classification/README.md, "ResNet" section (8 GPUs x --batch-size 128 --lr 0.5
--lr-scheduler cosineannealinglr --lr-warmup-epochs 5 --lr-warmup-method linear --auto-augment
ta_wide --epochs 600 --random-erase 0.1 --weight-decay 0.00002 --norm-weight-decay 0.0
--label-smoothing 0.1 --mixup-alpha 0.2 --cutmix-alpha 1.0 --train-crop-size 176 --model-ema
--val-resize-size 232 --ra-sampler --ra-reps 4), its train.py defaults (SGD momentum 0.9, no
Nesterov, --model-ema-steps 32, --model-ema-decay 0.99998) and the blog post
pytorch.org/blog/how-to-train-state-of-the-art-models-using-torchvision-latest-primitives.
We set: batch 1024, lr 0.5 x batch/1024, 5-epoch linear warm-up + cosine, 600 epochs, label
smoothing 0.1, Mixup 0.2 / CutMix 1.0 (one of the two per batch), weight decay 2e-5 on all but
BatchNorm's scale/bias (`not_norm`), an EMA of the weights and BN statistics every 32 steps with
torchvision's per-update decay 1 - 2e-5 x batch x 32 / epochs (0.99891 at batch 1024 and 600
epochs; it follows --config.batch_size and --config.num_epochs), Inception crop + flip at 176,
TrivialAugment Wide, random erasing 0.1, repeated augmentation x4, evaluation of the 224 centre
crop of the image resized to 232 (FixRes), v1.5 blocks, no zero-init of the last BN
(torchvision's default), bfloat16 compute.
Differences left: our warm-up and cosine move every step from 0 (torchvision's every epoch, from
0.01 x lr); repeated augmentation spreads an image's copies across one global batch
(torchvision's sampler across the GPUs' batches); never trained here at scale, so its 80.86 % is
not reproduced, only its ingredients.
recipe=lars: MLPerf's reference ResNet-50 at batch 4096 with LARS (You et al. 2017). Source:
mlcommons/training image_classification/README_tensorflow2.md (the TPU-v3-64 command:
--optimizer=LARS --batch_size=4096 --base_learning_rate=10.0 --lr_schedule=polynomial
--warmup_epochs=5 --train_epochs=42 --weight_decay=0.0002 --momentum=0.9 --label_smoothing=0.1
--lars_epsilon=0 --dtype=fp32), tensorflow2/lars_util.py (end_learning_rate 0.0001, polynomial
power 2.0 after a linear warm-up from 0), lars_optimizer.py (eeta 0.001) and common.py (no LARS
scaling and no decay for 'batch_normalization', 'bias', 'bn' variables: weight_decay_mask
'kernels'; the trust ratio skips them too, resnet_jax/optim.py). We set those values, with the
Inception crop + flip, 256/224 centre-crop evaluation and v1.5 blocks of recipe=modern.
Differences left: the reference's polynomial decays over the post-warm-up steps + 1 (ours ends
exactly at end_lr); its LARS turns epsilon 0 into Keras's 1e-7; its BN statistics are per
replica and its normalisation subtracts the mean only (ours: recipe=modern's whole-batch BN and
mean/std); the lr stays 10.0 at other batches below 16384, as in lars_util.py; not trained here.
recipe=rsb_a1|rsb_a2|rsb_a3: the three procedures of "ResNet strikes back" (Wightman, Touvron &
Jegou 2021, arXiv 2110.00476, Table 1; timm's resnet50.a1_in1k, a2_in1k, a3_in1k weights: 80.4,
79.8 and 78.1 % top-1). Table 1: batch 2048, LAMB, cosine, 5 warm-up epochs, BCE loss, no label
smoothing, Mixup/CutMix, RandAugment at magnitude 7 (6 for A3) with std 0.5, no EMA, no random
erasing, test crop ratio 0.95 at 224, mixed precision; A1: 600 epochs, lr 5e-3, weight decay 0.01,
stochastic depth 0.05, repeated augmentation x3, Mixup 0.2; A2: 300 epochs, lr 5e-3, weight decay
0.02, stochastic depth 0.05, repeated augmentation x3, Mixup 0.1; A3: 100 epochs at 160 px (tested
at 224), lr 8e-3, weight decay 0.02, Mixup 0.1, no stochastic depth or repeats. timm's published A2
command (train.py --aa rand-m7-mstd0.5-inc1 --mixup .1 --cutmix 1.0 --aug-repeats 3 --crop-pct 0.95
--drop-path .05 --smoothing 0.0 --bce-loss --bce-target-thresh 0.2 --opt lamb --weight-decay .02
--sched cosine --epochs 300 --lr 5e-3 --warmup-lr 1e-4 -b 256 on 8 GPUs) gives the BCE target
threshold 0.2 and the warm-up's start 1e-4; timm's train.py of that release (git fbf59c04,
2021-10-04) the rest: --min-lr 1e-6, --train-interpolation random (bilinear or bicubic per image,
and per RandAugment operation), evaluation with bicubic resizes (its resolve_data_config's
default), CutMix/Mixup switch 0.5 per batch, and its Lamb's default gradient clipping at global
norm 1.0; timm's ResNet zero-initialises each block's last BN and spreads stochastic depth as
(l-1)/(L-1) x rate (model.drop_path_rule='timm'); LAMB does not decay or adapt BN and biases
(timm's filter_bias_and_bn: 'kernels'). The lr follows the batch linearly (5e-3 at 2048).
Differences left: timm's schedule steps once per epoch and its cosine spans all epochs from epoch 0
(ours: every step, after the warm-up), and its train.py then ran 10 cool-down epochs at the minimum
lr by default; its BN statistics are per GPU (ours: the global batch; bn_group=256 for per-256
groups); timm's Mixup pairs the batch with its reverse (ours: adjacent pairs i, i ^ 1 swapped,
resnet_jax/mixing.py); not trained
here at scale, so the paper's accuracies are not reproduced, only its ingredients.
Config args: depth=50, plain, shortcut=A|B|C, recipe=paper|modern|torchvision|lars|rsb_a1|
rsb_a2|rsb_a3, stride_on=1x1|3x3, batch (default: 1024 for recipe=torchvision, 4096 for lars, 2048
for rsb_*, else 256), bn_group (BN statistics over groups of that many examples; default 32 for
recipe=paper, the whole global batch for the others; 0: the whole global batch),
dataset=imagenet2012, multiscale (also run Table 4's whole-image testing at 224-640 at the end),
tweaks=b|c|d (He et al. 2019's "Bag of Tricks" ResNet-B/C/D, Sec. 4.1, cumulative as in its Table
5: b is stride_on=3x3, c adds the deep 3x3 stem (model resnet{depth}c), d also the avg-pool
shortcuts (resnet{depth}d, timm's resnet50d)).
Evaluators (resnet_jax/evaluators.py): the paper recipe's main one is 10-crop validation (Tables
2-3); `center_crop` adds the centre-crop validation error Fig. 4 plots during training.
"""

from resnet_jax.default_config import base_config, parse_arg
from resnet_jax.models.names import IMAGENET_DEPTHS

RECIPES = ('paper', 'modern', 'torchvision', 'lars', 'rsb_a1', 'rsb_a2', 'rsb_a3')
# "ResNet strikes back", Table 1: (epochs, train size, lr at 2048, weight decay, drop path, repeats,
# Mixup alpha, RandAugment magnitude)
RSB_PROCEDURES = {
  'rsb_a1': (600, 224, 5e-3, 0.01, 0.05, 3, 0.2, 7),
  'rsb_a2': (300, 224, 5e-3, 0.02, 0.05, 3, 0.1, 7),
  'rsb_a3': (100, 160, 8e-3, 0.02, 0.0, 1, 0.1, 6),
}


def get_config(arg: str | None = None):
  args = parse_arg(
    arg,
    depth=50,
    plain=False,
    shortcut='B',
    recipe='paper',
    stride_on='',
    batch=0,
    bn_group=-1,  # -1: the recipe's (32 for paper, else whole batch)
    dataset='imagenet2012',
    multiscale=False,
    tweaks='',
  )
  if args.tweaks not in ('', 'b', 'c', 'd'):
    raise ValueError(f'tweaks must be b, c or d (ResNet-B/C/D), got {args.tweaks!r}')
  if args.tweaks and args.stride_on == '1x1':
    raise ValueError(
      f'tweaks={args.tweaks} includes ResNet-B, the stride on the 3x3 conv; stride_on=1x1 '
      'contradicts it'
    )
  if args.recipe not in RECIPES:
    raise ValueError(f'recipe must be one of {", ".join(RECIPES)}, got {args.recipe!r}')
  if args.depth not in IMAGENET_DEPTHS:  # resnet20 would be a CIFAR net (3x3 stem, 16-64 wide)
    raise ValueError(
      f'depth must be one of {", ".join(map(str, IMAGENET_DEPTHS))} (the ImageNet ResNets), got '
      f"{args.depth}; CIFAR-family depths are configs/cifar.py's"
    )
  paper = args.recipe == 'paper'
  torchvision = args.recipe == 'torchvision'
  c = base_config()
  c.model.name = f'resnet{args.depth}{args.tweaks if args.tweaks in ("c", "d") else ""}'
  c.model.residual = not args.plain
  c.model.shortcut = args.shortcut
  c.model.stride_on = args.stride_on or ('1x1' if paper and not args.tweaks else '3x3')
  bn_group = args.bn_group if args.bn_group >= 0 else (32 if paper else 0)
  c.model.bn_group_size = bn_group or None
  c.model.zero_init_last_bn = args.recipe == 'modern' and not args.plain
  c.data.name = args.dataset
  # TFDS's imagenet2012 has train and validation only; its test split (if built) has no labels.
  c.data.eval_split = 'validation'
  c.data.num_classes = 1000
  c.data.image_size = 224
  c.data.augment = 'imagenet' if paper else 'inception'
  c.data.normalize = 'per_pixel_mean' if paper else 'mean_std'
  c.data.num_workers = -1  # a worker per core but one: an H100 step wants 7-11 cores of decoding
  c.data.eval_crops = 10 if paper else 1
  c.batch_size = args.batch or (1024 if torchvision else 256)
  c.eval_batch_size = 64 if paper else 256  # paper: x10 crops per image
  c.dtype = 'float32' if paper else 'bfloat16'
  c.optimizer.weight_decay = 1e-4
  if paper:
    # A reference, so --config.batch_size (applied after get_config) sets the length too.
    c.num_train_steps = 600_000 * 256 // c.get_ref('batch_size')
    c.schedule.name = 'piecewise'
    c.schedule.base_lr = 0.1  # x batch_size / 256: also when --config.batch_size changes it
    c.schedule.scale_with_batch = True
    c.schedule.boundaries_epochs = '30,60'
  else:
    c.num_epochs = 90.0
    c.schedule.name = 'cosine'
    c.schedule.base_lr = 0.1
    c.schedule.scale_with_batch = True
    c.schedule.warmup = 'linear'
    c.schedule.warmup_epochs = 5.0  # in epochs: the same length at any batch_size
    c.label_smoothing = 0.1
    c.optimizer.nesterov = True
    c.optimizer.weight_decay_mask = 'kernels'
  if torchvision:
    c.num_epochs = 600.0
    c.schedule.base_lr = 0.5 / 4  # x batch/256: 0.5 at batch 1024
    c.optimizer.nesterov = False
    c.optimizer.weight_decay = 2e-5
    c.optimizer.weight_decay_mask = 'not_norm'  # --norm-weight-decay 0.0
    c.data.image_size = 176  # --train-crop-size 176
    c.data.eval_image_size = 224
    c.data.eval_resize = 232  # --val-resize-size 232
    c.data.auto_augment = 'trivial_wide'
    c.data.random_erasing = 0.1
    c.data.repeated_augmentations = 4  # --ra-sampler --ra-reps 4
    c.data.mixup_alpha = 0.2
    c.data.cutmix_alpha = 1.0
    c.ema_every_steps = 32
    # torchvision's train.py: alpha = (1 - 0.99998) * batch * ema_steps / epochs per update.
    c.ema_decay = 1.0 - (1.0 - 0.99998) * 32 / c.get_ref('num_epochs') * c.get_ref('batch_size')
  if args.recipe == 'lars':  # MLPerf's TF2 reference, batch 4096 (docstring)
    c.batch_size = args.batch or 4096
    c.dtype = 'float32'  # --dtype=fp32
    c.num_epochs = 42.0
    c.optimizer.name = 'lars'
    c.optimizer.nesterov = False
    c.optimizer.weight_decay = 2e-4
    c.optimizer.weight_decay_mask = 'kernels'  # skip_list: batch_normalization, bias, bn
    c.optimizer.trust_coefficient = 1e-3  # eeta
    c.optimizer.eps = 0.0
    c.schedule.name = 'polynomial'
    c.schedule.base_lr = 10.0
    c.schedule.scale_with_batch = False
    c.schedule.end_lr = 1e-4
    c.schedule.power = 2.0
  if args.recipe in RSB_PROCEDURES:  # "ResNet strikes back" (docstring)
    epochs, size, lr, decay, drop, reps, mixup, magnitude = RSB_PROCEDURES[args.recipe]
    c.batch_size = args.batch or 2048
    c.num_epochs = float(epochs)
    c.model.zero_init_last_bn = not args.plain
    c.model.drop_path_rate = 0.0 if args.plain else drop
    c.model.drop_path_rule = 'timm'
    c.optimizer.name = 'lamb'
    c.optimizer.nesterov = False
    c.optimizer.weight_decay = decay
    c.optimizer.weight_decay_mask = 'kernels'
    c.optimizer.clip_grad_norm = 1.0  # timm's Lamb(max_grad_norm=1.0)
    c.schedule.base_lr = lr * 256 / 2048  # x batch / 256
    c.schedule.warmup_init_lr = 1e-4
    c.schedule.end_lr = 1e-6
    c.label_smoothing = 0.0
    c.loss = 'sigmoid_bce'
    c.bce_target_threshold = 0.2
    c.data.mixup_alpha = mixup
    c.data.cutmix_alpha = 1.0
    c.data.repeated_augmentations = reps
    c.data.image_size = size
    c.data.eval_image_size = 224
    c.data.eval_crop_pct = 0.95  # the 224 crop of the image resized to floor(224 / 0.95) = 235
    c.data.interpolation = 'random'  # train: bilinear or bicubic per image; eval: bicubic
    c.data.auto_augment = f'rand-m{magnitude}-mstd0.5-inc1'
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 5000
  if paper:
    c.evals.center_crop = dict(crops=1, batch_size=256)
  if args.multiscale:  # Table 4: the shorter side at each scale; large images, small batches
    c.evals.multiscale = dict(scales='224,256,384,480,640', batch_size=32, every_steps=0)
  return c
