"""Model family: exact parameter counts, options, ghost BatchNorm, sharding invariance, dtypes."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax.models import BatchNorm, create_model, parse_name, shortcut
from resnet_jax.models.layers import conv_kernel_init, space_to_depth_conv


def rng(seed=0):
  """XLA's RngBitGenerator key: compiles in a fraction of threefry's time on CPU."""
  return jax.random.key(seed, impl='rbg')


def normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def abstract_variables(model, image_size):
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def n_params(variables):
  return sum(int(np.prod(l.shape)) for l in jax.tree.leaves(variables['params']))


@functools.cache
def _init(model, batch, size, seed):
  x = normal((batch, size, size, 3), seed)
  return jax.jit(lambda x: model.init(rng(1), x, train=False))(x), x


def init_tiny(model, batch=8, size=8, seed=0):
  """Real init on a tiny input: jitted (one compile instead of hundreds of eager op compiles) and
  cached per model, so tests that differ only in BN grouping or dtype share one compilation."""
  return _init(model.clone(bn_group_size=None, dtype=jnp.dtype(jnp.float32)), batch, size, seed)


@functools.cache
def _jitted_apply(model, options):
  kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in options}
  return jax.jit(functools.partial(model.apply, **kwargs))


def run(model, variables, x, **kwargs):
  """``model.apply`` under jit with static keyword options (compiled once per model and options)."""
  options = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))
  return _jitted_apply(model, options)(variables, x)


@pytest.mark.parametrize(
  'name,expected',
  [
    ('resnet18', 11_689_512),
    ('resnet34', 21_797_672),
    ('resnet50', 25_557_032),
    ('resnet101', 44_549_160),
    ('resnet152', 60_192_808),
    ('resnet20', 269_722),
    ('resnet32', 464_154),
    ('resnet44', 658_586),
    ('resnet56', 853_018),
    ('resnet110', 1_727_962),
    ('resnet1202', 19_421_274),
  ],
)
def test_parameter_counts_match_torchvision_and_paper(name, expected):
  size = 32 if parse_name(name).family == 'cifar' else 224
  assert n_params(abstract_variables(create_model(name), size)) == expected
  assert n_params(abstract_variables(create_model(name, scan=True), size)) == expected


@pytest.mark.parametrize('name,size', [('resnet34', 224), ('resnet50', 224), ('resnet20', 32)])
def test_plain_equals_option_a_and_c_gt_b_gt_a(name, size):
  count = lambda **kw: n_params(abstract_variables(create_model(name, **kw), size))
  a, b, c = count(shortcut='A'), count(shortcut='B'), count(shortcut='C')
  plain = n_params(abstract_variables(create_model(name.replace('resnet', 'plain')), size))
  assert plain == a == count(residual=False, shortcut='C')
  assert c > b > a


def test_name_registry_and_defaults():
  assert parse_name('resnet50').family == 'imagenet'
  assert parse_name('cifar_resnet50').family == 'cifar'
  assert parse_name('resnet8')[:4] == ('cifar', 8, True, 'basic')
  assert parse_name('plain1202')[:4] == ('cifar', 1202, False, 'basic')
  assert parse_name('resnet50')[:4] == ('imagenet', 50, True, 'bottleneck')
  m = create_model('plain34')
  assert (m.residual, m.shortcut, m.stride_on, m.num_classes) == (False, 'B', '3x3', 1000)
  m = create_model('resnet110')
  assert (m.residual, m.shortcut, m.num_classes, m.stage_sizes) == (True, 'A', 10, (18, 18, 18))
  v = abstract_variables(create_model('resnet18', num_classes=7), 64)
  assert v['params']['fc']['kernel'].shape == (512, 7)
  assert set(v) == {'params', 'batch_stats'}


@pytest.mark.parametrize(
  'bad', ['resnet21', 'resnet19', 'resnet2', 'resnet0', 'resnet', 'vgg16', 'ResNet50']
)
def test_unknown_name_lists_valid_forms(bad):
  with pytest.raises(ValueError, match=r'resnet\{6n\+2\}.*plain<N>') as e:
    create_model(bad)
  assert 'resnet152' in str(e.value) and repr(bad) in str(e.value)


def test_invalid_options_raise():
  for kw in [dict(shortcut='D'), dict(stride_on='2x2'), dict(bn_group_size=0)]:
    with pytest.raises(ValueError):
      create_model('resnet20', **kw)
  with pytest.raises(ValueError, match='plain'):
    create_model('plain20', zero_init_last_bn=True)


def test_parameter_names_follow_torchvision_scheme():
  v = abstract_variables(create_model('resnet50'), 64)
  p, s = v['params'], v['batch_stats']
  assert set(p) == {'conv1', 'bn1', 'fc'} | {
    f'layer{i}_{j}' for i, n in zip(range(1, 5), (3, 4, 6, 3)) for j in range(n)
  }
  block = {'conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3'}
  assert set(p['layer2_0']) == block | {'downsample_conv', 'downsample_bn'}
  assert set(p['layer2_1']) == block
  assert p['layer2_0']['conv2']['kernel'].shape == (3, 3, 128, 128)
  assert set(p['bn1']) == {'scale', 'bias'} and set(s['bn1']) == {'mean', 'var'}
  # Pre-activation: bare-conv projections and a final BN.
  v = abstract_variables(create_model('resnet20', preact=True, shortcut='B'), 32)
  assert 'bn_final' in v['params'] and 'bn1' not in v['params']
  assert set(v['params']['layer2_0']) == {'bn1', 'conv1', 'bn2', 'conv2', 'downsample_conv'}


def _preact_cifar_bottleneck_params(depth, num_classes=10):
  """He et al. 2016's CIFAR bottleneck net counted from its description, independently of the
  model code: conv 3x3x16 stem; three stages of (depth-2)/9 units with bottleneck widths 16/32/64
  and outputs 4x that; each unit BN-conv1x1, BN-conv3x3, BN-conv1x1 (BN: scale + bias); a bare
  1x1 projection where the width or resolution changes; final BN, dense."""
  n, total, c = (depth - 2) // 9, 3 * 3 * 3 * 16, 16
  weights_only = total
  for stage, m in enumerate((16, 32, 64)):
    for unit in range(n):
      convs = c * m + 9 * m * m + m * 4 * m
      if c != 4 * m or (stage > 0 and unit == 0):
        convs += c * 4 * m
      total += convs + 2 * (c + m + m)
      weights_only += convs
      c = 4 * m
  head = c * num_classes + num_classes
  return total + 2 * c + head, weights_only + head


@pytest.mark.parametrize('depth,paper_millions', [(164, 1.7), (1001, 10.2)])
def test_preact_cifar_bottleneck_counts_match_architecture_and_paper(depth, paper_millions):
  """He et al. 2016, Table 3: ResNet-164 has 1.7M and ResNet-1001 10.2M parameters; the paper
  counts conv and dense weights (ours also has BN scale/bias, which it leaves out)."""
  model = create_model(f'resnet{depth}', block='bottleneck', preact=True)
  assert model.stage_sizes == ((depth - 2) // 9,) * 3 and model.shortcut == 'B'
  total, weights_only = _preact_cifar_bottleneck_params(depth)
  assert n_params(abstract_variables(model, 32)) == total
  assert round(weights_only / 1e6, 1) == paper_millions


def test_cifar_bottleneck_names_and_errors():
  assert parse_name('resnet1001', 'bottleneck')[:4] == ('cifar', 1001, True, 'bottleneck')
  assert parse_name('resnet164')[:4] == (
    'cifar',
    164,
    True,
    'basic',
  )  # 6*27+2: the block is explicit
  assert parse_name('plain164', 'bottleneck').residual is False
  with pytest.raises(ValueError, match="block='bottleneck'"):
    create_model('resnet1001')  # 9n+2 only: the error says what to pass
  with pytest.raises(ValueError, match='contradicts'):
    create_model('resnet50', block='basic')
  for bad in [dict(name='resnet26', block='bottleneck'), dict(name='resnet20', block='wide')]:
    with pytest.raises(ValueError, match='block'):
      create_model(**bad)
  assert create_model('resnet11', block='bottleneck', shortcut='A').shortcut == 'A'


@pytest.mark.parametrize('preact,shortcut', [(True, 'B'), (False, 'A')])
def test_tiny_cifar_bottleneck_forward(preact, shortcut):
  """One unit per stage (resnet11): 16 -> 64 -> 128 -> 256 channels, both shortcut kinds."""
  model = create_model('resnet11', block='bottleneck', preact=preact, shortcut=shortcut)
  variables, x = init_tiny(model)
  logits, state = run(
    model, variables, x, train=False, capture_intermediates=True, mutable=['intermediates']
  )
  inter = state['intermediates']
  assert [inter[f'layer{s}_0']['__call__'][0].shape[-1] for s in (1, 2, 3)] == [64, 128, 256]
  assert logits.shape == (8, 10) and bool(jnp.all(jnp.isfinite(logits)))
  assert ('downsample_conv' in variables['params']['layer1_0']) == (shortcut == 'B')


def test_he_fan_out_init():
  k = conv_kernel_init(rng(), (3, 3, 64, 512))
  assert float(jnp.std(k)) == pytest.approx(np.sqrt(2.0 / (9 * 512)), rel=0.02)


def test_tiny_forward_train_and_eval():
  model = create_model('resnet8')
  variables, x = init_tiny(model)
  logits, updates = run(model, variables, x, train=True, mutable=['batch_stats'])
  assert logits.shape == (8, 10) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))
  old, new = variables['batch_stats']['bn1']['mean'], updates['batch_stats']['bn1']['mean']
  assert not np.allclose(old, new)
  eval_logits = run(model, {**variables, **updates}, x, train=False)
  assert eval_logits.shape == (8, 10)


def test_bfloat16_keeps_params_stats_and_logits_float32():
  model = create_model('resnet8', preact=True, shortcut='B', dtype=jnp.bfloat16)
  variables, x = init_tiny(model)
  abstract = jax.eval_shape(lambda x: model.init(rng(), x, train=False), x)
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(abstract))
  logits, updates = run(model, variables, x, train=True, mutable=['batch_stats'])
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(updates))
  assert logits.dtype == jnp.float32
  ref, _ = run(
    create_model('resnet8', preact=True, shortcut='B'),
    variables,
    x,
    train=True,
    mutable=['batch_stats'],
  )
  np.testing.assert_allclose(logits, ref, atol=0.1 * float(jnp.abs(ref).max()) + 1e-2)


def test_zero_init_last_bn_makes_blocks_identity():
  model = create_model('resnet8', zero_init_last_bn=True)
  variables, x = init_tiny(model)
  assert not np.any(variables['params']['layer1_0']['bn2']['scale'])
  _, inter = run(
    model, variables, x, train=False, capture_intermediates=True, mutable=['intermediates']
  )
  inter = inter['intermediates']
  stem_out = jax.nn.relu(inter['bn1']['__call__'][0])
  np.testing.assert_allclose(inter['layer1_0']['__call__'][0], stem_out, atol=1e-6)


def test_intermediates_expose_bn_output_before_relu_and_addition():
  """Fig. 7 analysis reads BN outputs after 3x3 convs; the block output is relu(bn2 + input)."""
  model = create_model('resnet8')
  variables, x = init_tiny(model)
  _, state = run(
    model, variables, x, train=False, capture_intermediates=True, mutable=['intermediates']
  )
  inter = state['intermediates']
  block_in = jax.nn.relu(inter['bn1']['__call__'][0])
  bn2 = inter['layer1_0']['bn2']['__call__'][0]
  assert bn2.shape == (8, 8, 8, 16) and float(bn2.min()) < 0  # pre-ReLU response
  np.testing.assert_allclose(
    inter['layer1_0']['__call__'][0], jax.nn.relu(bn2 + block_in), atol=1e-5
  )


def _outputs(model):
  variables, x = init_tiny(model)
  _, state = run(
    model, variables, x, train=False, capture_intermediates=True, mutable=['intermediates']
  )
  inter = state['intermediates']
  return variables, lambda *path: functools.reduce(lambda d, k: d[k], path, inter)['__call__'][0]


def test_preact_shortcuts_read_the_right_input():
  """First unit after the bare CIFAR stem shares its BN-ReLU with the shortcut; so does the
  option-A shortcut of a unit that changes shape (fb.resnet.torch 'both_preact', He et al. 2016)."""
  _, out = _outputs(create_model('resnet8', preact=True))
  np.testing.assert_allclose(
    out('layer1_0'), out('layer1_0', 'conv2') + jax.nn.relu(out('layer1_0', 'bn1')), atol=1e-5
  )
  sub = jax.nn.relu(out('layer2_0', 'bn1'))[:, ::2, ::2, :]
  expected = out('layer2_0', 'conv2') + jnp.pad(sub, ((0, 0), (0, 0), (0, 0), (0, 16)))
  np.testing.assert_allclose(out('layer2_0'), expected, atol=1e-5)
  assert out('fc').shape == (8, 10) and out('bn_final').shape[-1] == 64


def test_preact_identity_shortcut_of_a_shape_keeping_unit_reads_the_raw_sum():
  _, out = _outputs(create_model('resnet14', preact=True))
  np.testing.assert_allclose(out('layer2_1'), out('layer2_1', 'conv2') + out('layer2_0'), atol=1e-5)


def test_preact_projection_of_a_shape_keeping_unit_reads_the_preactivated_input():
  """Option C projects on every unit; a projection (like any shortcut of a unit that changes
  shape) reads the unit's BN-ReLU'd input, not the raw sum (fb.resnet.torch 'both_preact')."""
  variables, out = _outputs(create_model('resnet14', preact=True, shortcut='C'))
  kernel = variables['params']['layer2_1']['downsample_conv']['kernel'][0, 0]
  pre = jax.nn.relu(out('layer2_1', 'bn1'))
  np.testing.assert_allclose(
    out('layer2_1'), out('layer2_1', 'conv2') + jnp.einsum('nhwc,co->nhwo', pre, kernel), atol=1e-5
  )


def test_preact_net_ends_with_bn_relu_before_the_pool():
  """He et al. 2016, Sec. 4.1: the last unit's sum is not activated, so the net adds a final
  BN + ReLU; the classifier sees the global average of that ReLU'd response."""
  variables, out = _outputs(create_model('resnet8', preact=True))
  fc = variables['params']['fc']
  pooled = jnp.mean(jax.nn.relu(out('bn_final')), axis=(1, 2))
  np.testing.assert_allclose(out('fc'), pooled @ fc['kernel'] + fc['bias'], atol=1e-5)


def test_imagenet_preact_stem_is_the_first_units_preactivation():
  """conv-BN-ReLU-maxpool stem, then a first unit with no BN-ReLU of its own (fb.resnet.torch
  preresnet 'no_preact'): no BN-ReLU applied twice. Later units pre-activate themselves."""
  model = create_model('resnet18', preact=True).clone(widths=(4, 4, 8, 8), stage_sizes=(2, 1, 1, 1))
  variables, out = _outputs(model)
  p = variables['params']
  assert 'bn1' in p and 'bn1' not in p['layer1_0'] and 'bn1' in p['layer1_1']
  stem = nn.max_pool(jax.nn.relu(out('bn1')), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  np.testing.assert_allclose(out('layer1_0'), out('layer1_0', 'conv2') + stem, atol=1e-5)
  full = abstract_variables(create_model('resnet50', preact=True), 64)['params']
  assert 'bn1' not in full['layer1_0'] and set(full['layer1_0']) >= {'conv1', 'downsample_conv'}


def test_cifar_bottleneck_strides_its_first_1x1_imagenet_keeps_3x3():
  """He et al. 2016's CIFAR bottleneck code strides the first 1x1 conv; ImageNet stays v1.5."""
  model = create_model('resnet11', block='bottleneck')
  assert model.stride_on == '1x1' and create_model('resnet50').stride_on == '3x3'
  assert create_model('resnet11', block='bottleneck', stride_on='3x3').stride_on == '3x3'
  _, out = _outputs(model)
  assert out('layer2_0', 'conv1').shape[1:3] == (4, 4)  # 8x8 input halved by the 1x1
  assert out('layer2_0', 'conv2').shape[1:3] == (4, 4)


def _bn_apply(x, group_size, variables=None, momentum=0.5):
  bn = BatchNorm(use_running_average=False, group_size=group_size, momentum=momentum)
  variables = variables or bn.init(rng(), x)
  return run(bn, variables, x, mutable=['batch_stats'])


def test_batchnorm_whole_batch_matches_reference():
  """Normalised with the biased batch variance; running statistics move by (1 - momentum):
  new = momentum * old + (1 - momentum) * batch (momentum 0.9: the old value keeps 90 %)."""
  x = 3.0 + 2.0 * normal((6, 4, 4, 5))
  y, upd = _bn_apply(x, None, momentum=0.9)
  xn = np.asarray(x, np.float64)
  mean, var = xn.mean((0, 1, 2)), xn.var((0, 1, 2))
  np.testing.assert_allclose(y, (xn - mean) / np.sqrt(var + 1e-5), atol=1e-4)
  np.testing.assert_allclose(upd['batch_stats']['mean'], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(upd['batch_stats']['var'], 0.9 + 0.1 * var, rtol=1e-5)


def test_ghost_batchnorm_normalises_each_group_separately():
  x = normal((8, 3, 3, 4)) * jnp.arange(1.0, 9.0)[:, None, None, None]
  y, upd = _bn_apply(x, 2)
  means, variances = [], []
  for g in range(4):
    yg, ug = _bn_apply(x[2 * g : 2 * g + 2], None)
    np.testing.assert_allclose(y[2 * g : 2 * g + 2], yg, atol=1e-5)
    means.append(ug['batch_stats']['mean'])
    variances.append(ug['batch_stats']['var'])
  np.testing.assert_allclose(upd['batch_stats']['mean'], np.mean(means, 0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(upd['batch_stats']['var'], np.mean(variances, 0), rtol=1e-5)
  whole, _ = _bn_apply(x, None)
  assert not np.allclose(y, whole, atol=1e-2)


def test_ghost_batchnorm_rejects_indivisible_batch():
  with pytest.raises(ValueError, match='group_size=4 must divide the batch size 6'):
    _bn_apply(jnp.ones((6, 2, 2, 3)), 4)
  small, _ = _bn_apply(jnp.arange(24.0).reshape(2, 2, 2, 3), 4)  # smaller than a group: one group
  np.testing.assert_allclose(small, _bn_apply(jnp.arange(24.0).reshape(2, 2, 2, 3), None)[0])
  model = create_model('resnet8', bn_group_size=3)
  variables, x = init_tiny(model)
  with pytest.raises(ValueError, match='group_size'):
    run(model, variables, x, train=True, mutable=['batch_stats'])


def test_batchnorm_bfloat16_statistics_in_float32():
  x = (100.0 + normal((16, 4, 4, 3))).astype(jnp.bfloat16)
  bn = BatchNorm(use_running_average=False, dtype=jnp.bfloat16)
  variables = bn.init(rng(), x)
  y, upd = run(bn, variables, x, mutable=['batch_stats'])
  assert y.dtype == jnp.bfloat16 and upd['batch_stats']['var'].dtype == jnp.float32
  assert float(jnp.std(y.astype(jnp.float32))) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize(
  'size,kernel,padding',
  [
    ((15, 15), 7, ((3, 3), (3, 3))),
    ((9, 12), 7, ((3, 3), (3, 3))),
    ((8, 7), 3, ((1, 1), (0, 2))),
    ((9, 8), 4, ((1, 0), (1, 0))),
  ],
)
def test_space_to_depth_stem_conv_is_the_strided_conv(size, kernel, padding):
  """The stem's stride-2 conv on 2x2 blocks: the same output and both gradients as lax's conv,
  for odd and even sides and asymmetric padding; a stride-1 conv falls back unchanged."""
  x = normal((2, *size, 3))
  w = normal((kernel, kernel, 3, 4), seed=1)
  dn = ('NHWC', 'HWIO', 'NHWC')
  ref = lambda x, w: jax.lax.conv_general_dilated(x, w, (2, 2), padding, dimension_numbers=dn)
  ours = lambda x, w: space_to_depth_conv(x, w, (2, 2), padding, dimension_numbers=dn)
  assert ours(x, w).shape == ref(x, w).shape
  np.testing.assert_allclose(ours(x, w), ref(x, w), atol=1e-4)
  side = (kernel + 1) // 2  # the kernel padded to even sides, in 2x2 blocks
  assert f'{side},{side},12,4' in str(jax.make_jaxpr(ours)(x, w))
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  for a, b in zip(jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(ref), (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
  unstrided = space_to_depth_conv(x, w, (1, 1), padding, dimension_numbers=dn)
  np.testing.assert_array_equal(
    unstrided, jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=dn)
  )


def test_imagenet_stem_uses_space_to_depth_off_the_cpu(monkeypatch):
  """On a GPU/TPU the 7x7/2 stem runs as a 4x4 conv on 12 channels (3.5-4 % faster ResNet-50 step
  on an H100); on the CPU, where it measured 2.2x slower, as the plain conv. Same parameters."""
  from resnet_jax.models import layers

  model = create_model('resnet18', num_classes=10)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  blocked = lambda: '4,4,12,64' in str(jax.make_jaxpr(model.apply)(variables, x))
  assert not blocked()
  monkeypatch.setattr(layers.jax, 'default_backend', lambda: 'gpu')
  assert blocked()
  assert jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x) == variables


def test_shortcut_a_subsamples_and_zero_pads():
  x = normal((2, 4, 4, 3))
  y = shortcut(x, 5, 2, kind='A', conv=None, norm=None)
  np.testing.assert_array_equal(y[..., :3], x[:, ::2, ::2, :])
  assert y.shape == (2, 2, 2, 5) and not np.any(y[..., 3:])
  assert shortcut(x, 3, 1, kind='A', conv=None, norm=None) is x


@pytest.mark.parametrize('group_size', [2, None])
def test_sharding_over_four_devices_does_not_change_outputs(group_size):
  devices = jax.devices()
  assert len(devices) == 4, 'tests/conftest.py should simulate 4 CPU devices'
  model = create_model('resnet8', bn_group_size=group_size, shortcut='B')
  variables, x = init_tiny(model)

  @jax.jit
  def step(variables, x):
    return run(model, variables, x, train=True, mutable=['batch_stats'])

  ref_logits, ref_stats = step(variables, x)
  mesh = Mesh(np.array(devices), ('data',))
  xs = jax.device_put(x, NamedSharding(mesh, P('data')))
  vs = jax.device_put(variables, NamedSharding(mesh, P()))
  logits, stats = step(vs, xs)
  assert len(xs.sharding.device_set) == 4 and len(logits.sharding.device_set) == 4
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats, ref_stats
  )


@pytest.mark.parametrize('num_classes', [0, -3, 2.5])
def test_a_head_without_classes_is_one_clear_error(num_classes):
  """0 was a ZeroDivisionError and -3 a TypeError from inside the initialiser."""
  with pytest.raises(ValueError, match='num_classes must be a positive int or None'):
    create_model('resnet8', num_classes=num_classes)


def test_bn_momentum_and_epsilon_reach_the_models_batchnorms():
  """`config.model.bn_momentum` / `bn_epsilon` (create_model's) are the BN layers' own: with the
  initial statistics (mean 0, var 1) eval normalises by sqrt(1 + eps), and a training step moves
  the running mean by (1 - momentum) of the batch mean."""
  model = create_model('resnet8', bn_epsilon=3.0, bn_momentum=0.25)
  variables, x = init_tiny(model)
  _, inter = run(
    model, variables, x, train=False, capture_intermediates=True, mutable=['intermediates']
  )
  conv = inter['intermediates']['conv1']['__call__'][0]
  np.testing.assert_allclose(inter['intermediates']['bn1']['__call__'][0], conv / 2.0, atol=1e-5)
  _, upd = run(model, variables, x, train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(
    upd['batch_stats']['bn1']['mean'], 0.75 * np.mean(conv, axis=(0, 1, 2)), rtol=1e-4, atol=1e-6
  )


@pytest.mark.parametrize(
  'name, preact', [('resnet50', False), ('resnet50', True), ('resnet18', True)]
)
def test_zero_init_last_bn_zeroes_every_residual_branch(name, preact):
  """Goyal et al. 2017: the BN that ends each residual branch starts with scale 0 (bottleneck:
  bn3; pre-activation: the BN before the last conv), so every shape-keeping unit starts as the
  identity (post-activation: relu of its already non-negative input)."""
  model = create_model(name, zero_init_last_bn=True, preact=preact)
  model = model.clone(widths=(4, 4, 8, 8), stage_sizes=(2, 1, 1, 1))
  _, out = _outputs(model)
  np.testing.assert_allclose(out('layer1_1'), out('layer1_0'), atol=1e-6)


@pytest.mark.parametrize('kernel, dilation', [(3, 1), (7, 1), (1, 1), (3, 2)])
def test_convs_pad_symmetrically_like_torch(kernel, dilation):
  """Every conv pads dilation * (k // 2) on both sides (torch's padding=k // 2), never 'SAME',
  which pads 0 before and 1 after on an even input at stride 2 and shifts the feature map by
  half a pixel against torchvision's weights. Checked at stride 2 on an even side."""
  from resnet_jax.models import layers

  x = normal((2, 8, 8, 3))
  conv = layers.conv(4, kernel, 2, name='c', dilation=dilation)
  variables = conv.init(rng(), x)
  pad = dilation * (kernel // 2)
  want = jax.lax.conv_general_dilated(
    x,
    variables['params']['kernel'],
    (2, 2),
    ((pad, pad), (pad, pad)),
    rhs_dilation=(dilation, dilation),
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )
  np.testing.assert_allclose(conv.apply(variables, x), want, atol=1e-5)
