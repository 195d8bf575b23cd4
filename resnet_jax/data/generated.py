"""`generated_jpegs`: a TFDS dataset of generated JPEG images, for input benchmarks and tests.

It exercises the real on-disk path (ArrayRecord + encoded JPEG bytes + SkipDecoding + PIL draft
decode) without any download or TensorFlow: images are JPEG-encoded with PIL and handed to the
`Image` feature as bytes. Every image is a random crop (random box, scale, flip and a mild colour
gain) of the two photographs scikit-learn ships (`load_sample_images`: china.jpg, flower.jpg), so
the JPEGs carry natural-image detail and decode as slowly as photos do (smooth generated images
decode faster and would flatter the input pipeline). Importing this module registers the builder
(not imported by default).
Configs: `cifar` (32x32, like CIFAR-10), `imagenet` (ImageNet-like sizes, ~400x350 on average),
`tiny` (a few small variable-size images for tests).
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image


@dataclasses.dataclass
class GeneratedConfig(tfds.core.BuilderConfig):
  num_train: int = 0
  num_test: int = 0
  min_side: int = 32  # sizes drawn uniformly in [min_side, max_side] per side
  max_side: int = 32
  num_classes: int = 10


_PHOTOS: list[np.ndarray] = []


def _photos() -> list[np.ndarray]:
  """scikit-learn's two sample photographs (427x640 RGB), loaded once per process."""
  if not _PHOTOS:
    from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top

    _PHOTOS.extend(np.asarray(x, np.uint8) for x in load_sample_images().images)
  return _PHOTOS


def natural_image(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
  """uint8 [h, w, 3]: a random crop of a real photo (30%-100% of its area, aspect near w/h),
  resampled to w x h, maybe mirrored, with a per-channel gain in [0.8, 1.2]."""
  photos = _photos()
  photo = photos[int(rng.integers(len(photos)))]
  ph, pw = photo.shape[:2]
  area = ph * pw * rng.uniform(0.3, 1.0)
  aspect = (w / h) * float(np.exp(rng.uniform(-0.2, 0.2)))
  cw = int(min(pw, max(8, round(np.sqrt(area * aspect)))))
  ch = int(min(ph, max(8, round(np.sqrt(area / aspect)))))
  left, top = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
  img = Image.fromarray(photo[top : top + ch, left : left + cw]).resize((w, h), Image.BICUBIC)
  out = np.asarray(img, np.float32) * rng.uniform(0.8, 1.2, size=3)
  if rng.random() < 0.5:
    out = out[:, ::-1]
  return np.clip(out, 0, 255).astype(np.uint8)


class GeneratedJpegs(tfds.core.GeneratorBasedBuilder):
  """Deterministic synthetic JPEG classification data."""

  VERSION = tfds.core.Version('2.0.0')
  RELEASE_NOTES = {'2.0.0': 'Crops of real photos instead of smooth random pictures.'}
  BUILDER_CONFIGS = [
    GeneratedConfig(name='cifar', num_train=2048, num_test=256, min_side=32, max_side=32),
    GeneratedConfig(name='imagenet', num_train=512, num_test=64, min_side=300, max_side=500),
    GeneratedConfig(
      name='tiny', num_train=24, num_test=10, min_side=40, max_side=90, num_classes=5
    ),
  ]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # Avoid TFDS's `importlib_resources` probe for packages that are not pip-installed.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    fixed = cfg.min_side if cfg.min_side == cfg.max_side else None
    return tfds.core.DatasetInfo(
      builder=self,
      description='Generated JPEGs for input-pipeline benchmarks and tests.',
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(shape=(fixed, fixed, 3), encoding_format='jpeg'),
          'label': tfds.features.ClassLabel(num_classes=cfg.num_classes),
        }
      ),
      supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):  # pylint: disable=unused-argument
    cfg = self.builder_config
    return {
      'train': self._generate_examples(cfg.num_train, 0),
      'test': self._generate_examples(cfg.num_test, 1),
    }

  def _generate_examples(self, num: int, split_seed: int):
    cfg = self.builder_config
    for i in range(num):
      rng = np.random.default_rng((split_seed, i))
      w, h = (int(v) for v in rng.integers(cfg.min_side, cfg.max_side + 1, size=2))
      buf = io.BytesIO()
      Image.fromarray(natural_image(rng, w, h)).save(buf, format='JPEG', quality=90)
      yield i, {'image': buf.getvalue(), 'label': int(rng.integers(cfg.num_classes))}


def prepare(config_name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Prepares `generated_jpegs/<config_name>` (ArrayRecord) if needed and returns its builder."""
  builder = tfds.builder(
    f'generated_jpegs/{config_name}', data_dir=data_dir, file_format='array_record'
  )
  if not builder.is_prepared():
    builder.download_and_prepare(file_format='array_record')
  return builder
