"""torchvision weight import: logit parity, strict key accounting, convert/predict, fine-tuning.

Two kinds of parity test. The golden ones run everywhere, CI included (no torch): they rebuild
with numpy the weights `tests/fixtures/make_torch_golden.py` gave torchvision and compare our
logits with the ones torchvision computed, and convert the committed real `.pth` file. The others
take the `torch` fixture (the optional `[torch]` extra) and are skipped without it. torchvision's
weights cannot be downloaded here, so models get random weights and randomised BN statistics
(which is a stricter test than trained weights: every BN matters).
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from resnet_jax import convert, predict, pretrained
from resnet_jax.models import create_model, layout
from tests.fixtures import golden_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RESNET18 = os.path.join(golden_weights.FIXTURES, 'tiny_resnet18.pth')


def test_core_package_does_not_import_torch():
  code = (
    'import sys, resnet_jax.models, resnet_jax.summary, resnet_jax.convert, resnet_jax.predict; '
    f'resnet_jax.convert.load_torch_state_dict({TINY_RESNET18!r}); '
    'assert "torch" not in sys.modules and "torchvision" not in sys.modules'
  )
  subprocess.run([sys.executable, '-c', code], check=True, cwd=ROOT)


def assert_logits_close(ours, ref):
  """The parity tolerance of every torchvision comparison here."""
  assert ours.dtype == np.float32 and ours.shape == ref.shape
  assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-4
  assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4


GOLDEN = golden_weights.load_golden()


def golden_state_dict(name):
  entry = GOLDEN['archs'][name]
  return golden_weights.numpy_state_dict(entry['keys'], entry['seed'])


def golden_logits(name, variables):
  entry = GOLDEN['archs'][name]
  x = golden_weights.golden_input(entry['input_seed'], GOLDEN['input_shape'])
  return np.asarray(
    create_model(name, num_classes=GOLDEN['num_classes']).apply(
      variables, jnp.asarray(x), train=False
    )
  )


@pytest.mark.parametrize('name', list(GOLDEN['archs']))
def test_logits_match_torchvision_golden_without_torch(name):
  """torchvision's logits, recorded by make_torch_golden.py, for weights rebuilt with numpy
  from torchvision's own key list: the key mapping, every layout transpose and the model."""
  variables = convert.from_torchvision(golden_state_dict(name), name)
  assert_logits_close(
    golden_logits(name, variables), np.asarray(GOLDEN['archs'][name]['logits'], np.float32)
  )


def _no_torch_env(tmp_path):
  """An environment whose `import torch` fails: proves a command never imports it."""
  fake = tmp_path / 'no_torch' / 'torch'
  fake.mkdir(parents=True)
  (fake / '__init__.py').write_text("raise ImportError('torch must not be imported')\n")
  return {**os.environ, 'PYTHONPATH': f'{tmp_path / "no_torch"}{os.pathsep}{ROOT}'}


def test_convert_cli_reads_a_real_pth_without_torch(tmp_path):
  """`convert` on the committed torch.save file of a torchvision resnet18 (every tensor a strided
  view of a small storage), with torch unimportable; the converted model gives torchvision's
  logits."""
  out = tmp_path / 'converted'
  cmd = [
    sys.executable,
    '-m',
    'resnet_jax.convert',
    '--arch',
    'resnet18',
    '--torchvision-weights',
    TINY_RESNET18,
    '--out',
    str(out),
  ]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_no_torch_env(tmp_path))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'wrote resnet18 (11,181,642 parameters, 10 classes)' in proc.stdout
  variables = pretrained.load_model_variables(str(out))
  tiny = GOLDEN['tiny_resnet18']
  x = golden_weights.golden_input(tiny['input_seed'], GOLDEN['input_shape'])
  ours = np.asarray(create_model('resnet18', num_classes=10).apply(variables, x, train=False))
  assert_logits_close(ours, np.asarray(tiny['logits'], np.float32))


def test_predict_reads_a_real_pth_directly(tmp_path, capsys):
  """`predict --torchvision-weights W.pth` (torch-free reader) classifies like the converted
  checkpoint of the same file."""
  image = tmp_path / 'image.png'
  Image.fromarray(np.random.default_rng(9).integers(0, 256, (80, 90, 3), dtype=np.uint8)).save(
    image
  )
  out = tmp_path / 'converted'
  convert.main(['--arch', 'resnet18', '--torchvision-weights', TINY_RESNET18, '--out', str(out)])
  capsys.readouterr()
  args = ['--arch', 'resnet18', '--image-size', '64', str(image)]
  predict.main(['--torchvision-weights', TINY_RESNET18, *args])
  direct = capsys.readouterr().out.splitlines()
  predict.main(['--checkpoint', str(out), *args])
  assert direct == capsys.readouterr().out.splitlines() and len(direct) == 5


def test_convert_cli_reads_safetensors_in_timm_layout(tmp_path, capsys):
  """A `.safetensors` state_dict with torchvision's keys (what timm's v1.5 ResNets ship, with
  `num_batches_tracked` too), read by content whatever its name; weights kept in bfloat16 are
  widened exactly."""
  from safetensors.numpy import save_file

  sd = golden_state_dict('resnet18')
  sd['bn1.num_batches_tracked'] = np.array(10, np.int64)
  weights, out = tmp_path / 'model.safetensors', tmp_path / 'converted'
  save_file(sd, str(weights))
  convert.main(['--arch', 'resnet18', '--torchvision-weights', str(weights), '--out', str(out)])
  assert 'wrote resnet18 (11,181,642 parameters, 10 classes)' in capsys.readouterr().out
  variables = pretrained.load_model_variables(str(out))
  assert_logits_close(
    golden_logits('resnet18', variables),
    np.asarray(GOLDEN['archs']['resnet18']['logits'], np.float32),
  )

  import ml_dtypes

  renamed = tmp_path / 'weights.bin'  # not named .safetensors: sniffed from its header
  save_file({'fc.weight': sd['fc.weight'].astype(ml_dtypes.bfloat16)}, str(renamed))
  loaded = convert.load_torch_state_dict(str(renamed))['fc.weight']
  assert loaded.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(
    convert._to_numpy(loaded), sd['fc.weight'].astype(ml_dtypes.bfloat16).astype(np.float32)
  )


def test_timm_resnet_d_keys_are_refused_by_name():
  """timm's resnet50d-style nets (deep stem conv1.0/.3/.6, avg-pool downsample .1/.2) are not
  torchvision's layout: the strict key accounting names what does not fit."""
  sd = golden_state_dict('resnet18')
  deep = {
    k.replace('conv1.weight', 'conv1.0.weight', 1)
    if k == 'conv1.weight'
    else k.replace('downsample.1.', 'downsample.2.').replace('downsample.0.', 'downsample.1.'): v
    for k, v in sd.items()
  }
  with pytest.raises(ValueError) as e:
    convert.from_torchvision(deep, 'resnet18')
  message = str(e.value)
  assert "missing torchvision keys ['conv1.weight', 'layer2.0.downsample.0.weight'" in message
  assert "unused torchvision keys ['conv1.0.weight'" in message and '\n' not in message


def torch_logits(torch, model, x_nhwc):
  with torch.no_grad():
    return model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))).numpy()


@pytest.mark.parametrize(
  'name,size',
  [
    ('resnet18', 57),
    ('resnet34', 64),
    ('resnet50', 64),
    ('resnet101', 48),
    ('resnext50_32x4d', 64),
    ('wide_resnet50_2', 64),
    pytest.param('resnext101_32x8d', 64, marks=pytest.mark.slow),
    pytest.param('resnext101_64x4d', 64, marks=pytest.mark.slow),
    pytest.param('wide_resnet101_2', 64, marks=pytest.mark.slow),
  ],
)
def test_logits_match_torchvision(torch, random_torchvision, name, size):
  model = random_torchvision(name)
  x = np.random.default_rng(0).standard_normal((2, size, size, 3)).astype(np.float32)
  variables = convert.from_torchvision(model.state_dict(), name)
  ours = np.asarray(create_model(name).apply(variables, jnp.asarray(x), train=False))
  ref = torch_logits(torch, model, x)
  assert ref.shape == (2, 1000)
  assert_logits_close(ours, ref)


def test_torch_key_mapping():
  assert convert.torch_key('params', ['conv1', 'kernel']) == 'conv1.weight'
  assert convert.torch_key('params', ['bn1', 'scale']) == 'bn1.weight'
  assert (
    convert.torch_key('batch_stats', ['layer3_12', 'bn2', 'var']) == 'layer3.12.bn2.running_var'
  )
  down = ['layer2_0', 'downsample_conv', 'kernel']
  assert convert.torch_key('params', down) == 'layer2.0.downsample.0.weight'
  down = ['layer2_0', 'downsample_bn', 'mean']
  assert convert.torch_key('batch_stats', down) == 'layer2.0.downsample.1.running_mean'
  assert convert.torch_key('params', ['fc', 'bias']) == 'fc.bias'


def test_strict_key_accounting(torch, random_torchvision):
  sd = random_torchvision('resnet18', num_classes=7).state_dict()
  variables = convert.from_torchvision({f'module.{k}': v for k, v in sd.items()}, 'resnet18')
  assert variables['params']['fc']['kernel'].shape == (512, 7)
  np.testing.assert_array_equal(variables['params']['fc']['kernel'], sd['fc.weight'].numpy().T)
  np.testing.assert_array_equal(
    variables['batch_stats']['layer2_0']['downsample_bn']['var'],
    sd['layer2.0.downsample.1.running_var'].numpy(),
  )

  missing = {k: v for k, v in sd.items() if k != 'layer1.1.bn2.running_mean'}
  with pytest.raises(
    ValueError, match=r'missing torchvision keys \[\'layer1.1.bn2.running_mean\'\]'
  ):
    convert.from_torchvision(missing, 'resnet18')
  with pytest.raises(ValueError, match=r'unused torchvision keys \[\'extra.weight\'\]'):
    convert.from_torchvision({**sd, 'extra.weight': sd['fc.bias']}, 'resnet18')
  bad = dict(sd, **{'layer1.0.conv1.weight': torch.zeros(64, 64, 1, 1)})
  with pytest.raises(ValueError, match='shape mismatches.*layer1.0.conv1.weight'):
    convert.from_torchvision(bad, 'resnet18')
  sd34 = random_torchvision('resnet34').state_dict()
  with pytest.raises(ValueError, match=r'unused torchvision keys \[.*layer1\.2\.bn1\.bias'):
    convert.from_torchvision(sd34, 'resnet18')
  with pytest.raises(ValueError, match='ImageNet ResNets, ResNeXts and Wide ResNets only'):
    convert.from_torchvision(sd, 'resnet20')


def test_adapt_input_channels_for_grayscale():
  """A grey image through the adapted stem gives the logits the RGB model gives to that image
  replicated over three channels (the RGB kernels are summed). No torch needed: random weights."""
  model = create_model('resnet18')
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 40, 40, 3))))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
    lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32) * 0.1, abstract
  )
  gray = convert.adapt_input_channels(variables, 1)
  assert gray['params']['conv1']['kernel'].shape == (7, 7, 1, 64)
  x = np.random.default_rng(1).standard_normal((2, 40, 40, 1)).astype(np.float32)
  rgb_logits = model.apply(variables, np.repeat(x, 3, axis=-1), train=False)
  np.testing.assert_allclose(model.apply(gray, x, train=False), rgb_logits, rtol=1e-4, atol=1e-4)


def test_preprocessing_matches_torchvision_transforms(torch, tv):
  try:
    from torchvision import transforms
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f'torchvision.transforms unavailable: {e}')
  image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (300, 451, 3), dtype=np.uint8))
  reference = transforms.Compose(
    [
      transforms.Resize(256),
      transforms.CenterCrop(224),
      transforms.ToTensor(),
      transforms.Normalize(mean=predict.IMAGENET_MEAN.tolist(), std=predict.IMAGENET_STD.tolist()),
    ]
  )
  np.testing.assert_allclose(
    predict.preprocess(image), reference(image).numpy().transpose(1, 2, 0), atol=1e-5
  )


def test_convert_cli_then_predict_prints_top5(torch, random_torchvision, tmp_path, capsys):
  model = random_torchvision('resnet18', seed=3)
  weights, out = tmp_path / 'r18.pth', tmp_path / 'converted'
  torch.save(model.state_dict(), weights)
  convert.main(['--arch', 'resnet18', '--torchvision-weights', str(weights), '--out', str(out)])
  assert 'wrote resnet18 (11,689,512 parameters, 1000 classes)' in capsys.readouterr().out
  restored = pretrained.load_model_variables(str(out))
  expected = convert.from_torchvision(model.state_dict(), 'resnet18')
  jax.tree.map(np.testing.assert_array_equal, restored, expected)

  image_path = tmp_path / 'image.png'
  Image.fromarray(np.random.default_rng(4).integers(0, 256, (230, 310, 3), dtype=np.uint8)).save(
    image_path
  )
  predict.main(['--arch', 'resnet18', '--checkpoint', str(out), str(image_path)])
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 5
  probs = [float(line.split()[0]) for line in lines]
  indices = [int(line.rsplit('(', 1)[1].rstrip(')')) for line in lines]
  assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001

  x = predict.preprocess(Image.open(image_path))[None]
  ref = torch.softmax(torch.from_numpy(torch_logits(torch, model, x)), -1).numpy()[0]
  assert indices == list(np.argsort(-ref)[:5])
  np.testing.assert_allclose(probs, ref[indices], atol=1e-4)
  if predict.class_names(1000)[0] != 'class 0':  # torchvision's ImageNet names were found
    assert lines[0].split(None, 1)[1] == f'{predict.class_names(1000)[indices[0]]} ({indices[0]})'

  predict.main(['--arch', 'resnet18', '--torchvision-weights', str(weights), str(image_path)])
  assert capsys.readouterr().out.splitlines() == lines


@pytest.mark.parametrize('name', ['resnext50_32x4d', 'wide_resnet50_2'])
def test_convert_and_predict_take_resnext_and_wide_resnet_weights(
  torch, random_torchvision, tmp_path, capsys, name
):
  model = random_torchvision(name, seed=6)
  weights, out = tmp_path / f'{name}.pth', tmp_path / 'converted'
  torch.save(model.state_dict(), weights)
  convert.main(['--arch', name, '--torchvision-weights', str(weights), '--out', str(out)])
  count = {'resnext50_32x4d': '25,028,904', 'wide_resnet50_2': '68,883,240'}[name]
  assert f'wrote {name} ({count} parameters, 1000 classes)' in capsys.readouterr().out
  image_path = tmp_path / 'image.png'
  Image.fromarray(np.random.default_rng(7).integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(
    image_path
  )
  predict.main(['--arch', name, '--checkpoint', str(out), '--image-size', '64', str(image_path)])
  lines = capsys.readouterr().out.splitlines()
  probs = [float(line.split()[0]) for line in lines]
  indices = [int(line.rsplit('(', 1)[1].rstrip(')')) for line in lines]
  x = predict.preprocess(Image.open(image_path), 64, int(round(64 * 256 / 224)))[None]
  ref = torch.softmax(torch.from_numpy(torch_logits(torch, model, x)), -1).numpy()[0]
  assert len(lines) == 5 and indices == list(np.argsort(-ref)[:5])
  np.testing.assert_allclose(probs, ref[indices], atol=1e-4)


@pytest.mark.slow
def test_finetune_from_converted_checkpoint_on_digits(converted_random_weights, tmp_path):
  """A 1000-class converted ResNet-18 fine-tunes on digits with a fresh 10-class head.

  With lr=0 every restored weight must come out unchanged: it was loaded, not re-initialised.
  """
  from tests.runner import results, run_main

  _, converted = converted_random_weights('resnet18', seed=5)
  workdir = tmp_path / 'ft'
  proc = run_main(
    str(workdir),
    f'--config.init_from={converted}',
    '--config.schedule.base_lr=0.0',
    '--config.eval_every_steps=0',
    devices=1,
    fast_compile=True,
    config='configs/finetune.py:arch=resnet18,steps=2,batch=8,image_size=16',
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = results(str(workdir))
  assert res['step'] == 2 and res['eval']['num_examples'] == 360
  assert res['params'] == 11_689_512 - 7 * 7 * 2 * 64 - 513 * 990  # grey stem, 10-class head
  before = pretrained.load_model_variables(str(converted))['params']
  after = layout.to_unrolled(pretrained.load_model_variables(str(workdir)))['params']
  assert after['fc']['kernel'].shape == (512, 10)
  for key in before:
    if key != 'fc':
      jax.tree.map(np.testing.assert_array_equal, after[key], before[key])


def test_torchvision_round_trip_in_both_layouts_without_torch():
  """to_torchvision / from_torchvision invert each other; scan=True gives the scanned layout."""
  model = create_model('resnet18', num_classes=7, scan=True)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract)
  sd = convert.to_torchvision(variables)
  assert sd['layer1.1.conv2.weight'].shape == (64, 64, 3, 3) and 'fc.weight' in sd
  # torch's layouts: conv weight[out, in, kh, kw] is flax's kernel[kh, kw, in, out] (a kh/kw swap
  # would survive the round trip below; only this and the torch parity tests see it, and those
  # need torch), Linear weight[out, in] is the dense kernel[in, out].
  kernel = variables['params']['conv1']['kernel']
  for o, i, kh, kw in [(0, 0, 0, 1), (5, 2, 6, 3), (63, 1, 2, 5)]:
    assert sd['conv1.weight'][o, i, kh, kw] == kernel[kh, kw, i, o]
  assert sd['fc.weight'][6, 100] == variables['params']['fc']['kernel'][100, 6]
  np.testing.assert_array_equal(
    sd['layer4.1.bn1.running_var'], variables['batch_stats']['layer4_scan']['bn1']['var'][0]
  )
  scanned = convert.from_torchvision(sd, 'resnet18', scan=True)
  assert jax.tree.structure(scanned) == jax.tree.structure(jax.tree.map(np.asarray, variables))
  jax.tree.map(np.testing.assert_array_equal, scanned, variables)
  unrolled = convert.from_torchvision(sd, 'resnet18')
  assert 'layer4_1' in unrolled['params'] and 'layer4_scan' not in unrolled['params']
  np.testing.assert_array_equal(
    unrolled['params']['layer2_1']['conv1']['kernel'],
    variables['params']['layer2_scan']['conv1']['kernel'][0],
  )
