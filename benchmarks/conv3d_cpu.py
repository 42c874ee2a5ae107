"""3D convolution forward+backward: XLA's native conv vs the depth-folded 2D form.

    python benchmarks/conv3d_cpu.py

Prints per layer shape the median time of ``grad(sum(conv(x, w)**2))`` w.r.t. x and w for
both implementations in one run, and their ratio. Shapes are those of the hippocampus
config's U-Net (batch 4, patch 32x48x32, features 8..64).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from unetjax.models.layers import conv3d_depth_folded, conv_native

SHAPES = [  # (spatial, c_in, c_out, stride)
    ((32, 48, 32), 1, 8, (1, 1, 1)),
    ((32, 48, 32), 8, 8, (1, 1, 1)),
    ((32, 48, 32), 8, 16, (2, 2, 2)),
    ((16, 24, 16), 16, 16, (1, 1, 1)),
    ((8, 12, 8), 32, 32, (1, 1, 1)),
    ((4, 6, 4), 64, 64, (1, 1, 1)),
    ((32, 48, 32), 16, 8, (1, 1, 1)),
]


def median_seconds(fn, x, w, strides, repeats: int = 5) -> float:
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w, strides) ** 2), argnums=(0, 1)))
    jax.block_until_ready(grad(x, w))  # compile + warm-up excluded
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(grad(x, w))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


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


if __name__ == "__main__":
    main()
