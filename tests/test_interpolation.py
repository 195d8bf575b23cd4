"""`config.data.interpolation` and `config.data.eval_crop_pct`: timm's and torchvision's inputs.

timm's "ResNet strikes back" recipes train on random-resized crops resampled bilinear or bicubic
at random (`RandomResizedCropAndInterpolation`, torchvision's `F.resized_crop` on PIL images) and
evaluate on `Resize(floor(224 / crop_pct), bicubic)` + `CenterCrop(224)`. With the same box, our
crops and eval inputs are those pixels: checked live where torchvision and timm are installed,
and against their recorded hashes (tests/fixtures/make_interpolation_golden.py) where not.
"""

import importlib.util
import io
import json
import math

import numpy as np
import pytest
from PIL import Image

import resnet_jax.data as data
from resnet_jax import predict, train, validation
from resnet_jax.data import augment, pipeline, views
from resnet_jax.workdir import merge_onto_defaults
from tests.fixtures import make_interpolation_golden as golden
from tests.runner import ROOT, assert_one_line_error, data_config, digits_config, run_cli

with open(golden.OUT, encoding='utf-8') as _f:
  GOLDEN = json.load(_f)


def _channels(mode: str) -> int:
  return 3 if mode == 'RGB' else 1


def _png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, 'PNG')
  return buf.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, 'JPEG', quality=90)
  return buf.getvalue()


@pytest.fixture(scope='module')
def timm_tv():
  """(timm's transforms_factory, torchvision's functional, InterpolationMode), or a skip."""
  pytest.importorskip('torch', reason='torch is an optional extra')
  if importlib.util.find_spec('torchvision') is None:
    pytest.skip('torchvision is not installed')
  from tests.fixtures.make_torch_golden import importable_torchvision

  importable_torchvision()  # before timm, which imports torchvision
  pytest.importorskip('timm', reason='timm is not installed')
  from timm.data import transforms_factory
  from torchvision.transforms import InterpolationMode
  from torchvision.transforms import functional as F

  return transforms_factory, F, InterpolationMode


# --- training crops -----------------------------------------------------------------------------


@pytest.mark.parametrize(
  'record', GOLDEN['train'], ids=lambda r: f'{r["interpolation"]}-{r["seed"]}'
)
def test_training_crops_are_torchvisions_resized_crop_of_the_same_box(record):
  """Recorded: torchvision's `F.resized_crop` (+ `hflip`) of the box our rng drew, hashed."""
  (h, w), mode = record['shape'], record['mode']
  pre = augment.Preprocessor(
    'inception', record['size'], _channels(mode), interpolation=record['interpolation']
  )
  out = pre.train(golden.golden_array(h, w, mode), np.random.default_rng(record['seed']))
  assert golden.digest(out) == record['sha256']


def test_training_crops_match_torchvision_live_on_png_and_arrays(timm_tv):
  _, F, mode_of = timm_tv
  for interpolation in ('bicubic', 'random', 'bilinear'):
    drawn = set()
    for seed in range(8):
      array = golden.golden_array(70, 90, 'RGB')
      (left, top, cw, ch), kind, flip = golden.train_draws(
        np.random.default_rng(seed), 90, 70, interpolation
      )
      drawn.add(kind)
      expected = F.resized_crop(Image.fromarray(array), top, left, ch, cw, [40, 40], mode_of(kind))
      expected = np.asarray(F.hflip(expected) if flip else expected)
      pre = augment.Preprocessor('inception', 40, 3, interpolation=interpolation)
      for stored in (array, _png(array)):
        got = pre.train(stored, np.random.default_rng(seed))
        if interpolation == 'bilinear':  # the default keeps its resample of PIL's `box`: it reads
          # the pixels just outside the crop, so only the crop's border differs
          diff = np.abs(got.astype(int) - expected)
          assert diff[3:-3, 3:-3].max() <= 1 and diff.mean() < 1.0
        else:
          np.testing.assert_array_equal(got, expected)
    assert drawn == ({'bilinear', 'bicubic'} if interpolation == 'random' else {interpolation})


def test_jpeg_crops_differ_from_torchvisions_full_decode_by_the_draft_only(timm_tv):
  """JPEGs keep the pipeline's reduced DCT decode (`draft`), so their crops are not torchvision's
  pixels where a crop shrinks 2x or more. The bound, on large natural-image JPEGs at 224: the
  mean difference from torchvision's crop of the full decode is under 3 levels, and bicubic's is
  no more than bilinear's (today's, same draft) by more than half (measured 2026-11-25 on 20
  images: 1.63 against 1.40, at most 6.9 and 5.7 on one image)."""
  from resnet_jax.data import generated

  _, F, mode_of = timm_tv
  rng = np.random.default_rng(0)
  raws = [_jpeg(generated.natural_image(rng, 900, 720)) for _ in range(5)]
  mean = {}
  for interpolation in ('bilinear', 'bicubic'):
    pre = augment.Preprocessor('inception', 224, 3, interpolation=interpolation)
    diffs = []
    for seed, raw in enumerate(raws):
      full = Image.open(io.BytesIO(raw)).convert('RGB')
      (left, top, cw, ch), kind, flip = golden.train_draws(
        np.random.default_rng(seed), 900, 720, interpolation
      )
      expected = F.resized_crop(full, top, left, ch, cw, [224, 224], mode_of(kind))
      expected = np.asarray(F.hflip(expected) if flip else expected)
      got = pre.train(raw, np.random.default_rng(seed))
      diffs.append(np.abs(got.astype(int) - expected).mean())
    mean[interpolation] = float(np.mean(diffs))
  assert mean['bicubic'] < 3.0 and mean['bicubic'] < 1.5 * mean['bilinear'] + 0.5, mean


def test_random_draws_both_filters_per_example_and_is_deterministic():
  """timm's `random.choice((bilinear, bicubic))`, from each example's own generator: both occur
  over a few examples, and the same generator state gives the same crop."""
  array = golden.golden_array(61, 83, 'RGB')
  pre = augment.Preprocessor('inception', 32, 3, interpolation='random')
  kinds = [golden.train_draws(np.random.default_rng(s), 83, 61, 'random')[1] for s in range(12)]
  assert set(kinds) == {'bilinear', 'bicubic'}
  for seed in range(4):
    first = pre.train(array, np.random.default_rng(seed))
    np.testing.assert_array_equal(first, pre.train(array, np.random.default_rng(seed)))
  # the drawn filter is what resamples: bicubic draws differ from the bilinear crop of their box
  bilinear = augment.Preprocessor('inception', 32, 3, interpolation='bilinear')
  seed = kinds.index('bicubic')
  assert not np.array_equal(
    pre.train(array, np.random.default_rng(seed)),
    bilinear.train(array, np.random.default_rng(seed)),
  )


def test_imagenet_scale_augmentation_resamples_with_the_chosen_filter():
  array = golden.golden_array(96, 70, 'RGB')
  out = {
    k: augment.Preprocessor('imagenet', 32, 3, interpolation=k).train(
      array, np.random.default_rng(3)
    )
    for k in ('bilinear', 'bicubic')
  }
  diff = np.abs(out['bilinear'].astype(int) - out['bicubic'])
  assert 0 < diff.mean() < 10  # same box and flip, another filter


# --- evaluation ---------------------------------------------------------------------------------


@pytest.mark.parametrize('record', GOLDEN['eval'], ids=lambda r: f'{r["shape"]}-{r["crop_pct"]}')
def test_eval_input_is_timms_eval_transform(record):
  """Recorded: timm's `transforms_imagenet_eval(size, crop_pct, interpolation)` uint8 output."""
  (h, w), mode = record['shape'], record['mode']
  pre = augment.Preprocessor(
    'inception',
    record['size'],
    _channels(mode),
    interpolation=record['interpolation'],
    eval_crop_pct=record['crop_pct'],
  )
  assert pre.eval_resize == record['resize'] == math.floor(record['size'] / record['crop_pct'])
  array = golden.golden_array(h, w, mode)
  for stored in (array, _png(array)):
    assert golden.digest(pre.eval(stored)) == record['sha256']


def test_eval_input_matches_timm_live(timm_tv):
  transforms_factory, _, _ = timm_tv
  for (h, w), pct, interpolation in (((83, 120), 0.95, 'bicubic'), ((90, 61), 0.875, 'bilinear')):
    array = golden.golden_array(h, w, 'RGB')
    transform = transforms_factory.transforms_imagenet_eval(
      48, crop_pct=pct, interpolation=interpolation, use_prefetcher=True
    )
    expected = np.moveaxis(transform(Image.fromarray(array)).numpy(), 0, -1)
    pre = augment.Preprocessor('inception', 48, 3, interpolation=interpolation, eval_crop_pct=pct)
    np.testing.assert_array_equal(pre.eval(_png(array)), expected)
  with pytest.raises(KeyError):  # timm has no random eval filter: 'random' evaluates bicubic
    transforms_factory.transforms_imagenet_eval(48, interpolation='random')


def test_random_evaluates_bicubic_and_every_eval_view_uses_the_filter():
  array = golden.golden_array(77, 100, 'RGB')
  bicubic = augment.Preprocessor('inception', 32, 3, interpolation='bicubic', eval_crop_pct=0.9)
  random = augment.Preprocessor('inception', 32, 3, interpolation='random', eval_crop_pct=0.9)
  bilinear = augment.Preprocessor('inception', 32, 3, eval_crop_pct=0.9)
  for view in (
    lambda p: p.eval(array),
    lambda p: p.eval(array, crops=10),
    lambda p: p.eval(array, crops=2, scale=40),
    lambda p: p.whole_image(array, (40, 52)),
  ):
    np.testing.assert_array_equal(view(random), view(bicubic))
    assert not np.array_equal(view(bicubic), view(bilinear))
  ten = bicubic.eval(array, crops=10)
  np.testing.assert_array_equal(ten[4], bicubic.eval(array))  # the 10-crop's centre is timm's


def test_bicubic_jpeg_eval_stays_close_to_timms_full_decode(timm_tv):
  transforms_factory, _, _ = timm_tv
  from resnet_jax.data import generated

  rng = np.random.default_rng(1)
  transform = transforms_factory.transforms_imagenet_eval(
    224, crop_pct=0.95, interpolation='bicubic', use_prefetcher=True
  )
  pre = augment.Preprocessor('inception', 224, 3, interpolation='bicubic', eval_crop_pct=0.95)
  for w, h in ((500, 375), (375, 500), (640, 480)):
    raw = _jpeg(generated.natural_image(rng, w, h))
    expected = np.moveaxis(transform(Image.open(io.BytesIO(raw)).convert('RGB')).numpy(), 0, -1)
    got = pre.eval(raw)
    assert got.shape == expected.shape  # timm's shape even from a reduced decode
    assert np.abs(got.astype(int) - expected).mean() < 3.0


def test_the_default_is_the_pipelines_own_bilinear_geometry():
  """Default fields: today's eval (long side rounded, centre offset floored) byte for byte."""
  array = golden.golden_array(59, 81, 'RGB')  # 81 x 37/59 = 50.8: rounded 51, truncated 50
  pre = augment.Preprocessor('inception', 32, 3)
  assert pre.geometry == 'pil' and pre.eval_resize == round(32 * 256 / 224) == 37
  img = Image.fromarray(array).resize((51, 37), Image.BILINEAR)
  np.testing.assert_array_equal(pre.eval(array), views.center_crop(np.asarray(img), 32))
  # training crops: PIL's `box` resample of the drawn box, as before these fields existed
  (left, top, cw, ch), _, flip = golden.train_draws(np.random.default_rng(2), 81, 59, 'bilinear')
  crop = Image.fromarray(array).resize(
    (32, 32), Image.BILINEAR, box=(left, top, left + cw, top + ch)
  )
  crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else crop
  np.testing.assert_array_equal(pre.train(array, np.random.default_rng(2)), np.asarray(crop))
  timm_like = augment.Preprocessor('inception', 32, 3, eval_crop_pct=32 / 37)
  assert timm_like.geometry == 'torchvision' and timm_like.eval_resize == 37
  assert not np.array_equal(timm_like.eval(array), pre.eval(array))


def test_opencv_bicubic_crops_stay_as_close_to_pils_as_bilinear_ones():
  """OpenCV's cubic kernel is not PIL's antialiased one; measured on natural-image JPEGs: the
  mean difference from PIL's crop is of the bilinear pair's size (docs/performance.md)."""
  pytest.importorskip('cv2')
  from resnet_jax.data import generated

  rng = np.random.default_rng(0)
  raws = [_jpeg(generated.natural_image(rng, 360, 300)) for _ in range(4)]
  mean = {}
  for kind in ('bilinear', 'bicubic'):
    pil = augment.Preprocessor('inception', 64, 3, interpolation=kind)
    ocv = augment.Preprocessor('inception', 64, 3, 'opencv', interpolation=kind)
    mean[kind] = np.mean(
      [
        np.abs(pil.train(r, np.random.default_rng(s)).astype(int) - ocv.train(r, rng_s)).mean()
        for s, r in enumerate(raws)
        for rng_s in [np.random.default_rng(s)]
      ]
    )
  assert mean['bicubic'] < 2 * mean['bilinear'] + 1, mean
  cubic, linear = (
    augment.Preprocessor('inception', 64, 3, 'opencv', interpolation=k).train(
      raws[0], np.random.default_rng(0)
    )
    for k in ('bicubic', 'bilinear')
  )
  assert not np.array_equal(cubic, linear)  # OpenCV resamples with the filter asked for


# --- config -------------------------------------------------------------------------------------


def test_config_fields_reach_the_pipeline_and_old_configs_read_the_defaults():
  config = data_config(augment='inception', interpolation='random', eval_crop_pct=0.95)
  pre = pipeline.make_preprocessor(config)
  assert (pre.interpolation, pre.eval_crop_pct, pre.eval_resize) == ('random', 0.95, 8)
  saved = json.loads(data_config(augment='inception').to_json())
  del saved['data']['interpolation'], saved['data']['eval_crop_pct']  # a run from before them
  old = pipeline.make_preprocessor(merge_onto_defaults(saved))
  assert (old.interpolation, old.eval_crop_pct, old.geometry) == ('bilinear', 0.0, 'pil')


@pytest.mark.parametrize(
  'overrides,needle',
  [
    ({'data.interpolation': 'lanczos'}, 'data.interpolation must be one of bilinear, bicubic'),
    ({'data.eval_crop_pct': 1.5}, 'data.eval_crop_pct must be in (0, 1]'),
    ({'data.eval_crop_pct': -0.5}, 'data.eval_crop_pct must be in (0, 1]'),
    ({'data.eval_crop_pct': 0.9, 'data.eval_resize': 10}, 'both set the eval resize'),
    ({'data.interpolation': 'bicubic', 'data.augment': 'none'}, "not 'none'"),
    ({'data.decoder': 'opencv', 'data.augment': 'bit'}, "augment 'bit' decodes with PIL"),
  ],
)
def test_bad_values_are_refused_before_anything_is_written(tmp_path, overrides, needle):
  config = digits_config(**{'data.augment': 'inception', **overrides})
  with pytest.raises(validation.ConfigError, match=needle.replace('(', r'\(').replace(')', r'\)')):
    validation.validate_config(config)
  with pytest.raises(validation.ConfigError):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_boundary_values_are_accepted():
  for overrides in ({'data.eval_crop_pct': 1.0}, {'data.eval_crop_pct': 0.0}):
    validation.validate_config(digits_config(**{'data.augment': 'inception', **overrides}))


def test_a_bad_value_is_one_error_line_from_the_cli(tmp_path):
  proc = run_cli(
    'resnet_jax.main',
    f'--config={ROOT}/configs/digits.py',
    f'--workdir={tmp_path / "run"}',
    '--config.data.eval_crop_pct=1.2',
  )
  assert_one_line_error(proc, 'data.eval_crop_pct must be in (0, 1]')
  assert not (tmp_path / 'run').exists()


def test_random_training_batches_resume_exactly():
  config = data_config(augment='inception', interpolation='random', image_size=8)
  make = lambda: data.create_train_iterator(  # noqa: E731
    config, local_batch_size=16, process_index=0, process_count=1, seed=3
  )
  it = make()
  next(it)
  state = it.get_state()
  expected = [next(it)['image'] for _ in range(2)]
  fresh = make()
  fresh.set_state(state)
  for a in expected:
    np.testing.assert_array_equal(a, next(fresh)['image'])


# --- predict ------------------------------------------------------------------------------------


def test_predict_preprocess_can_be_timms_eval_input(timm_tv):
  transforms_factory, _, _ = timm_tv
  array = golden.golden_array(83, 120, 'RGB')
  transform = transforms_factory.transforms_imagenet_eval(
    48, crop_pct=0.95, interpolation='bicubic'
  )
  expected = np.moveaxis(transform(Image.fromarray(array)).numpy(), 0, -1)
  got = predict.preprocess(
    Image.fromarray(array), 48, math.floor(48 / 0.95), resample=Image.BICUBIC
  )
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_predict_resize_and_filter_from_the_flags():
  args = predict.build_parser().parse_args(
    ['--arch', 'resnet50', '--torchvision-weights', 'w.pth', '--crop-pct', '0.95',
     '--interpolation', 'bicubic', 'x.jpg']
  )  # fmt: skip
  assert predict.eval_geometry(args) == (224, 235, Image.BICUBIC)
  plain = predict.build_parser().parse_args(['--arch', 'resnet50', '--checkpoint', 'd', 'x.jpg'])
  assert predict.eval_geometry(plain) == (224, 256, Image.BILINEAR)  # torchvision's, as before


@pytest.mark.parametrize(
  'flags,needle',
  [(['--crop-pct', '1.5'], '--crop-pct'), (['--interpolation', 'random'], '--interpolation')],
)
def test_predict_refuses_bad_flags_in_one_line(flags, needle):
  proc = run_cli(
    'resnet_jax.predict', '--arch', 'resnet18', '--torchvision-weights', 'none.pth', *flags, 'x.png'
  )
  assert_one_line_error(proc, needle)


def test_predict_on_a_training_run_refuses_the_input_flags(tmp_path, capsys):
  """A training run's own evaluation input is used, so the flags that would change it are bad
  input (as --image-size), refused before any weight is read."""
  (tmp_path / 'config.json').write_text('{}')
  for flag, value in (('--interpolation', 'bicubic'), ('--crop-pct', '0.9')):
    with pytest.raises(SystemExit) as exit_info:
      predict.main(['--arch', 'resnet18', '--checkpoint', str(tmp_path), flag, value, 'x.png'])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f'error: {flag}: ') and 'training run' in err[0]
