"""Building blocks of the U-Net, written for speed on XLA CPU as well as GPU/TPU.

XLA's transposed convolution and reduce-window max-pool are slow on CPU (NOTES.md:
~80x and ~4x slower than the forms below), so the U-Net upsamples with one matmul
followed by depth-to-space and pools with reshape + max.
"""

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


def conv_native(x: jnp.ndarray, kernel: jnp.ndarray, strides: Sequence[int]) -> jnp.ndarray:
    """N-d convolution with symmetric ``k // 2`` padding (XLA's conv)."""
    nd = x.ndim - 2
    spatial = "DHW"[-nd:] if nd <= 3 else None
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        tuple(strides),
        [(k // 2, k // 2) for k in kernel.shape[:nd]],
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
    )


def conv3d_depth_folded(x: jnp.ndarray, kernel: jnp.ndarray, strides: Sequence[int]) -> jnp.ndarray:
    """3D convolution as one 2D convolution: depth taps stacked on channels, depth on batch.

    ``[B, D, H, W, C]`` -> the ``kd`` depth-shifted (and depth-strided) slabs concatenated
    on channels ``[B * D_out, H, W, kd * C]`` -> 2D conv with the kernel reshaped to
    ``[kh, kw, kd * C, F]``. Mathematically identical to ``conv_native``; on XLA CPU its
    forward + backward is 4-75x faster (3D convs there are not well optimised;
    ``benchmarks/conv3d_cpu.py``).
    """
    kd, kh, kw, cin, cout = kernel.shape
    batch, depth = x.shape[:2]
    sd = strides[0]
    pad = kd // 2
    xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0), (0, 0), (0, 0))) if pad else x
    d_out = (depth + 2 * pad - kd) // sd + 1
    slabs = [xp[:, dz : dz + sd * (d_out - 1) + 1 : sd] for dz in range(kd)]
    folded = jnp.concatenate(slabs, axis=-1) if kd > 1 else slabs[0]
    folded = folded.reshape(batch * d_out, *x.shape[2:4], kd * cin)
    kernel2d = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh, kw, kd * cin, cout)
    y = conv_native(folded, kernel2d, strides[1:])
    return y.reshape(batch, d_out, *y.shape[1:])


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
