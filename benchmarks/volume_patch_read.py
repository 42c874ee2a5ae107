"""Random 96^3 float32 patch reads from a page-cached zarr v3 store: chunk shape x codec,
sequential vs concurrent (tensorstore futures) vs a 2-thread pool (grain-style).

    nice -n 5 python benchmarks/volume_patch_read.py            # 512^3 volume, all variants
    python benchmarks/volume_patch_read.py --size 256 --patches 100 --variants 64:raw

Each variant writes the same synthetic volume (``unetjax.volumes.synthetic``) under
``--scratch`` (deleted at the end) and reads every chunk file once so the store is in the page
cache. Then, in ``--rounds`` interleaved rounds, every (variant, method) pair reads
``--patches`` patches at fresh seeded uniform random origins through a tensorstore context with
a bounded 64 MiB chunk cache (as ``Dataset``); the median over rounds is reported (the machine
is shared: the load average is recorded). Results: ``benchmarks/results/volume_patch_read.json``.
"""

import argparse
import concurrent.futures
import json
import os
import pathlib
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from unetjax.volumes.arrays import create_array, open_array, read_box, read_boxes  # noqa: E402
from unetjax.volumes.ingest import codec_spec  # noqa: E402
from unetjax.volumes.synthetic import SyntheticVolume  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "volume_patch_read.json"


def write_variant(path, size, chunk, codec):
    vol = SyntheticVolume((size,) * 3, seed=0)
    arr = create_array(path, (size,) * 3 + (1,), np.float32, (chunk,) * 3 + (1,),
                       codec=codec_spec(codec, 4))  # fmt: skip
    for z0 in range(0, size, chunk):
        image, _ = vol.slab(z0, min(z0 + chunk, size))
        arr[z0 : z0 + image.shape[0]].write(image[..., None]).result()


def warm_page_cache(path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                while chunk := f.read(1 << 24):
                    total += len(chunk)
    return total


def boxes(size, patch, n, seed):
    rng = np.random.default_rng(seed)
    lo = rng.integers(0, size - patch + 1, (n, 3))
    return [(o, o + patch) for o in lo]


def time_sequential(arr, bxs):
    t = time.perf_counter()
    for lo, hi in bxs:
        read_box(arr, lo, hi)()
    return len(bxs) / (time.perf_counter() - t)


def time_futures(arr, bxs, in_flight):
    t = time.perf_counter()
    for i in range(0, len(bxs), in_flight):
        read_boxes(arr, bxs[i : i + in_flight])
    return len(bxs) / (time.perf_counter() - t)


def time_threads(arr, bxs, threads):
    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda b: read_box(arr, *b)(), bxs))
    return len(bxs) / (time.perf_counter() - t)


METHODS = {
    "sequential": time_sequential,
    "futures_2": lambda a, b: time_futures(a, b, 2),
    "futures_4": lambda a, b: time_futures(a, b, 4),
    "futures_8": lambda a, b: time_futures(a, b, 8),
    "threads_2": lambda a, b: time_threads(a, b, 2),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--patch", type=int, default=96)
    ap.add_argument("--patches", type=int, default=40, help="per method, variant and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", default="64:raw,64:lz4,64:zstd,32:raw,32:lz4")
    ap.add_argument("--cache_mib", type=int, default=64)
    ap.add_argument("--scratch", default="/work/scratch_volumes/patch_read")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    scratch = pathlib.Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    variants = [(int(c), codec) for c, codec in (v.split(":") for v in args.variants.split(","))]
    rows = {}
    try:
        arrays = {}
        for chunk, codec in variants:
            path = scratch / f"c{chunk}_{codec}"
            t = time.perf_counter()
            write_variant(path, args.size, chunk, codec)
            rows[(chunk, codec)] = {
                "chunk": chunk, "codec": codec, "write_s": round(time.perf_counter() - t, 2),
                "disk_mib": round(warm_page_cache(path) / 2**20, 1),
            }  # fmt: skip
            arrays[(chunk, codec)] = open_array(path, cache_bytes=args.cache_mib << 20)
            read_box(arrays[(chunk, codec)], (0, 0, 0), (args.patch,) * 3)()  # first-use costs
        samples = {key: {m: [] for m in METHODS} for key in arrays}
        for r in range(args.rounds):  # interleaved, fresh random boxes for every measurement
            for i, key in enumerate(arrays):
                for j, (name, fn) in enumerate(METHODS.items()):
                    seed = (r * 1000 + i) * 100 + j
                    bxs = boxes(args.size, args.patch, args.patches, seed)
                    samples[key][name].append(fn(arrays[key], bxs))
        for key, per_method in samples.items():
            for name, values in per_method.items():
                rows[key][name] = round(float(np.median(values)), 1)
                rows[key][f"{name}_min_max"] = [round(min(values), 1), round(max(values), 1)]
            shown = {k: v for k, v in rows[key].items() if not k.endswith("min_max")}
            print(json.dumps(shown), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "command": " ".join(sys.argv),
        "volume": [args.size] * 3, "patch": [args.patch] * 3,
        "patches_per_measurement": args.patches, "rounds": args.rounds,
        "unit": "patches/s (median over rounds)", "chunk_cache_mib": args.cache_mib,
        "cpus": os.cpu_count(), "loadavg_before": load, "loadavg_after": os.getloadavg(),
        "rows": list(rows.values()),
    }  # fmt: skip
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"-> {args.out}  (load average before {load}, after {os.getloadavg()})")


if __name__ == "__main__":
    main()
