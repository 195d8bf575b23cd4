"""timm's RandAugment (the "ResNet strikes back" recipes' `rand-m7-mstd0.5-inc1`), as timm 1.0.31.

Pixels are checked against timm's own `AugmentOp` / `RandAugment` forward: everywhere against the
SHA-256 digests recorded by tests/fixtures/make_timm_rand_augment_golden.py (timm fed the random
numbers our draws take, on small real photos), and live where timm is installed. The rest of the
spec (the parsing, the draws' statistics, the fill, the place in the pipeline) needs no timm.
"""

import argparse
import collections
import json

import numpy as np
import pytest
from PIL import Image

from resnet_jax.data import augment, auto_augment, timm_augment
from tests.fixtures import make_timm_rand_augment_golden as golden
from tests.runner import assert_one_line_error, run_main

with open(golden.OUT, encoding='utf-8') as f:
  RECORDS = json.load(f)
INPUTS = golden.decode_inputs(RECORDS['inputs'])
RSB = 'rand-m7-mstd0.5-inc1'


def _array(img: Image.Image) -> np.ndarray:
  a = np.asarray(img)
  return a[..., None] if a.ndim == 2 else a


def _draw(name: str, level: float, neg, resample) -> timm_augment.Draw:
  rule = timm_augment.OPERATIONS[name][0]
  return timm_augment.Draw(name, None if rule is None else rule(level, bool(neg)), resample)


# ------------------------------------------------------------------ parity with timm's recordings


def test_every_operation_matches_timms_recorded_outputs():
  """Each operation of timm's two lists, at levels 0-10, both signs, both filters, on two RGB
  photos and a grey one: timm's level-to-argument value exactly, its output pixel for pixel."""
  cases = RECORDS['operations']
  names = set(timm_augment.RAND_TRANSFORMS) | set(timm_augment.RAND_INCREASING_TRANSFORMS)
  assert {c['op'] for c in cases} == names and len(names) == 21
  assert {c['resample'] for c in cases} == {None, 'bilinear', 'bicubic'}
  assert {c['input'] for c in cases} == set(INPUTS) and len(cases) > 400
  for c in cases:
    draw = _draw(c['op'], c['level'], c['neg'], c['resample'])
    assert draw.arg == c['arg'], c
    got = timm_augment.apply(INPUTS[c['input']], draw)
    assert golden.digest(got) == c['sha256'], c


def test_whole_policies_give_timms_pixels_for_the_same_draws():
  """For each seed, resnet_jax draws from `default_rng(seed)`; timm's own RandAugment forward,
  fed those numbers, decided which operations apply, at which (noisy) level, sign and filter, and
  produced the recorded image. Ours must be that image, pixel for pixel."""
  records = RECORDS['transforms']
  assert {r['policy'] for r in records} >= {RSB, 'rand-m6-mstd0.5-inc1', 'rand-m9'}
  assert {r['interpolation'] for r in records} == set(timm_augment.INTERPOLATIONS)
  for r in records:
    img = INPUTS[r['input']]
    policy = auto_augment.parse(r['policy'])
    ops = timm_augment.draws(policy, np.random.default_rng(r['seed']), r['interpolation'])
    assert [list(op) for op in ops] == r['ops'], r
    out = auto_augment.augment_array(
      _array(img), r['policy'], np.random.default_rng(r['seed']), r['interpolation']
    )
    assert golden.digest(out[..., 0] if img.mode == 'L' else out) == r['sha256'], r
  applied = [op for r in records for op in r['ops']]
  assert len({op[0] for op in applied}) >= 12  # most operations met in whole policies too
  assert sum(not r['ops'] for r in records) < len(records) // 3


# ------------------------------------------------------------------ the spec, without timm


def test_timms_strings_parse_with_timms_defaults():
  p = auto_augment.parse(RSB)
  assert (p.magnitude, p.num_ops, p.magnitude_std, p.magnitude_max) == (7, 2, 0.5, 10)
  assert p.increasing and p.prob == 0.5
  assert auto_augment.parse('rand') == timm_augment.TimmRandAugment()  # m10 n2 mstd0 inc0 p0.5
  p = auto_augment.parse('rand-n3-m9-p0.7-mmax12-inc0-mstd101')
  assert (p.magnitude, p.num_ops, p.magnitude_max, p.increasing, p.prob) == (9, 3, 12, False, 0.7)
  assert p.magnitude_std == float('inf')  # timm: mstd > 100 samples uniformly in [0, m]
  assert auto_augment.parse('rand-m9-mstd100').magnitude_std == 100.0  # a (wide) Gaussian
  assert auto_augment.parse('rand-m12-mmax15').magnitude == 12
  # the torchvision forms keep their meaning
  assert auto_augment.parse('rand_augment') == auto_augment.Policy('rand_augment', 2, 9)


@pytest.mark.parametrize(
  'bad, why',
  [
    ('rand-m11', 'above mmax10'),
    ('rand-m7-mmax5', 'above mmax5'),
    ('rand-m7-n0', 'n must be 1-14'),
    ('rand-m7-n15', 'n must be 1-14'),
    ('rand-m7-mstd-1', "section 'mstd' needs a value"),
    ('rand-m7-p1.5', 'must be in [0, 1]'),
    ('rand-m7-inc2', "section 'inc2'"),
    ('rand-m7-tweights', "unknown section 'tweights'; accepted keys: m, n, mstd, mmax, inc, p"),
    ('rand-m7-w0', "unknown section 'w0'"),
    ('rand-m7-m8', 'm given twice'),
    ('rand-m7-', "unknown section ''"),
    ('rand-m7.5', "section 'm7.5'"),
    ('rand-mmax0-m0', 'mmax must be at least 1'),
  ],
)
def test_bad_timm_strings_are_refused_in_one_line(bad, why):
  with pytest.raises(ValueError) as e:
    augment.Preprocessor('inception', 32, 3, auto_augment=bad)
  message = str(e.value)
  assert why in message and timm_augment.FORM in message and '\n' not in message
  assert message.startswith(f'config.data.auto_augment={bad!r}')
  with pytest.raises(argparse.ArgumentTypeError, match=why.replace('[', r'\[')):
    auto_augment.cli_type(bad)  # the benchmark scripts' --auto-augment
  assert auto_augment.cli_type(RSB) == RSB


def test_the_training_cli_refuses_a_bad_string_in_one_line(tmp_path):
  proc = run_main(str(tmp_path / 'run'), '--config.data.auto_augment=rand-m11-mstd0.5')
  assert_one_line_error(proc, "auto_augment='rand-m11-mstd0.5'", 'above mmax10', 'rand-m{M}')
  assert not (tmp_path / 'run').exists()


def test_a_wrong_name_lists_timms_form_among_the_accepted():
  with pytest.raises(ValueError, match=r'is not one of .*rand_augment_n\{N\}_m\{M\}.*rand-m\{M\}'):
    auto_augment.parse('randaugment-m7')


def test_operation_lists_are_timms_in_timms_order():
  """The draw picks an index: the order is timm's `_RAND_TRANSFORMS` /
  `_RAND_INCREASING_TRANSFORMS` (inc1: the severity grows with the level for all of them)."""
  assert timm_augment.RAND_TRANSFORMS == (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd',
    'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel',
    'TranslateYRel',
  )  # fmt: skip
  assert timm_augment.RAND_INCREASING_TRANSFORMS == (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing', 'SolarizeIncreasing',
    'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing',
    'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel',
  )  # fmt: skip


def test_level_to_argument_rules():
  """timm's rules at magnitude 7 (of 10): the RSB recipe's mean level."""
  arg = lambda name, level=7, neg=False: _draw(name, level, neg, None).arg
  assert arg('Rotate') == pytest.approx(21.0) and arg('Rotate', neg=True) == pytest.approx(-21.0)
  assert arg('ShearX') == pytest.approx(0.21) and arg('TranslateYRel') == pytest.approx(0.315)
  assert arg('Color') == pytest.approx(1.36)  # 0.1 + 1.8 x 0.7: 1.0 (no change) at level 5
  assert arg('ColorIncreasing') == pytest.approx(1.63)  # 1 +- 0.9 x 0.7
  assert arg('ColorIncreasing', neg=True) == pytest.approx(0.37)
  assert arg('ContrastIncreasing', 10, True) == pytest.approx(0.1)  # never below 0.1
  assert arg('ContrastIncreasing', 12, True) == pytest.approx(0.1)  # mmax above 10
  assert (arg('Posterize'), arg('PosterizeIncreasing')) == (2, 2)  # int(2.8); 4 - int(2.8)
  assert (arg('Posterize', 10), arg('PosterizeIncreasing', 0)) == (4, 4)
  assert (arg('Solarize'), arg('SolarizeIncreasing')) == (179, 77)  # int(179.2); 256 - 179
  assert (arg('Solarize', 0), arg('SolarizeIncreasing', 0)) == (0, 256)
  assert arg('SolarizeAdd') == 77 and arg('SolarizeAdd', 10) == 110  # int(0.7 x 110)
  assert arg('Equalize') is None


def test_draws_apply_each_operation_with_p_and_noise_the_level():
  """n operations drawn uniformly with replacement, each applied with probability p, at a level
  drawn from N(m, mstd) per operation and clipped to [0, mmax]; signs and filters half-half."""
  rng = np.random.default_rng(0)
  policy = auto_augment.parse(RSB)
  per_image = [timm_augment.draws(policy, rng) for _ in range(6000)]
  assert 0.95 < np.mean([len(d) for d in per_image]) < 1.05  # 2 x 0.5
  ops = [op for d in per_image for op in d]
  counts = collections.Counter(op.name for op in ops)
  assert set(counts) == set(timm_augment.RAND_INCREASING_TRANSFORMS)
  assert all(300 < c < 500 for c in counts.values()), counts  # 400 each expected
  assert sum(len(d) == 2 and d[0].name == d[1].name for d in per_image) > 30  # replacement
  levels = np.asarray([abs(op.arg) / 3 for op in ops if op.name == 'Rotate'])
  assert abs(levels.mean() - 7) < 0.1 and abs(levels.std() - 0.5) < 0.06
  rotations = [op.arg for op in ops if op.name == 'Rotate']
  assert 0.4 < np.mean(np.asarray(rotations) < 0) < 0.6
  filters = collections.Counter(op.resample for op in ops)
  assert set(filters) == {None, 'bilinear', 'bicubic'}
  assert 0.4 < filters['bilinear'] / (filters['bilinear'] + filters['bicubic']) < 0.6
  assert all(op.resample is None for op in ops if op.name not in timm_augment._TAIL + ('Rotate',))
  clipped = auto_augment.parse('rand-m10-mstd2-p1.0')
  top = [
    abs(op.arg)
    for _ in range(500)
    for op in timm_augment.draws(clipped, rng)
    if op.name == 'Rotate'
  ]
  assert max(top) == 30.0 and 0.3 < np.mean(np.asarray(top) == 30.0) < 0.7  # half clipped at 10
  exact = auto_augment.parse('rand-m7-n3-p1.0')  # no noise, every operation applies
  assert all(len(timm_augment.draws(exact, rng)) == 3 for _ in range(50))
  shears = {
    abs(op.arg) for _ in range(300) for op in timm_augment.draws(exact, rng) if 'Shear' in op.name
  }
  assert len(shears) == 1 and shears.pop() == pytest.approx(0.21)  # one level: 7
  uniform = auto_augment.parse('rand-m10-mstd101-p1.0')
  spread = [abs(op.arg) / 3 for _ in range(1000) for op in timm_augment.draws(uniform, rng)
            if op.name == 'Rotate']  # fmt: skip
  assert 4 < np.mean(spread) < 6 and min(spread) < 1  # uniform on [0, 10]


def test_a_fixed_interpolation_takes_no_filter_draw():
  """timm's create_transform passes a fixed training interpolation to its operations; then no
  random number picks the filter, so the other draws are those of 'random' minus the filters."""
  policy = auto_augment.parse('rand-m9-n4-p1.0')
  for seed in range(20):
    fixed = timm_augment.draws(policy, np.random.default_rng(seed), 'bicubic')
    assert all(op.resample in (None, 'bicubic') for op in fixed)
  recorder = golden.Recorder(0)
  timm_augment.draws(policy, recorder, 'bilinear')
  assert not any(m == 'integers' and a == (2,) for m, a, _ in recorder.draws)
  with pytest.raises(ValueError, match='interpolation'):
    timm_augment.draws(policy, np.random.default_rng(0), 'nearest')


def test_geometric_operations_fill_with_the_imagenet_mean_pixel():
  """timm's img_mean from its default mean (0.485, 0.456, 0.406): (124, 116, 104); a grey image
  gets that pixel's grey, 117."""
  rgb = INPUTS['china']
  draw = timm_augment.Draw('TranslateXRel', 0.25, 'bilinear')  # reads 0.25 x 48 = 12 px right
  out = np.asarray(timm_augment.apply(rgb, draw))
  assert (out[:, -11:] == (124, 116, 104)).all()
  np.testing.assert_array_equal(out[:, :30], np.asarray(rgb)[:, 12:42])
  grey = np.asarray(timm_augment.apply(INPUTS['china_grey'], draw))
  assert (grey[:, -11:] == 117).all()
  assert np.asarray(Image.new('RGB', (1, 1), timm_augment.FILL_RGB).convert('L'))[0, 0] == 117
  rotated = np.asarray(timm_augment.apply(rgb, timm_augment.Draw('Rotate', 30.0, 'bicubic')))
  assert (rotated[0, 0] == (124, 116, 104)).all()


def test_posterize_to_zero_bits_is_black_and_solarize_add_brightens_the_dark():
  rgb = INPUTS['flower']
  for draw in (_draw('Posterize', 2, None, None), _draw('PosterizeIncreasing', 10, None, None)):
    assert draw.arg == 0
    assert not np.asarray(timm_augment.apply(rgb, draw)).any()
  ramp = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))
  out = np.asarray(timm_augment.apply(ramp, timm_augment.Draw('SolarizeAdd', 110, None))).ravel()
  v = np.arange(256)
  np.testing.assert_array_equal(out, np.where(v < 128, np.minimum(v + 110, 255), v))


def test_same_rng_same_image_and_grey_images_keep_their_channel_axis():
  for image in (_array(INPUTS['china']), _array(INPUTS['china_grey'])):
    outs = [auto_augment.augment_array(image, RSB, np.random.default_rng(s)) for s in range(8)]
    again = [auto_augment.augment_array(image, RSB, np.random.default_rng(s)) for s in range(8)]
    for a, b in zip(outs, again):
      np.testing.assert_array_equal(a, b)
      assert a.shape == image.shape and a.dtype == np.uint8
    assert sum(not np.array_equal(o, image) for o in outs) >= 4


@pytest.mark.parametrize('interpolation', ['bilinear', 'bicubic', 'random'])
def test_preprocessor_applies_it_after_the_geometry_of_training_images_only(interpolation):
  """After the crop and flip, with the training interpolation (timm's create_transform hands a
  fixed one to the operations; 'random' lets each operation draw its filter)."""
  raw = np.asarray(INPUTS['flower'].resize((64, 64)))
  plain = augment.Preprocessor('inception', 32, 3, interpolation=interpolation)
  rsb = augment.Preprocessor('inception', 32, 3, auto_augment=RSB, interpolation=interpolation)
  for seed in range(6):
    geometry = plain.train(raw, np.random.default_rng(seed))
    expected_rng = np.random.default_rng(seed)  # one generator: the geometry, then the ops
    plain.train(raw, expected_rng)
    img = Image.fromarray(geometry)
    for draw in timm_augment.draws(auto_augment.parse(RSB), expected_rng, interpolation):
      img = timm_augment.apply(img, draw)
    np.testing.assert_array_equal(rsb.train(raw, np.random.default_rng(seed)), np.asarray(img))
  np.testing.assert_array_equal(rsb.eval(raw), plain.eval(raw))


# ------------------------------------------------------------------ live, with timm


@pytest.fixture(scope='module')
def timm_aa(torch):
  import importlib.util

  if importlib.util.find_spec('timm') is None:
    pytest.skip('timm is not installed (pip install --no-deps timm==1.0.*)')
  return golden.import_timm_auto_augment()


def test_level_rules_and_lists_are_timms(timm_aa):
  assert list(timm_augment.RAND_TRANSFORMS) == timm_aa._RAND_TRANSFORMS
  assert list(timm_augment.RAND_INCREASING_TRANSFORMS) == timm_aa._RAND_INCREASING_TRANSFORMS
  for name in set(timm_aa._RAND_TRANSFORMS) | set(timm_aa._RAND_INCREASING_TRANSFORMS):
    signed = timm_augment.OPERATIONS[name][1]
    for level in np.linspace(0, 15, 61):
      for neg in (False, True) if signed else (None,):
        want, _ = golden.timm_operation(timm_aa, INPUTS['china'], name, float(level), neg, None)
        assert _draw(name, float(level), neg, None).arg == want, (name, level, neg)


def test_whole_policies_match_timm_live(timm_aa):
  """timm's RandAugment forward, fed our draws, on a larger photo and other seeds than recorded."""
  from sklearn.datasets import load_sample_image

  photo = Image.fromarray(load_sample_image('china.jpg')).reduce(4)
  for text, interpolation in golden.POLICIES:
    for seed in range(100, 104):
      for img in (photo, photo.convert('L')):
        recorder = golden.Recorder(seed)
        timm_augment.draws(auto_augment.parse(text), recorder, interpolation)
        want = golden.timm_transform(timm_aa, img, text, interpolation, recorder.draws)
        got = auto_augment.augment_array(
          _array(img), text, np.random.default_rng(seed), interpolation
        )
        np.testing.assert_array_equal(got, _array(want), err_msg=f'{text} {seed} {img.mode}')
