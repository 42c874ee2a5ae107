"""End to end on a synthetic volume larger than this benchmark's memory budget (default 1024^3
float32 = 4 GiB): generate -> ingest -> train -> streaming sliding-window prediction, each
phase in its own process with its peak resident memory (``ru_maxrss``) recorded.

    nice -n 5 python benchmarks/volume_1024.py                       # all phases, 1024^3
    nice -n 5 python benchmarks/volume_1024.py --size 256 --steps 20  # a quick rehearsal
    python benchmarks/volume_1024.py --phases predict --predict_regions 0 --keep  # resume/finish

Model: a small benchmark U-Net (``--base_features 2 --num_stages 2``, no deep supervision) on
64^3 patches, batch 2, AdamW: XLA's 3D convolutions on 2 shared CPU cores manage only ~1-2
Mvoxel/s, so the full prediction (step 0.5 -> 31^3 windows, ~8 voxel-visits per voxel) takes
hours there. ``--predict_regions K`` runs the real full-volume prediction for its first K
regions (z-slabs; the run is resumable, a later call with ``0`` finishes it) and extrapolates
the full time from them (regions are uniform). Windows, sigma = patch/8 and step 0.5 are the
library defaults. Results: ``benchmarks/results/volume_1024.json``; big files live under
``--scratch`` (removed at the end unless ``--keep``).
"""

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "volume_1024.json"
PHASES = ("generate", "ingest", "train", "predict")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase_generate(args, scratch):
    from unetjax.volumes.synthetic import SyntheticVolume, write_npy

    t = time.perf_counter()
    write_npy(SyntheticVolume((args.size,) * 3), scratch / "image.npy", scratch / "label.npy")
    seconds = time.perf_counter() - t
    size = sum((scratch / n).stat().st_size for n in ("image.npy", "label.npy"))
    return {"seconds": seconds, "bytes_written": size}


def phase_ingest(args, scratch):
    from unetjax.volumes.ingest import ingest_volume

    t = time.perf_counter()
    ds = ingest_volume(
        scratch / "image.npy", scratch / "store", label=scratch / "label.npy", chunk=64,
        codec="raw", overwrite=True, log_every_s=60,
    )  # fmt: skip
    seconds = time.perf_counter() - t
    info = ds.manifest.case("volume")
    return {
        "seconds": seconds, "voxels_per_s": args.size**3 / seconds,
        "class_voxels": info.class_voxels, "fg_index_rows": len(ds.foreground_coords("volume")),
    }  # fmt: skip


def _experiment(args, scratch):
    import jax.numpy as jnp

    from unetjax.config import default_config
    from unetjax.data.store import open_store
    from unetjax.experiment import Experiment
    from unetjax.models import UNet
    from unetjax.planning import resolve_model_config

    c = default_config()
    c.model.base_features = args.base_features
    c.model.max_features = 8 * args.base_features
    c.model.num_stages = args.num_stages
    c.model.deep_supervision = False
    c.train.batch_size = args.batch
    c.train.optimizer = "adamw"
    c.train.learning_rate = 3e-3
    c.train.schedule = "constant"
    c.eval.batch_size = 4
    ds = open_store(scratch / "store")
    patch = (args.patch,) * 3
    kw = resolve_model_config(c.model, patch, ds.manifest.median_spacing)
    model = UNet(num_classes=ds.manifest.num_classes, dtype=jnp.float32, **kw)
    split = {"train": ["volume"], "val": [], "test": []}
    return Experiment(c, ds, split, patch, model, kw, None)


def phase_train(args, scratch):
    import flax.serialization
    import jax
    import numpy as np

    from unetjax.data.augment import AugmentConfig
    from unetjax.data.pipeline import make_train_loader
    from unetjax.sharding import batch_sharding, global_batch, make_mesh
    from unetjax.training.loop import sharded_setup
    from unetjax.training.state import make_optimizer
    from unetjax.volumes.arrays import read_boxes

    exp = _experiment(args, scratch)
    c = exp.config
    ds = exp.dataset
    # raw patch reads (the 64^3 training patch, float32) from the store, 2 in flight
    rng = np.random.default_rng(0)
    image = ds.image_array("volume")
    n = 64
    lo = rng.integers(0, args.size - args.patch + 1, (n, 3))
    t = time.perf_counter()
    for i in range(0, n, 2):
        read_boxes(image, [(o, o + args.patch) for o in lo[i : i + 2]])
    raw_read_patches_per_s = n / (time.perf_counter() - t)

    mesh = make_mesh(c.mesh, batch_size=args.batch)
    state, step_fn = sharded_setup(exp, make_optimizer(c.train), mesh)
    sharding = batch_sharding(mesh, 3)
    loader = make_train_loader(
        ds, ["volume"], patch_size=exp.patch_size, batch_size=args.batch, seed=0,
        fg_oversample=0.33, augment=AugmentConfig.from_config(c.data.augment),
        normalization="zscore", num_threads=2, prefetch=2, concurrent_reads=True,
    )  # fmt: skip
    t = time.perf_counter()
    for _ in range(10):
        next(loader)
    loader_patches_per_s = 10 * args.batch / (time.perf_counter() - t)
    data_wait = compute = 0.0
    losses = []
    t_start = time.perf_counter()
    for step in range(args.steps):
        t0 = time.perf_counter()
        batch = global_batch(next(loader), sharding)
        t1 = time.perf_counter()
        state, metrics = step_fn(state, batch)
        loss = float(metrics["loss"])  # waits for the step: splits data wait from compute
        t2 = time.perf_counter()
        if step > 0:  # step 0 includes compilation
            data_wait += t1 - t0
            compute += t2 - t1
        if step % 25 == 0 or step == args.steps - 1:
            losses.append((step, loss))
            print(f"step {step} loss {loss:.4f}", flush=True)
    seconds = time.perf_counter() - t_start
    loader.close()
    params = jax.device_get(state.params)
    (scratch / "params.msgpack").write_bytes(flax.serialization.to_bytes(params))
    return {
        "steps": args.steps, "seconds": seconds, "model": exp.model_kwargs,
        "params": int(sum(x.size for x in jax.tree.leaves(params))),
        "raw_read_patches_per_s": raw_read_patches_per_s,
        "loader_patches_per_s_augmented": loader_patches_per_s,
        "data_wait_s": data_wait, "compute_s": compute,
        "step_s_mean": (data_wait + compute) / max(args.steps - 1, 1), "losses": losses,
    }  # fmt: skip


def phase_predict(args, scratch):
    import flax.serialization
    import jax
    import jax.numpy as jnp
    import numpy as np

    from unetjax.sharding import make_mesh, replicated
    from unetjax.training.step import make_predict_fn
    from unetjax.volumes.arrays import Geometry, open_array
    from unetjax.volumes.streaming import (
        DEFAULT_MAX_ACCUMULATOR_BYTES,
        predict_volume,
        region_plan,
    )

    exp = _experiment(args, scratch)
    ds = exp.dataset
    template = exp.model.init(jax.random.key(0), jnp.zeros((1, *exp.patch_size, 1)))["params"]
    params = flax.serialization.from_bytes(template, (scratch / "params.msgpack").read_bytes())
    mesh = make_mesh(exp.config.mesh, batch_size=exp.config.eval.batch_size)
    predict = make_predict_fn(exp.model, mesh=mesh)
    params = jax.device_put(params, replicated(mesh))
    info = ds.manifest.case("volume")
    res = predict_volume(
        ds.image_array("volume"), lambda tiles: predict(params, tiles), exp.patch_size,
        exp.num_classes, scratch / "prediction", step=0.5, batch_size=exp.config.eval.batch_size,
        normalize=lambda tile: exp.normalize(tile, "volume"), outputs=("labels",),
        geometry=Geometry(info.spacing, info.affine), identity="volume_1024",
        stop_after_regions=args.predict_regions or None, progress=False,
    )  # fmt: skip
    # Dice per class over the regions (boxes) written so far, one box at a time: bounded memory
    root = scratch / "prediction" if res.complete else scratch / ".prediction.partial"
    pred, true = open_array(root / "labels"), ds.label_array("volume")
    plan = region_plan(
        info.shape, exp.patch_size, 0.5, exp.num_classes, DEFAULT_MAX_ACCUMULATOR_BYTES
    )
    inter = np.zeros(exp.num_classes)
    total = np.zeros(exp.num_classes)
    for box in plan.boxes[: res.regions_done]:
        index = tuple(slice(lo, hi) for lo, hi in plan.output_box(box))
        p = np.asarray(pred[index].read().result())
        g = np.asarray(true[index].read().result())
        for k in range(1, exp.num_classes):
            inter[k] += np.count_nonzero((p == k) & (g == k))
            total[k] += np.count_nonzero(p == k) + np.count_nonzero(g == k)
    dice = {str(k): float(2 * inter[k] / total[k]) if total[k] else None
            for k in range(1, exp.num_classes)}  # fmt: skip
    extrapolated = res.seconds * res.regions_total / max(res.regions_done - res.regions_skipped, 1)
    return {
        "complete": res.complete, "regions_done": res.regions_done,
        "regions_total": res.regions_total, "regions_skipped": res.regions_skipped,
        "tiles_computed": res.tiles_computed, "voxels_written": res.voxels_written,
        "seconds": res.seconds, "voxels_per_s": res.voxels_per_s,
        "tile_voxels_per_s": res.tiles_computed * int(np.prod(exp.patch_size)) / res.seconds,
        "read_wait_s": res.read_wait_s, "compute_wait_s": res.compute_wait_s,
        "accumulate_s": res.accumulate_s, "write_s": res.write_s,
        "full_volume_seconds_extrapolated": extrapolated if not res.complete else res.seconds,
        "regions_scored": res.regions_done, "dice_on_regions_written": dice,
    }  # fmt: skip


def run_phase(args):
    scratch = pathlib.Path(args.scratch)
    fn = globals()[f"phase_{args.phase}"]
    if args.phase in ("train", "predict"):
        from unetjax.host_devices import configure_host_devices

        configure_host_devices()  # as train.py: data parallelism over the 2 cores
    out = fn(args, scratch)
    out["peak_rss_mib"] = peak_rss_mib()
    (scratch / f"phase_{args.phase}.json").write_text(json.dumps(out, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--scratch", default="/work/scratch_volumes/v1024")
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--base_features", type=int, default=2)
    ap.add_argument("--num_stages", type=int, default=2)
    ap.add_argument("--predict_regions", type=int, default=3, help="0 = the whole volume")
    ap.add_argument("--keep", action="store_true", help="keep the scratch files")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.phase:
        return run_phase(args)
    scratch = pathlib.Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    result = {"command": " ".join(sys.argv), "size": [args.size] * 3, "cpus": os.cpu_count(),
              "memory_budget_mib": 2048, "phases": {}}  # fmt: skip
    passthrough = [f"--{k}={v}" for k, v in vars(args).items()
                   if k not in ("phases", "phase", "keep") and v is not None]  # fmt: skip
    try:
        for name in args.phases.split(","):
            load = os.getloadavg()
            t = time.perf_counter()
            subprocess.run([sys.executable, __file__, *passthrough, "--phase", name], check=True)
            row = json.loads((scratch / f"phase_{name}.json").read_text())
            row.update(wall_s=time.perf_counter() - t, loadavg_before=load,
                       loadavg_after=os.getloadavg())  # fmt: skip
            result["phases"][name] = row
            print(f"{name}: peak RSS {row['peak_rss_mib']:.0f} MiB, {row['wall_s']:.0f} s")
            out = pathlib.Path(args.out)
            prev = json.loads(out.read_text()) if out.exists() else {}
            if prev.get("size") == result["size"]:  # keep phases measured by earlier calls
                result["phases"] = {**prev.get("phases", {}), **result["phases"]}
            out.write_text(json.dumps(result, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
