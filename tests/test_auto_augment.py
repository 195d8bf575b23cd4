"""TrivialAugment Wide (torchvision's new recipe): its operations, draws and place in the pipeline.

The operations are checked pixel for pixel against torchvision's own `_apply_op`: live where torch
is installed, and everywhere against the digests of its outputs recorded in tests/fixtures; the
rest of the spec (the draw, the magnitudes, the geometry of a translation and a shear, the
determinism per example) needs no torch.
"""

import collections
import importlib
import json

import numpy as np
import pytest
from PIL import Image

from resnet_jax.data import augment, auto_augment, pipeline
from tests.fixtures.make_rand_augment_golden import OUT as RAND_GOLDEN
from tests.fixtures.make_trivial_augment_golden import OUT as GOLDEN
from tests.fixtures.make_trivial_augment_golden import digest, golden_input
from tests.runner import data_config


def photo(size=(48, 40)) -> Image.Image:
  from sklearn.datasets import load_sample_image

  return Image.fromarray(load_sample_image('china.jpg')).resize(size, Image.BILINEAR)


def test_the_fourteen_operations_and_their_magnitudes():
  assert list(auto_augment.OPERATIONS) == [
    'Identity',
    'ShearX',
    'ShearY',
    'TranslateX',
    'TranslateY',
    'Rotate',
    'Brightness',
    'Color',
    'Contrast',
    'Sharpness',
    'Posterize',
    'Solarize',
    'AutoContrast',
    'Equalize',
  ]
  mags = {name: m for name, (_, m, _) in auto_augment.OPERATIONS.items()}
  signed = {name for name, (_, _, s) in auto_augment.OPERATIONS.items() if s}
  unsigned = {'Identity', 'Posterize', 'Solarize', 'AutoContrast', 'Equalize'}
  assert signed == set(auto_augment.OPERATIONS) - unsigned
  tops = {'ShearX': 0.99, 'ShearY': 0.99, 'TranslateX': 32.0, 'TranslateY': 32.0}
  tops.update(Rotate=135.0, Brightness=0.99, Color=0.99, Contrast=0.99, Sharpness=0.99)
  for name, top in tops.items():
    np.testing.assert_allclose(mags[name], np.linspace(0.0, top, 31), rtol=1e-6)
  # torchvision: 8 - (arange(31) / ((31 - 1) / 6)).round(), i.e. 8 - round(i / 5)
  bits = [8] * 3 + [v for v in (7, 6, 5, 4, 3) for _ in range(5)] + [2] * 3
  assert list(mags['Posterize']) == bits
  np.testing.assert_allclose(mags['Solarize'], np.linspace(255.0, 0.0, 31))
  assert mags['TranslateX'][15] == 16.0  # a whole pixel count stays whole (int() truncates)
  assert mags['Identity'] is None and mags['Equalize'] is None


def test_draws_are_uniform_over_operations_bins_and_signs():
  rng = np.random.default_rng(0)
  draws = [auto_augment.draw(rng) for _ in range(14_000)]
  counts = collections.Counter(name for name, _ in draws)
  assert set(counts) == set(auto_augment.OPERATIONS)
  assert all(800 < c < 1200 for c in counts.values()), counts  # 1,000 each expected
  rotations = [m for name, m in draws if name == 'Rotate']
  assert 0.4 < np.mean(np.asarray(rotations) < 0) < 0.6
  bins = set(np.round(np.abs(rotations), 3))
  assert len(bins) == 31 and max(bins) == 135.0
  assert all(m >= 0 for name, m in draws if name in ('Posterize', 'Solarize'))


def test_translation_moves_whole_pixels_and_fills_black():
  img = photo()
  a = np.asarray(img)
  out = np.asarray(auto_augment.apply_operation(img, 'TranslateX', 5.9))  # torchvision: int(5.9)
  np.testing.assert_array_equal(out[:, 5:], a[:, :-5])
  assert not out[:, :5].any()
  out = np.asarray(auto_augment.apply_operation(img, 'TranslateY', -7.0))
  np.testing.assert_array_equal(out[:-7], a[7:])
  assert not out[-7:].any()
  np.testing.assert_array_equal(np.asarray(auto_augment.apply_operation(img, 'Identity', 0)), a)


def test_shear_x_slides_each_row_by_m_times_its_height_and_solarize_inverts_the_bright():
  img = photo()
  a = np.asarray(img)
  h, w, _ = a.shape
  m = 0.3
  out = np.asarray(auto_augment.apply_operation(img, 'ShearX', m))
  for y in (0, 10, 39):  # nearest sampling at pixel centres: row y reads x + m (y + 1/2)
    src = np.floor(np.arange(w) + 0.5 + m * (y + 0.5)).astype(int)
    inside = src < w
    np.testing.assert_array_equal(out[y, inside], a[y, src[inside]])
    assert not out[y, ~inside].any()
  ramp = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))
  out = np.asarray(auto_augment.apply_operation(ramp, 'Solarize', 100.0)).ravel()
  v = np.arange(256)
  np.testing.assert_array_equal(out, np.where(v < 100, v, 255 - v))


def test_same_rng_same_image_and_grey_images_keep_their_channel_axis():
  rgb = np.asarray(photo())
  grey = np.asarray(photo().convert('L'))[..., None]
  for image in (rgb, grey):
    outs = [
      auto_augment.augment_array(image, 'trivial_wide', np.random.default_rng(s)) for s in range(8)
    ]
    again = [
      auto_augment.augment_array(image, 'trivial_wide', np.random.default_rng(s)) for s in range(8)
    ]
    for a, b in zip(outs, again):
      np.testing.assert_array_equal(a, b)
      assert a.shape == image.shape and a.dtype == np.uint8
    assert sum(not np.array_equal(o, image) for o in outs) >= 5
  assert auto_augment.augment_array(rgb, 'none', np.random.default_rng(0)) is rgb


def test_preprocessor_applies_it_after_the_geometry_of_training_images_only():
  raw = np.asarray(photo((64, 64)))
  plain = augment.Preprocessor('inception', 32, 3)
  ta = augment.Preprocessor('inception', 32, 3, auto_augment='trivial_wide')
  for seed in range(6):
    geometry = plain.train(raw, np.random.default_rng(seed))
    # one generator draws the geometry, then the operation
    expected_rng = np.random.default_rng(seed)
    plain.train(raw, expected_rng)
    name, magnitude = auto_augment.draw(expected_rng)
    expected = np.asarray(auto_augment.apply_operation(Image.fromarray(geometry), name, magnitude))
    np.testing.assert_array_equal(ta.train(raw, np.random.default_rng(seed)), expected)
  np.testing.assert_array_equal(ta.eval(raw), plain.eval(raw))  # evaluation is untouched
  with pytest.raises(ValueError, match='auto_augment'):
    augment.Preprocessor('inception', 32, 3, auto_augment='randaugment')


def test_config_field_reaches_the_pipeline():
  config = data_config(auto_augment='trivial_wide')
  assert pipeline.make_preprocessor(config).auto_augment == 'trivial_wide'
  assert pipeline.make_preprocessor(data_config()).auto_augment == 'none'


def test_operations_match_torchvisions_recorded_outputs():
  """Without torch: the SHA-256 of torchvision's own outputs, recorded by
  tests/fixtures/make_trivial_augment_golden.py, for every operation at three magnitudes (and
  their negatives), on an RGB and a grey image."""
  with open(GOLDEN, encoding='utf-8') as f:
    cases = json.load(f)['cases']
  assert {c['op'] for c in cases} == set(auto_augment.OPERATIONS) and len(cases) > 100
  for c in cases:
    got = auto_augment.apply_operation(golden_input(c['mode']), c['op'], c['magnitude'])
    assert digest(got) == c['sha256'], c


def test_operations_match_torchvision_pixel_for_pixel(tv):
  del tv  # loaded for its side effect: an importable torchvision package (see conftest)
  tva = importlib.import_module('torchvision.transforms.autoaugment')
  nearest = importlib.import_module('torchvision.transforms').InterpolationMode.NEAREST
  space = tva.TrivialAugmentWide()._augmentation_space(auto_augment.NUM_BINS)
  assert list(space) == list(auto_augment.OPERATIONS)
  checked = 0
  for name, (magnitudes, signed) in space.items():
    ours = auto_augment.OPERATIONS[name][1]
    if magnitudes.ndim:  # torchvision's float32 linspace may differ in the last bit
      np.testing.assert_allclose(magnitudes.numpy(), ours, rtol=1e-6)
    values = [0.0] if not magnitudes.ndim else [float(ours[i]) for i in (1, 15, 30)]
    for m in values + ([-v for v in values if v] if signed else []):
      for mode in ('RGB', 'L'):
        img = photo().convert(mode)
        want = np.asarray(tva._apply_op(img, name, m, interpolation=nearest, fill=None))
        got = np.asarray(auto_augment.apply_operation(img, name, m))
        np.testing.assert_array_equal(got, want, err_msg=f'{name} {m} {mode}')
        checked += 1
  assert checked > 100


# RandAugment and AutoAugment: torchvision's other automatic augmentations, on the same operations.

with open(RAND_GOLDEN, encoding='utf-8') as f:
  RAND_RECORDS = json.load(f)


def _as_array(img: Image.Image) -> np.ndarray:
  a = np.asarray(img)
  return a[..., None] if a.ndim == 2 else a


def test_rand_and_auto_augment_operations_match_torchvisions_recorded_outputs():
  """RandAugment's milder magnitudes (31 bins) and AutoAugment's (10 bins), Invert included:
  the SHA-256 of torchvision's `_apply_op` outputs (tests/fixtures/make_rand_augment_golden.py)."""
  cases = RAND_RECORDS['operations']
  assert {c['op'] for c in cases} == set(auto_augment.OPERATIONS) | {'Invert'}
  for c in cases:
    got = auto_augment.apply_operation(golden_input(c['mode']), c['op'], c['magnitude'])
    assert digest(got) == c['sha256'], c


def test_whole_policies_give_torchvisions_pixels_for_the_same_draws():
  """For each seed, resnet_jax draws its operations from `default_rng(seed)`; torchvision's own
  RandAugment/AutoAugment forward, fed those random numbers, decided which operations apply, at
  which bin and sign, and produced the recorded image. Ours must be that image, pixel for pixel."""
  records = RAND_RECORDS['transforms']
  assert {r['policy'] for r in records} == {
    'rand_augment',
    'rand_augment_n3_m15',
    'autoaugment_imagenet',
    'autoaugment_cifar10',
  }
  for r in records:
    img = golden_input(r['mode'])
    ops = auto_augment.policy_draws(
      auto_augment.parse(r['policy']), np.random.default_rng(r['seed']), img.size
    )
    assert [list(op) for op in ops] == r['ops'], r
    out = auto_augment.augment_array(_as_array(img), r['policy'], np.random.default_rng(r['seed']))
    assert digest(out[..., 0] if r['mode'] == 'L' else out) == r['sha256'], r
  assert sum(len(r['ops']) == 0 for r in records) < len(records) // 10


def test_rand_augment_draws_uniform_operations_at_one_magnitude():
  """RandAugment (torchvision's defaults: 2 operations, magnitude 9 of 31): each operation
  uniform over the 14 of TrivialAugment, all at the same bin, signed ones negated half the time;
  translations scale with the image (150/331 of its side at the top bin)."""
  rng = np.random.default_rng(0)
  policy = auto_augment.parse('rand_augment')
  assert policy == auto_augment.Policy('rand_augment', 2, 9)
  draws = [op for _ in range(7_000) for op in auto_augment.policy_draws(policy, rng, (40, 32))]
  assert len(draws) == 14_000
  counts = collections.Counter(name for name, _ in draws)
  assert set(counts) == set(auto_augment.RAND_AUGMENT_OPERATIONS)
  assert all(800 < c < 1200 for c in counts.values()), counts
  rotations = [m for name, m in draws if name == 'Rotate']
  assert set(np.round(np.abs(rotations), 4)) == {9.0}  # 30 x 9 / 30
  assert 0.4 < np.mean(np.asarray(rotations) < 0) < 0.6
  shifts = {abs(m) for name, m in draws if name == 'TranslateX'}
  assert len(shifts) == 1 and shifts.pop() == pytest.approx(150 / 331 * 40 * 9 / 30, rel=1e-6)
  top = auto_augment.magnitude_space(31, 32, 40)
  assert top['TranslateY'][0][30] == pytest.approx(150 / 331 * 32, rel=1e-6)
  assert list(top['Posterize'][0][[0, 3, 4, 30]]) == [8, 8, 7, 4]
  n3 = auto_augment.parse('rand_augment_n3_m30')
  assert len(auto_augment.policy_draws(n3, rng, (40, 32))) == 3
  rotations = [
    m for _ in range(300) for n, m in auto_augment.policy_draws(n3, rng, (8, 8)) if n == 'Rotate'
  ]
  assert {abs(m) for m in rotations} == {30.0}  # the top bin


def test_autoaugment_applies_each_step_with_its_probability():
  """One of the 25 sub-policies, uniformly; each of its two steps applied when a uniform draw is
  at most its probability (ImageNet's 'Equalize:0.0' never, its 'Equalize:1.0' always)."""
  policy = auto_augment.parse('autoaugment_imagenet')
  subs = auto_augment.AUTOAUGMENT_POLICIES['imagenet']
  assert len(subs) == 25 and all(len(s) == 2 for s in subs)
  assert subs[0] == (('Posterize', 0.4, 8), ('Rotate', 0.6, 9))
  assert len(auto_augment.AUTOAUGMENT_POLICIES['cifar10']) == 25
  applied = collections.Counter()
  chosen = collections.Counter()
  for seed in range(3_000):
    rng = np.random.default_rng(seed)
    sub = subs[int(np.random.default_rng(seed).integers(25))]
    chosen[sub] += 1
    ops = auto_augment.policy_draws(policy, rng, (40, 32))
    names = [n for n, _ in ops]
    if sub == (('Posterize', 0.4, 8), ('Rotate', 0.6, 9)):
      applied['posterize'] += 'Posterize' in names
      applied['rotate'] += 'Rotate' in names
      applied['total'] += 1
      for name, m in ops:
        if name == 'Posterize':
          assert m == 8 - round(8 / 2.25)  # bin 8 of 10: 8 - round(8 / (9/4)) bits
        if name == 'Rotate':
          assert abs(m) == 30.0  # bin 9 of 10: the top, 30 degrees
    if sub == (('Equalize', 0.0, None), ('Equalize', 0.8, None)):
      assert len(ops) <= 1  # probability 0 never applies
  assert len(chosen) == len(set(subs)) == 20  # every sub-policy drawn (the list repeats five)
  n = applied['total']
  assert abs(applied['posterize'] / n - 0.4) < 0.12 and abs(applied['rotate'] / n - 0.6) < 0.12


def test_auto_augment_values_are_parsed_or_refused_in_one_line():
  assert auto_augment.parse('rand_augment_n1_m0') == auto_augment.Policy('rand_augment', 1, 0)
  assert auto_augment.parse('autoaugment_cifar10').kind == 'autoaugment_cifar10'
  for bad in ('rand_augment_n0_m9', 'rand_augment_n2_m31', 'randaugment', 'autoaugment_svhn'):
    with pytest.raises(ValueError, match='is not one of none, trivial_wide, rand_augment') as e:
      augment.Preprocessor('inception', 32, 3, auto_augment=bad)
    assert '\n' not in str(e.value)


def test_rand_and_auto_augment_spaces_and_policies_are_torchvisions(tv):
  del tv  # loaded for its side effect: an importable torchvision package (see conftest)
  tva = importlib.import_module('torchvision.transforms.autoaugment')
  for bins, theirs in (
    (31, tva.RandAugment()._augmentation_space(31, (32, 40))),
    (10, tva.AutoAugment()._augmentation_space(10, (32, 40))),
  ):
    ours = auto_augment.magnitude_space(bins, 32, 40)
    for name, (magnitudes, signed) in theirs.items():
      mine, mine_signed = ours[name]
      assert signed == mine_signed, name
      if magnitudes.ndim:
        np.testing.assert_allclose(magnitudes.numpy(), mine, rtol=1e-6, err_msg=name)
      else:
        assert mine is None, name
  assert list(tva.RandAugment()._augmentation_space(31, (32, 40))) == list(
    auto_augment.RAND_AUGMENT_OPERATIONS
  )
  for which in ('imagenet', 'cifar10'):
    theirs = tva.AutoAugment()._get_policies(tva.AutoAugmentPolicy(which))
    assert [tuple(map(tuple, s)) for s in theirs] == list(auto_augment.AUTOAUGMENT_POLICIES[which])
