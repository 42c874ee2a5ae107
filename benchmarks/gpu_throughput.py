"""Single-accelerator train-step throughput of the default configs and two reference nets.

    python benchmarks/gpu_throughput.py [--out DIR] [--budget-seconds 300]

For each case (model, batch, compute dtype) it compiles the jitted train step (AdamW,
donated state), runs 3 warm-up steps, then times 20 steps (one host sync at the end) and
reports images/s and voxels/s. float32 means JAX's default precision, i.e. TF32
matmuls/convs on NVIDIA GPUs. Writes ``gpu_throughput.json`` under ``--out``; stops
starting new cases once the budget is spent. ``benchmarks/gpu_report.py`` adds FLOP
rates (XLA's GPU cost analysis does not see inside cuDNN convolutions).
"""

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unetjax.models import UNet, stage_features
from unetjax.planning import plan_strides_and_kernels
from unetjax.training.state import create_train_state
from unetjax.training.step import make_train_step

# name: (patch, in channels, classes, base, max, stages, batch sizes)
CASES = {
    "nuclei (default 2D)": ((128, 128), 3, 2, 16, 256, 5, (8, 64)),
    "hippocampus (default 3D)": ((32, 48, 32), 1, 3, 8, 64, 4, (4, 32)),
    "classic U-Net 64..1024 at 256^2": ((256, 256), 1, 2, 64, 1024, 5, (32,)),
    "nnU-Net 3D 32..320 at 128^3": ((128, 128, 128), 1, 3, 32, 320, 6, (2,)),
}


def measure(name, patch, cin, k, base, top, stages, batch, dtype, steps=20):
    strides, kernels = plan_strides_and_kernels(patch, [1.0] * len(patch), stages)
    model = UNet(
        k,
        stage_features(len(strides), base, top),
        strides,
        kernels,
        deep_supervision=True,
        dtype=dtype,
    )
    tx = optax.adamw(1e-3)
    rng = np.random.default_rng(0)
    batch_data = {
        "image": jnp.asarray(rng.normal(size=(batch, *patch, cin)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, k, (batch, *patch)), jnp.int32),
    }
    state = create_train_state(model, tx, jax.random.key(0), batch_data["image"][:1])
    step = make_train_step(model, tx, batch_dice=False)
    start = time.perf_counter()
    lowered = step.lower(state, batch_data)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    # FLOPs of the lowered program: the compiled one hides convs in cuDNN custom calls
    cost = lowered.cost_analysis()
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    for _ in range(3):
        state, metrics = compiled(state, batch_data)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch_data)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
    return {
        "case": name,
        "batch": batch,
        "dtype": jnp.dtype(dtype).name,
        "step_ms": seconds * 1e3,
        "samples_per_s": batch / seconds,
        "voxels_per_s": batch * int(np.prod(patch)) / seconds,
        "tflops_per_s": flops / seconds / 1e12,
        "gflop_per_step": flops / 1e9,
        "compile_s": compile_s,
        "loss_finite": bool(np.isfinite(float(metrics["loss"]))),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--budget-seconds", type=float, default=300)
    parser.add_argument("--only", default="", help="run only cases whose name contains this")
    parser.add_argument("--smoke", action="store_true",
                        help="smallest case, batch 2, 2 steps: checks the script on a CPU")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0]
    report = {
        "device": device.device_kind,
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "results": [],
    }
    t0 = time.perf_counter()
    for name, (patch, cin, k, base, top, stages, batches) in CASES.items():
        if args.only not in name:
            continue
        for batch in (2,) if args.smoke else batches:
            for dtype in (jnp.float32, jnp.bfloat16):
                if time.perf_counter() - t0 > args.budget_seconds:
                    break
                row = measure(name, patch, cin, k, base, top, stages, batch, dtype,
                              steps=2 if args.smoke else 20)
                report["results"].append(row)
                print(json.dumps(row), flush=True)
                (out / "gpu_throughput.json").write_text(json.dumps(report, indent=1))
        if args.smoke:
            break


if __name__ == "__main__":
    main()
