"""Per-example augmentations, eval crops, reduced-size JPEG decoding and dataset statistics."""

import io

import numpy as np
import pytest
from PIL import Image

from resnet_jax.data import augment
from resnet_jax.data import stats


def identity_norm() -> augment.Normalizer:
  return augment.Normalizer(np.zeros((), np.float32), np.ones((), np.float32))


def jpeg_bytes(w: int, h: int, seed: int = 0) -> bytes:
  rng = np.random.default_rng(seed)
  small = Image.fromarray(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h))
  buf = io.BytesIO()
  small.save(buf, format="JPEG", quality=90)
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
  image = np.random.default_rng(0).integers(1, 256, (32, 32, 3), dtype=np.uint8)
  pre = augment.Preprocessor("cifar", 32, 3, identity_norm())
  assert pre.pad == 4
  padded = np.pad(image.astype(np.float32), ((4, 4), (4, 4), (0, 0)))
  windows = {padded[t:t + 32, l:l + 32].tobytes() for t in range(9) for l in range(9)}
  windows |= {padded[t:t + 32, l:l + 32][:, ::-1].tobytes() for t in range(9) for l in range(9)}
  outs = [pre.train(image, np.random.default_rng(s)) for s in range(20)]
  assert all(o.shape == (32, 32, 3) and o.tobytes() in windows for o in outs)
  assert len({o.tobytes() for o in outs}) > 5  # it does vary


def test_imagenet_scale_augmentation_and_pca_colour_shift():
  pre = augment.Preprocessor("imagenet", 32, 3, identity_norm(), np.array([0.0, 0.0, 0.1], np.float32),
                             np.eye(3, dtype=np.float32))
  raw = jpeg_bytes(120, 80)
  out = pre.train(raw, np.random.default_rng(1))
  assert out.shape == (32, 32, 3) and out.dtype == np.float32
  no_pca = augment.Preprocessor("imagenet", 32, 3, identity_norm()).train(raw, np.random.default_rng(1))
  shift = out - no_pca  # the colour shift is one RGB offset along the eigenvectors, same at every pixel
  assert np.allclose(shift[..., :2], 0) and np.allclose(shift[..., 2], shift[0, 0, 2], atol=1e-3)
  assert abs(shift[0, 0, 2]) > 0


def test_inception_crop_box_stays_inside_and_varies():
  rng = np.random.default_rng(0)
  boxes = [augment._random_resized_box(rng, 300, 200) for _ in range(50)]  # pylint: disable=protected-access
  assert all(0 <= l and 0 <= t and l + w <= 300 and t + h <= 200 and w > 0 and h > 0 for l, t, w, h in boxes)
  assert len(set(boxes)) > 40
  out = augment.Preprocessor("inception", 48, 3, identity_norm()).train(jpeg_bytes(300, 200), rng)
  assert out.shape == (48, 48, 3)


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
  pre = augment.Preprocessor("imagenet", 32, 3, augment.Normalizer(mean, np.ones((), np.float32)))
  raw = jpeg_bytes(160, 96)
  assert pre.eval(raw).shape == (32, 32, 3)
  assert pre.eval(raw, crops=10).shape == (10, 32, 32, 3)
  scaled = pre.eval(raw, crops=2, scale=48)
  assert scaled.shape == (2, 48, 48, 3)
  expected = augment.center_crop(pre.base_uint8(raw, 48), 48).astype(np.float32) - 10.0
  np.testing.assert_allclose(scaled[0], expected, atol=1e-4)
  with pytest.raises(ValueError):
    pre.eval(raw, crops=10, scale=48)


def test_greyscale_images_keep_one_channel():
  image = np.random.default_rng(0).integers(0, 256, (8, 8, 1), dtype=np.uint8)
  pre = augment.Preprocessor("cifar", 8, 1, identity_norm())
  assert pre.pad == 1 and pre.train(image, np.random.default_rng(0)).shape == (8, 8, 1)
  np.testing.assert_array_equal(pre.eval(image), image.astype(np.float32))


def test_compute_stats_matches_numpy():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (50, 4, 4, 3), dtype=np.uint8)
  records = [{"image": x} for x in images]
  s = stats.compute_stats(records, lambda x: x, max_examples=1000)
  x = images.astype(np.float64)
  np.testing.assert_allclose(s["pixel_mean"], x.mean(0), rtol=1e-5)
  np.testing.assert_allclose(s["channel_mean"], x.mean((0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(s["channel_std"], x.std((0, 1, 2)), rtol=1e-4)
  cov = np.cov((x / 255).reshape(-1, 3).T, bias=True)
  np.testing.assert_allclose(np.sort(s["pca_eigvals"]), np.linalg.eigvalsh(cov), rtol=1e-3, atol=1e-6)
  assert int(stats.compute_stats(records, lambda x: x, max_examples=7)["num_examples"]) == 7


def test_stats_cache_roundtrip(tmp_path):
  calls = []

  def compute():
    calls.append(1)
    return {"pixel_mean": np.ones((2, 2, 1), np.float32)}

  key = {"test": str(tmp_path)}
  first = stats.cached_stats(key, str(tmp_path), compute)
  stats._MEMORY.clear()  # pylint: disable=protected-access
  second = stats.cached_stats(key, str(tmp_path), compute)
  assert len(calls) == 1 and list(tmp_path.glob("resnet_jax_stats_*.npz"))
  np.testing.assert_array_equal(first["pixel_mean"], second["pixel_mean"])


def test_imagenet_crop_matches_resize_then_crop():
  """The region-resample shortcut gives the paper's 'resize shorter side to s, random crop' geometry."""
  yy, xx = np.mgrid[0:90, 0:140]
  image = np.stack([xx * 255 / 139, yy * 255 / 89, (xx + yy) * 255 / 228], -1).round().astype(np.uint8)
  pre = augment.Preprocessor("imagenet", 32, 3, identity_norm())
  for seed in range(5):
    out = pre.train(image, np.random.default_rng(seed))
    rng = np.random.default_rng(seed)  # replay the draws: scale, top, left, flip
    lo, hi = (round(32 * r) for r in augment.SCALE_AUG_RANGE)
    resized = pre.base_uint8(image, int(rng.integers(lo, hi + 1))).astype(np.float32)
    top = int(rng.integers(0, resized.shape[0] - 32 + 1))
    left = int(rng.integers(0, resized.shape[1] - 32 + 1))
    expected = resized[top:top + 32, left:left + 32]
    if rng.random() < 0.5:
      expected = expected[:, ::-1]
    assert np.abs(out - expected).mean() < 2.0
