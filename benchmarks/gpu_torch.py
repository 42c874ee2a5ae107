"""PyTorch train-step throughput of the same cases as ``gpu_throughput.py`` (its twin nets).

    python benchmarks/gpu_torch.py [--out DIR] [--budget-seconds 200] [--smoke]

PyTorch's best settings, each a mode: ``tf32`` (float32 with TF32 matmuls/convs, as JAX's
default), ``amp_bf16_cl`` (autocast bfloat16 + channels_last memory format) and
``compile_amp_bf16_cl`` (the same under ``torch.compile``). The twin (``torch_unet``) has
exactly the parameters of the Flax U-Net (asserted); loss and deep supervision are the
same; the optimizer is fused AdamW (as ``optax.adamw(1e-3)`` in ``gpu_throughput.py``).
Each case: 3 warm-up steps, then 20 timed steps with one sync at the end. ``--smoke``
runs the smallest case at batch 2 for 2 steps on whatever device there is (checks the
script on a CPU). Writes ``gpu_torch.json`` under ``--out``.
"""

import argparse
import contextlib
import json
import pathlib
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import torch_unet  # noqa: E402
from gpu_throughput import CASES  # noqa: E402

from unetjax.models import stage_features  # noqa: E402
from unetjax.planning import plan_strides_and_kernels  # noqa: E402

MODES = ("tf32", "amp_bf16_cl", "compile_amp_bf16_cl")


def build(patch, cin, k, base, top, stages, device, channels_last: bool):
    strides, kernels = plan_strides_and_kernels(patch, [1.0] * len(patch), stages)
    model = torch_unet.build_twin(
        cin, k, stage_features(len(strides), base, top), strides, kernels,
        deep_supervision=True,
    ).to(device)
    if channels_last:
        fmt = torch.channels_last if len(patch) == 2 else torch.channels_last_3d
        model = model.to(memory_format=fmt)
    return model


def measure(name, case, batch, mode, device, steps=20, warmup=3) -> dict:
    patch, cin, k, base, top, stages, _ = case
    amp = mode != "tf32"
    model = build(patch, cin, k, base, top, stages, device, channels_last=amp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.normal(size=(batch, cin, *patch)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, k, size=(batch, *patch)))
    image, labels = image.to(device), labels.to(device)
    if amp:
        fmt = torch.channels_last if len(patch) == 2 else torch.channels_last_3d
        image = image.contiguous(memory_format=fmt)

    def step():
        opt.zero_grad(set_to_none=True)
        ctx = torch.autocast(device.type, torch.bfloat16) if amp else contextlib.nullcontext()
        with ctx:
            outputs = model(image)
        loss = torch_unet.segmentation_loss(outputs, labels)  # float32 (casts inside)
        loss.backward()
        opt.step()
        return loss.detach()

    if mode.startswith("compile"):
        step = torch.compile(step)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    loss = step()
    sync()
    first_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        loss = step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    return {
        "case": name,
        "batch": batch,
        "mode": mode,
        "step_ms": seconds * 1e3,
        "samples_per_s": batch / seconds,
        "voxels_per_s": batch * int(np.prod(patch)) / seconds,
        "first_step_s": first_s,
        "loss_finite": bool(torch.isfinite(loss).item()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--budget-seconds", type=float, default=200)
    parser.add_argument("--only", default="", help="run only cases whose name contains this")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--smoke", action="store_true", help="tiny CPU-checkable run")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "results": [],
    }
    t0 = time.perf_counter()
    modes = [m for m in args.modes.split(",") if m]
    for name, case in CASES.items():
        if args.only not in name:
            continue
        batches = (2,) if args.smoke else case[-1]
        for batch in batches:
            for mode in modes:
                if time.perf_counter() - t0 > args.budget_seconds:
                    break
                try:
                    row = measure(name, case, batch, mode, device,
                                  steps=2 if args.smoke else 20, warmup=1 if args.smoke else 3)
                except Exception as err:  # e.g. out of memory, a compile failure
                    row = {"case": name, "batch": batch, "mode": mode, "error": repr(err)[:300]}
                report["results"].append(row)
                print(json.dumps(row), flush=True)
                (out / "gpu_torch.json").write_text(json.dumps(report, indent=1))
        if args.smoke:
            break


if __name__ == "__main__":
    main()
