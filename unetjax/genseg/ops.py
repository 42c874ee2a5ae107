"""Shared low-level ops of the GenSeg models: N-d convolutions with explicit padding,
the candidate stride-2 up/down operations and their fused forms, and instance norm.

Channel-last throughout (``[B, *spatial, C]``, kernels ``[*k, C_in, C_out]``); one code
path for 2D and 3D.

Candidate ops (``CANDIDATES``: kernel/padding 4/1, 6/2, 8/3), PyTorch semantics:

- down: ``Conv(k, stride 2, padding p)`` maps n -> (n + 2p - k) / 2 + 1 = n / 2 (n even);
- up: ``ConvTranspose(k, stride 2, padding p)`` maps n -> 2(n - 1) - 2p + k = 2n.

Reference forms (``down_reference`` / ``up_reference``) are XLA convolutions: the up op is
a correlation of the 2x-dilated input (``lhs_dilation``) with padding ``k - 1 - p``
(== ``jax.lax.conv_transpose(x, w, (2,)*d, [(k-1-p, k-1-p)]*d)``; PyTorch's
``ConvTranspose`` is the same with the kernel flipped, irrelevant when training from
scratch). XLA's dilated convolution is slow on CPU (NOTES.md), and a softmax-weighted
mixture of linear ops on one input is itself one linear op, so the models use fused
forms by default:

- ``down_fused``: every candidate kernel embedded (zero-filled) in one window covering all
  of their taps, weighted by softmax(alpha), one stride-2 convolution;
- ``up_fused``: the sub-pixel form of a stride-2 transposed convolution: each candidate
  kernel is rearranged into a stride-1 kernel with ``2^d * C_out`` outputs (one group
  per output parity), the candidates summed with their weights, one stride-1
  convolution, then depth-to-space. No multiplications by the dilation zeros.

Both are exactly the reference mixture (tests check it numerically).
"""

import contextlib
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unetjax.models.layers import conv3d_depth_folded, depth_to_space

CANDIDATES: tuple[tuple[int, int], ...] = ((4, 1), (6, 2), (8, 3))  # (kernel, padding)
DEFAULT_OP: tuple[tuple[int, int], ...] = ((4, 1),)  # pix2pix's fixed op


def fast_rng():
    """Context: threefry in its non-partitionable form while tracing random ops.

    On XLA CPU (jax 0.10.2) every ``jax.random`` call site costs ~2.5 s of compile time in
    the default partitionable form and ~0.2 s in this one (a small U-Net's ``init``:
    16 s -> 1.5 s). Values differ from the default mode (same quality). Random arrays are
    then not generated shard-locally under SPMD; GenSeg's are tiny (augmentation
    parameters, dropout masks). Falls back to a no-op where the option is gone.
    """
    option = getattr(jax, "threefry_partitionable", None)
    return option(False) if option is not None else contextlib.nullcontext()


def _dimension_numbers(nd: int):
    spatial = "DHW"[-nd:]
    return (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")


def _out_sizes(spatial, kernel_shape, strides, padding):
    return [
        (n + lo + hi - k) // st + 1
        for n, k, st, (lo, hi) in zip(spatial, kernel_shape, strides, padding, strict=True)
    ]


def conv_im2col(x, kernel, strides, padding):
    """Convolution as one matmul over the stacked shifted (strided) slices of the input."""
    nd = x.ndim - 2
    ksize = kernel.shape[:nd]
    xp = jnp.pad(x, [(0, 0), *padding, (0, 0)])
    out = _out_sizes(x.shape[1:-1], ksize, strides, padding)
    cols = []
    for offs in itertools.product(*[range(k) for k in ksize]):
        idx = tuple(
            slice(o, o + st * (n - 1) + 1, st) for o, st, n in zip(offs, strides, out, strict=True)
        )
        cols.append(xp[(slice(None), *idx)])
    patches = jnp.concatenate(cols, axis=-1) if len(cols) > 1 else cols[0]
    return patches @ kernel.reshape(-1, kernel.shape[-1])


IM2COL_MAX_OUTPUTS = 63  # output voxels per image below which im2col is used (CPU, auto)
IM2COL_MAX_TAPS = 128


def conv_nd(
    x: jnp.ndarray,
    kernel: jnp.ndarray,
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    impl: str = "auto",
) -> jnp.ndarray:
    """Convolution (cross-correlation) with explicit ``(lo, hi)`` padding per axis.

    ``impl``: ``"native"`` (XLA's conv), ``"folded"`` (3D as a depth-folded 2D conv: the
    depth taps stacked on channels, depth on batch, see
    ``unetjax.models.layers.conv3d_depth_folded``), ``"im2col"`` (one matmul over shifted
    slices) or ``"auto"``. Auto on CPU: im2col where the output is tiny (< 64 voxels per
    image, <= 128 taps: XLA CPU's conv is pathologically slow there, e.g. 5x5 on 4x4
    with 128 -> 256 channels: 36 ms vs 0.7 ms forward, 50 vs 1.9 ms forward+backward),
    else folded for 3D, native for 2D; native everywhere on other backends.
    """
    nd = x.ndim - 2
    strides, padding = tuple(strides), [tuple(p) for p in padding]
    if impl == "auto":
        impl = "native"
        if jax.default_backend() == "cpu":
            out = _out_sizes(x.shape[1:-1], kernel.shape[:nd], strides, padding)
            taps = int(np.prod(kernel.shape[:nd]))
            if int(np.prod(out)) <= IM2COL_MAX_OUTPUTS and taps <= IM2COL_MAX_TAPS:
                impl = "im2col"
            elif nd == 3:
                impl = "folded"
    if impl == "im2col":
        return conv_im2col(x, kernel, strides, padding)
    if impl == "native" or nd != 3:
        return jax.lax.conv_general_dilated(
            x, kernel, strides, padding, dimension_numbers=_dimension_numbers(nd)
        )
    if impl != "folded":
        raise ValueError(f"conv impl must be auto, native, folded or im2col; got {impl!r}")
    return conv3d_depth_folded(x, kernel, strides, padding)


# ----------------------------------------------------------------------------- reference


def down_reference(x: jnp.ndarray, kernel: jnp.ndarray, padding: int) -> jnp.ndarray:
    """Stride-2 conv with kernel ``k`` and symmetric padding ``p`` (n -> n/2)."""
    nd = x.ndim - 2
    return conv_nd(x, kernel, (2,) * nd, [(padding, padding)] * nd, impl="native")


def up_reference(x: jnp.ndarray, kernel: jnp.ndarray, padding: int) -> jnp.ndarray:
    """Stride-2 transposed conv, kernel ``k``, padding ``p`` (n -> 2n), via lhs_dilation."""
    nd = x.ndim - 2
    pad = kernel.shape[0] - 1 - padding
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (1,) * nd,
        [(pad, pad)] * nd,
        lhs_dilation=(2,) * nd,
        dimension_numbers=_dimension_numbers(nd),
    )


def mixed_reference(x, kernels, weights, candidates, direction: str, conv_impl=None):
    """The textbook DARTS mixed op: ``sum_c weights[c] * op_c(x)`` (XLA convs)."""
    op = up_reference if direction == "up" else down_reference
    out = 0.0
    for c, (kernel, (_, pad)) in enumerate(zip(kernels, candidates, strict=True)):
        out = out + weights[c] * op(x, kernel, pad)
    return out


# ----------------------------------------------------------------------------- fused


def _down_window(candidates) -> tuple[int, int]:
    """(lowest tap offset, window size) covering every candidate's taps ``-p .. k-1-p``."""
    lo = min(-p for _, p in candidates)
    hi = max(k - 1 - p for k, p in candidates)
    return lo, hi - lo + 1


def down_fused(x, kernels, weights, candidates, conv_impl="auto") -> jnp.ndarray:
    """Mixture of stride-2 convs as one stride-2 conv with the weighted embedded kernels."""
    nd = x.ndim - 2
    lo, size = _down_window(candidates)
    total = 0.0
    for c, (kernel, (k, p)) in enumerate(zip(kernels, candidates, strict=True)):
        start = -p - lo
        pads = [(start, size - start - k)] * nd + [(0, 0), (0, 0)]
        total = total + weights[c] * jnp.pad(kernel, pads)
    # output n/2 needs lo_pad + hi_pad = size - 2 (n even)
    return conv_nd(x, total, (2,) * nd, [(-lo, size - 2 + lo)] * nd, impl=conv_impl)


def _up_half_window(candidates) -> int:
    """Half-size of the sub-pixel window: tap offsets ``(r + j - (k-1-p)) / 2`` in +-half."""
    half = 0
    for k, p in candidates:
        big_p = k - 1 - p
        for r in range(2):
            for j in range(k):
                if (r + j - big_p) % 2 == 0:
                    half = max(half, abs((r + j - big_p) // 2))
    return half


def subpixel_kernel(kernel: jnp.ndarray, padding: int, half: int) -> jnp.ndarray:
    """Transposed-conv kernel ``[k]*d + [Cin, Cout]`` -> stride-1 kernel
    ``[2*half+1]*d + [Cin, 2^d * Cout]`` whose depth-to-space output equals ``up_reference``.

    Per axis, output ``2i + r`` of the reference op is ``sum_j w[j] x[i + (r + j - P)/2]``
    over ``j`` with ``r + j - P`` even (``P = k - 1 - p``); so window tap ``s`` (offset
    ``s - half``) of parity ``r`` takes ``w[2 (s - half) + P - r]`` (zero if out of range).
    """
    nd = kernel.ndim - 2
    k = kernel.shape[0]
    big_p = k - 1 - padding
    size = 2 * half + 1
    w = kernel
    for axis in reversed(range(nd)):  # last first: the new parity axis lands at ``axis``
        parts = []
        for r in range(2):
            j0 = big_p - r - 2 * half  # kernel index of window tap 0; step 2
            lo, hi = max(0, -j0), max(0, j0 + 2 * (size - 1) - (k - 1))
            pads = [(0, 0)] * w.ndim
            pads[axis] = (lo, hi)
            wp = jnp.pad(w, pads)
            start = j0 + lo
            parts.append(jax.lax.slice_in_dim(wp, start, start + 2 * (size - 1) + 1, 2, axis))
        w = jnp.stack(parts, axis=axis)
    cin, cout = kernel.shape[-2:]  # w: [2, size] * nd + [cin, cout]
    order = [2 * a + 1 for a in range(nd)] + [2 * nd] + [2 * a for a in range(nd)] + [2 * nd + 1]
    return w.transpose(order).reshape(*(size,) * nd, cin, 2**nd * cout)


def up_fused(x, kernels, weights, candidates, conv_impl="auto") -> jnp.ndarray:
    """Mixture of stride-2 transposed convs as one stride-1 conv + depth-to-space."""
    nd = x.ndim - 2
    half = _up_half_window(candidates)
    total = 0.0
    for c, (kernel, (_, p)) in enumerate(zip(kernels, candidates, strict=True)):
        total = total + weights[c] * subpixel_kernel(kernel, p, half)
    y = conv_nd(x, total, (1,) * nd, [(half, half)] * nd, impl=conv_impl)
    return depth_to_space(y, (2,) * nd)


def mixed_op(
    x, kernels, weights, candidates, direction: str, impl: str = "fused", conv_impl="auto"
):
    """Softmax-weighted candidate mixture, ``direction`` "up" (n -> 2n) or "down" (n -> n/2).

    ``impl``: "fused" (one conv, ``conv_nd`` with ``conv_impl``) or "reference"."""
    if direction not in ("up", "down"):
        raise ValueError(f"direction must be up or down; got {direction!r}")
    if impl == "reference":
        return mixed_reference(x, kernels, weights, candidates, direction)
    if impl != "fused":
        raise ValueError(f"mixed-op impl must be fused or reference; got {impl!r}")
    fn = up_fused if direction == "up" else down_fused
    return fn(x, kernels, weights, candidates, conv_impl)


# ----------------------------------------------------------------------------- norm


def instance_norm(x: jnp.ndarray, scale=None, bias=None, eps: float = 1e-5) -> jnp.ndarray:
    """Instance norm over the spatial axes, in at least float32 (float64 stays float64)."""
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    axes = tuple(range(1, x.ndim - 1))
    xf = x.astype(dtype)
    mean = xf.mean(axes, keepdims=True)
    var = jnp.square(xf - mean).mean(axes, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype)
