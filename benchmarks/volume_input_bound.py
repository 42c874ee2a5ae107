"""Is training input-bound? Step time with real batches from the grain pipeline vs with one
constant batch already on the device, in the same process, blocks interleaved.

    nice -n 5 python benchmarks/volume_input_bound.py                      # configs/hippocampus.py
    python benchmarks/volume_input_bound.py --config configs/hippocampus.py --steps 10 --blocks 3

Same set-up as ``train.py`` (host devices, mesh, sharded compiled step, the config's loader with
augmentation). Each block runs ``--steps`` steps and waits for the last; the real-data blocks
pull every batch from the loader (prefetching in its threads, as in training) and put it on the
mesh. Also reports the loader alone (batches/s with no training). Output:
``benchmarks/results/volume_input_bound.json``.
"""

import argparse
import importlib.util
import json
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from unetjax.host_devices import configure_host_devices  # noqa: E402

configure_host_devices()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from unetjax.data.augment import AugmentConfig  # noqa: E402
from unetjax.data.pipeline import make_train_loader  # noqa: E402
from unetjax.experiment import build_experiment  # noqa: E402
from unetjax.sharding import batch_sharding, global_batch, make_mesh  # noqa: E402
from unetjax.training.loop import sharded_setup  # noqa: E402
from unetjax.training.state import make_optimizer  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "volume_input_bound.json"


def load_config(path):
    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/hippocampus.py")
    ap.add_argument("--steps", type=int, default=10, help="steps per block")
    ap.add_argument("--blocks", type=int, default=3, help="blocks per mode (interleaved)")
    ap.add_argument("--concurrent_reads", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    cfg = load_config(args.config)
    with tempfile.TemporaryDirectory() as workdir:
        exp = build_experiment(cfg, workdir)
    tc = cfg.train
    mesh = make_mesh(cfg.mesh, batch_size=tc.batch_size)
    state, step_fn = sharded_setup(exp, make_optimizer(tc), mesh)
    sharding = batch_sharding(mesh, len(exp.patch_size))
    loader = make_train_loader(
        exp.dataset, exp.split["train"], patch_size=exp.patch_size, batch_size=tc.batch_size,
        seed=cfg.seed, fg_oversample=cfg.data.fg_oversample,
        augment=AugmentConfig.from_config(cfg.data.augment),
        normalization=cfg.data.normalization, num_threads=cfg.data.num_threads,
        prefetch=cfg.data.prefetch, ct_stats=exp.ct_stats, concurrent_reads=args.concurrent_reads,
    )  # fmt: skip
    load_before = os.getloadavg()
    constant = global_batch(next(loader), sharding)
    state, metrics = step_fn(state, constant)  # compile
    jax.block_until_ready(metrics)

    def block(real: bool) -> float:
        nonlocal state
        t = time.perf_counter()
        for _ in range(args.steps):
            batch = global_batch(next(loader), sharding) if real else constant
            state, m = step_fn(state, batch)
        jax.block_until_ready(m)
        return (time.perf_counter() - t) / args.steps

    times = {"real": [], "constant": []}
    for _ in range(args.blocks):
        times["real"].append(block(True))
        times["constant"].append(block(False))
    t = time.perf_counter()
    n_loader = 3 * args.steps
    for _ in range(n_loader):
        next(loader)
    loader_s = (time.perf_counter() - t) / n_loader
    loader.close()
    real, const = float(np.median(times["real"])), float(np.median(times["constant"]))
    result = {
        "command": " ".join(sys.argv), "config": args.config, "devices": len(jax.devices()),
        "mesh": dict(mesh.shape), "batch": tc.batch_size, "patch": list(exp.patch_size),
        "concurrent_reads": args.concurrent_reads,
        "step_s_real_median": real, "step_s_constant_median": const,
        "real_over_constant": real / const, "step_s_real": times["real"],
        "step_s_constant": times["constant"], "loader_alone_s_per_batch": loader_s,
        "cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }  # fmt: skip
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
