"""The one place every config field is defined, with its default.

Experiment files in `configs/` start from `base_config()` and change what their recipe needs, so a
field that exists in one experiment exists in all of them and `--config.<key>=...` overrides behave
the same everywhere (with `lock_config=True` a misspelled key is an error).
"""

from __future__ import annotations

from typing import Any

import ml_collections

# ILSVRC-2012's training images: the synthetic dataset's epoch and the modern recipe's warm-up.
IMAGENET_TRAIN_EXAMPLES = 1_281_167


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every experiment (the paper's CIFAR recipe where a choice is needed)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dtype = 'float32'  # 'float32' | 'bfloat16' (compute dtype; params and BN stats stay float32)

  c.model = ml_collections.ConfigDict()
  c.model.name = 'resnet20'
  c.model.num_classes = ml_collections.FieldReference(
    None, field_type=int
  )  # None: from the dataset
  c.model.residual = True
  c.model.shortcut = ml_collections.FieldReference(
    None, field_type=str
  )  # None: A for CIFAR, B for ImageNet
  c.model.stride_on = ml_collections.FieldReference(
    None, field_type=str
  )  # '1x1' (paper v1) | '3x3' (v1.5)
  c.model.preact = False
  c.model.block = ml_collections.FieldReference(
    None, field_type=str
  )  # CIFAR: None/'basic' | 'bottleneck'
  c.model.zero_init_last_bn = False
  c.model.bn_group_size = ml_collections.FieldReference(
    None, field_type=int
  )  # None: whole global batch
  c.model.bn_momentum = 0.9
  c.model.bn_epsilon = 1e-5
  # Run the identical blocks of each stage as one scan over stacked parameters (compile time
  # independent of depth) and optionally rematerialise each block in the backward pass.
  # None: scan on the CPU (faster to compile and to run there), unrolled on GPU/TPU, where the
  # unrolled step measured 17-33 % faster on an H100 (docs/performance.md); set true for very
  # deep nets (ResNet-1202) on an accelerator to keep compile time flat.
  c.model.scan = ml_collections.FieldReference(None, field_type=bool)
  c.model.remat = False
  # ResNeXt / Wide ResNet bottlenecks (None: the name's own, e.g. resnext50_32x4d: 32 and 4) and
  # dropout between a block's convs (the CIFAR Wide ResNets of configs/wrn.py).
  c.model.groups = ml_collections.FieldReference(None, field_type=int)
  c.model.width_per_group = ml_collections.FieldReference(None, field_type=int)
  c.model.dropout_rate = 0.0
  # Dropout on the pooled features before the classifier, in training only (timm's drop_rate, TF's
  # dropout_rate: ResNet-RS's 0.25-0.4, configs/resnetrs.py). 0: no dropout module at all.
  c.model.head_dropout_rate = 0.0
  # The classifier's kernel starts at zero (BiT's fine-tuning head, configs/bit.py); False: He init
  c.model.zero_init_head = False
  # Stochastic depth (Huang et al. 2016): block l of L drops its residual branch in training
  # with probability l / L * drop_path_rate (0.5: the paper's p_L); 'row' per example | 'batch'.
  # drop_path_rule 'timm': (l - 1) / (L - 1) * drop_path_rate instead (timm's ResNet, RSB's);
  # 'stage': every block of stage s of S at (s + 1) / (S + 1) * drop_path_rate (TF's ResNet-RS).
  c.model.drop_path_rate = 0.0
  c.model.drop_path_mode = 'row'
  c.model.drop_path_rule = 'huang'
  # Fine-tuning a backbone: output stride 16 / 8 by dilation, BatchNorm with frozen statistics
  # (and scale/bias), stem + stages 1..k frozen (-1: none; optimizer leaves them untouched).
  c.model.output_stride = 32
  c.model.frozen_bn = False
  c.model.frozen_bn_affine = False
  c.model.frozen_stages = -1
  # Bag of Tricks (He et al. 2019, Sec. 4.1): stem 'deep' = ResNet-C's three 3x3 convs ('7x7': the
  # paper's), avg_down = ResNet-D's avg-pool projection shortcuts. None: the name's own
  # (resnet50c: deep stem; resnet50d: both; every other name: neither).
  c.model.stem = ml_collections.FieldReference(None, field_type=str)
  c.model.avg_down = ml_collections.FieldReference(None, field_type=bool)
  # 'se': squeeze-and-excitation blocks (Hu et al. 2018; timm's seresnet*); None: the name's own.
  c.model.attention = ml_collections.FieldReference(None, field_type=str)

  c.data = ml_collections.ConfigDict()
  # 'digits' | 'synthetic' | 'image_folder' (data_dir=ROOT/<split>/<class>/<image>) | a TFDS name
  c.data.name = 'digits'
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  c.data.validation_size = 0  # >0: hold out that many train examples as split 'validation'
  c.data.image_size = 32  # model input side; 0: the dataset's own (fixed-size images only)
  c.data.num_classes = 10  # only used by 'synthetic'
  c.data.num_train_examples = IMAGENET_TRAIN_EXAMPLES  # only used by 'synthetic' (an epoch)
  c.data.num_eval_examples = (
    32  # only used by 'synthetic' (random data: eval only exercises the path)
  )
  # 'synthetic': its images' channels; 'image_folder': files read as 1 (greyscale) or 3 (RGB)
  c.data.channels = 3
  c.data.augment = 'none'  # 'none' | 'cifar' | 'translate' | 'imagenet' | 'inception' | 'bit'
  # 'bit' (BiT's fine-tuning): the whole image resized to this square, then a random image_size
  # crop and flip; evaluation resizes straight to image_size. 0: image_size (flip only)
  c.data.train_resize = 0
  # 'per_pixel_mean' (paper) | 'mean_std' | 'scale' ([0, 1]) | 'inception' ([-1, 1]: BiT's)
  c.data.normalize = 'per_pixel_mean'
  c.data.decoder = 'pil'  # JPEG decoder of the training crops: 'pil' | 'opencv' (if installed)
  # 'trivial_wide': TrivialAugment Wide on each training image after its crop and flip, as
  # torchvision's new recipe does (resnet_jax/data/auto_augment.py); 'rand_augment' (2 operations
  # at magnitude 9 of 31) or 'rand_augment_n{N}_m{M}'; 'autoaugment_imagenet' or
  # 'autoaugment_cifar10' (AutoAugment's learned policies), all as torchvision's; timm's
  # RandAugment strings, 'rand-m7-mstd0.5-inc1' (the "ResNet strikes back" recipe's; -n, -mstd,
  # -mmax, -inc, -p as timm parses them; resnet_jax/data/timm_augment.py); 'none': paper's
  c.data.auto_augment = 'none'
  # Testing at another resolution than training (FixRes; torchvision's new recipe: train 176, test
  # 224 cut from 232): the eval crop and the shorter side it is cut from. 0: image_size and
  # image_size x 256/224. ImageNet augment modes only.
  c.data.eval_image_size = 0
  c.data.eval_resize = 0
  # The resampling filter of the training crops ('imagenet'/'inception') and of every eval resize:
  # 'bilinear' (the pipeline's own, unchanged) | 'bicubic' | 'random' (bilinear or bicubic per
  # training image, timm's default --train-interpolation; evaluation then bicubic, as timm's). Not
  # 'bilinear' also takes torchvision's resize/crop rounding (pixel-equal to timm's transforms).
  c.data.interpolation = 'bilinear'
  # timm's crop_pct: evaluate on the eval crop cut from the shorter side resized to
  # floor(crop / crop_pct) (RSB's resnet50.a1_in1k: 0.95, bicubic). 0: data.eval_resize's rule
  c.data.eval_crop_pct = 0.0
  # Random erasing (Zhong et al. 2017) of one rectangle per training image with this probability,
  # on the device after normalisation (torchvision's new recipe: 0.1)
  c.data.random_erasing = 0.0
  # Repeated augmentation: each global batch holds batch / N images, each N times with its own
  # augmentation (Hoffer et al. 2019; torchvision's new recipe: 4). 1: off
  c.data.repeated_augmentations = 1
  # Grain worker processes: 0 decodes in the training process; -1 is one per core this process
  # may use, less one for the training loop (pipeline.worker_count)
  c.data.num_workers = 0
  c.data.prefetch = 2  # batches prepared ahead on the host (0 acts as 1)
  c.data.eval_crops = 1  # 1 | 10 (the paper's 10-crop testing)
  # Mixup (Zhang et al. 2018) / CutMix (Yun et al. 2019) of each training batch inside the jitted
  # step, as torchvision's reference trainer does (resnet_jax/mixing.py): lambda ~ Beta(alpha,
  # alpha), 0 turns one off (both 0: no mixing); a batch is mixed with probability mix_prob,
  # by CutMix with probability mix_switch_prob when both are on (torchvision: 1.0 and 0.5).
  c.data.mixup_alpha = 0.0
  c.data.cutmix_alpha = 0.0
  c.data.mix_prob = 1.0
  c.data.mix_switch_prob = 0.5

  c.batch_size = 128  # global, over all devices and hosts
  # >1: each step's gradient over that many micro-batches in turn (activation memory / N), the
  # same update as one pass when ghost-BN groups fit the micro-batches (validation.py checks)
  c.grad_accum_steps = 1
  c.eval_batch_size = 256
  c.num_epochs = 10.0
  c.num_train_steps = -1  # >0 overrides num_epochs; -1: train num_epochs

  c.optimizer = ml_collections.ConfigDict()
  # 'sgd' (momentum, coupled L2: the paper's) | 'lars' (You et al. 2017: MLPerf's large-batch
  # ResNet-50) | 'lamb' (You et al. 2019: timm's "ResNet strikes back") | 'adamw' (Loshchilov &
  # Hutter); the last three decay the weights decoupled from the gradient (resnet_jax/optim.py).
  c.optimizer.name = 'sgd'
  c.optimizer.momentum = 0.9  # sgd and lars
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 1e-4
  # Which parameters are decayed: 'all' (the paper's Caffe L2 on every weight, BN included),
  # 'kernels' (conv/dense kernels only: the modern choice) or 'not_norm' (all but BN's scale and
  # bias: torchvision's new recipe, norm_weight_decay=0).
  c.optimizer.weight_decay_mask = 'all'
  # Only for the optimizers that read them (None: that optimizer's default): Adam's moment decay
  # rates b1, b2 (lamb, adamw: 0.9, 0.999); eps (lamb 1e-6, adamw 1e-8 beside sqrt(v); lars 0 in
  # its trust ratio's denominator); LARS's trust coefficient eta (0.001). Setting one that the
  # chosen optimizer ignores is an error.
  c.optimizer.b1 = ml_collections.FieldReference(None, field_type=float)
  c.optimizer.b2 = ml_collections.FieldReference(None, field_type=float)
  c.optimizer.eps = ml_collections.FieldReference(None, field_type=float)
  c.optimizer.trust_coefficient = ml_collections.FieldReference(None, field_type=float)
  # > 0: the gradient is rescaled to this global L2 norm when larger, before any optimizer (timm's
  # --clip-grad, big_vision's grad_clip_norm; timm's Lamb clips at 1.0 by default). 0: off.
  c.optimizer.clip_grad_norm = 0.0
  # The training loss: 'softmax_xent' (softmax cross-entropy) | 'sigmoid_bce' (one sigmoid per
  # class against the smoothed/mixed one-hot targets: timm's BinaryCrossEntropy, "ResNet strikes
  # back"), averaged over classes and batch unless bce_sum_classes (timm's --bce-sum); with
  # bce_target_threshold, targets above it become 1 and the rest 0 (timm's --bce-target-thresh).
  # Evaluation's loss stays the softmax cross-entropy (resnet_jax/losses.py).
  c.loss = 'softmax_xent'
  c.bce_target_threshold = ml_collections.FieldReference(None, field_type=float)
  c.bce_sum_classes = False
  c.label_smoothing = 0.0
  # An exponential moving average of the weights and BN statistics (resnet_jax/ema.py), updated
  # every ema_every_steps steps with this decay per update (0: none); copies the weights during
  # the lr warm-up. Evaluated beside the model ('eval_ema' in metrics.jsonl and results.json).
  c.ema_decay = 0.0
  c.ema_every_steps = 1

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = 'piecewise'  # 'piecewise' | 'cosine' | 'polynomial' | 'constant'
  c.schedule.base_lr = 0.1
  c.schedule.scale_with_batch = False  # lr = base_lr * batch_size / 256 (Goyal et al.)
  c.schedule.boundaries = ml_collections.FieldReference(
    None, field_type=str
  )  # e.g. '32000,48000' (steps)
  c.schedule.boundaries_epochs = ml_collections.FieldReference(None, field_type=str)  # e.g. '30,60'
  c.schedule.decay_factor = 0.1
  c.schedule.warmup_steps = 0
  # Warm-up length in epochs instead (it then follows batch_size); set one of the two.
  c.schedule.warmup_epochs = 0.0
  c.schedule.warmup = 'constant'  # 'constant' (paper: lr 0.01 for ResNet-110) | 'linear'
  c.schedule.warmup_lr = 0.01  # used by constant warm-up
  c.schedule.warmup_init_lr = 0.0  # linear warm-up starts here (timm's --warmup-lr)
  # 'polynomial': lr = (peak - end_lr) x (1 - t / T)^power + end_lr after the warm-up, T the steps
  # left after it (None: end_lr 0, power 2, MLPerf's LARS schedule); 'cosine' ends at end_lr too
  # (timm's --min-lr). end_lr is at most the peak lr.
  c.schedule.end_lr = ml_collections.FieldReference(None, field_type=float)
  c.schedule.power = ml_collections.FieldReference(None, field_type=float)

  c.log_every_steps = 50
  c.eval_every_steps = 500  # <=0: only at the end
  # More evaluators beside the main one (data.eval_split every eval_every_steps), by name:
  # e.g. c.evals.test = dict(split='test', crops=10, every_steps=0); see resnet_jax/evaluators.py
  c.evals = ml_collections.ConfigDict()
  c.checkpoint_every_steps = 500
  c.max_to_keep = 3
  # Also save at every main evaluation and keep the checkpoint with the lowest eval top-1 error.
  c.keep_best = False
  c.on_nonfinite = 'error'  # 'error': stop naming the step | 'skip': drop that update
  c.init_from = ''  # another run's workdir or a converted checkpoint: weights only
  # The data fields a config file read while it was built, {section: {field: value}}, and `by`:
  # which file and its args (configs/bit.py sizes its schedule by the train split). A later
  # --config override of such a field is refused: the file's choices followed the old value.
  c.read_when_built = ml_collections.ConfigDict()
  c.progress_bar = True
  c.profile_steps = ''  # 'START,STOP': write a jax.profiler trace of those steps to workdir/profile
  return c


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses a config-string such as ``depth=56,plain,shortcut=B`` (big_vision style).

  Each key must appear in `defaults`; values are converted to the default's type and a bare
  ``key`` means ``key=True``. Unknown keys are an error that lists the valid ones.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return out
  seen = set()
  for item in arg.split(','):
    item = item.strip()
    if not item:
      continue
    key, sep, value = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise ValueError(f'unknown config argument {key!r}; valid: {", ".join(sorted(defaults))}')
    if key in seen:  # which one wins would be a silent choice (r50.py:depth=101 is 'depth=50,...')
      raise ValueError(f'config argument {key!r} is given twice in {arg.strip(",")!r}')
    seen.add(key)
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f'config argument {key!r} needs a value ({key}=...)')
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(f'config argument {key}={value!r}: expected true/false')
      out[key] = value.lower() in ('true', '1')
    elif isinstance(default, (int, float)):
      kind = type(default)
      try:
        out[key] = kind(value)
      except ValueError:
        raise ValueError(
          f'config argument {key}={value!r}: expected {"an integer" if kind is int else "a number"}'
        ) from None
    else:
      out[key] = value
  return out


def set_cifar_model(model: ml_collections.ConfigDict, args: ml_collections.ConfigDict) -> None:
  """`model.*` from the CIFAR-family config args that cifar.py and digits.py share.

  args: depth, plain, shortcut ('' = the net's default, `models.names.default_shortcut`), preact,
  block ('basic' is stored as None, the name's own kind, so
  runs from before `model.block` existed still resume).
  """
  from resnet_jax.models.names import IMAGENET_DEPTHS, default_shortcut, parse_name

  # 50 and 152 are 6n+2 too: the prefix keeps them CIFAR nets, not ImageNet ResNet-50/152.
  model.name = f'{"cifar_" if args.depth in IMAGENET_DEPTHS else ""}resnet{args.depth}'
  model.residual = not args.plain
  model.block = None if args.block == 'basic' else args.block
  model.shortcut = args.shortcut or default_shortcut(parse_name(model.name, model.block))
  model.preact = args.preact


def set_cifar_recipe(
  c: ml_collections.ConfigDict, args: ml_collections.ConfigDict, steps: int
) -> None:
  """He et al. 2015 Sec. 4.2's CIFAR training recipe, shared by cifar.py and fashion_mnist.py.

  Batch 128, SGD momentum 0.9 (the base config's), weight decay 1e-4, lr 0.1 divided by 10 at 50 %
  and 75 % of `steps` (the paper's 32k and 48k of 64k), depth >= 110 warms up at lr 0.01 for the
  paper's 400 of 64k iterations (scaled); pad/crop/flip, per-pixel mean; ghost BN of
  `args.bn_group` (0: whole batch); `args.val` training images held out as 'validation'.
  """
  if steps <= 0:
    raise ValueError(f'steps must be positive, got {steps}')
  c.model.bn_group_size = args.bn_group or None
  c.data.augment = 'cifar'
  c.data.normalize = 'per_pixel_mean'
  c.data.validation_size = args.val
  c.data.eval_split = 'validation' if args.val else 'test'
  if args.val:  # model selection on the held-out images; the test error is still the figure
    c.evals.test = dict(split='test')
  c.batch_size = 128
  c.num_train_steps = steps
  c.schedule.name = 'piecewise'
  c.schedule.base_lr = 0.1
  # A smoke run of a few steps gets the distinct positive ones (2 steps: '1', not '1,1').
  c.schedule.boundaries = ','.join(map(str, sorted({steps // 2, steps * 3 // 4} - {0})))
  if args.depth >= 110:
    c.schedule.warmup_steps = max(1, 400 * steps // 64_000)
    c.schedule.warmup = 'constant'
    c.schedule.warmup_lr = 0.01
  c.optimizer.weight_decay = 1e-4


def load_config_module(path: str):
  """Imports a config file such as `configs/paper.py` (configs/ is a folder, not a package)."""
  import importlib.util
  import os
  import sys

  name = 'resnet_jax_configs_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path} does not exist')
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses defined in the file look their module up here
  spec.loader.exec_module(module)
  return module


def load_sibling_config(this_file: str, name: str):
  """Imports `configs/<name>.py` next to `this_file`."""
  import os

  return load_config_module(os.path.join(os.path.dirname(os.path.abspath(this_file)), f'{name}.py'))
