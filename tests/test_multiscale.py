"""He et al. 2015 Table 4 testing (issue 14 §3): whole image, shape buckets, exact-once, scales."""

import json
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import multiscale
from resnet_jax.data import augment
from resnet_jax.models import create_model
from resnet_jax.train_step import create_mesh
from tests.runner import ROOT, data_config, env_with_devices


def test_whole_image_shape_keeps_orientation_and_moves_the_long_side_to_a_stride_multiple():
  assert augment.whole_image_shape(300, 400, 224, 32) == (224, 288)  # 298.7 -> 288
  assert augment.whole_image_shape(400, 300, 224, 32) == (288, 224)  # portrait stays portrait
  assert augment.whole_image_shape(500, 500, 256, 32) == (256, 256)
  assert augment.whole_image_shape(20, 30, 8, 4) == (8, 12)  # exact: 8 * 1.5 = 12
  rng = np.random.default_rng(0)
  for _ in range(300):
    h, w = (int(v) for v in rng.integers(20, 900, 2))
    for s in (224, 256, 384, 480, 640):
      out = augment.whole_image_shape(h, w, s, 32)
      assert min(out) == s and np.sign(out[0] - out[1]) in (0, np.sign(h - w))
      assert abs(max(out) - s * max(h, w) / min(h, w)) <= 16 and max(out) % 32 == 0


@pytest.mark.parametrize('process_count', [1, 2, 3])
def test_plan_counts_every_example_once_per_scale_on_any_process_count(process_count):
  rng = np.random.default_rng(1)
  sizes = rng.integers(6, 40, (37, 2))
  plans = [multiscale.plan(sizes, [8, 12], 4, 3, p, process_count) for p in range(process_count)]
  layout = [[(b.scale, b.shape, b.indices.shape) for b in plan] for plan in plans]
  assert all(x == layout[0] for x in layout)  # every process runs the same sequence of batches
  assert len({b.shape for b in plans[0]}) < 2 * len(sizes)  # shapes are shared
  for scale in (8, 12):
    seen = np.concatenate([b.indices.ravel() for plan in plans for b in plan if b.scale == scale])
    np.testing.assert_array_equal(np.sort(seen[seen >= 0]), np.arange(len(sizes)))
  for p, plan in enumerate(plans):
    for b in plan:
      own = b.indices[b.indices >= 0]
      assert np.all(own % process_count == p)  # an example stays on one process at every scale
      for i in own:
        assert augment.whole_image_shape(*sizes[i], b.scale, 4) == b.shape


def _records(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return [
    {'image': rng.integers(0, 256, (h, w, 3), dtype=np.uint8), 'label': int(rng.integers(5))}
    for h, w in shapes
  ]


# Aspect ratios whose long side is a whole number of strides (4) at scales 8 and 16: exact shapes.
SHAPES = [(20, 30), (30, 20), (10, 20), (20, 10), (9, 9), (24, 36), (40, 20), (7, 7), (12, 18)]


def _direct(model, variables, image, scales, flip=False):
  """softmax of the net on the whole image at each scale, one image at a time, averaged."""
  pre = augment.Preprocessor('none', 8, 3)
  out = []
  h, w = image.shape[:2]
  for s in scales:
    shape = (s, s * w // h) if h <= w else (s * h // w, s)  # exact aspect
    x = pre.whole_image(image, shape).astype(np.float32)[None]
    probs = jax.nn.softmax(model.apply(variables, jnp.asarray(x), train=False))
    if flip:
      flipped = model.apply(variables, jnp.asarray(x[:, :, ::-1]), train=False)
      probs = 0.5 * (probs + jax.nn.softmax(flipped))
    out.append(np.asarray(probs)[0])
  return np.mean(out, axis=0)


@pytest.mark.parametrize('devices,batch,crops', [(1, 2, 1), (4, 4, 2)])
def test_equals_a_direct_per_image_computation(devices, batch, crops):
  model = create_model('resnet8', num_classes=5)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
  stats = jax.tree.map(lambda v: v + 0.3, variables['batch_stats'])  # not the identity BN
  variables = {'params': variables['params'], 'batch_stats': stats}
  records = _records(SHAPES)
  scales = [8, 16]
  per = multiscale.whole_image_probabilities(
    model.apply,
    variables,
    records,
    augment.Preprocessor('none', 8, 3),
    create_mesh(jax.devices()[:devices]),
    data_config(),
    scales=scales,
    stride=multiscale.network_stride(model),
    global_batch=batch,
    crops=crops,
  )
  np.testing.assert_array_equal(per.indices, np.arange(len(records)))
  np.testing.assert_array_equal(per.labels, [r['label'] for r in records])
  expected = np.stack([_direct(model, variables, r['image'], scales, crops == 2) for r in records])
  np.testing.assert_allclose(per.probs, expected, atol=2e-6)  # each example once per scale
  single = [_direct(model, variables, records[0]['image'], [s], crops == 2) for s in scales]
  assert not np.allclose(single[0], single[1], atol=1e-4)  # the scales do differ: averaged
  totals = jax.device_get(
    multiscale.metric_totals(per, create_mesh(jax.devices()[:devices]), len(records))
  )
  assert int(totals['count']) == len(records)
  top1 = np.argmax(expected, -1) != per.labels
  assert int(totals['top1_errors']) == int(top1.sum())


def test_the_sides_of_the_image_decide_the_answer():
  """Centre squares are identical grey; only the sides say the class. The whole image gets every
  example right; the old centred-square input could only guess."""
  records = []
  for i in range(12):
    label = i % 2
    image = np.full((8, 20, 3), 128, np.uint8)
    side = 255 if label == 0 else 0
    image[:, :6], image[:, -6:] = side, side
    records.append({'image': image if i % 3 else image.transpose(1, 0, 2), 'label': label})

  def brightness(variables, x, train=False):
    del variables, train
    m = jnp.mean(x, axis=(1, 2, 3))
    return jnp.stack([m, -m], axis=-1) * 10.0

  normalizer = augment.Normalizer(np.full((), 128.0, np.float32), np.full((), 128.0, np.float32))
  pre = augment.Preprocessor('none', 8, 3)
  per = multiscale.whole_image_probabilities(
    brightness,
    {},
    records,
    pre,
    create_mesh(),
    data_config(),
    scales=[8, 12],
    stride=4,
    global_batch=4,
    normalizer=normalizer,
  )
  assert np.all(np.argmax(per.probs, -1) == per.labels)
  centre = np.stack([normalizer(pre.eval(r['image'], scale=8)) for r in records])
  assert np.allclose(centre, 0.0)  # what the centred square saw: nothing to tell the classes by


def test_bad_inputs_raise():
  kwargs = dict(scales=[8], stride=4, global_batch=4)
  args = (lambda v, x, train=False: x, {}, _records([(8, 8)]), augment.Preprocessor('none', 8, 3))
  with pytest.raises(ValueError, match='crops'):
    multiscale.whole_image_probabilities(*args, create_mesh(), data_config(), crops=10, **kwargs)
  with pytest.raises(ValueError, match='scales'):
    multiscale.whole_image_probabilities(
      *args, create_mesh(), data_config(), **{**kwargs, 'scales': [0]}
    )
  with pytest.raises(ValueError, match='stride'):
    multiscale.network_stride(object())
  assert multiscale.network_stride(create_model('resnet18')) == 32
  assert multiscale.network_stride(create_model('resnet18', output_stride=16)) == 16


_TWO_PROCESS = r"""
import json, sys
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(
  coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import jax.numpy as jnp, numpy as np
from resnet_jax import multiscale
from resnet_jax.data import augment
from resnet_jax.models import create_model
from resnet_jax.train_step import create_mesh
from tests.runner import data_config
from tests.test_multiscale import SHAPES, _records
model = create_model('resnet8', num_classes=5)
variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
records = _records(SHAPES)
per = multiscale.whole_image_probabilities(
  model.apply, variables, records, augment.Preprocessor('none', 8, 3), create_mesh(),
  data_config(), scales=[8, 16], stride=4, global_batch=4, crops=2)
totals = jax.device_get(multiscale.metric_totals(per, create_mesh(), len(records)))
print(json.dumps({'indices': per.indices.tolist(), 'probs': per.probs.tolist(),
                  'count': float(totals['count']), 'loss': float(totals['loss'])}))
"""


@pytest.mark.slow
def test_two_processes_split_the_examples_and_sum_the_metrics():
  """Two JAX processes (2 CPU devices each, gloo): each scores its own examples; sums span both."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    address = f'localhost:{s.getsockname()[1]}'
  procs = [
    subprocess.Popen(
      [sys.executable, '-c', _TWO_PROCESS, address, str(i)],
      cwd=ROOT,
      env=env_with_devices(2, fast_compile=True),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=300) for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
  got = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
  assert got[0]['indices'] == list(range(0, len(SHAPES), 2))
  assert got[1]['indices'] == list(range(1, len(SHAPES), 2))
  assert got[0]['count'] == got[1]['count'] == len(SHAPES)
  model = create_model('resnet8', num_classes=5)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
  records = _records(SHAPES)
  expected = np.stack([_direct(model, variables, r['image'], [8, 16], True) for r in records])
  probs = np.zeros_like(expected)
  for g in got:
    probs[g['indices']] = g['probs']
  np.testing.assert_allclose(probs, expected, atol=2e-6)
  labels = np.array([r['label'] for r in records])
  loss = -np.log(expected[np.arange(len(records)), labels]).sum()
  assert got[0]['loss'] == pytest.approx(loss, rel=1e-5) and got[1]['loss'] == got[0]['loss']


def test_varied_size_jpegs_through_the_configured_pipeline(tmp_path):
  """Encoded JPEGs of many sizes (header-read sizes, per-pixel mean resized to every shape)."""
  from resnet_jax.data import generated, sources
  from resnet_jax.data.device_preprocess import make_device_preprocess
  from resnet_jax.evaluate import run_multiscale_evaluation

  generated.prepare('tiny', str(tmp_path))
  config = data_config(
    name='generated_jpegs/tiny', data_dir=str(tmp_path), image_size=24, augment='imagenet'
  )
  config.eval_batch_size = 8
  model = create_model('resnet8', num_classes=5)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 24, 24, 3)), train=False)
  mesh = create_mesh()
  result = run_multiscale_evaluation(
    model.apply, variables, config, mesh, scales=[24, 32], stride=4, split='test'
  )
  assert result['num_examples'] == 10
  source = sources.open_split(config, 'test')
  assert source.encoded
  normalizer = make_device_preprocess(config).normalizer
  pre = augment.Preprocessor('imagenet', 24, 3)
  per = multiscale.whole_image_probabilities(
    model.apply, variables, source.records, pre, mesh, config,
    scales=[24, 32], stride=4, global_batch=8, normalizer=normalizer,
  )  # fmt: skip
  shapes = set()
  for i, probs in zip(per.indices, per.probs):
    image = source.records[int(i)]['image']
    h, w = augment.image_hw(image, 3)
    direct = []
    for s in (24, 32):
      shape = augment.whole_image_shape(h, w, s, 4)
      shapes.add(shape)
      x = normalizer(pre.whole_image(image, shape))[None]
      direct.append(np.asarray(jax.nn.softmax(model.apply(variables, x, train=False)))[0])
    np.testing.assert_allclose(probs, np.mean(direct, axis=0), atol=2e-6)
  assert len(shapes) > 4  # really varied: portrait, landscape, several lengths
