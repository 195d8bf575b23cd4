"""Rules of last session's code (BiT nets, the BiT-HyperRule, ResNet-RS's recipe, ImageNet-V2's
numbered folders, damaged images, Grain worker processes, predict --normalize) that mutation
audit 5 (a one-line change to each, one at a time; docs/mutation-audit-5.md) found no test for:
each test below fails on that change and passes on the code."""

import io
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from resnet_jax import models, predict, torch_keys, validation
from resnet_jax.data import augment, image_folder, pipeline, split, workers
from resnet_jax.default_config import base_config, load_config_module, load_sibling_config
from resnet_jax.models import layers
from tests.runner import digits_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
bit = load_config_module(os.path.join(ROOT, 'configs', 'bit.py'))

# --------------------------------------------- weight standardisation's precision and paths (B4-B6)


def test_bfloat16_weight_standardisation_is_computed_in_float32_and_rounded_once():
  """A bfloat16 BiT net (config dtype bfloat16): the kernel is standardised in float32 and
  rounded to bfloat16 once (within half a bfloat16 ulp of the exact value, which bfloat16
  arithmetic misses), and the conv runs in bfloat16 (lax refuses a float32 kernel beside
  bfloat16 inputs)."""
  k = np.random.default_rng(1).normal(0.3, 2.0, (3, 3, 4, 5)).astype(np.float32)
  kb = jnp.asarray(k, jnp.bfloat16)
  w = layers.standardize_kernel(kb, 1e-8)
  assert w.dtype == jnp.bfloat16
  exact = np.asarray(kb, np.float64)
  exact = (exact - exact.mean((0, 1, 2))) / np.sqrt(exact.var((0, 1, 2)) + 1e-8)
  half_ulp = 2.0 ** (np.floor(np.log2(np.abs(exact))) - 8)  # bfloat16: 8 significant bits
  assert (np.abs(np.asarray(w, np.float64) - exact) <= half_ulp * (1 + 1e-6)).all()
  x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 6, 6, 4)), jnp.bfloat16)
  conv = layers.conv(5, 3, name='c', weight_std_eps=1e-8, dtype=jnp.bfloat16)
  y = conv.apply({'params': {'kernel': k}}, x)
  assert y.dtype == jnp.bfloat16 and y.shape == (1, 6, 6, 5)


@pytest.mark.parametrize(
  'path, rewritten',
  [
    ({'space_to_depth': True}, 'space_to_depth_conv'),
    ({'loop_friendly': True}, 'loop_friendly_conv'),
  ],
  ids=['space_to_depth', 'loop_friendly'],
)
def test_a_standardised_conv_still_runs_through_the_rewritten_conv(monkeypatch, path, rewritten):
  """The GPU stem's space-to-depth conv and the CPU scan's loop-friendly conv are what run (their
  speed is why they exist), fed the standardised kernel: matching values alone would not show
  that the plain lax conv had replaced them."""
  seen = []
  original = getattr(layers, rewritten)

  def spy(lhs, rhs, *args, **kwargs):
    seen.append(np.asarray(rhs))
    return original(lhs, rhs, *args, **kwargs)

  monkeypatch.setattr(layers, rewritten, spy)
  stride = 2 if 'space_to_depth' in path else 1
  k = np.random.default_rng(3).normal(0.1, 1.0, (7, 7, 3, 4)).astype(np.float32)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 16, 16, 3)), jnp.float32)
  conv = layers.conv(4, 7, stride, name='c', weight_std_eps=1e-8, **path)
  conv.apply({'params': {'kernel': k}}, x)
  assert len(seen) == 1
  np.testing.assert_allclose(seen[0], layers.standardize_kernel(jnp.asarray(k), 1e-8), atol=1e-6)


# ------------------------------------------------------------------------ head dropout's check (H8)


def test_an_unset_head_dropout_rate_is_a_config_error():
  """model.head_dropout_rate set to None (ml_collections lets a float field be None): a
  ConfigError, which the CLI prints as one `error:` line, not a TypeError from None < 0."""
  c = base_config()
  c.model.head_dropout_rate = None
  with pytest.raises(validation.ConfigError, match=r'head_dropout_rate must be in \[0, 1\).*None'):
    validation.validate_config(c)


# --------------------------------------------------------------------- timm's BiT keys (K7)


def _bit_state_dict(num_classes=3):
  model = models.create_model('resnetv2_50x1_bit', num_classes=num_classes)
  shapes = jax.eval_shape(
    lambda x: model.init(jax.random.key(0), x), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  )
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  return variables, torch_keys.to_torchvision(variables, bit=True)


def test_bit_weights_convert_to_a_backbone_without_timms_head():
  """`from_torchvision(..., features_only=True)` (a backbone) on timm's BiT state dict: its head
  is 'head.fc', not torchvision's 'fc', and is dropped like it; every other tensor maps on."""
  variables, sd = _bit_state_dict()
  assert 'head.fc.weight' in sd and 'head.fc.bias' in sd
  backbone = torch_keys.from_torchvision(sd, 'resnetv2_50x1_bit', features_only=True)
  assert set(backbone) == {'params'} and 'fc' not in backbone['params']
  expected = {k: v for k, v in variables['params'].items() if k != 'fc'}
  jax.tree.map(np.testing.assert_array_equal, backbone['params'], expected)


# -------------------------------------------- accumulation with running statistics in training (V2)


def test_a_config_with_frozen_bn_may_accumulate_gradients():
  """validate_config's check of grad_accum_steps: frozen BN normalises with the running statistics
  (fine-tuning), so micro-batches give the one-pass update, as for a GroupNorm net: accepted,
  while the same config with batch statistics is refused."""
  c = digits_config(grad_accum_steps=2, **{'model.frozen_bn': True})
  validation.validate_config(c)
  assert not validation.uses_batch_statistics(c.model)
  c.model.frozen_bn = False
  assert validation.uses_batch_statistics(c.model)
  with pytest.raises(validation.ConfigError, match='whole-batch BN statistics'):
    validation.validate_config(c)


# --------------------------------------- the 'bit' augment and its normalisation (A1, A4, A11, A13)


def _jpeg(h=120, w=160, seed=0) -> bytes:
  """A smooth RGB JPEG (a gradient plus noise): a DCT-scaled decode differs from a full one."""
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], -1)
  noise = np.random.default_rng(seed).normal(0, 20, (h, w, 3))
  buf = io.BytesIO()
  Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(buf, 'JPEG', quality=90)
  return buf.getvalue()


def test_train_resize_equal_to_the_crop_is_accepted_and_only_flips():
  """'at least image_size': train_resize == image_size is legal (the crop is then the whole
  squashed image, as data.train_resize=0), and the config validates it."""
  image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
  pre = augment.Preprocessor('bit', 24, 3, train_resize=24)
  whole = np.asarray(Image.fromarray(image).resize((24, 24), Image.BILINEAR))
  for seed in range(4):
    got = pre.train(image, np.random.default_rng(seed))
    assert np.array_equal(got, whole) or np.array_equal(got, whole[:, ::-1])
  c = base_config()
  c.data.augment, c.data.image_size, c.data.train_resize = 'bit', 24, 24
  validation.validate_config(c)


def test_bit_eval_at_a_scale_squashes_the_whole_image_to_that_side():
  """`eval(scale=S)` (`create_eval_iterator(scale=S)`: multi-scale testing, S x S inputs) on
  'bit': the whole image resized straight to S x S, not to the training crop's size."""
  image = np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8)
  pre = augment.Preprocessor('bit', 24, 3)
  got = pre.eval(image, scale=40)
  assert got.shape == (40, 40, 3)
  np.testing.assert_array_equal(
    got, np.asarray(Image.fromarray(image).resize((40, 40), Image.BILINEAR))
  )


def test_bit_squashes_a_jpeg_from_its_smallest_dct_scale_covering_the_square():
  """views.squash: a JPEG is decoded at the smallest DCT scale still >= side x side (PIL's draft:
  160 x 120 -> 40 x 30 for a 24 square), then resized, as its docstring promises (a full decode of
  a large photo for a 128-pixel input would cost the pipeline many times the work)."""
  data = _jpeg()
  img = Image.open(io.BytesIO(data))
  img.draft('RGB', (24, 24))
  assert img.size == (40, 30)
  expected = np.asarray(img.convert('RGB').resize((24, 24), Image.BILINEAR))
  pre = augment.Preprocessor('bit', 24, 3)
  np.testing.assert_array_equal(pre.eval(data), expected)
  full = np.asarray(Image.open(io.BytesIO(data)).convert('RGB').resize((24, 24), Image.BILINEAR))
  assert not np.array_equal(full, expected)  # the draft is what the test tells apart


def test_inception_normalisation_reads_no_statistics(monkeypatch):
  """normalize 'inception' is fixed ([-1, 1]): with augment 'bit' (no PCA lighting) the train
  split's statistics are neither computed nor read (on ImageNet: a pass over 10,000 images)."""
  from resnet_jax.data import stats as stats_lib

  def refuse(*args, **kwargs):
    raise AssertionError('statistics computed for a fixed normalisation')

  monkeypatch.setattr(stats_lib, 'cached_stats', refuse)
  c = base_config()
  c.data.augment, c.data.normalize, c.data.image_size = 'bit', 'inception', 16
  norm = pipeline.make_normalization(c)
  assert norm.pca_eigvals is None and norm.pca_eigvecs is None
  x = np.array([[[0, 255, 51]]], np.uint8)
  np.testing.assert_allclose(norm.normalizer(x), [[[-1.0, 1.0, 51 / 127.5 - 1]]], rtol=1e-6)


def test_the_configs_train_resize_reaches_the_pipeline():
  """configs/bit.py's data.train_resize (160 for digits' 128 crops) is the square the pipeline's
  preprocessor resizes to before its random crop; a saved run without the field reads 0."""
  c = bit.get_config('')
  pre = pipeline.make_preprocessor(c)
  assert (pre.augment, pre.image_size, pre.train_resize) == ('bit', 128, 160)
  del c.data['train_resize']
  c.data.augment = 'inception'
  assert pipeline.make_preprocessor(c).train_resize == 0


# -------------------------------------------------------- configs/bit.py's reading of the split (C)


def _fake_split(monkeypatch, n=500, hw=(32, 32)):
  from resnet_jax.data import sources

  fake = type('Split', (), {'native_shape': (*hw, 3), '__len__': lambda _: n})()
  monkeypatch.setattr(sources, 'open_split', lambda config, name: fake)


def test_a_given_train_examples_wins_over_the_splits_size(monkeypatch):
  """train_examples= alone (image_area read from the split): the rule sizes the run by the count
  given (a subset the split's length does not show), not by the split's 500 images."""
  _fake_split(monkeypatch, n=500, hw=(32, 32))
  c = bit.get_config('dataset=cifar10,train_examples=50000')
  assert (c.num_train_steps, c.data.mixup_alpha) == (10_000, 0.1)
  assert (c.data.image_size, c.data.train_resize) == (128, 160)  # the area still read: 32 x 32
  c = bit.get_config('dataset=cifar10,image_area=50176')  # and the reverse: the count read
  assert (c.num_train_steps, c.data.image_size) == (500, 384)


def test_one_step_keeps_every_boundary_at_step_one_or_later():
  """steps=1 (a smoke run): the rule's 200/300/400 of 500 scale to 0.4, 0.6, 0.8: no decay
  boundary at step 0 (the schedule would start decayed), and the config validates."""
  c = bit.get_config('steps=1,image_size=32')
  assert c.schedule.boundaries == '1' and c.schedule.warmup_steps == 1
  validation.validate_config(c)


# ------------------------------------------------------------- configs/resnetrs.py's eval size (R3)


def test_the_rs_eval_size_follows_an_image_size_override():
  """configs/resnetrs.py: `--config.data.image_size=224` trains at another size with the chosen
  config's regularisation and 'the eval size follows it' (train = eval size in every released
  config): the config leaves eval_image_size unset rather than pinning the table's size."""
  rs = load_sibling_config('configs/x.py', 'resnetrs')
  for depth, size in ((50, 160), (152, 256)):
    c = rs.get_config(f'depth={depth},size={size}')
    assert c.data.eval_image_size == 0
    c.data.image_size, c.data.name = 224, 'synthetic'
    pre = pipeline.make_preprocessor(c)
    assert (pre.image_size, pre.eval_image_size) == (224, 224)


# ----------------------------------------------- numbered folders and damaged images (F2, F12, F13)


@pytest.mark.parametrize(
  'name, numeral',
  [
    ('0', True),
    ('7', True),
    ('999', True),
    ('07', False),
    ('n01', False),
    ('', False),
    ('\u00b2', False),
    ('\u0663', False),
    ('-1', False),
  ],
  ids=['0', '7', '999', '07', 'n01', 'empty', 'superscript-2', 'arabic-indic-3', 'minus-1'],
)
def test_a_numbered_folder_is_str_of_a_class_index(name, numeral):
  """As str(k) writes k: ASCII digits without a leading zero. A superscript two (which
  str.isdigit accepts and int() refuses) or an Arabic-Indic three is a name, never a crash."""
  assert image_folder.is_numeral(name) is numeral


def test_a_damaged_image_without_a_file_is_left_as_its_own_error():
  """damage_named names the file only when the record has one: a TFDS record's decoding error
  stays PIL's own (no 'image file None'), and a DatasetNotFoundError passes through unchanged."""
  with pytest.raises(OSError, match='broken data stream') as e:
    with split.damage_named({'image': b'', 'label': 0}):
      raise OSError('broken data stream when reading image file')
  assert not isinstance(e.value, split.DatasetDamagedError)
  with pytest.raises(split.DatasetDamagedError, match=r'image file /x/a\.jpg cannot be read'):
    with split.damage_named({'image': b'', 'label': 0, 'path': '/x/a.jpg'}):
      raise OSError('broken data stream when reading image file')
  gone = split.DatasetNotFoundError('the split moved')
  with pytest.raises(split.DatasetNotFoundError) as e:
    with split.damage_named({'image': b'', 'label': 0, 'path': '/x/a.jpg'}):
      raise gone
  assert e.value is gone


# ------------------------------------------------------------ an orphaned Grain worker (W1, W2, W5)


def test_the_watch_polls_every_half_second_and_exits_once_reparented(monkeypatch):
  """The worker's watch, run in-process with the process calls replaced: it polls its parent's id
  every POLL_S (README: 'checks every 0.5 s'), keeps the worker alive while
  the parent is the one it was given, and ends the process once it is re-parented; the
  sigkill test's own deadline scales with POLL_S, so a slow poll would not fail it."""
  parents = iter([100, 100, 100, 1])  # the run, then init after the run was killed
  sleeps, exits, done = [], [], threading.Event()
  monkeypatch.setattr(workers.os, 'getppid', lambda: next(parents))
  monkeypatch.setattr(workers.time, 'sleep', sleeps.append)

  def fake_exit(code):
    exits.append(code)
    done.set()

  monkeypatch.setattr(workers.os, '_exit', fake_exit)
  workers.exit_with_parent(100, 0, 1)
  assert done.wait(10), 'the watch never ended the process'
  assert exits == [1] and sleeps == [workers.POLL_S] * 3
  assert workers.POLL_S == 0.5


# --------------------------------------------------------------------- predict --normalize (P3, P4)


@pytest.mark.parametrize(
  'arch, flags, white',
  [
    ('resnet50', ['--normalize', 'inception'], [1.0, 1.0, 1.0]),
    (
      'resnetv2_50x1_bit',
      ['--normalize', 'imagenet'],
      (1 - predict.IMAGENET_MEAN) / predict.IMAGENET_STD,
    ),
    ('resnetv2_50x1_bit', [], [1.0, 1.0, 1.0]),
  ],
  ids=['resnet50-inception', 'bit-imagenet', 'bit-default'],
)
def test_predict_normalize_flag_overrides_the_names_default(
  tmp_path, monkeypatch, arch, flags, white
):
  """What reaches the model: a white image normalised as --normalize says, whatever the name's
  default (torchvision weights fine-tuned here with [-1, 1] inputs, BiT weights re-exported)."""
  path = str(tmp_path / 'white.png')
  Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(path)
  seen = []
  monkeypatch.setattr(predict, 'load_variables', lambda args: {})
  monkeypatch.setattr(
    predict, '_classify', lambda parser, args, batch, variables: seen.append(batch)
  )
  predict.main(
    ['--arch', arch, '--torchvision-weights', 'w.pth', '--image-size', '8', *flags, path]
  )
  (batch,) = seen
  assert batch.shape == (1, 8, 8, 3)
  np.testing.assert_allclose(batch[0, 4, 4], white, rtol=1e-6)


def test_predict_on_a_training_run_refuses_normalize(tmp_path, capsys):
  """A training run normalises as it trained (its own evaluation input): --normalize there would
  be silently ignored, so it is bad input, one line, as --interpolation and --crop-pct are."""
  (tmp_path / 'config.json').write_text('{}')
  with pytest.raises(SystemExit) as exit_info:
    predict.main(
      ['--arch', 'resnet18', '--checkpoint', str(tmp_path), '--normalize', 'inception', 'x.png']
    )
  assert exit_info.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: --normalize: ') and 'training run' in err[0]
