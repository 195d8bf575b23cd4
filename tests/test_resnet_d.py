"""The Bag of Tricks ResNets (He et al. 2019, Sec. 4.1, Fig. 2) and timm's weights for them.

ResNet-C replaces the 7x7/2 stem conv by three 3x3 convs (32-32-64, the first with stride 2, each
followed by BN + ReLU); ResNet-D moves a projection shortcut's stride to a 2x2 average pool
before its 1x1 conv. timm names them `resnet50c` / `resnet50d`; its weights convert here. Parity
runs without torch against `tests/fixtures/timm_golden.json` (written by
`tests/fixtures/make_timm_golden.py` with timm 1.0.31); with timm installed, a live test checks
more nets.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from resnet_jax import convert, default_config, predict, pretrained, runtime, summary
from resnet_jax.models import backbone, create_model, layers, layout, parse_name
from resnet_jax.train_step import count_params
from tests.fixtures import golden_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(golden_weights.FIXTURES, 'timm_golden.json')) as f:
  GOLDEN = json.load(f)


def init(model, size=32, channels=3):
  x = jnp.zeros((1, size, size, channels), jnp.float32)
  return jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)


def abstract(model, size=32):
  return jax.eval_shape(lambda: init(model, size))


def shapes(tree):
  return jax.tree.map(lambda x: x.shape, tree)


def rel_err(ours, ref):
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape
  return max(
    np.linalg.norm(ours - ref) / np.linalg.norm(ref), np.abs(ours - ref).max() / np.abs(ref).max()
  )


def golden_state_dict(name):
  entry = GOLDEN['archs'][name]
  return golden_weights.numpy_state_dict(entry['keys'], entry['seed'])


def golden_input(name):
  return golden_weights.golden_input(GOLDEN['archs'][name]['input_seed'], GOLDEN['input_shape'])


# ----------------------------------------------------------------------------- the architecture


@pytest.mark.parametrize('name', sorted(GOLDEN['param_counts']))
def test_parameter_counts_equal_timms(name):
  variables = abstract(create_model(name), 64)
  assert count_params(variables['params']) == GOLDEN['param_counts'][name]


def test_deep_stem_is_three_3x3_convs_32_32_64_the_first_strided():
  variables = abstract(create_model('resnet50c', num_classes=4), 64)
  params = variables['params']
  assert params['stem_conv1']['kernel'].shape == (3, 3, 3, 32)
  assert params['stem_conv2']['kernel'].shape == (3, 3, 32, 32)
  assert params['stem_conv3']['kernel'].shape == (3, 3, 32, 64)
  assert {k for k in params if k.startswith('stem_') or k in ('conv1', 'bn1')} == {
    'stem_conv1',
    'stem_bn1',
    'stem_conv2',
    'stem_bn2',
    'stem_conv3',
    'bn1',
  }
  assert params['stem_bn1']['scale'].shape == params['stem_bn2']['scale'].shape == (32,)
  assert variables['batch_stats']['bn1']['mean'].shape == (64,)
  # the stem's output (after the max-pool) is at stride 4, as the 7x7 stem's is
  backbone_net = create_model('resnet50c', features_only=True)
  feats = jax.eval_shape(
    lambda: backbone_net.apply(init(backbone_net, 64), jnp.zeros((1, 64, 64, 3)))
  )
  assert feats['C2'].shape == (1, 16, 16, 256)


def test_c_is_the_deep_stem_only_d_adds_avg_down_and_neither_changes_the_blocks():
  base = shapes(abstract(create_model('resnet50'))['params'])
  c = shapes(abstract(create_model('resnet50c'))['params'])
  d = shapes(abstract(create_model('resnet50d'))['params'])
  assert c == d  # the avg pool has no parameters
  stem = lambda tree: {k: v for k, v in tree.items() if not k.startswith('layer')}
  blocks = lambda tree: {k: v for k, v in tree.items() if k.startswith('layer')}
  assert blocks(c) == blocks(base)
  assert set(stem(base)) == {'conv1', 'bn1', 'fc'}
  assert create_model('resnet50c').avg_down is False and create_model('resnet50d').avg_down
  assert create_model('resnet50').stem == 'imagenet' and create_model('resnet50d').stem == 'deep'


def test_defaults_are_the_papers_net_unchanged():
  """stem='7x7' and avg_down=False are the defaults: the same tree and values for the same rng."""
  default = init(create_model('resnet18', num_classes=3))
  explicit = init(create_model('resnet18', num_classes=3, stem='7x7', avg_down=False))
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), default, explicit))
  assert 'stem_conv1' not in default['params'] and 'conv1' in default['params']


def test_options_equal_names():
  """The ablation is one flag each: resnet50 + stem/avg_down is resnet50c / resnet50d."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 33, 33, 3)), jnp.float32)
  for name, kwargs in (
    ('resnet50c', dict(stem='deep')),
    ('resnet50d', dict(stem='deep', avg_down=True)),
  ):
    named = create_model(name, num_classes=5)
    flagged = create_model('resnet50', num_classes=5, **kwargs)
    variables = init(named, 33)
    assert shapes(abstract(flagged, 33)) == shapes(variables)
    np.testing.assert_array_equal(
      jax.jit(named.apply)(variables, x), jax.jit(flagged.apply)(variables, x)
    )
  # ResNet-D without ResNet-C: avg-pool shortcuts, 7x7 stem
  only_d = abstract(create_model('resnet50', avg_down=True))['params']
  assert 'conv1' in only_d and 'stem_conv1' not in only_d


def test_avg_pool_down_is_timms_ceil_mode_pool_without_padding_in_the_count():
  """2x2/2 average, ceil_mode=True, count_include_pad=False: an odd side's last window averages
  the one row (column) it covers; stride 1 is the identity; a dilated stage (output stride 16 / 8)
  pools 2x2/1 over the input padded with a zero row and column at the end (timm's AvgPool2dSame:
  the zeros count)."""
  x = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)
  out = np.asarray(layers.avg_pool_down(jnp.asarray(x), 2))
  assert out.shape == (2, 3, 4, 3)
  for i in range(3):
    for j in range(4):
      window = x[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]  # clipped at the edge
      np.testing.assert_allclose(out[:, i, j], window.mean(axis=(1, 2)), rtol=1e-6)
  assert out[0, 2, 3, 0] == pytest.approx(x[0, 4, 6, 0])  # the corner window: one element
  np.testing.assert_array_equal(layers.avg_pool_down(jnp.asarray(x), 1), x)
  same = np.asarray(layers.avg_pool_down(jnp.asarray(x), 1, dilated=True))
  padded = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
  ref = (padded[:, :-1, :-1] + padded[:, 1:, :-1] + padded[:, :-1, 1:] + padded[:, 1:, 1:]) / 4
  np.testing.assert_allclose(same, ref, rtol=1e-6, atol=1e-7)


class _Projection(nn.Module):
  """A block's B shortcut from 64 to 256 channels, bare (no BN), alone."""

  strides: int
  avg_down: bool

  @nn.compact
  def __call__(self, x):
    return layers.shortcut(
      x, 256, self.strides, kind='B', conv=layers.conv, norm=None, avg_down=self.avg_down
    )


def test_avg_down_only_where_a_projection_strides():
  """timm's rule: a stride-1 projection (resnet50's layer1.0, 64 -> 256) stays a bare 1x1 conv;
  a stride-2 one is the same 1x1 kernel, stride 1, on the 2x2 means."""
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 8, 8, 64)), jnp.float32)
  variables = _Projection(1, False).init(jax.random.key(0), x)
  run = lambda strides, avg_down: np.asarray(_Projection(strides, avg_down).apply(variables, x))
  np.testing.assert_array_equal(run(1, True), run(1, False))
  strided, averaged = run(2, False), run(2, True)
  assert strided.shape == averaged.shape == (1, 4, 4, 256)
  kernel = np.asarray(variables['params']['downsample_conv']['kernel'])[0, 0]
  np.testing.assert_allclose(strided, np.asarray(x)[:, ::2, ::2] @ kernel, rtol=1e-4, atol=1e-5)
  means = np.asarray(x).reshape(1, 4, 2, 4, 2, 64).mean(axis=(2, 4))
  np.testing.assert_allclose(averaged, means @ kernel, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- names and refusals


def test_names():
  assert parse_name('resnet50d').tweak == 'd' and parse_name('resnet18c').tweak == 'c'
  assert parse_name('resnet50').tweak == ''
  spec = parse_name('resnext50d_32x4d')
  assert (spec.variant, spec.groups, spec.width_per_group, spec.tweak) == ('resnext', 32, 4, 'd')
  for depth in (18, 34, 50, 101, 152):
    assert create_model(f'resnet{depth}d').avg_down


@pytest.mark.parametrize(
  'build, needle',
  [
    (lambda: create_model('resnet20d'), 'name ImageNet ResNets'),
    (lambda: create_model('plain50d'), 'name ImageNet ResNets'),
    (lambda: create_model('cifar_resnet50d'), 'name ImageNet ResNets'),
    (lambda: create_model('resnet20', stem='deep'), 'the CIFAR net resnet20'),
    (lambda: create_model('resnet56', avg_down=True, shortcut='B'), 'the CIFAR net resnet56'),
    (lambda: create_model('resnet50', stem='3x3'), 'stem must be one of 7x7, deep'),
    (lambda: create_model('resnet50', avg_down='yes'), 'avg_down must be'),
    (lambda: create_model('resnet50d', stem='7x7'), 'contradicts it'),
    (lambda: create_model('resnet50c', avg_down=True), 'contradicts it'),
    (
      lambda: create_model('resnet50', avg_down=True, shortcut='A'),
      "shortcut='A' has no projections",
    ),
    (lambda: create_model('resnet50', avg_down=True, residual=False), 'residual=False'),
  ],
)
def test_refusals(build, needle):
  with pytest.raises(ValueError) as info:
    build()
  assert needle in str(info.value)


def test_config_fields_reach_the_model():
  config = default_config.base_config()
  config.model.update(name='resnet18', num_classes=4, stem='deep', avg_down=True)
  model = runtime.build_model(config)
  assert (model.stem, model.avg_down) == ('deep', True)
  config = default_config.base_config()
  config.model.update(name='resnet18', num_classes=4)
  assert (config.model.stem, config.model.avg_down) == (None, None)
  assert runtime.build_model(config).stem == 'imagenet'


def test_imagenet_config_tweaks_are_cumulative_b_c_d():
  """He et al. 2019's Table 5 stacks them: B (stride on the 3x3), C (+ deep stem), D (+ pool)."""
  imagenet = default_config.load_sibling_config(os.path.join(ROOT, 'configs', 'x.py'), 'imagenet')
  assert imagenet.get_config('').model.stride_on == '1x1'  # the paper recipe's v1
  for tweaks, name in (('b', 'resnet50'), ('c', 'resnet50c'), ('d', 'resnet50d')):
    model = runtime.build_model(imagenet.get_config(f'tweaks={tweaks}'))
    assert (model.stride_on, model.stem == 'deep', model.avg_down) == (
      '3x3',
      tweaks in 'cd',
      tweaks == 'd',
    )
    assert imagenet.get_config(f'tweaks={tweaks}').model.name == name
  assert imagenet.get_config('depth=18,tweaks=d').model.name == 'resnet18d'
  with pytest.raises(ValueError, match='stride_on=1x1 contradicts'):
    imagenet.get_config('tweaks=c,stride_on=1x1')
  with pytest.raises(ValueError, match='tweaks must be b, c or d'):
    imagenet.get_config('tweaks=e')


def test_bad_config_value_is_one_error_line(tmp_path):
  from tests import runner

  proc = runner.run_main(
    str(tmp_path / 'w'), '--config.model.stem=deep', devices=1, config='configs/digits.py:depth=8'
  )
  runner.assert_one_line_error(proc, "stem='deep'", 'resnet8')


def test_a_workdir_holding_another_stem_or_shortcut_is_refused(tmp_path):
  """Resuming with another stem (other variables) or avg_down (same variables, another function)
  would continue a different net: refused like another shortcut option."""
  from etils import epath

  from resnet_jax import train
  from resnet_jax.workdir import CONFIG_FILE

  config = default_config.base_config()
  config.model.update(name='resnet18', stem='deep')
  workdir = epath.Path(tmp_path)
  (workdir / CONFIG_FILE).write_text(config.to_json_best_effort())
  train._prepare_workdir(workdir, config)  # the same config resumes
  for field, value in (('stem', '7x7'), ('avg_down', True)):
    other = default_config.base_config()
    other.model.update(name='resnet18', stem='deep')
    other.model[field] = value
    with pytest.raises(train.ConfigError, match=f'holds a run with model.{field}='):
      train._prepare_workdir(workdir, other)


# ------------------------------------------------------------------ layouts, backbone, training


def test_scanned_layout_and_remat_compute_the_same_function():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32, 32, 3)), jnp.float32)
  unrolled = create_model('resnet18d', num_classes=3)
  variables = init(unrolled)
  scanned = create_model('resnet18d', num_classes=3, scan=True, remat=True)
  sv = layout.to_scanned(variables, scanned.stage_sizes)
  assert shapes(sv) == shapes(init(scanned))
  np.testing.assert_allclose(
    scanned.apply(sv, x), unrolled.apply(variables, x), rtol=1e-5, atol=1e-5
  )


def test_training_with_drop_path_remat_and_frozen_stem_reaches_the_deep_stem():
  model = create_model('resnet18d', num_classes=3, drop_path_rate=0.2, remat=True, scan=True)
  variables = init(model)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 32, 32, 3)), jnp.float32)

  def loss(params):
    out, _ = model.apply(
      {**variables, 'params': params},
      x,
      train=True,
      rngs={'dropout': jax.random.key(1)},
      mutable=['batch_stats'],
    )
    return jnp.sum(out**2)

  grads = jax.jit(jax.grad(loss))(variables['params'])
  for name in ('stem_conv1', 'stem_conv2', 'stem_conv3', 'layer2_0'):
    assert float(jnp.abs(jax.tree.leaves(grads[name])[0]).sum()) > 0, name
  # frozen_stages=0 freezes the whole deep stem (and only it); frozen_bn_affine its BNs too
  mask = backbone.frozen_mask(variables['params'], frozen_stages=0)
  for name in ('stem_conv1', 'stem_bn1', 'stem_conv2', 'stem_bn2', 'stem_conv3', 'bn1'):
    assert all(jax.tree.leaves(mask[name])), name
  assert not any(jax.tree.leaves(mask['layer1_0'])) and not any(jax.tree.leaves(mask['fc']))
  affine = backbone.frozen_mask(variables['params'], frozen_bn_affine=True)
  assert all(jax.tree.leaves(affine['stem_bn2'])) and not any(jax.tree.leaves(affine['stem_conv2']))
  frozen = create_model('resnet18d', num_classes=3, frozen_stages=0)
  fgrads = jax.jit(
    jax.grad(
      lambda p: jnp.sum(
        frozen.apply({**variables, 'params': p}, x, train=True, mutable=['batch_stats'])[0] ** 2
      )
    )
  )(layout.to_unrolled(variables)['params'])
  assert float(jnp.abs(fgrads['stem_conv1']['kernel']).sum()) == 0
  assert float(jnp.abs(fgrads['layer1_0']['conv1']['kernel']).sum()) > 0


def test_summary_and_features(capsys):
  summary.main(['resnet50d', '--json'])
  out = json.loads(capsys.readouterr().out)
  assert out['params'] == GOLDEN['param_counts']['resnet50d']
  assert (out['stem'], out['avg_down']) == ('deep', True)
  stem = out['stages'][0]
  assert stem['name'] == 'stem' and stem['params'] == 3 * 3 * (3 * 32 + 32 * 32 + 32 * 64) + 2 * (
    32 + 32 + 64
  )
  summary.main(['resnet50', '--stem', 'deep', '--avg-down', '--json'])
  assert json.loads(capsys.readouterr().out)['params'] == out['params']
  summary.main(['resnet18d', '--features', '--output-stride', '16', '--json'])
  feats = {f['name']: f for f in json.loads(capsys.readouterr().out)['features']}
  assert feats['C5']['stride'] == 16 and feats['C2']['stride'] == 4


# ------------------------------------------------------------------------------- timm's weights


@pytest.mark.parametrize('name', sorted(GOLDEN['archs']))
def test_golden_timm_logits(name):
  """timm's eval-mode logits (recorded with timm 1.0.31) for weights rebuilt here with numpy."""
  entry = GOLDEN['archs'][name]
  sd = golden_state_dict(name)
  x = jnp.asarray(golden_input(name))
  variables = convert.from_torchvision(sd, name)
  model = create_model(name, num_classes=GOLDEN['num_classes'])
  assert rel_err(model.apply(variables, x), entry['logits']) < 1e-4
  if 'extra' in entry:  # the same weights, dilated (timm's AvgPool2dSame shortcut)
    kwargs = entry['extra']['kwargs']
    dilated = create_model(name, num_classes=GOLDEN['num_classes'], **kwargs)
    assert rel_err(dilated.apply(variables, x), entry['extra']['logits']) < 1e-4
  scanned = create_model(name, num_classes=GOLDEN['num_classes'], scan=True)
  sv = convert.from_torchvision(sd, name, scan=True)
  assert rel_err(scanned.apply(sv, x), entry['logits']) < 1e-4


def test_timm_keys_round_trip():
  sd = golden_state_dict('resnet50d')
  variables = convert.from_torchvision(sd, 'resnet50d')
  back = convert.to_torchvision(variables, avg_down=True)
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])
  assert convert.torch_key('params', ['stem_conv2', 'kernel']) == 'conv1.3.weight'
  assert convert.torch_key('batch_stats', ['stem_bn2', 'var']) == 'conv1.4.running_var'
  down = ['layer3_0', 'downsample_bn', 'scale']
  assert convert.torch_key('params', down, avg_down=True) == 'layer3.0.downsample.2.weight'
  assert convert.torch_key('params', down) == 'layer3.0.downsample.1.weight'


def test_wrong_arch_names_the_stem_and_shortcuts():
  sd = golden_state_dict('resnet18d')
  with pytest.raises(ValueError) as info:
    convert.from_torchvision(sd, 'resnet18')
  msg = str(info.value)
  assert 'missing torchvision keys' in msg and "'conv1.weight'" in msg
  assert 'unused torchvision keys' in msg and 'conv1.0.weight' in msg
  assert 'the file has a deep (3x3 x3) stem and avg-pool projection shortcuts' in msg
  # d weights given as c: only the shortcuts differ
  with pytest.raises(ValueError) as info:
    convert.from_torchvision(sd, 'resnet18c')
  assert 'resnet18c has a deep (3x3 x3) stem and strided projection shortcuts' in str(info.value)
  assert 'layer2.0.downsample.2.weight' in str(info.value)


def test_convert_cli_writes_a_checkpoint_of_timms_safetensors(tmp_path, capsys):
  from safetensors.numpy import save_file

  sd = golden_state_dict('resnet18d')
  path = str(tmp_path / 'model.safetensors')
  save_file(sd, path)
  convert.main(['--arch', 'resnet18d', '--torchvision-weights', path, '--out', str(tmp_path / 'c')])
  assert 'wrote resnet18d (11,' in capsys.readouterr().out
  variables = pretrained.load_model_variables(str(tmp_path / 'c'))
  model = create_model('resnet18d', num_classes=GOLDEN['num_classes'])
  logits = model.apply(variables, jnp.asarray(golden_input('resnet18d')))
  assert rel_err(logits, GOLDEN['archs']['resnet18d']['logits']) < 1e-4
  # predict reads the file directly (the same mapping) and classifies like the checkpoint
  image = tmp_path / 'image.png'
  pixels = np.random.default_rng(9).integers(0, 256, (70, 90, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(image)
  args = ['--arch', 'resnet18d', '--image-size', '64', str(image)]
  predict.main(['--torchvision-weights', path, *args])
  direct = capsys.readouterr().out.splitlines()
  predict.main(['--checkpoint', str(tmp_path / 'c'), *args])
  assert direct == capsys.readouterr().out.splitlines() and len(direct) == 5
  with pytest.raises(SystemExit) as info:
    convert.main(
      ['--arch', 'resnet18', '--torchvision-weights', path, '--out', str(tmp_path / 'd')]
    )
  assert info.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: state_dict does not fit resnet18')


def test_grayscale_adaptation_of_the_deep_stem():
  variables = convert.from_torchvision(golden_state_dict('resnet18d'), 'resnet18d')
  grey = convert.adapt_input_channels(variables, 1)
  assert grey['params']['stem_conv1']['kernel'].shape == (3, 3, 1, 32)
  model = create_model('resnet18d', num_classes=GOLDEN['num_classes'])
  x = np.random.default_rng(4).normal(size=(1, 33, 33, 1)).astype(np.float32)
  np.testing.assert_allclose(
    model.apply(grey, jnp.asarray(x)),
    model.apply(variables, jnp.asarray(np.repeat(x, 3, axis=-1))),
    rtol=1e-4,
    atol=1e-3,
  )


# ------------------------------------------------------------------------------ live, with timm


@pytest.fixture(scope='module')
def timm(torch):
  """timm, importable once torchvision's pure-Python parts are (tests/conftest.py's `tv` trick)."""
  import importlib.util
  import sys

  if importlib.util.find_spec('timm') is None:
    pytest.skip('timm is not installed (pip install --no-deps timm==1.0.*)')
  sys.path.insert(0, golden_weights.FIXTURES)
  try:
    from make_timm_golden import import_timm
  finally:
    sys.path.remove(golden_weights.FIXTURES)
  return import_timm()


@pytest.mark.parametrize(
  'name, kwargs, size',
  [
    ('resnet34d', {}, 35),
    ('resnet50c', {}, 33),
    ('resnext50d_32x4d', {'output_stride': 8}, 33),
    # basic blocks dilated (torchvision refuses them): the first block of a dilated stage keeps
    # the previous dilation in its first conv only, as timm's BasicBlock does
    ('resnet34', {'output_stride': 8}, 35),
    ('resnet18d', {'output_stride': 16}, 33),
    # squeeze-and-excitation (timm's SEModule: 1x1 convs with biases, C/16 rounded to 8s)
    ('seresnet34', {}, 35),
    ('seresnext50_32x4d', {'output_stride': 16}, 33),
    # ResNet-RS: deep stem whose max-pool is a 3x3/2 conv, SE at ratio 1/4, ResNet-D shortcuts
    ('resnetrs50', {}, 35),
  ],
)
def test_live_timm_parity(timm, torch, randomise_bn, name, kwargs, size):
  torch.manual_seed(0)
  model = randomise_bn(timm.create_model(name, num_classes=7, **kwargs).eval())
  x = np.random.default_rng(5).normal(size=(2, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  variables = convert.from_torchvision(sd, name)
  ours = create_model(name, num_classes=7, **kwargs).apply(variables, jnp.asarray(x))
  assert rel_err(ours, ref) < 1e-4
