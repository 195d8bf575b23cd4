"""Big Transfer (Kolesnikov et al. 2020, "Big Transfer (BiT)") read as the spec of timm's
`resnetv2_*_bit` (timm/models/resnetv2.py, timm/layers/std_conv.py): a pre-activation ResNet-v2
(He et al. 2016) whose norms are GroupNorm (32 groups, eps 1e-5) + ReLU and whose convs are
weight-standardised (per output channel over in x kh x kw, biased variance, eps 1e-8); the stem is
a 7x7/2 conv with no norm, a zero pad and an unpadded 3x3/2 max-pool; each stage's first unit
projects (a bare 1x1 conv) from its pre-activated input; the stride is on the 3x3; the net ends
with GroupNorm + ReLU, average pool and a 1x1 conv head (our Dense); widths x 1..4.

Parity runs without torch against `tests/fixtures/bit_golden.json` (written by
`tests/fixtures/make_bit_golden.py` with timm 1.0.31); with timm installed, live tests check a
narrow ResNetV2 and timm's own layers.
"""

import importlib.util
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import checkpointing, convert, precise_bn, pretrained, summary, torch_keys
from resnet_jax.models import create_model, layers, parse_name, stems
from resnet_jax.models.blocks import PreActBottleneck
from resnet_jax.models.names import BIT_WS_EPSILON
from resnet_jax.models.resnet import ResNet
from resnet_jax.train_step import count_params, init_state, jit_train_step
from tests.fixtures import golden_weights

sys.path.insert(0, golden_weights.FIXTURES)
import make_bit_golden  # noqa: E402  (numpy only at import: torch is imported in its main)

sys.path.remove(golden_weights.FIXTURES)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(make_bit_golden.BIT_GOLDEN_JSON) as f:
  GOLDEN = json.load(f)


def rel_err(ours, ref):
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape
  return max(
    np.linalg.norm(ours - ref) / np.linalg.norm(ref), np.abs(ours - ref).max() / np.abs(ref).max()
  )


def abstract(model, size=32):
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def filled(tree, value=0.0):
  """Arrays of `value` in the shapes of an abstract tree."""
  return jax.tree.map(lambda s: np.full(s.shape, value, s.dtype), tree)


def narrow(**kwargs):
  """A test-only BiT net: widths 8-64 (x4 out), 16-channel stem, GroupNorm of 4 groups."""
  fields = dict(
    stage_sizes=(1, 2, 1, 1),
    block_cls=PreActBottleneck,
    num_classes=7,
    widths=(8, 16, 32, 64),
    stem='bit',
    stem_width=16,
    norm='group',
    gn_groups=4,
    weight_std_eps=BIT_WS_EPSILON,
  )
  return ResNet(**{**fields, **kwargs})


def golden_state_dict():
  """The golden weights, keyed by our own mapping's timm keys (checked against timm's)."""
  model = create_model(GOLDEN['name'], num_classes=GOLDEN['num_classes'])
  zeros = filled(abstract(model))
  keys = [(k, v.shape) for k, v in torch_keys.to_torchvision(zeros, bit=True).items()]
  assert make_bit_golden.keys_digest(keys) == GOLDEN['keys_sha256'], 'not timm keys and shapes'
  return make_bit_golden.keyed_state_dict(keys, GOLDEN['seed'])


def golden_input():
  rng = np.random.default_rng(GOLDEN['input_seed'])
  return rng.standard_normal(GOLDEN['input_shape']).astype(np.float32)


# ----------------------------------------------------------------------------- the architecture


@pytest.mark.parametrize('name', sorted(GOLDEN['param_counts']))
def test_parameter_counts_equal_timms(name):
  """timm's counts (1000 classes), recorded by make_bit_golden.py, for all 12 depth x width."""
  params = abstract(create_model(name, scan=True))['params']
  assert count_params(params) == GOLDEN['param_counts'][name]


def test_names():
  spec = parse_name('resnetv2_101x3_bit')
  assert (spec.family, spec.depth, spec.block, spec.variant, spec.widen) == (
    'imagenet',
    101,
    'bottleneck',
    'bit',
    3,
  )
  for bad in ('resnetv2_34x1_bit', 'resnetv2_50x5_bit', 'resnetv2_200x1_bit'):
    with pytest.raises(ValueError, match='Big Transfer nets are'):
      parse_name(bad)
  with pytest.raises(ValueError, match='bottleneck'):
    parse_name('resnetv2_50x1_bit', block='basic')


def test_structure_is_bits():
  model = create_model('resnetv2_50x3_bit', num_classes=5)
  variables = abstract(model)
  assert set(variables) == {'params'}  # GroupNorm: no running statistics
  p = variables['params']
  assert model.widths == (192, 384, 768, 1536) and model.block_cls.preact
  assert p['conv1']['kernel'].shape == (7, 7, 3, 192)  # stem: the conv alone (no norm)
  assert not any(k in p for k in ('bn1', 'stem_conv1'))
  first = p['layer1_0']  # has its own pre-activation norm (the stem has none) and a projection
  assert first['bn1']['scale'].shape == (192,)
  assert first['downsample_conv']['kernel'].shape == (1, 1, 192, 768)
  assert 'downsample_bn' not in first  # projected from the pre-activated input, no norm
  assert 'downsample_conv' not in p['layer1_1'] and 'downsample_conv' in p['layer2_0']
  assert p['layer2_0']['conv2']['kernel'].shape == (3, 3, 384, 384)
  assert p['bn_final']['scale'].shape == (3 * 2048,)
  assert p['fc']['kernel'].shape == (3 * 2048, 5)


def test_the_stride_is_on_the_3x3_and_the_projection_strides():
  """Intercepted convs of layer2_0: the 1x1 reduce keeps the size, the 3x3 halves it."""
  model = create_model('resnetv2_50x1_bit', num_classes=3)
  seen = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, nn.Conv) and context.module.path[0] == 'layer2_0':
      seen[context.module.name] = (args[0].shape[1], out.shape[1])
    return out

  with nn.intercept_methods(record):
    abstract(model, 64)
  assert seen == {'conv1': (16, 16), 'conv2': (16, 8), 'conv3': (8, 8), 'downsample_conv': (16, 8)}


def test_group_norm_is_torchs():
  """Per example, channels in contiguous groups (torch's group_norm), biased variance, eps 1e-5."""
  x = np.random.default_rng(0).normal(0.2, 0.01, (2, 3, 3, 8)).astype(np.float32)  # var ~ eps
  norm = narrow(gn_groups=2)._norm(True, False)(name='n')
  scale = np.linspace(0.5, 1.5, 8).astype(np.float32)
  bias = np.linspace(-1, 1, 8).astype(np.float32)
  y = norm.apply({'params': {'scale': scale, 'bias': bias}}, jnp.asarray(x))
  g = x.reshape(2, 3, 3, 2, 4).astype(np.float64)
  ref = (g - g.mean((1, 2, 4), keepdims=True)) / np.sqrt(g.var((1, 2, 4), keepdims=True) + 1e-5)
  assert np.abs(np.asarray(y) - (ref.reshape(x.shape) * scale + bias)).max() < 1e-5


def test_weight_standardisation_per_output_channel():
  k = np.random.default_rng(1).normal(0.3, 2.0, (3, 3, 4, 5)).astype(np.float32)
  w = np.asarray(layers.standardize_kernel(jnp.asarray(k), 1e-8))
  ref = (k - k.mean((0, 1, 2))) / np.sqrt(k.var((0, 1, 2)) + 1e-8)  # biased (ddof=0)
  assert np.abs(w - ref).max() < 1e-5
  # the conv sees the standardised kernel: invariant to each output channel's offset and scale
  conv = layers.conv(5, 3, name='c', weight_std_eps=1e-8)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 6, 6, 4)), jnp.float32)
  a = conv.apply({'params': {'kernel': k}}, x)
  b = conv.apply({'params': {'kernel': 3.0 * k + np.arange(5.0, dtype=np.float32)}}, x)
  plain = layers.conv(5, 3, name='c').apply({'params': {'kernel': ref.astype(np.float32)}}, x)
  assert np.abs(np.asarray(a) - np.asarray(b)).max() < 1e-4
  assert np.abs(np.asarray(a) - np.asarray(plain)).max() < 1e-4


@pytest.mark.parametrize('path', [{'space_to_depth': True}, {'loop_friendly': True}])
def test_weight_standardisation_composes_with_the_rewritten_convs(path):
  """The GPU stem's space-to-depth conv and the CPU scan's loop-friendly one see the standardised
  kernel too (values and gradients as lax's conv)."""
  stride = 2 if 'space_to_depth' in path else 1
  k = np.random.default_rng(3).normal(0.1, 1.0, (7, 7, 3, 4)).astype(np.float32)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 15, 15, 3)), jnp.float32)

  def run(**kw):
    conv = layers.conv(4, 7, stride, name='c', weight_std_eps=1e-8, **kw)
    f = lambda k, x: jnp.sum(jnp.sin(conv.apply({'params': {'kernel': k}}, x)))
    return f(k, x), jax.grad(f, argnums=(0, 1))(k, x)

  (a, ga), (b, gb) = run(**path), run()
  assert abs(float(a - b)) < 1e-4 * abs(float(b))
  for u, v in zip(ga, gb):
    assert rel_err(u, v) < 1e-4


def test_stem_pads_with_zeros_before_an_unpadded_max_pool():
  """timm's 'fixed' stem: ConstantPad2d(1, 0) + MaxPool2d(3, 2): a zero wins the border windows
  of a negative map (a -inf pad, as torch's own max-pool padding, would give -1 there)."""

  class Stem(nn.Module):
    @nn.compact
    def __call__(self, x):
      fake_conv = lambda *a, **k: lambda x: x[:, ::2, ::2, :] - 1.0  # 7x7/2 stand-in: all -1
      return stems.apply_stem('bit', x, 1, conv=fake_conv, norm=None, preact=True)

  y = np.asarray(Stem().apply({}, jnp.zeros((1, 12, 12, 1))))[0, :, :, 0]
  assert y.shape == (3, 3)  # 6 -> pad 8 -> (8 - 3) // 2 + 1
  assert (y[0] == 0).all() and (y[:, 0] == 0).all() and y[1, 1] == -1.0


def test_norm_option_on_any_net():
  """GroupNorm + weight standardisation on resnet50: the same parameters (scale / bias per
  channel either way), no batch_stats."""
  v = abstract(create_model('resnet50', norm='group', weight_standardization=True))
  assert set(v) == {'params'} and count_params(v['params']) == 25_557_032


@pytest.mark.parametrize(
  'kwargs, needle',
  [
    ({'bn_group_size': 32}, 'bn_group_size=32 configures BatchNorm'),
    ({'frozen_bn': True}, 'frozen_bn=True'),
    ({'frozen_bn_affine': True}, 'frozen_bn_affine=True'),
    ({'norm': 'batch'}, 'contradicts it'),
    ({'weight_standardization': False}, 'contradicts it'),
    ({'stride_on': '1x1'}, "stride_on='1x1'"),
    ({'stem': 'deep'}, "stem='deep'"),
    ({'avg_down': True}, 'avg_down=True'),
    ({'shortcut': 'A'}, "shortcut='A'"),  # a CIFAR ablation's option: BiT's weights need B
    ({'shortcut': 'C'}, "shortcut='C'"),
    ({'residual': False}, 'residual=False contradicts it'),
    ({'groups': 32}, 'groups=1; groups=32 contradicts it'),
    ({'norm': 'layer'}, 'norm must be one of batch, group'),
  ],
)
def test_refusals(kwargs, needle):
  with pytest.raises(ValueError, match=needle.replace('(', r'\(')):
    create_model('resnetv2_50x1_bit', **kwargs)


def test_precise_bn_is_refused_for_a_group_norm_net():
  model = narrow()
  variables = filled(abstract(model))
  with pytest.raises(ValueError, match='no BatchNorm statistics'):
    precise_bn.precise_batch_stats(model, variables, iter([]), None, num_batches=1)


# ---------------------------------------------------------------------------- training, restore


def train_step(accum_steps=1):
  """(state, one SGD step of the narrow net, a batch of 4 random 16x16 images)."""
  import optax

  from resnet_jax.train_step import batch_sharding, create_mesh

  mesh = create_mesh(jax.devices()[:1])
  state = init_state(narrow(num_classes=4), optax.sgd(0.1), (16, 16, 3), seed=0, mesh=mesh)
  sharding = jax.tree.map(lambda x: x.sharding, state)
  step = jit_train_step(mesh, sharding, optax.constant_schedule(0.1), accum_steps=accum_steps)
  rng = np.random.default_rng(0)
  batch = {
    'image': rng.normal(size=(4, 16, 16, 3)).astype(np.float32),
    'label': rng.integers(0, 4, size=4).astype(np.int32),
  }
  return state, step, {k: jax.device_put(v, batch_sharding(mesh)) for k, v in batch.items()}


def test_a_train_step_updates_params_and_keeps_no_batch_stats():
  state, step, batch = train_step()
  assert state.batch_stats == {}
  before = jax.tree.map(np.array, state.params)  # the step donates the state
  new, metrics = step(state, batch)
  assert np.isfinite(float(metrics['loss'])) and int(new.step) == 1
  assert new.batch_stats == {}
  moved = jax.tree.map(
    lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), new.params, before
  )
  assert min(jax.tree.leaves(moved)) > 0  # every parameter (GroupNorm's too) gets a gradient


def test_gradient_accumulation_is_exact_and_allowed_for_group_norm():
  """No batch statistics: micro-batches give the one-pass gradient, so the config check that
  refuses accumulation with whole-batch BN lets a BiT net through (and still refuses resnet50)."""
  from resnet_jax import validation
  from resnet_jax.default_config import load_sibling_config

  state, one, batch = train_step()
  a = one(state, batch)[0].params
  state, two, batch = train_step(accum_steps=2)
  b = two(state, batch)[0].params
  assert max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), a, b))) < 1e-5

  imagenet = load_sibling_config(os.path.join(ROOT, 'configs', 'x.py'), 'imagenet')
  config = imagenet.get_config('recipe=torchvision')
  config.update_from_flattened_dict(
    {
      'model.name': 'resnetv2_50x1_bit',
      'grad_accum_steps': 2,
      'batch_size': 8,
      'data.repeated_augmentations': 1,
    }
  )
  validation.validate_config(config)
  config.model.name = 'resnet50'
  with pytest.raises(validation.ConfigError, match='whole-batch BN statistics'):
    validation.validate_config(config)


def test_converted_weights_save_and_load_without_batch_stats(tmp_path):
  model = narrow()
  variables = filled(abstract(model), 1.0)
  pretrained.save_model_variables(tmp_path / 'ckpt', variables)
  loaded = pretrained.load_model_variables(tmp_path / 'ckpt')
  assert loaded['batch_stats'] == {} and jax.tree.structure(loaded['params']) == jax.tree.structure(
    variables['params']
  )
  merged, reinit = pretrained.merge_pretrained(variables, loaded)
  assert reinit == [] and set(merged) == {'params'}
  assert checkpointing.flatten(merged).keys() == checkpointing.flatten(variables).keys()


# ------------------------------------------------------------------------------- timm's weights


def test_golden_timm_logits():
  """timm's eval-mode logits (timm 1.0.31) of resnetv2_50x1_bit, weights rebuilt with numpy."""
  sd = golden_state_dict()
  assert len(sd) == GOLDEN['num_keys']
  x = jnp.asarray(golden_input())
  variables = convert.from_torchvision(sd, GOLDEN['name'], scan=True)
  assert set(variables) == {'params'}
  model = create_model(GOLDEN['name'], num_classes=GOLDEN['num_classes'], scan=True)
  assert rel_err(model.apply(variables, x), GOLDEN['logits']) < 1e-4


def test_timm_keys_round_trip_and_wrong_arch_hints():
  sd = golden_state_dict()
  variables = convert.from_torchvision(sd, 'resnetv2_50x1_bit')
  back = torch_keys.to_torchvision(variables, bit=True)
  assert back.keys() == sd.keys()
  assert all(np.array_equal(back[k], sd[k]) for k in sd)
  assert back['head.fc.weight'].shape == (10, 2048, 1, 1)  # timm's 1x1 conv head
  with pytest.raises(ValueError, match='is --arch resnetv2_50x1_bit'):
    convert.from_torchvision(sd, 'resnet50')
  with pytest.raises(ValueError, match='shape mismatches'):
    convert.from_torchvision(sd, 'resnetv2_50x3_bit')
  tv = torch_keys.to_torchvision(filled(abstract(create_model('resnet50'))))
  with pytest.raises(ValueError, match='torchvision-style keys'):
    convert.from_torchvision(tv, 'resnetv2_50x1_bit')


def test_summary(capsys):
  summary.main(['resnetv2_50x1_bit', '--json'])
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out['params'] == GOLDEN['param_counts']['resnetv2_50x1_bit']
  assert (out['stem'], out['norm'], out['preact'], out['widths']) == (
    'bit',
    'group',
    True,
    [64, 128, 256, 512],
  )
  # resnet50 v1.5's convolutions exactly (the 7x7 stem, 3x3-strided bottlenecks, the same head):
  # only the norms, the weight standardisation and the pad before the pool differ
  assert out['macs'] == summary.analyze(create_model('resnet50'), 224)['macs']


# ------------------------------------------------------------------------------ live, with timm


@pytest.fixture(scope='module')
def timm(torch):
  """timm, importable once torchvision's pure-Python parts are (make_torch_golden's note)."""
  if importlib.util.find_spec('torchvision') is None or importlib.util.find_spec('timm') is None:
    pytest.skip('timm / torchvision are not installed (pip install --no-deps timm==1.0.*)')
  sys.path.insert(0, golden_weights.FIXTURES)
  try:
    from make_torch_golden import importable_torchvision
  finally:
    sys.path.remove(golden_weights.FIXTURES)
  importable_torchvision()
  import timm

  return timm


def timm_narrow(timm, torch):
  """timm's ResNetV2 as its resnetv2_*_bit entry points build it, narrow (narrow() here)."""
  import functools

  from timm.layers import GroupNormAct, StdConv2d
  from timm.models.resnetv2 import ResNetV2

  torch.manual_seed(0)
  return ResNetV2(
    layers=[1, 2, 1, 1],
    channels=(32, 64, 128, 256),
    stem_chs=16,
    num_classes=7,
    stem_type='fixed',
    conv_layer=functools.partial(StdConv2d, eps=1e-8),
    norm_layer=functools.partial(GroupNormAct, num_groups=4),
  ).eval()


def test_live_timm_parity_narrow(timm, torch):
  model = timm_narrow(timm, torch)
  with torch.no_grad():  # random norms: every GroupNorm's affine counts
    for m in model.modules():
      if isinstance(m, torch.nn.GroupNorm):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.2)
  x = np.random.default_rng(5).normal(size=(2, 35, 35, 3)).astype(np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  ours = narrow()
  variables = _map_timm(sd, ours)
  assert rel_err(ours.apply(variables, jnp.asarray(x)), ref) < 1e-4


def _map_timm(sd, model):
  sd = dict(sd)

  def leaf(keypath, s):
    names = [k.key for k in keypath]
    value = torch_keys._to_flax_layout(sd.pop(torch_keys.bit_torch_key(names[0], names[1:])), names)
    assert value.shape == s.shape
    return value

  variables = jax.tree_util.tree_map_with_path(leaf, abstract(model))
  assert not sd, sorted(sd)  # every timm tensor used
  return variables


def test_live_timm_resnetv2_50x1_bit(timm, torch):
  """The registered net itself, timm's init (its GroupNorms at 1 / 0: weights random only)."""
  torch.manual_seed(1)
  model = timm.create_model('resnetv2_50x1_bit', num_classes=5).eval()
  x = np.random.default_rng(6).normal(size=(1, 33, 33, 3)).astype(np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  variables = convert.from_torchvision(sd, 'resnetv2_50x1_bit', scan=True)
  ours = create_model('resnetv2_50x1_bit', num_classes=5, scan=True)
  assert rel_err(ours.apply(variables, jnp.asarray(x)), ref) < 1e-4


def test_live_std_conv_and_group_norm_act(timm, torch):
  """timm's layers one by one: StdConv2d(eps=1e-8) (stride 2) and GroupNormAct(32 groups)."""
  from timm.layers import GroupNormAct, StdConv2d

  torch.manual_seed(2)
  conv = StdConv2d(6, 8, 3, stride=2, eps=1e-8).eval()
  x = np.random.default_rng(7).normal(size=(1, 9, 9, 6)).astype(np.float32)
  with torch.no_grad():
    ref = conv(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
  ours = layers.conv(8, 3, 2, name='c', weight_std_eps=1e-8)
  kernel = conv.weight.detach().numpy().transpose(2, 3, 1, 0)
  assert rel_err(ours.apply({'params': {'kernel': kernel}}, jnp.asarray(x)), ref) < 1e-5

  gn = GroupNormAct(64, num_groups=32).eval()
  with torch.no_grad():
    gn.weight.uniform_(0.5, 1.5)
    gn.bias.normal_(0.0, 0.2)
  y = np.random.default_rng(8).normal(1.0, 2.0, size=(2, 5, 5, 64)).astype(np.float32)
  with torch.no_grad():
    ref = gn(torch.from_numpy(y.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
  norm = narrow(gn_groups=32)._norm(False, False)(name='n')
  params = {'scale': gn.weight.detach().numpy(), 'bias': gn.bias.detach().numpy()}
  assert rel_err(nn.relu(norm.apply({'params': params}, jnp.asarray(y))), ref) < 1e-5


# ------------------------------------------------------------------------- the CLIs, end to end


@pytest.mark.slow
def test_convert_cli_and_predict_on_timms_safetensors(tmp_path, capsys):
  from PIL import Image
  from safetensors.numpy import save_file

  from resnet_jax import predict

  path = str(tmp_path / 'model.safetensors')
  save_file(golden_state_dict(), path)
  convert.main(
    ['--arch', GOLDEN['name'], '--torchvision-weights', path, '--out', str(tmp_path / 'c')]
  )
  assert f'wrote {GOLDEN["name"]} (23,' in capsys.readouterr().out  # 25.5 M - 990 classes' head
  variables = pretrained.load_model_variables(str(tmp_path / 'c'))
  model = create_model(GOLDEN['name'], num_classes=GOLDEN['num_classes'])
  assert rel_err(model.apply(variables, jnp.asarray(golden_input())), GOLDEN['logits']) < 1e-4
  image = tmp_path / 'image.png'
  Image.fromarray(np.random.default_rng(9).integers(0, 256, (40, 50, 3), np.uint8)).save(image)
  args = ['--arch', GOLDEN['name'], '--image-size', '32', str(image)]
  predict.main(['--torchvision-weights', path, *args])
  direct = capsys.readouterr().out.splitlines()
  predict.main(['--checkpoint', str(tmp_path / 'c'), *args])
  assert direct == capsys.readouterr().out.splitlines() and len(direct) == 5


@pytest.mark.slow
def test_training_resumes_and_evaluates(tmp_path):
  """The README's smoke run: 2 steps of resnetv2_50x1_bit on synthetic data, then a resumed 3rd,
  then evaluate; a BatchNorm option on the GroupNorm net is one error line."""
  from tests import runner

  workdir = str(tmp_path / 'w')
  args = [
    '--config.model.name=resnetv2_50x1_bit',
    '--config.data.name=synthetic',
    '--config.batch_size=4',
    '--config.data.image_size=32',
    '--config.data.eval_image_size=32',
    '--config.eval_batch_size=8',
    '--config.data.eval_crops=1',
  ]
  config = 'configs/imagenet.py:recipe=torchvision'
  run = lambda *more: runner.run_main(
    workdir, *args, *more, config=config, devices=1, fast_compile=True
  )
  runner.assert_ok(run('--config.num_train_steps=2'))
  assert runner.finished_checkpoints(workdir) == [2]
  resumed = runner.assert_ok(run('--config.num_train_steps=3'))
  assert 'resuming from' in resumed.stderr and runner.results(workdir)['step'] == 3
  # imagenet.py's 1000 classes: timm's count
  assert runner.results(workdir)['params'] == GOLDEN['param_counts']['resnetv2_50x1_bit']
  out = runner.run_evaluate(workdir, fast_compile=True)
  assert out['num_examples'] == 32 and out['step'] == 3
  bad = runner.run_main(
    str(tmp_path / 'x'), *args, config='configs/imagenet.py', devices=1
  )  # the paper recipe's ghost BN (groups of 32)
  runner.assert_one_line_error(bad, 'bn_group_size=32 configures BatchNorm')


def test_predict_feeds_bit_weights_the_inputs_they_were_trained_on():
  """timm's resnetv2_*_bit configs normalise with mean = std = 0.5 ([-1, 1] pixels), torchvision's
  and most timm weights with ImageNet's mean/std: predict picks by name, --normalize overrides."""
  from PIL import Image

  from resnet_jax import predict

  assert predict.default_normalization('resnetv2_50x1_bit') == 'inception'
  assert predict.default_normalization('resnet50') == 'imagenet'
  assert predict.default_normalization('no_such_net') == 'imagenet'  # refused when built
  pixels = np.zeros((8, 8, 3), np.uint8)
  pixels[:4] = 255
  image = Image.fromarray(pixels)
  bit = predict.preprocess(image, 8, 8, normalize='inception')
  assert bit.min() == -1.0 and bit.max() == 1.0
  tv = predict.preprocess(image, 8, 8)
  np.testing.assert_allclose(tv[0, 0], (1 - predict.IMAGENET_MEAN) / predict.IMAGENET_STD, 1e-6)
  args = predict.build_parser().parse_args(['--arch', 'resnet50', '--checkpoint', 'x', 'a.jpg'])
  assert args.normalize is None  # so the name decides
