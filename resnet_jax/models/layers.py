"""Building pieces shared by all ResNet variants: convolution factory, BatchNorm, shortcuts.

Why a custom BatchNorm instead of ``flax.linen.BatchNorm``: the paper computes BN statistics per
GPU over 32 (ImageNet) or 64 (CIFAR) examples. We reproduce that with "ghost" batch norm
(``group_size``): statistics are computed over consecutive groups of ``group_size`` examples of the
*global* batch. Training runs under one ``jax.jit`` over a batch sharded along a mesh axis, so the
result is a pure function of the global batch and never depends on how it is split over devices.

Variables of :class:`BatchNorm` (names chosen to map 1:1 onto torch's ``BatchNorm2d``):
``params/scale`` (torch ``weight``), ``params/bias`` (``bias``), ``batch_stats/mean``
(``running_mean``), ``batch_stats/var`` (``running_var``); all float32 whatever the compute dtype.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
ModuleDef = Callable[..., nn.Module]

# He et al. 2015 init N(0, 2 / fan): fan_out (k*k*out_channels) as torchvision and fb.resnet.torch
# do; the paper's Caffe "msra" filler uses fan_in (k*k*in_channels). Equal wherever a conv keeps
# its width; they differ only on the convs that change it.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# torchvision's nn.Linear default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


_NHWC = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # flax's NHWC / HWIO / NHWC, as lax spells it
_DN = ('NHWC', 'HWIO', 'NHWC')


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _canonical_conv(x: jax.Array, w: jax.Array, padding: tuple) -> jax.Array:
  return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_DN)


def _canonical_conv_fwd(x, w, padding):
  return _canonical_conv(x, w, padding), (x, w)


def _canonical_conv_bwd(padding, res, dy):
  """Both gradients as forward convolutions in the canonical NHWC/HWIO layout."""
  x, w = res
  (lo_h, hi_h), (lo_w, hi_w) = padding
  k_h, k_w = w.shape[:2]
  # d/dx: correlate dy with the spatially flipped kernel, in/out channels swapped.
  w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
  dx_pad = ((k_h - 1 - lo_h, k_h - 1 - hi_h), (k_w - 1 - lo_w, k_w - 1 - hi_w))
  dx = jax.lax.conv_general_dilated(dy, w_t, (1, 1), dx_pad, dimension_numbers=_DN)
  # d/dw: channels of x as the batch, examples as the features, dy as a (H, W, N, O) kernel.
  dw = jax.lax.conv_general_dilated(
    x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), (1, 1), padding, dimension_numbers=_DN
  )
  return dx.astype(x.dtype), dw.transpose(1, 2, 0, 3).astype(w.dtype)


_canonical_conv.defvjp(_canonical_conv_fwd, _canonical_conv_bwd)


def _plain_nhwc(lhs, rhs, window_strides, padding, stride: tuple[int, int], options: dict) -> bool:
  """Whether a ``lax.conv_general_dilated`` call (keyword ``options`` as flax passes them) is the
  undilated, ungrouped NHWC/HWIO conv with explicit padding and `stride` that
  `loop_friendly_conv` and `space_to_depth_conv` rewrite; anything else goes to lax as it is."""
  known = ('lhs_dilation', 'rhs_dilation', 'dimension_numbers', 'feature_group_count', 'precision')
  dn = options.get('dimension_numbers')
  return (
    tuple(window_strides) == stride
    and options.get('feature_group_count', 1) == 1
    and all(
      d in (None, 1) or tuple(d) == (1, 1)
      for d in (options.get('lhs_dilation'), options.get('rhs_dilation'))
    )
    and all(v is None for k, v in options.items() if k not in known)
    and not isinstance(padding, str)
    and dn is not None
    and tuple(map(tuple, jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dn))) == _NHWC
  )


def loop_friendly_conv(lhs, rhs, window_strides, padding, **options):
  """``lax.conv_general_dilated`` whose gradients are themselves canonical forward convolutions.

  Why: XLA:CPU rewrites the backward convolutions (weight gradient f01b_i01o->01bf, input
  gradient with a reversed kernel) into its fast layout only outside loops; inside a ``scan``
  body they run on a naive path, 5-50x slower (measured; jax-ml/jax#12868 is the forward-pass
  cousin). Stride-1, undilated, ungrouped NHWC convs (all a scanned block has) take this path;
  anything else falls back to ``lax.conv_general_dilated``.
  """
  plain = _plain_nhwc(lhs, rhs, window_strides, padding, (1, 1), options)
  if options.get('precision') is not None or not plain:
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **options)
  return _canonical_conv(lhs, rhs, tuple(tuple(int(v) for v in p) for p in padding))


def space_to_depth_conv(lhs, rhs, window_strides, padding, **options):
  """A stride-2 NHWC convolution computed as a stride-1 one on 2x2 space-to-depth blocks.

  Why: the ImageNet stem (7x7/2 on 3 channels) is a poor fit for tensor cores, whose kernels pad
  the 3 input channels to 8 and waste most of each 7x7 tap. Rearranged, it is a 4x4/1 convolution
  on 12 channels with the same weights (zero-padded to 8x8): the same sums, fewer padded lanes
  (MLPerf's TPU ResNet uses the same transform). The parameter keeps its 7x7x3xO shape, so
  checkpoints and torchvision weights are unchanged. Anything but a stride-2, undilated, ungrouped
  NHWC/HWIO conv with explicit padding falls back to ``lax.conv_general_dilated``.
  """
  if not _plain_nhwc(lhs, rhs, window_strides, padding, (2, 2), options):
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **options)
  k_h, k_w, c, o = rhs.shape
  ek_h, ek_w = k_h + k_h % 2, k_w + k_w % 2  # kernel padded to even sides (zero taps)
  pads = []
  for size, (lo, hi), k, ek in (
    (lhs.shape[1], padding[0], k_h, ek_h),
    (lhs.shape[2], padding[1], k_w, ek_w),
  ):
    out = (size + lo + hi - k) // 2 + 1
    # to the even length 2 * (out - 1) + ek (a negative high pad crops a row no window reads)
    pads.append((lo, 2 * (out - 1) + ek - size - lo, 0))
  x = jax.lax.pad(lhs, jnp.zeros((), lhs.dtype), ((0, 0, 0), pads[0], pads[1], (0, 0, 0)))
  n, h, w, _ = x.shape
  x = (
    x.reshape(n, h // 2, 2, w // 2, 2, c)
    .transpose(0, 1, 3, 2, 4, 5)
    .reshape(n, h // 2, w // 2, 4 * c)
  )
  k = jnp.pad(rhs, ((0, ek_h - k_h), (0, ek_w - k_w), (0, 0), (0, 0)))
  k = (
    k.reshape(ek_h // 2, 2, ek_w // 2, 2, c, o)
    .transpose(0, 2, 1, 3, 4, 5)
    .reshape(ek_h // 2, ek_w // 2, 4 * c, o)
  )
  return jax.lax.conv_general_dilated(
    x, k, (1, 1), 'VALID', dimension_numbers=_DN, precision=options.get('precision')
  )


def conv(
  features: int,
  kernel_size: int,
  strides: int = 1,
  *,
  name: str,
  dtype: Dtype = jnp.float32,
  groups: int = 1,
  dilation: int = 1,
  loop_friendly: bool | None = False,
  space_to_depth: bool | None = False,
  weight_std_eps: Optional[float] = None,
) -> nn.Conv:
  """A bias-free square convolution, symmetric padding ``dilation * (kernel_size // 2)``.

  ``groups``: grouped convolution (ResNeXt; torch ``groups``, flax ``feature_group_count``: the
  kernel is HW x (in / groups) x out). ``dilation``: atrous convolution (a backbone's output stride
  16 or 8, torchvision's ``replace_stride_with_dilation``), padded like torch's ``conv3x3``.

  ``padding='SAME'`` pads asymmetrically (0 before, 1 after) for even inputs with stride 2, which
  shifts every strided feature map by half a pixel relative to torch; explicit symmetric padding
  is what torchvision (and imported weights) expect. ``loop_friendly``: gradients through
  ``loop_friendly_conv`` (for convs inside a scan; same values); ``None``: only where the default
  backend is the CPU (on a GPU, cuDNN's own backward convolutions are the fast ones).
  ``space_to_depth``: a stride-2 conv through ``space_to_depth_conv`` (same values); ``None``: only
  off the CPU (it made an H100's ResNet-50 step 3.5-4 % faster; XLA:CPU runs it 2.2x slower).
  ``weight_std_eps``: a weight-standardised conv (``standardized_conv``, BiT's ``StdConv2d``) with
  that epsilon; the ``kernel`` parameter keeps its shape and name (None: a plain conv).
  """
  on_cpu = jax.default_backend() == 'cpu'
  if loop_friendly is None:
    loop_friendly = on_cpu
  if space_to_depth is None:
    space_to_depth = not on_cpu
  pad = dilation * (kernel_size // 2)
  conv_fn = loop_friendly_conv if loop_friendly else space_to_depth_conv if space_to_depth else None
  if weight_std_eps is not None:
    conv_fn = functools.partial(standardized_conv, eps=weight_std_eps, conv_fn=conv_fn)
  return nn.Conv(
    features,
    (kernel_size, kernel_size),
    strides=(strides, strides),
    padding=((pad, pad), (pad, pad)),
    kernel_dilation=(dilation, dilation),
    feature_group_count=groups,
    use_bias=False,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=conv_kernel_init,
    conv_general_dilated=conv_fn,
    name=name,
  )


def standardize_kernel(kernel: jax.Array, eps: float) -> jax.Array:
  """Weight standardisation (Qiao et al. 2019) of an HWIO kernel, as timm's ``StdConv2d``: each
  output channel's weights (over kh x kw x in / groups) minus their mean, over the square root of
  their biased variance + ``eps``; computed in float32, returned in the kernel's dtype."""
  w = kernel.astype(jnp.float32)
  mean = jnp.mean(w, axis=(0, 1, 2), keepdims=True)
  var = jnp.var(w, axis=(0, 1, 2), keepdims=True)  # two-pass and biased, as torch's batch_norm
  return ((w - mean) * jax.lax.rsqrt(var + eps)).astype(kernel.dtype)


def standardized_conv(lhs, rhs, window_strides, padding, *, eps: float, conv_fn=None, **options):
  """``conv_fn`` (None: ``lax.conv_general_dilated``) of ``lhs`` with the standardised kernel:
  BiT's convolution. The stored kernel stays raw, so imported weights are a transpose away."""
  conv_fn = conv_fn or jax.lax.conv_general_dilated
  return conv_fn(lhs, standardize_kernel(rhs, eps), window_strides, padding, **options)


class BatchNorm(nn.Module):
  """Batch normalisation over N, H, W with optional ghost groups of ``group_size`` examples.

  Statistics are computed in float32 in one pass (E[x^2] - E[x]^2, clamped at 0, as Flax does),
  so bfloat16 activations do not lose precision in the reduction. Running statistics use
  ``new = momentum * old + (1 - momentum) * batch_stat`` with the biased batch variance (Flax's
  convention; torch stores the unbiased one, which only matters during training, not when
  importing weights). With groups, the running statistics are updated with the mean over groups.
  A batch smaller than ``group_size`` forms a single group; any other batch size that is not a
  multiple of ``group_size`` raises ``ValueError``.

  ``frozen_affine``: no gradient reaches ``scale``/``bias`` (``stop_gradient``; with running
  statistics this is torchvision's ``FrozenBatchNorm2d``, the detection backbones' norm).
  """

  use_running_average: Optional[bool] = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  group_size: Optional[int] = None
  dtype: Dtype = jnp.float32
  scale_init: Callable[..., jax.Array] = nn.initializers.ones
  bias_init: Callable[..., jax.Array] = nn.initializers.zeros
  frozen_affine: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: Optional[bool] = None) -> jax.Array:
    use_running_average = nn.merge_param(
      'use_running_average', self.use_running_average, use_running_average
    )
    features = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    scale = self.param('scale', self.scale_init, (features,), jnp.float32)
    bias = self.param('bias', self.bias_init, (features,), jnp.float32)
    if self.frozen_affine:
      scale, bias = jax.lax.stop_gradient(scale), jax.lax.stop_gradient(bias)

    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
      y = _affine(x, mean, var, scale, bias, self.epsilon)
      return y.astype(self.dtype)

    batch = x.shape[0]
    # A batch smaller than one group (smoke runs, tiny debug batches) is a single group.
    group = batch if self.group_size is None else min(self.group_size, batch)
    if group <= 0 or batch % group:
      raise ValueError(
        f'BatchNorm group_size={self.group_size} must divide the batch size {batch} '
        '(ghost batch norm computes statistics over groups of exactly group_size examples).'
      )
    # (num_groups, group, ..., C): reduce over everything but the group and channel axes.
    xg = x.reshape((batch // group, group) + x.shape[1:])
    axes = tuple(range(1, xg.ndim - 1))
    xf = xg.astype(jnp.float32)
    mean = jnp.mean(xf, axis=axes, keepdims=True)
    mean2 = jnp.mean(jnp.square(xf), axis=axes, keepdims=True)
    var = jnp.maximum(0.0, mean2 - jnp.square(mean))

    if not self.is_initializing():
      flat = lambda s: jnp.mean(s.reshape(-1, features), axis=0)
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1.0 - m) * flat(mean)
      ra_var.value = m * ra_var.value + (1.0 - m) * flat(var)

    y = _affine(xg, mean, var, scale, bias, self.epsilon)
    return y.reshape(x.shape).astype(self.dtype)


def _affine(x, mean, var, scale, bias, epsilon):
  """(x - mean) / sqrt(var + eps) * scale + bias, folded into one multiply-add in float32."""
  mul = scale * jax.lax.rsqrt(var + epsilon)
  return x * mul + (bias - mean * mul)


def changes_shape(x: jax.Array, out_features: int, strides: int) -> bool:
  """Whether a block maps `x` to another resolution or width (where shortcuts A/B differ)."""
  return strides != 1 or x.shape[-1] != out_features


def shortcut(
  x: jax.Array,
  out_features: int,
  strides: int,
  *,
  kind: str,
  conv: ModuleDef,
  norm: Optional[ModuleDef],
  avg_down: bool = False,
  dilated: bool = False,
) -> jax.Array:
  """The paper's shortcut options for a block mapping ``x`` to ``out_features`` channels.

  A: identity; where the shape changes, strided subsampling + zero-padded extra channels
   (parameter-free). B: identity, projection (1x1 conv + BN) only where the shape changes.
  C: projection on every block. ``norm=None`` gives a bare conv projection (pre-activation blocks,
  whose next block normalises the sum anyway). Submodules: ``downsample_conv``, ``downsample_bn``.
  ``avg_down``: a projection pools first (``avg_pool_down``; ``dilated``: the block is in a stage
  dilated for output stride 16 / 8) and its conv has stride 1 (ResNet-D, He et al. 2019).
  """
  in_features = x.shape[-1]
  changes = changes_shape(x, out_features, strides)
  if kind == 'A':
    if not changes:
      return x
    if in_features > out_features:
      raise ValueError("shortcut 'A' can only add channels, not remove them")
    y = x[:, ::strides, ::strides, :]
    return jnp.pad(y, ((0, 0), (0, 0), (0, 0), (0, out_features - in_features)))
  if kind == 'B' and not changes:
    return x
  if kind not in ('B', 'C'):
    raise ValueError(f"unknown shortcut {kind!r}; expected 'A', 'B' or 'C'")  # names.SHORTCUTS
  if avg_down:
    x, strides = avg_pool_down(x, strides, dilated), 1
  y = conv(out_features, 1, strides, name='downsample_conv')(x)
  return y if norm is None else norm(name='downsample_bn')(y)


def avg_pool_down(x: jax.Array, strides: int, dilated: bool = False) -> jax.Array:
  """ResNet-D's pool before a projection's 1x1 conv, as timm's ``downsample_avg`` does it.

  Stride 2: 2x2 average pool with stride 2, ``ceil_mode=True``: an odd side's last window holds
  one row / column and averages only it (``count_include_pad=False``). Stride 1: nothing, except
  in a dilated stage (output stride 16 / 8), where timm pools 2x2 with stride 1 after padding one
  zero row and column at the bottom / right (its ``AvgPool2dSame``: the zeros count, divisor 4).
  """
  if strides == 1:
    if not dilated:
      return x
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return nn.avg_pool(x, (2, 2), strides=(1, 1), padding='VALID')
  pad = ((0, x.shape[1] % strides), (0, x.shape[2] % strides))
  return nn.avg_pool(x, (2, 2), strides=(strides, strides), padding=pad, count_include_pad=False)
