"""3D convolution on XLA CPU: native conv vs the depth-folded 2D forms.

    taskset -c 0 python benchmarks/conv3d_cpu.py   # one core, as in benchmarks/results/

Shapes are those of the hippocampus config's U-Net (batch 4, patch 32x48x32, features
8..64; the decoders' first convs take skip + upsampled channels, ``C_in = 2 F``). Prints per
layer shape, medians in one run:

1. forward + backward (``grad(sum(conv(x, w)**2))`` w.r.t. x and w): XLA's native conv vs
   ``conv3d_depth_folded`` (what the U-Net uses on CPU), and their ratio;
2. forward only, at depth stride 1: native, the input-folded form (depth taps
   concatenated on the input channels) and the output-folded form (one 2D conv to
   ``kd * C_out`` channels, shifted sum), the forward ``conv3d_depth_folded`` runs there;
3. forward + backward at depth stride 1: derivatives through the input-folded form (the
   ``custom_jvp`` ``conv3d_depth_folded`` uses where ``C_in <= F``) vs plain autodiff of
   the output-folded form (used where ``C_in > F``).
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from unetjax.models.layers import (
    _conv3d_depth_stride1,
    _conv3d_input_folded,
    _conv3d_output_folded,
    conv3d_depth_folded,
    conv_native,
    symmetric_padding,
)

SHAPES = [  # (spatial, c_in, c_out, stride)
    ((32, 48, 32), 1, 8, (1, 1, 1)),
    ((32, 48, 32), 8, 8, (1, 1, 1)),
    ((32, 48, 32), 8, 16, (2, 2, 2)),
    ((16, 24, 16), 16, 16, (1, 1, 1)),
    ((8, 12, 8), 32, 32, (1, 1, 1)),
    ((4, 6, 4), 64, 64, (1, 1, 1)),
    ((32, 48, 32), 16, 8, (1, 1, 1)),
    ((16, 24, 16), 32, 16, (1, 1, 1)),
    ((8, 12, 8), 64, 32, (1, 1, 1)),
]


def median_call_seconds(fn, *args, repeats: int = 5) -> float:
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))  # compile + warm-up excluded
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def median_seconds(fn, x, w, strides, repeats: int = 5) -> float:
    grad = jax.grad(lambda x, w: jnp.sum(fn(x, w, strides) ** 2), argnums=(0, 1))
    return median_call_seconds(grad, x, w, repeats=repeats)


def depth_stride1_layers(rng):
    """(spatial, c_in, c_out, strides, x, w, padding) of the SHAPES at depth stride 1."""
    for spatial, cin, cout, strides in SHAPES:
        if strides[0] == 1:
            x = jnp.asarray(rng.normal(size=(4, *spatial, cin)), jnp.float32)
            w = jnp.asarray(rng.normal(size=(3, 3, 3, cin, cout)) * 0.1, jnp.float32)
            yield spatial, cin, cout, strides, x, w, tuple(symmetric_padding(w.shape[:3]))


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    print(
        f"{'input':>22} {'cin':>4} {'cout':>4} {'stride':>10} {'native ms':>10} "
        f"{'folded ms':>10} {'speed-up':>9}"
    )
    for spatial, cin, cout, strides in SHAPES:
        x = jnp.asarray(rng.normal(size=(4, *spatial, cin)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(3, 3, 3, cin, cout)) * 0.1, jnp.float32)
        native = median_seconds(conv_native, x, w, strides)
        folded = median_seconds(conv3d_depth_folded, x, w, strides)
        print(
            f"{str((4, *spatial)):>22} {cin:>4} {cout:>4} {str(strides):>10} "
            f"{native * 1e3:10.1f} {folded * 1e3:10.1f} {native / folded:8.1f}x"
        )
    print("\nforward only, depth stride 1 (ms)")
    print(
        f"{'input':>22} {'cin':>4} {'cout':>4} {'native':>8} {'in-fold':>8} {'out-fold':>8} "
        f"{'out vs in':>9}"
    )
    for spatial, cin, cout, strides, x, w, pad in depth_stride1_layers(rng):
        native = median_call_seconds(functools.partial(conv_native, strides=strides), x, w)
        infold = median_call_seconds(
            functools.partial(_conv3d_input_folded, strides=strides, padding=pad), x, w
        )
        outfold = median_call_seconds(
            functools.partial(_conv3d_output_folded, strides=strides, padding=pad), x, w
        )
        print(
            f"{str((4, *spatial)):>22} {cin:>4} {cout:>4} {native * 1e3:8.2f} "
            f"{infold * 1e3:8.2f} {outfold * 1e3:8.2f} {infold / outfold:8.2f}x"
        )
    print("\nforward + backward, depth stride 1 (ms): derivatives through")
    print(f"{'input':>22} {'cin':>4} {'cout':>4} {'in-fold':>8} {'out-fold':>8} {'out vs in':>9}")
    for spatial, cin, cout, strides, x, w, pad in depth_stride1_layers(rng):
        infold = median_seconds(
            lambda x, w, s, p=pad: _conv3d_depth_stride1(x, w, s, p), x, w, strides
        )
        outfold = median_seconds(
            lambda x, w, s, p=pad: _conv3d_output_folded(x, w, s, p), x, w, strides
        )
        print(
            f"{str((4, *spatial)):>22} {cin:>4} {cout:>4} {infold * 1e3:8.2f} "
            f"{outfold * 1e3:8.2f} {infold / outfold:8.2f}x"
        )


if __name__ == "__main__":
    main()
