"""Data-parallel communication on paper: all-reduce volume and expected scaling.

    python benchmarks/allreduce.py

For each model (the default configs' U-Nets and a full-size 3D nnU-Net), prints the
parameter count, the gradient bytes all-reduced per step (float32), the bytes each device
sends in a ring all-reduce (2 (N-1)/N x gradient bytes), the training FLOPs per sample
from XLA's cost analysis of the lowered step (not compiled), and the expected scaling
efficiency ``t_compute / (t_compute + t_comm)`` with no compute/communication overlap (a
lower bound; XLA overlaps much of it). Assumed hardware numbers are printed with the result.
"""

import jax
import jax.numpy as jnp

from unetjax.losses import segmentation_loss
from unetjax.models import UNet, stage_features, unet_param_count
from unetjax.planning import plan_strides_and_kernels

MODELS = {  # name: (in channels, classes, patch, base, max, stages, per-device batch)
    "nuclei (default 2D)": (3, 2, (128, 128), 16, 256, 5, 8),
    "hippocampus (default 3D)": (1, 3, (32, 48, 32), 8, 64, 4, 4),
    "nnU-Net 3d_fullres-size": (1, 3, (128, 128, 128), 32, 320, 6, 2),
}
# (name, devices, all-reduce bus bandwidth per device in bytes/s, peak bf16 FLOP/s, MFU)
SYSTEMS = [
    ("8x H100 SXM (NVLink 4, ~350 GB/s achieved all-reduce bus bw)", 8, 350e9, 989e12, 0.2),
    ("TPU v5e-16 (4x4 ICI, ~100 GB/s achieved per chip)", 16, 100e9, 197e12, 0.2),
]


def training_flops(model: UNet, shape) -> float:
    """FLOPs of one forward+backward pass from XLA's cost analysis of the lowered program."""
    x = jnp.zeros(shape, jnp.float32)
    y = jnp.zeros(shape[:-1], jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]

    def loss(p):
        return segmentation_loss(model.apply({"params": p}, x), y)

    lowered = jax.jit(jax.grad(loss)).lower(params)
    cost = lowered.cost_analysis()
    return float(cost["flops"]) if cost else float("nan")


def main() -> None:
    print(f"{'model':28} {'params':>11} {'grad MB':>8} {'GFLOP/sample':>13}")
    rows = []
    for name, (cin, k, patch, base, top, stages, batch) in MODELS.items():
        strides, kernels = plan_strides_and_kernels(patch, [1.0] * len(patch), stages)
        feats = stage_features(len(strides), base, top)
        n_params = unet_param_count(cin, k, feats, kernels, strides, deep_supervision=True)
        model = UNet(k, feats, strides, kernels, deep_supervision=True, conv_impl="native")
        flops = training_flops(model, (1, *patch, cin))
        grad_bytes = 4 * n_params
        rows.append((name, n_params, grad_bytes, flops, batch))
        print(f"{name:28} {n_params:>11,} {grad_bytes / 1e6:8.2f} {flops / 1e9:13.1f}")
    for system, n, bw, peak, mfu in SYSTEMS:
        print(f"\n{system}, {mfu:.0%} MFU assumed for compute:")
        for name, _, grad_bytes, flops, batch in rows:
            sent = 2 * (n - 1) / n * grad_bytes
            t_comm = sent / bw
            t_compute = batch * flops / (peak * mfu)
            eff = t_compute / (t_compute + t_comm)
            print(
                f"  {name:28} sends {sent / 1e6:7.2f} MB/step: comm {t_comm * 1e3:6.3f} ms, "
                f"compute {t_compute * 1e3:7.2f} ms (batch {batch}/device) -> "
                f"efficiency >= {eff:.1%}"
            )


if __name__ == "__main__":
    main()
