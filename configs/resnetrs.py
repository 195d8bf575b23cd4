"""ResNet-RS's ImageNet training recipe (Bello et al. 2021, "Revisiting ResNets: Improved Training
and Scaling Strategies", arXiv 2103.07579), for the `resnetrs50` ... `resnetrs420` models.

Usage: `python -m resnet_jax.main --config=configs/resnetrs.py:depth=50 --workdir=runs/rs50`.
Config args: depth=50|101|152|200|270|350|420; size (one of the training sizes the authors
released for that depth, which selects that config's regularisation; 0: the default below); batch
(default 4096; the lr follows it); bn_group (BN statistics over groups of that many examples; 0:
the whole global batch); dataset=imagenet2012. Every field stays overridable
(`--config.data.image_size=224` trains at another size with the chosen config's regularisation;
the eval size follows it).

Sources, and which value comes from which ([P] the paper; [T] its authors' code and per-model
configs, tensorflow/tpu models/official/resnet (resnet_main.py, resnet_model.py, configs/
resnet_config.py) and resnet/resnet_rs/configs/resnetrs{depth}_i{size}.yaml, git 7dc921f8, which
the paper's README points to ("see configs and Table 1 in the paper"); [G] TF Model Garden's
official/vision/configs/experiments/image_classification/imagenet_resnetrs{depth}_i{size}.yaml;
[M] timm's `resnetrs*` entries in timm/models/resnet.py, whose weights are [T]'s checkpoints):
- 350 epochs [P]; batch 4096 [T][G]; bfloat16 [T][G].
- SGD momentum 0.9 [T][G], lr 0.1 x batch / 256 = 1.6 at 4096 ([T] base_learning_rate 0.1 scaled
  by train_batch_size / 256; [G] initial_learning_rate 1.6), cosine decay [P][G] after a 5-epoch
  linear warm-up from 0 ([G] warmup_steps 1560 = 5 x 312 steps per epoch).
- Weight decay 4e-5 [P][T][G] as a coupled L2 (SGD's gradient + 4e-5 x w, the project's
  `optimizer.name=sgd`) on every parameter but BatchNorm's (`not_norm`: conv kernels, the SE convs'
  kernels and biases, fc's kernel and bias). [T] adds 4e-5 x sum(tf.nn.l2_loss(v)) to the loss for
  every trainable v whose name lacks 'batch_normalization'; tf.nn.l2_loss is sum(v^2) / 2, so the
  gradient term is 4e-5 x v, i.e. weight decay 4e-5, not 8e-5. [G]'s `l2_weight_decay: 4e-5` is
  turned into keras.regularizers.l2(4e-5 / 2) "to match tf.nn.l2_loss": the same 4e-5 x v.
- Label smoothing 0.1 [P][T][G]; softmax cross-entropy.
- EMA of the weights and of the BN statistics with decay 0.9999 every step [P][T][G] (`ema_decay`;
  [T]'s get_ema_vars averages moving_mean / moving_variance too). Its figure is `eval_ema`.
- BN momentum 0 [T][G] (`model.bn_momentum=0.0`): the running statistics are the last batch's,
  and the EMA averages them; [T]'s resnet_main.py refuses an EMA with bn_momentum > 0. The plain
  `eval` (the model's own weights) therefore uses one batch's statistics; `eval_ema` is the
  paper's. BN epsilon 1e-5 [T] (the default).
- ReLU ([T]'s norm_act_layer 'bn_relu', the default its RS configs keep; [M] builds the nets with
  ReLU and loads [T]'s checkpoints). [G] sets activation 'swish' in every RS yaml: a Model Garden
  difference we do not follow (the paper's code, and the timm weights this project converts, use
  ReLU).
- Zero-initialised last BN of every block ([T] bottleneck_block's init_zero=True).
- Dropout before the classifier, stochastic depth and RandAugment's magnitude per model, from
  [T]'s yaml (`RS_CONFIGS` below; [G] agrees except RS-101 at 160, where [G] has magnitude 15 and
  [T] 10; we keep [T]). Stochastic depth is [T]'s drop_connect: per example, with the rate of
  stage s of 4 at (s + 1) / 5 x rate (`model.drop_path_rule='stage'`).
- RandAugment: 2 operations at the model's magnitude [T] (randaug_num_layers 2). We use timm's
  implementation (resnet_jax/data/timm_augment.py), the closest to [T]'s (tensorflow/tpu
  models/official/efficientnet/autoaugment.py, distort_image_with_randaugment): the same 0-10
  level scale and, without `inc1`, the same level rules for Rotate (30 deg), Shear (0.3),
  Posterize, Solarize, SolarizeAdd, Color/Contrast/Brightness/Sharpness (0.1-1.9) and Invert.
  [T] applies both drawn operations always, so `-p1.0`; its magnitude 15 is above timm's default
  cap of 10: timm clips the level to `mmax` (10 unless given; its auto_augment.py notes a larger
  mmax is "closer to Google TF RA impl"), this project refuses m > mmax rather than clip silently,
  so the string names `-mmax15`: 'rand-m15-n2-mmax15-inc0-p1.0' (timm_augment.py is unchanged).
- Training crops: Inception-style random crops (area 0.08-1, aspect 3/4-4/3) [T] resized bicubic
  [T] (`data.interpolation='bicubic'`), flip, mean/std normalisation [T]. Evaluation: the centre
  crop of the same size as training ([T] evaluates at image_size; [G] at input_size), cut from
  the shorter side x 224/256 ([T]'s CROP_FRACTION 0.875) and resized bicubic.

Per model ([T]'s yaml; [G] the same but for the magnitude noted above; top-1 from [T]'s README):

  model    train  eval  dropout  stoch. depth  RandAugment  [T] top-1  [M] test size
  RS-50    160    160   0.25     0.0           10           78.8       224
  RS-101   160    160   0.25     0.0           10           80.3       -
  RS-101   192    192   0.25     0.0           15           81.2       288
  RS-152   192    192   0.25     0.0           15           82.0       -
  RS-152   224    224   0.25     0.0           15           82.2       -
  RS-152   256    256   0.25     0.0           15           83.0       320
  RS-200   256    256   0.25     0.1           15           83.4       320
  RS-270   256    256   0.25     0.1           15           83.8       352
  RS-350   256    256   0.25     0.1           15           84.0       384
  RS-350   320    320   0.4      0.1           15           84.2       -
  RS-420   320    320   0.4      0.1           15           84.4       416

A depth's default size is that of the checkpoint [M] converts (its files resnetrs101_i192,
resnetrs152_i256, resnetrs350_i256). [M]'s test sizes are timm's own evaluations of the converted
weights, not the paper's protocol.

Differences left:
- [T]'s RandAugment draws from 16 operations (timm's 15 plus Cutout of up to 40 x level / 10
  pixels), translates by 100 x level / 10 pixels (timm: 0.45 x level / 10 of the side), fills
  with grey 128 (timm: the ImageNet mean pixel) and resamples its geometry nearest-neighbour
  (ours: the crops' bicubic); at level 15 timm caps SolarizeAdd's addition at 128 ([T]: 165).
- [T] resizes its crops with TF's bicubic, which does not antialias (ours: PIL's, which does).
- [T]/[G] average with TF's ExponentialMovingAverage(num_updates=step): decay min(0.9999,
  (1 + t) / (10 + t)) from step 0; ours copies the weights during the 5-epoch warm-up, then 0.9999.
- [G]'s cosine spans all steps from step 0 with the warm-up overriding its start (ours: the cosine
  runs after the warm-up); [T]'s released resnet_main.py has only the piecewise schedule and
  Nesterov momentum, so we follow [P] and [G] (cosine, plain momentum).
- [T]/[G] keep BN statistics per TPU replica ([G] use_sync_bn false); ours are over the global
  batch unless `bn_group` sets the group size.
- The paper's text was not available offline here: its values are the ones [T]'s and [G]'s configs
  carry, which match the recipe the abstract and README describe.
Not trained here at scale: the accuracies above are the sources', not reproduced.
"""

from resnet_jax.default_config import base_config, parse_arg
from resnet_jax.models.names import RS_DEPTHS

# (depth, train size) -> (eval size, head dropout, stochastic depth, RandAugment magnitude)
RS_CONFIGS = {
  (50, 160): (160, 0.25, 0.0, 10),
  (101, 160): (160, 0.25, 0.0, 10),
  (101, 192): (192, 0.25, 0.0, 15),
  (152, 192): (192, 0.25, 0.0, 15),
  (152, 224): (224, 0.25, 0.0, 15),
  (152, 256): (256, 0.25, 0.0, 15),
  (200, 256): (256, 0.25, 0.1, 15),
  (270, 256): (256, 0.25, 0.1, 15),
  (350, 256): (256, 0.25, 0.1, 15),
  (350, 320): (320, 0.4, 0.1, 15),
  (420, 320): (320, 0.4, 0.1, 15),
}
DEFAULT_SIZE = {50: 160, 101: 192, 152: 256, 200: 256, 270: 256, 350: 256, 420: 320}
BATCH = 4096
BASE_LR = 0.1  # x batch / 256: 1.6 at 4096
EPOCHS = 350.0
WEIGHT_DECAY = 4e-5


def rand_augment(magnitude: int) -> str:
  """timm's RandAugment string for TF's `randaug_num_layers=2, randaug_magnitude=M`: both
  operations always applied (p 1.0), the non-increasing operations (inc0, TF's level rules), and
  the cap raised to M (timm's default cap is 10; this project refuses m above mmax)."""
  return f'rand-m{magnitude}-n2-mmax{max(magnitude, 10)}-inc0-p1.0'


def get_config(arg: str | None = None):
  args = parse_arg(arg, depth=50, size=0, batch=0, bn_group=0, dataset='imagenet2012')
  if args.depth not in RS_DEPTHS:
    raise ValueError(
      f'depth must be one of {", ".join(map(str, sorted(RS_DEPTHS)))} (the ResNet-RS nets), got '
      f'{args.depth}'
    )
  size = args.size or DEFAULT_SIZE[args.depth]
  if (args.depth, size) not in RS_CONFIGS:
    sizes = sorted(s for d, s in RS_CONFIGS if d == args.depth)
    raise ValueError(
      f'size={size}: the authors released RS-{args.depth} at {", ".join(map(str, sizes))}; '
      f'pick one of those (its regularisation), then --config.data.image_size for another size'
    )
  eval_size, dropout, stochastic_depth, magnitude = RS_CONFIGS[args.depth, size]
  if args.bn_group < 0:
    raise ValueError(f'bn_group must be >= 0 (0: the whole global batch), got {args.bn_group}')
  c = base_config()
  c.model.name = f'resnetrs{args.depth}'
  c.model.zero_init_last_bn = True
  c.model.bn_momentum = 0.0  # the EMA averages the statistics (docstring)
  c.model.bn_group_size = args.bn_group or None
  c.model.head_dropout_rate = dropout
  c.model.drop_path_rate = stochastic_depth
  c.model.drop_path_rule = 'stage'
  c.data.name = args.dataset
  c.data.eval_split = 'validation'
  c.data.num_classes = 1000
  c.data.image_size = size
  c.data.eval_image_size = 0 if eval_size == size else eval_size  # 0: data.image_size's
  c.data.augment = 'inception'
  c.data.normalize = 'mean_std'
  c.data.interpolation = 'bicubic'
  c.data.auto_augment = rand_augment(magnitude)
  c.data.num_workers = -1
  c.batch_size = args.batch or BATCH
  c.eval_batch_size = 256
  c.dtype = 'bfloat16'
  c.num_epochs = EPOCHS
  c.schedule.name = 'cosine'
  c.schedule.base_lr = BASE_LR
  c.schedule.scale_with_batch = True
  c.schedule.warmup = 'linear'
  c.schedule.warmup_epochs = 5.0
  c.optimizer.name = 'sgd'
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = WEIGHT_DECAY
  c.optimizer.weight_decay_mask = 'not_norm'
  c.label_smoothing = 0.1
  c.ema_decay = 0.9999
  c.ema_every_steps = 1
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 5000
  return c
