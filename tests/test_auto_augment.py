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
