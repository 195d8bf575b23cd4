"""Per-example augmentations, eval crops, reduced-size JPEG decoding and dataset statistics."""

import collections
import importlib.util
import io
import os
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from resnet_jax.data import augment, stats
from resnet_jax.data.device_preprocess import DevicePreprocess, make_device_preprocess
from tests.runner import data_config

_LEGACY = os.path.join(os.path.dirname(__file__), '..', 'scripts', 'legacy_augment.py')


def identity_norm() -> augment.Normalizer:
  return augment.Normalizer(np.zeros((), np.float32), np.ones((), np.float32))


def legacy():
  """The frozen pre-uint8 augment.py (host float32 normalisation), the reference for the split."""
  if 'legacy_augment' not in sys.modules:  # dataclasses look their module up while executing it
    spec = importlib.util.spec_from_file_location('legacy_augment', _LEGACY)
    sys.modules['legacy_augment'] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules['legacy_augment'])
  return sys.modules['legacy_augment']


def jpeg_bytes(w: int, h: int, seed: int = 0) -> bytes:
  rng = np.random.default_rng(seed)
  small = Image.fromarray(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h))
  buf = io.BytesIO()
  small.save(buf, format='JPEG', quality=90)
  return buf.getvalue()


def test_ten_crops_are_corners_centre_and_flips():
  x = np.arange(6 * 8 * 1).reshape(6, 8, 1)
  crops = augment.ten_crops(x, 4)
  assert crops.shape == (10, 4, 4, 1)
  np.testing.assert_array_equal(crops[0], x[:4, :4])
  np.testing.assert_array_equal(crops[1], x[:4, 4:])
  np.testing.assert_array_equal(crops[2], x[2:, :4])
  np.testing.assert_array_equal(crops[3], x[2:, 4:])
  np.testing.assert_array_equal(crops[4], x[1:5, 2:6])
  np.testing.assert_array_equal(crops[5:], crops[:5, :, ::-1])


def test_cifar_train_is_a_shifted_window_of_the_zero_padded_image():
  images = np.random.default_rng(0).integers(1, 256, (20, 32, 32, 3), dtype=np.uint8)
  pre = augment.Preprocessor('cifar', 32, 3)
  assert pre.pad == 4
  host = pre.train(images[0], np.random.default_rng(0))
  assert host.dtype == np.uint8 and np.array_equal(host, images[0])  # the device augments
  out = np.asarray(DevicePreprocess('cifar', 32, identity_norm())(images, rng=jax.random.key(1)))
  assert out.shape == (20, 32, 32, 3) and out.dtype == np.float32
  drawn = set()
  for image, o in zip(images, out):
    padded = np.pad(image.astype(np.float32), ((4, 4), (4, 4), (0, 0)))
    windows = {
      padded[t : t + 32, l : l + 32][:, ::f].tobytes(): (t, l, f)
      for t in range(9)
      for l in range(9)
      for f in (1, -1)
    }
    drawn.add(windows[o.tobytes()])  # KeyError: not a window of the padded image
  assert len(drawn) > 5  # offsets and flips vary across the batch
  again = np.asarray(DevicePreprocess('cifar', 32, identity_norm())(images, rng=jax.random.key(1)))
  other = np.asarray(DevicePreprocess('cifar', 32, identity_norm())(images, rng=jax.random.key(2)))
  np.testing.assert_array_equal(out, again)  # a function of the key
  assert not np.array_equal(out, other)


def test_imagenet_scale_augmentation_and_pca_colour_shift():
  raw = jpeg_bytes(120, 80)
  host = augment.Preprocessor('imagenet', 32, 3).train(raw, np.random.default_rng(1))
  assert host.shape == (32, 32, 3) and host.dtype == np.uint8
  batch = np.stack([host] * 64)
  # Eigenvectors are the columns (numpy.linalg.eigh's convention); an asymmetric basis, so a
  # transposed matrix would shift along a row instead. Only the third has a non-zero eigenvalue.
  v = np.array([2.0, 3.0, 6.0]) / 7.0
  u = np.array([3.0, -2.0, 0.0]) / np.sqrt(13.0)
  eigvecs = np.stack([u, np.cross(v, u), v], axis=1).astype(np.float32)
  eigvals = np.array([0.0, 0.0, 0.1], np.float32)
  out = np.asarray(
    DevicePreprocess('imagenet', 32, identity_norm(), eigvals, eigvecs)(
      batch, rng=jax.random.key(0)
    )
  )
  plain = DevicePreprocess('imagenet', 32, identity_norm())
  no_pca = np.asarray(plain(batch, rng=jax.random.key(0)))
  np.testing.assert_array_equal(no_pca, batch.astype(np.float32))
  shift = out - no_pca  # one RGB offset along the eigenvectors per example, same at every pixel
  alpha = shift[:, 0, 0, 2] / (0.1 * 255.0 * v[2])  # alpha ~ N(0, 0.1), drawn per example
  np.testing.assert_allclose(
    shift,
    np.broadcast_to((alpha[:, None] * 0.1 * 255.0 * v)[:, None, None], shift.shape),
    atol=2e-3,
  )
  assert len(set(np.round(alpha, 5))) == 64 and 0.05 < alpha.std() < 0.2


def test_inception_crop_box_stays_inside_and_varies():
  rng = np.random.default_rng(0)
  boxes = [augment._random_resized_box(rng, 300, 200) for _ in range(50)]  # pylint: disable=protected-access
  assert all(
    0 <= l and 0 <= t and l + w <= 300 and t + h <= 200 and w > 0 and h > 0 for l, t, w, h in boxes
  )
  assert len(set(boxes)) > 40
  out = augment.Preprocessor('inception', 48, 3).train(jpeg_bytes(300, 200), rng)
  assert out.shape == (48, 48, 3) and out.dtype == np.uint8


def test_jpeg_is_decoded_at_reduced_size_when_possible():
  img = augment.open_image(jpeg_bytes(640, 480), 3)
  reduced = augment.resize_shorter(img, 100, 3)
  assert reduced.size == (133, 100)
  drafted = augment.decode(augment.open_image(jpeg_bytes(640, 480), 3), 3, (160, 120))
  assert drafted.size == (160, 120)  # DCT scaling by 1/4 instead of a full decode
  full = augment.decode(augment.open_image(jpeg_bytes(640, 480), 3), 3, (400, 300))
  assert full.size == (640, 480)  # 1/2 would be too small: no reduction


def test_eval_scale_gives_square_input_and_resizes_the_pixel_mean():
  mean = np.full((32, 32, 3), 10.0, np.float32)
  pre = augment.Preprocessor('imagenet', 32, 3)
  device = DevicePreprocess('imagenet', 32, augment.Normalizer(mean, np.ones((), np.float32)))
  raw = jpeg_bytes(160, 96)
  assert pre.eval(raw).shape == (32, 32, 3) and pre.eval(raw).dtype == np.uint8
  assert pre.eval(raw, crops=10).shape == (10, 32, 32, 3)
  scaled = pre.eval(raw, crops=2, scale=48)
  assert scaled.shape == (2, 48, 48, 3)
  expected = augment.center_crop(pre.base_uint8(raw, 48), 48).astype(np.float32) - 10.0
  np.testing.assert_allclose(np.asarray(device(scaled[None], rng=None))[0, 0], expected, atol=1e-4)
  with pytest.raises(ValueError):
    pre.eval(raw, crops=10, scale=48)


def test_greyscale_images_keep_one_channel():
  image = np.random.default_rng(0).integers(0, 256, (8, 8, 1), dtype=np.uint8)
  pre = augment.Preprocessor('cifar', 8, 1)
  assert pre.pad == 1 and pre.train(image, np.random.default_rng(0)).shape == (8, 8, 1)
  np.testing.assert_array_equal(pre.eval(image), image)
  out = DevicePreprocess('cifar', 8, identity_norm())(image[None], rng=jax.random.key(0))
  assert out.shape == (1, 8, 8, 1)


def _jpeg_or_array(kind: str, size: int):
  if kind == 'imagenet':
    return jpeg_bytes(120, 80)
  return np.random.default_rng(3).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize('kind,size', [('cifar', 16), ('imagenet', 32), ('none', 16)])
@pytest.mark.parametrize('per_pixel', [True, False])
def test_host_uint8_plus_device_equals_the_old_host_float_path(kind, size, per_pixel):
  """Eval (every crop mode and scale) and deterministic training inputs: unchanged by the split."""
  old = legacy()
  rng = np.random.default_rng(0)
  mean = rng.uniform(50, 200, (size, size, 3) if per_pixel else (3,)).astype(np.float32)
  std = np.float32(60.0)
  reference = old.Preprocessor(kind, size, 3, old.Normalizer(mean, std))
  host = augment.Preprocessor(kind, size, 3)
  device = DevicePreprocess(kind, size, augment.Normalizer(mean, std))
  raw = _jpeg_or_array(kind, size)
  for crops, scale in ((1, None), (2, None), (10, None), (1, 24), (2, 24)):
    images = host.eval(raw, crops=crops, scale=scale)
    assert images.dtype == np.uint8
    got = np.asarray(device(images[None], rng=None))[0]
    np.testing.assert_allclose(got, reference.eval(raw, crops=crops, scale=scale), atol=1e-5)
  if kind != 'cifar':  # same host draws (scale, position, flip); PCA off: same input exactly
    images = host.train(raw, np.random.default_rng(5))[None]
    got = np.asarray(device(images, rng=jax.random.key(0)))[0]
    np.testing.assert_allclose(got, reference.train(raw, np.random.default_rng(5)), atol=1e-5)


def test_compute_stats_matches_numpy():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (50, 4, 4, 3), dtype=np.uint8)
  records = [{'image': x} for x in images]
  s = stats.compute_stats(records, lambda x: x, max_examples=1000)
  x = images.astype(np.float64)
  np.testing.assert_allclose(s['pixel_mean'], x.mean(0), rtol=1e-5)
  np.testing.assert_allclose(s['channel_mean'], x.mean((0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(s['channel_std'], x.std((0, 1, 2)), rtol=1e-4)
  cov = np.cov((x / 255).reshape(-1, 3).T, bias=True)
  np.testing.assert_allclose(
    np.sort(s['pca_eigvals']), np.linalg.eigvalsh(cov), rtol=1e-3, atol=1e-6
  )
  assert int(stats.compute_stats(records, lambda x: x, max_examples=7)['num_examples']) == 7


def test_stats_cache_roundtrip(tmp_path):
  calls = []

  def compute():
    calls.append(1)
    return {'pixel_mean': np.ones((2, 2, 1), np.float32)}

  key = {'test': str(tmp_path)}
  first = stats.cached_stats(key, str(tmp_path), compute)
  stats._MEMORY.clear()  # pylint: disable=protected-access
  second = stats.cached_stats(key, str(tmp_path), compute)
  assert len(calls) == 1 and list(tmp_path.glob('resnet_jax_stats_*.npz'))
  np.testing.assert_array_equal(first['pixel_mean'], second['pixel_mean'])


def test_cached_statistics_are_recomputed_after_compute_stats_changes(tmp_path, monkeypatch):
  """The cache beside a dataset outlives code changes; its key carries compute_stats' source, so
  a changed computation cannot be hidden by statistics cached before it."""
  from resnet_jax.data import pipeline
  from resnet_jax.default_config import load_sibling_config
  from tests.runner import ROOT

  config = load_sibling_config(ROOT + '/configs/x.py', 'digits').get_config('depth=8')
  config.data.data_dir = str(tmp_path)
  calls = []
  compute = stats.compute_stats
  assert stats.VERSION.endswith(stats._source_digest(compute))  # pylint: disable=protected-access
  monkeypatch.setattr(stats, 'compute_stats', lambda *a, **k: calls.append(1) or compute(*a, **k))
  for version in (stats.VERSION, stats.VERSION, 'another computation'):
    monkeypatch.setattr(stats, 'VERSION', version)
    stats._MEMORY.clear()  # pylint: disable=protected-access  -- read the disk cache
    pipeline.make_normalization(config)
  assert len(calls) == 2


def test_imagenet_crop_matches_resize_then_crop():
  """The region-resample shortcut gives the paper's 'resize shorter side to s, random crop'."""
  yy, xx = np.mgrid[0:90, 0:140]
  image = (
    np.stack([xx * 255 / 139, yy * 255 / 89, (xx + yy) * 255 / 228], -1).round().astype(np.uint8)
  )
  pre = augment.Preprocessor('imagenet', 32, 3)
  for seed in range(5):
    out = pre.train(image, np.random.default_rng(seed)).astype(np.float32)
    rng = np.random.default_rng(seed)  # replay the draws: scale, top, left, flip
    lo, hi = (round(32 * r) for r in augment.SCALE_AUG_RANGE)
    resized = pre.base_uint8(image, int(rng.integers(lo, hi + 1))).astype(np.float32)
    top = int(rng.integers(0, resized.shape[0] - 32 + 1))
    left = int(rng.integers(0, resized.shape[1] - 32 + 1))
    expected = resized[top : top + 32, left : left + 32]
    if rng.random() < 0.5:
      expected = expected[:, ::-1]
    assert np.abs(out - expected).mean() < 2.0


def test_opencv_decoder_gives_the_same_crop_as_pil():
  pytest.importorskip('cv2')
  raw = jpeg_bytes(320, 240)
  for kind in ('imagenet', 'inception'):
    for seed in range(4):
      pil = augment.Preprocessor(kind, 64, 3).train(raw, np.random.default_rng(seed))
      ocv = augment.Preprocessor(kind, 64, 3, 'opencv').train(raw, np.random.default_rng(seed))
      assert ocv.shape == pil.shape == (64, 64, 3) and ocv.dtype == np.uint8
      # same box, flip and channel order; only the resampling filters differ (a swapped channel
      # order or flip gives 40-70 on this blocky test image)
      assert np.abs(ocv.astype(np.float32) - pil).mean() < 10.0, (kind, seed)
  with pytest.raises(ValueError, match='decoder'):
    augment.Preprocessor('imagenet', 64, 3, 'turbo')


def test_translate_is_cifar_without_the_flip():
  images = np.random.default_rng(1).integers(1, 256, (24, 16, 16, 1), dtype=np.uint8)
  out = np.asarray(
    DevicePreprocess('translate', 16, identity_norm())(images, rng=jax.random.key(3))
  )
  shifts = set()
  for image, o in zip(images, out):
    padded = np.pad(image.astype(np.float32), ((2, 2), (2, 2), (0, 0)))
    windows = {padded[t : t + 16, l : l + 16].tobytes(): (t, l) for t in range(5) for l in range(5)}
    shifts.add(windows[o.tobytes()])  # KeyError: flipped or not a window of the padded image
  assert len(shifts) > 5


def test_cifar_crop_draws_every_offset_of_the_padding_and_flips_half_the_images():
  """Paper: pad p pixels, crop uniformly among all (2p + 1)^2 windows, flip with probability 1/2.
  Over 400 draws every offset 0..2p appears on both axes and the flip rate is near 0.5."""
  images = np.random.default_rng(2).integers(1, 256, (400, 8, 8, 1), dtype=np.uint8)
  pre = DevicePreprocess('cifar', 8, identity_norm())
  assert pre.pad == 1
  out = np.asarray(pre(images, rng=jax.random.key(4)))
  tops, lefts, flips = [], [], []
  for image, o in zip(images, out):
    padded = np.pad(image.astype(np.float32), ((1, 1), (1, 1), (0, 0)))
    windows = {
      padded[t : t + 8, l : l + 8][:, ::f].tobytes(): (t, l, f)
      for t in range(3)
      for l in range(3)
      for f in (1, -1)
    }
    t, l, f = windows[o.tobytes()]
    tops.append(t), lefts.append(l), flips.append(f == -1)
  assert set(tops) == set(lefts) == {0, 1, 2}
  assert 0.4 < np.mean(flips) < 0.6
  for axis in (tops, lefts):  # uniform: each offset about a third of the draws
    assert all(0.25 < np.mean(np.equal(axis, k)) < 0.42 for k in range(3))


def test_eval_resolution_defaults_to_training_and_can_differ_from_it():
  raw = jpeg_bytes(320, 240)
  same = augment.Preprocessor('inception', 64, 3)
  assert (same.eval_image_size, same.eval_resize) == (64, round(64 * 256 / 224))
  np.testing.assert_array_equal(same.eval(raw), same.eval_uint8(raw))  # as before the fields
  fixres = augment.Preprocessor('inception', 48, 3, eval_size=64, eval_resize_size=70)
  want = augment.center_crop(fixres.base_uint8(raw, 70), 64)
  np.testing.assert_array_equal(fixres.eval(raw), want)
  assert fixres.eval(raw, crops=10).shape == (10, 64, 64, 3)
  assert fixres.train(raw, np.random.default_rng(0)).shape == (48, 48, 3)
  assert fixres.eval_uint8(raw).shape == (48, 48, 3)  # the statistics keep the training size
  assert augment.Preprocessor('imagenet', 48, 3, eval_size=64).eval_resize == 73  # 64 x 256/224
  with pytest.raises(ValueError, match='crop-based'):
    augment.Preprocessor('cifar', 32, 3, eval_size=40)
  with pytest.raises(ValueError, match='smaller than the eval crop'):
    augment.Preprocessor('inception', 48, 3, eval_size=64, eval_resize_size=60)


def test_random_erasing_blanks_one_rectangle_of_torchvisions_size_in_a_fraction_p():
  """torchvision's RandomErasing(p): one rectangle per erased image, area 2-33 % of the image,
  aspect 0.3-3.3, set to 0 (the mean after normalisation); p of the images; off by default."""
  images = np.full((2000, 16, 24, 3), 200, np.uint8)
  norm = augment.Normalizer(np.zeros((), np.float32), np.ones((), np.float32))
  out = np.asarray(
    DevicePreprocess('none', 16, norm, erase_prob=0.25)(images, rng=jax.random.key(0))
  )
  erased = (out == 0).all(axis=-1)
  hit = erased.any(axis=(1, 2))
  assert 0.21 < hit.mean() < 0.29
  edges, tops = set(), collections.defaultdict(set)
  for mask in erased[hit][:200]:
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    assert mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all() and mask.sum() == h * w
    assert 0.02 * 0.7 <= h * w / (16 * 24) <= 0.33 * 1.3 and 0.3 / 2 <= h / w <= 3.3 * 2
    assert h < 16 and w < 24  # torchvision retries a box as tall or wide as the image
    edges |= {('top', rows[0] == 0), ('bottom', rows[-1] == 15)}
    edges |= {('left', cols[0] == 0), ('right', cols[-1] == 23)}
    tops[h, w].add((rows[0], cols[0]))
  # each image draws its own position: boxes of one size do not all sit in one place
  assert max(len(places) for places in tops.values()) > 1
  # the position is uniform over every place the box fits: it reaches each border
  assert {e for e, touches in edges if touches} == {'top', 'bottom', 'left', 'right'}
  np.testing.assert_array_equal(out[~hit], 200.0)
  again = DevicePreprocess('none', 16, norm, erase_prob=0.25)(images, rng=jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(again), out)
  plain = DevicePreprocess('cifar', 16, norm)(images[:8], rng=jax.random.key(3))
  with_erasing_off = DevicePreprocess('cifar', 16, norm, erase_prob=0.0)(
    images[:8], rng=jax.random.key(3)
  )
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(with_erasing_off))
  config = data_config(random_erasing=0.1)
  assert make_device_preprocess(config).erase_prob == 0.1
