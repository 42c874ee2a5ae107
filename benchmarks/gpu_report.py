"""Turn ``gpu_throughput.py`` JSON files into one report with FLOP rates.

    python benchmarks/gpu_report.py RUN.json [RUN2.json ...] --out benchmarks/results/gpu_h100

XLA's cost analysis on GPU hides convolutions inside cuDNN custom calls, so the FLOPs per
sample come from the same train step lowered on CPU (``benchmarks/allreduce.py``), and
achieved TFLOP/s = FLOPs per sample x samples/s. Later runs replace earlier rows of the
same (case, batch, dtype). Writes ``<out>.json`` and ``<out>.md``.
"""

import argparse
import json
import pathlib

from allreduce import training_flops
from gpu_throughput import CASES

from unetjax.models import UNet, stage_features
from unetjax.planning import plan_strides_and_kernels


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
    report = {"device": head["device"], "jax": head["jax"], "date": head["date"], "results": table}
    out = pathlib.Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = [
        f"{head['device']}, jax {head['jax']}, {head['date']}",
        "",
        "| model | batch | dtype | ms/step | samples/s | Mvoxel/s | TFLOP/s | compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['case']} | {r['batch']} | {r['dtype']} | {r['step_ms']:.2f} | "
            f"{r['samples_per_s']:,.0f} | {r['voxels_per_s'] / 1e6:,.0f} | "
            f"{r['tflops_per_s']:.1f} | {r['compile_s']:.0f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
