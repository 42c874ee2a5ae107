"""Turn ``gpu_throughput.py`` JSON files into one report with FLOP rates (and MFU).

    python benchmarks/gpu_report.py RUN.json [RUN2.json ...] --out benchmarks/results/gpu_h100 \
        [--torch gpu_torch.json]

XLA's cost analysis on GPU hides convolutions inside cuDNN custom calls, so the FLOPs per
sample come from the same train step lowered on CPU (``benchmarks/allreduce.py``), and
achieved TFLOP/s = FLOPs per sample x samples/s. Later runs replace earlier rows of the
same (case, batch, dtype). With ``--torch`` (``gpu_torch.py``'s JSON) a second table gives
PyTorch's rows and, per (case, batch), JAX bfloat16 over PyTorch's fastest mode. MFU is
against the dense bfloat16 peak of the device (``BF16_PEAK``). Writes ``<out>.json`` and
``<out>.md``.
"""

import argparse
import json
import pathlib

from allreduce import training_flops
from gpu_throughput import CASES

from unetjax.models import UNet, stage_features
from unetjax.planning import plan_strides_and_kernels

BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core FLOP/s


def bf16_peak(device: str) -> float | None:
    return next((v for k, v in BF16_PEAK.items() if k in device), None)


def flops_per_sample(name: str) -> float:
    patch, cin, k, base, top, stages, _ = CASES[name]
    strides, kernels = plan_strides_and_kernels(patch, [1.0] * len(patch), stages)
    model = UNet(
        k,
        stage_features(len(strides), base, top),
        strides,
        kernels,
        deep_supervision=True,
        conv_impl="native",
    )
    return training_flops(model, (1, *patch, cin))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--torch", default=None, help="gpu_torch.py JSON to compare with")
    args = parser.parse_args()
    runs = [json.loads(pathlib.Path(p).read_text()) for p in args.runs]
    rows = {}
    for run in runs:
        for r in run["results"]:
            rows[(r["case"], r["batch"], r["dtype"])] = r
    flops = {name: flops_per_sample(name) for name in {k[0] for k in rows}}
    table = []
    for (name, _, _), r in rows.items():
        r = dict(
            r,
            gflop_per_sample=flops[name] / 1e9,
            tflops_per_s=flops[name] * r["samples_per_s"] / 1e12,
        )
        r.pop("gflop_per_step", None)
        table.append(r)
    head = runs[0]
    peak = bf16_peak(head["device"])
    for r in table:
        r["mfu_bf16_peak"] = r["tflops_per_s"] * 1e12 / peak if peak else None
    report = {"device": head["device"], "jax": head["jax"], "date": head["date"], "results": table}
    lines = [
        f"{head['device']}, jax {head['jax']}, {head['date']}",
        "",
        "| model | batch | dtype | ms/step | samples/s | Mvoxel/s | TFLOP/s | MFU (bf16 peak) "
        "| compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        mfu = f"{100 * r['mfu_bf16_peak']:.1f}%" if r["mfu_bf16_peak"] else "–"
        lines.append(
            f"| {r['case']} | {r['batch']} | {r['dtype']} | {r['step_ms']:.2f} | "
            f"{r['samples_per_s']:,.0f} | {r['voxels_per_s'] / 1e6:,.0f} | "
            f"{r['tflops_per_s']:.1f} | {mfu} | {r['compile_s']:.0f} |"
        )
    if args.torch:
        report["torch"] = json.loads(pathlib.Path(args.torch).read_text())
        lines += torch_table(table, report["torch"])
    out = pathlib.Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def torch_table(jax_rows: list[dict], torch_run: dict) -> list[str]:
    """PyTorch rows, each with JAX bfloat16's throughput over PyTorch's best mode."""
    jax_bf16 = {(r["case"], r["batch"]): r for r in jax_rows if r["dtype"] == "bfloat16"}
    ok = [r for r in torch_run["results"] if "error" not in r]
    best = {}
    for r in ok:
        key = (r["case"], r["batch"])
        if key not in best or r["samples_per_s"] > best[key]["samples_per_s"]:
            best[key] = r
    lines = [
        "",
        f"PyTorch {torch_run['torch']} on {torch_run['device']} (`benchmarks/gpu_torch.py`): "
        "same nets (parameter counts asserted), same loss; JAX/PyTorch = JAX bfloat16 "
        "samples/s over PyTorch's fastest mode for that case and batch.",
        "",
        "| model | batch | PyTorch mode | ms/step | samples/s | first step s "
        "| JAX bf16/PyTorch best |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in ok:
        key = (r["case"], r["batch"])
        ratio = "–"
        if best[key] is r and key in jax_bf16:
            ratio = f"**{jax_bf16[key]['samples_per_s'] / r['samples_per_s']:.2f}**"
        lines.append(
            f"| {r['case']} | {r['batch']} | {r['mode']} | {r['step_ms']:.2f} | "
            f"{r['samples_per_s']:,.0f} | {r['first_step_s']:.1f} | {ratio} |"
        )
    lines += [f"| {r['case']} | {r['batch']} | {r['mode']} | failed: {r['error'][:80]} "
              "| | | |" for r in torch_run["results"] if "error" in r]
    return lines


if __name__ == "__main__":
    main()
