"""Building blocks of the U-Net, written for speed on XLA CPU as well as GPU/TPU.

XLA's transposed convolution and reduce-window max-pool are slow on CPU (NOTES.md:
~80x and ~4x slower than the forms below), so the U-Net upsamples with one matmul
followed by depth-to-space and pools with reshape + max.
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def depth_to_space(x: jnp.ndarray, factors: Sequence[int]) -> jnp.ndarray:
    """[B, *S, prod(f) * C] -> [B, *(S * f), C]; channel index = (offset..., c) row-major."""
    batch, *spatial, channels = x.shape
    nd = len(spatial)
    out_c = channels // int(np.prod(factors))
    x = x.reshape(batch, *spatial, *factors, out_c)
    # interleave spatial axis i with its factor axis: (B, s0, f0, s1, f1, ..., C)
    order = [0]
    for i in range(nd):
        order += [1 + i, 1 + nd + i]
    x = x.transpose(*order, 1 + 2 * nd)
    return x.reshape(batch, *(s * f for s, f in zip(spatial, factors, strict=True)), out_c)


def space_to_blocks(x: jnp.ndarray, factors: Sequence[int]) -> jnp.ndarray:
    """[B, *S, C] -> [B, *(S / f), *f, C]: each pooling window on its own axes."""
    batch, *spatial, channels = x.shape
    nd = len(spatial)
    for size, f in zip(spatial, factors, strict=True):
        if size % f:
            raise ValueError(f"spatial size {size} is not divisible by pooling factor {f}")
    shape = [batch]
    for size, f in zip(spatial, factors, strict=True):
        shape += [size // f, f]
    x = x.reshape(*shape, channels)
    order = [0, *range(1, 2 * nd, 2), *range(2, 2 * nd + 1, 2), 2 * nd + 1]
    return x.transpose(order)


def max_pool(x: jnp.ndarray, factors: Sequence[int]) -> jnp.ndarray:
    """Max-pool with window == stride as reshape + max (no reduce-window)."""
    nd = x.ndim - 2
    return space_to_blocks(x, factors).max(axis=tuple(range(1 + nd, 1 + 2 * nd)))


class UpsampleMatmul(nn.Module):
    """Transposed convolution with kernel == stride, as one matmul + depth-to-space.

    Mathematically identical to ``jax.lax.conv_transpose`` with kernel size == stride
    (see ``to_conv_transpose_kernel``); the kernel is stored as ``[C_in, prod(f) * C_out]``.
    """

    features: int
    factors: Sequence[int]
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        n = int(np.prod(self.factors))
        y = nn.Dense(
            n * self.features,
            use_bias=False,
            dtype=self.dtype,
            kernel_init=nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
            name="kernel",
        )(x)
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = depth_to_space(y, self.factors)
        return y + bias.astype(y.dtype)


def to_conv_transpose_kernel(kernel: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Matmul kernel [C_in, prod(f)*C_out] -> conv_transpose kernel [*f, C_in, C_out].

    ``jax.lax.conv_transpose(x, k, strides=f, padding="VALID")`` (default
    ``transpose_kernel=False``) with this kernel equals ``UpsampleMatmul``. That op
    correlates the dilated input with the kernel, hence the spatial flip.
    """
    c_in = kernel.shape[0]
    k = np.moveaxis(np.asarray(kernel).reshape(c_in, *factors, -1), 0, len(factors))
    return np.ascontiguousarray(k[tuple(slice(None, None, -1) for _ in factors)])


def symmetric_padding(kernel_spatial: Sequence[int]) -> list[tuple[int, int]]:
    """``(k // 2, k // 2)`` per axis: size-preserving for odd kernels at stride 1."""
    return [(k // 2, k // 2) for k in kernel_spatial]


def conv_native(
    x: jnp.ndarray,
    kernel: jnp.ndarray,
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]] | None = None,
) -> jnp.ndarray:
    """N-d convolution (XLA's conv); ``padding`` per axis, default ``symmetric_padding``."""
    nd = x.ndim - 2
    spatial = "DHW"[-nd:] if nd <= 3 else None
    if padding is None:
        padding = symmetric_padding(kernel.shape[:nd])
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        tuple(strides),
        [tuple(p) for p in padding],
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
    )


def _conv3d_input_folded(x, kernel, strides, padding):
    """Depth taps stacked on the input channels: one 2D conv to ``C_out``."""
    kd, kh, kw, cin, cout = kernel.shape
    sd = strides[0]
    xp = jnp.pad(x, ((0, 0), padding[0], (0, 0), (0, 0), (0, 0)))
    d_out = (xp.shape[1] - kd) // sd + 1
    slabs = [xp[:, dz : dz + sd * (d_out - 1) + 1 : sd] for dz in range(kd)]
    folded = jnp.concatenate(slabs, axis=-1) if kd > 1 else slabs[0]
    folded = folded.reshape(x.shape[0] * d_out, *x.shape[2:4], kd * cin)
    kernel2d = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh, kw, kd * cin, cout)
    y = conv_native(folded, kernel2d, strides[1:], padding[1:])
    return y.reshape(x.shape[0], d_out, *y.shape[1:])


def _conv3d_output_folded(x, kernel, strides, padding):
    """Depth taps stacked on the output channels (depth stride 1): one 2D conv of the
    unpadded input to ``kd * C_out``, then each output depth sums its ``kd`` shifted taps."""
    kd, kh, kw, cin, cout = kernel.shape
    batch, depth = x.shape[:2]
    lo, hi = padding[0]
    d_out = depth + lo + hi - kd + 1
    kernel2d = jnp.transpose(kernel, (1, 2, 3, 0, 4)).reshape(kh, kw, cin, kd * cout)
    z = conv_native(x.reshape(batch * depth, *x.shape[2:]), kernel2d, strides[1:], padding[1:])
    z = z.reshape(batch, depth, *z.shape[1:3], kd, cout)
    y = None  # pad each tap's valid slice, not z (padding all kd*C_out channels: 2-6x slower)
    for dz in range(kd):
        start = dz - lo  # input depth feeding output depth 0 through tap dz
        first, last = max(0, -start), min(d_out, depth - start)  # outputs with a real input
        if last <= first:
            continue
        part = z[:, first + start : last + start, :, :, dz]
        part = jnp.pad(part, ((0, 0), (first, d_out - last), (0, 0), (0, 0), (0, 0)))
        y = part if y is None else y + part
    if y is None:  # the padding leaves every output without a real input
        return jnp.zeros((batch, d_out, *z.shape[2:4], cout), z.dtype)
    return y


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _conv3d_depth_stride1(x, kernel, strides, padding):
    """Output-folded value; derivatives (forward and reverse) through the input-folded form."""
    return _conv3d_output_folded(x, kernel, strides, padding)


@_conv3d_depth_stride1.defjvp
def _depth_stride1_jvp(strides, padding, primals, tangents):
    (x, kernel), (x_dot, kernel_dot) = primals, tangents
    y = _conv3d_output_folded(x, kernel, strides, padding)
    # bilinear in (x, kernel): JAX transposes this for the reverse pass
    y_dot = _conv3d_input_folded(x_dot, kernel, strides, padding) + _conv3d_input_folded(
        x, kernel_dot, strides, padding
    )
    return y, y_dot


def conv3d_depth_folded(
    x: jnp.ndarray,
    kernel: jnp.ndarray,
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]] | None = None,
) -> jnp.ndarray:
    """3D convolution as one 2D convolution with the depth taps folded onto channels.

    Depth goes on the batch axis. Mathematically identical to ``conv_native`` (same
    ``padding`` rule); on XLA CPU it is far faster (3D convs there are not well optimised:
    forward + backward 4-75x, ``benchmarks/conv3d_cpu.py``). Two foldings:

    * input-folded: the ``kd`` depth-shifted (and depth-strided) slabs concatenated on the
      input channels ``[B * D_out, H, W, kd * C]``, kernel ``[kh, kw, kd * C, F]``;
    * output-folded (depth stride 1): the unshifted input through a 2D conv to
      ``kd * F`` channels, then each output depth sums its ``kd`` shifted taps. No
      ``kd``-times copy of the input: its forward is 1.1-3.8x faster per layer of the
      hippocampus U-Net (``benchmarks/conv3d_cpu.py``). Where ``C_in <= F`` its derivatives
      (a ``custom_jvp``, so forward and reverse mode both work) go through the input-folded
      form, measured faster to differentiate there; where ``C_in > F`` (a decoder's first
      conv, on skip + upsampled channels) autodiff of the output-folded form is faster:
      its backward builds the ``kd`` depth-shifted copies of the ``F``-channel output
      gradient instead of the ``C_in``-channel input (``benchmarks/conv3d_cpu.py``,
      forward + backward per layer).
    """
    strides = tuple(strides)
    padding = tuple(tuple(p) for p in (padding or symmetric_padding(kernel.shape[:3])))
    if strides[0] == 1 and kernel.shape[0] > 1:
        if kernel.shape[3] > kernel.shape[4]:  # the backward shifts the narrower gradient
            return _conv3d_output_folded(x, kernel, strides, padding)
        return _conv3d_depth_stride1(x, kernel, strides, padding)
    return _conv3d_input_folded(x, kernel, strides, padding)


class Conv(nn.Module):
    """Convolution with symmetric ``k // 2`` padding, kernel ``[*k, C_in, C_out]`` + bias.

    ``impl``: ``"native"`` (XLA's conv), ``"folded"`` (3D as a depth-folded 2D conv, see
    ``conv3d_depth_folded``) or ``"auto"`` (folded for 3D on CPU, native elsewhere). The
    parameters are the same for every impl, so checkpoints move between them.
    """

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int]
    dtype: jnp.dtype = jnp.float32
    impl: str = "auto"
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kernel = self.param(
            "kernel",
            nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
            (*self.kernel_size, x.shape[-1], self.features),
        )
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        impl = self.impl
        if impl == "auto":
            impl = "folded" if x.ndim == 5 and jax.default_backend() == "cpu" else "native"
        if impl == "folded" and x.ndim == 5:
            y = conv3d_depth_folded(x, kernel, self.strides)
        elif impl in ("native", "folded"):
            y = conv_native(x, kernel, self.strides)
        else:
            raise ValueError(f"conv impl must be auto, native or folded; got {self.impl!r}")
        if not self.use_bias:
            return y
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return y + bias.astype(y.dtype)


class ConvNormAct(nn.Module):
    """Conv -> InstanceNorm -> LeakyReLU(0.01), nnU-Net's basic block.

    The conv has no bias: instance norm subtracts the per-channel mean, so a bias there
    gets a zero gradient (in float arithmetic: noise, which Adam would amplify).

    Padding is symmetric ``k // 2`` per side (as PyTorch's nnU-Net), so a stride-s conv
    maps size n to n / s for n divisible by s. Params stay float32; compute in ``dtype``.
    """

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int]
    dtype: jnp.dtype = jnp.float32
    negative_slope: float = 0.01
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = Conv(
            self.features,
            tuple(self.kernel_size),
            tuple(self.strides),
            dtype=self.dtype,
            impl=self.conv_impl,
            use_bias=False,
            name="conv",
        )(x)
        x = instance_norm(x, self.param, self.features)
        return nn.leaky_relu(x, self.negative_slope)


def instance_norm(x: jnp.ndarray, param_fn, features: int, eps: float = 1e-5) -> jnp.ndarray:
    """Instance norm over spatial axes with affine scale/bias; statistics in float32."""
    axes = tuple(range(1, x.ndim - 1))
    xf = x.astype(jnp.float32)
    mean = xf.mean(axes, keepdims=True)
    var = jnp.square(xf - mean).mean(axes, keepdims=True)
    scale = param_fn("norm_scale", nn.initializers.ones, (features,))
    bias = param_fn("norm_bias", nn.initializers.zeros, (features,))
    y = (xf - mean) * (jnp.reciprocal(jnp.sqrt(var + eps)) * scale) + bias
    return y.astype(x.dtype)
