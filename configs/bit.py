"""Fine-tune a Big Transfer net (converted BiT weights) with the BiT-HyperRule.

Kolesnikov et al. 2020, "Big Transfer (BiT)", Sec. 3.3, and its released code
(google-research/big_transfer: bit_hyperrule.py, bit_pytorch/train.py). Convert the weights first
(README, "Pretrained weights"), then:
  python -m resnet_jax.main --config=configs/bit.py:arch=resnetv2_50x1_bit,dataset=cifar10 \\
      --config.init_from=/tmp/bit_m_r50x1 --workdir=/tmp/bit_ft
The rule, by the training set's size N and image area (both read from the train split when the
config is built, `sources.open_split`; or give train_examples= / image_area=):
- steps: N < 20k: 500; N < 500k: 10k; else 20k (paper and code).
- schedule: SGD momentum 0.9 (no Nesterov: train.py's torch.optim.SGD), no weight decay
  (train.py passes none), lr 0.003 at batch 512 (paper), scaled here by batch/512 (BiT-HyperRule
  is stated at 512; train.py keeps 0.003 at any batch); linear warm-up from 0, then x 0.1 at
  30 %, 60 %, 90 % of the steps. Warm-up 500 steps (paper) for N >= 20k; below 20k the released
  code's schedule, warm-up 100 and decays at 200, 300, 400 of 500 (the paper's 500-step warm-up
  would be the whole run). The code decays after a boundary (lr(3000) is still 0.003, its
  `s < step`); optax's piecewise schedule here decays at it (lr(3000) = 0.0003): one step apart.
- MixUp (Zhang et al. 2018) alpha 0.1 on every batch when N >= 20k, none below (paper and code).
- resolution: images of area < 96 x 96 resized to 160 x 160 and randomly cropped to 128; larger
  ones resized to 448 x 448 and cropped to 384 (paper; the released code uses 512 / 480); random
  horizontal flip; evaluation resizes straight to the crop size (augment 'bit'). Datasets of
  variable-size images count as large (BiT's natural-image tasks: pets, flowers, ImageNet).
- inputs scaled to [-1, 1] (normalize 'inception': timm's resnetv2_*_bit mean = std = 0.5;
  train.py's Normalize((0.5,) * 3, (0.5,) * 3)).
- the classifier head starts at zero (model.zero_init_head; train.py's zero_head=True); init_from
  re-initialises it only when the class count differs from the checkpoint's.
Differences left: no gradient accumulation split (train.py's --batch_split: use grad_accum_steps);
digits' 8 x 8 grayscale images go through the 128 px rule like CIFAR's 32 x 32.
Config args: arch=resnetv2_50x1_bit (any resnetv2_{50,101,152}x{1,2,3,4}_bit), dataset=digits
(or any TFDS name, or image_folder), data_dir=, train_split=train (e.g. a few-shot subset,
train[:5%], of a TFDS dataset: an image folder's split is a folder, unsliced), validation_size=0
(examples held out of the train split), batch=512, lr=0.003 (at batch 512), train_examples=0
and image_area=0 (0: from the train split), steps=0, image_size=0, resize=0 (0: the rule's),
bf16. The train split is read before --config.data.*
overrides apply, so a run that overrides data.name, data.data_dir, data.train_split or
data.validation_size afterwards is refused (`read_when_built`): give them as args.
"""

from resnet_jax.default_config import base_config, parse_arg

BASE_BATCH = 512  # the batch the paper's lr 0.003 is stated at
SMALL_DATASET, LARGE_DATASET = 20_000, 500_000  # the rule's dataset-size thresholds
SMALL_IMAGE_AREA = 96 * 96


def hyperrule(num_examples: int, image_area: int | None) -> dict:
  """The BiT-HyperRule's choices for a training set of `num_examples` images of `image_area`
  pixels (None: variable size, counted as large): steps, warm-up, decay boundaries, MixUp alpha,
  and the (resize, crop) sides."""
  if num_examples < SMALL_DATASET:  # the released code's small schedule: 100/200/300/400/500
    steps, warmup, boundaries = 500, 100, [200, 300, 400]
  else:
    steps = 10_000 if num_examples < LARGE_DATASET else 20_000
    warmup, boundaries = 500, [steps * 3 // 10, steps * 6 // 10, steps * 9 // 10]
  small_images = image_area is not None and image_area < SMALL_IMAGE_AREA
  return dict(
    steps=steps,
    warmup=warmup,
    boundaries=boundaries,
    mixup_alpha=0.0 if num_examples < SMALL_DATASET else 0.1,
    resize=160 if small_images else 448,
    crop=128 if small_images else 384,
  )


def get_config(arg: str | None = None):
  args = parse_arg(
    arg,
    arch='resnetv2_50x1_bit',
    dataset='digits',
    data_dir='',
    train_split='train',
    validation_size=0,
    batch=512,
    lr=0.003,
    train_examples=0,
    image_area=0,
    steps=0,
    image_size=0,
    resize=0,
    bf16=False,
  )
  for key in ('steps', 'train_examples', 'image_area', 'image_size', 'resize', 'validation_size'):
    if args[key] < 0:  # steps=-1 would mean "train num_epochs": millions of steps, silently
      raise ValueError(f"configs/bit.py: {key} must be >= 0 (0: the rule's), got {args[key]}")
  c = base_config()
  c.model.name = args.arch
  c.model.zero_init_head = True
  c.data.name = args.dataset
  c.data.data_dir = args.data_dir or None
  c.data.train_split = args.train_split
  c.data.validation_size = args.validation_size
  n, area = args.train_examples, args.image_area or None
  if not n or not area:
    from resnet_jax.data import sources  # the split's size: the rule needs it at config time

    read = {k: c.data[k] for k in ('name', 'data_dir', 'train_split', 'validation_size')}
    c.read_when_built = dict(
      data=read, by='configs/bit.py (args dataset=, data_dir=, train_split=, validation_size=)'
    )
    try:
      train = sources.open_split(c, str(c.data.train_split))
    except ValueError as e:  # DatasetNotFoundError: one line saying how to prepare it
      raise ValueError(
        f'{e} (configs/bit.py reads the train split for the BiT-HyperRule while the config is '
        'built, before --config.data.* overrides apply: give dataset=, data_dir=, train_split= '
        'as its args; or give train_examples= and image_area=)'
      ) from None
    h, w = train.native_shape[:2]
    n = n or len(train)
    area = area or (h * w if h is not None else None)
  rule = hyperrule(n, area)
  steps = args.steps or rule['steps']
  scale = steps / rule['steps']  # a steps= override keeps the boundaries' fractions
  c.data.image_size = args.image_size or rule['crop']
  c.data.train_resize = args.resize or max(
    c.data.image_size, round(c.data.image_size * rule['resize'] / rule['crop'])
  )
  c.data.augment = 'bit'
  c.data.normalize = 'inception'
  c.data.mixup_alpha = rule['mixup_alpha']
  c.batch_size = args.batch
  c.eval_batch_size = 360 if args.dataset == 'digits' else 256
  c.num_train_steps = steps
  c.dtype = 'bfloat16' if args.bf16 else 'float32'
  c.schedule.name = 'piecewise'
  c.schedule.base_lr = args.lr * args.batch / BASE_BATCH
  c.schedule.warmup = 'linear'
  c.schedule.warmup_steps = max(1, round(rule['warmup'] * scale))
  bounds = sorted({max(1, round(b * scale)) for b in rule['boundaries']})
  c.schedule.boundaries = ','.join(map(str, bounds))
  c.schedule.decay_factor = 0.1
  c.optimizer.name = 'sgd'
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 0.0
  c.log_every_steps = max(1, min(50, steps // 10))
  c.eval_every_steps = max(1, steps // 3)
  c.checkpoint_every_steps = max(1, steps // 3)
  return c
