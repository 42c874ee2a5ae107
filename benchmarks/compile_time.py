"""First-step compile time of a config's train step, cold and with a warm persistent cache.

    python benchmarks/compile_time.py [--config configs/nuclei.py] [--runs 2]

Runs ``train.py`` for one step ``--runs`` times in fresh processes that share one new
compilation cache directory (``$UNETJAX_CACHE``): the first run compiles from scratch, the
later ones load the compiled step from the cache. Reports the loop's own "train step
compiled in X s" measurement (lowering + compilation, or the cache load) and each process's
wall time. Writes ``benchmarks/results/compile_time.json``.
"""

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
PATTERN = re.compile(r"train step compiled in ([0-9.]+) s")


def one_run(config: str, workdir: pathlib.Path, cache: pathlib.Path) -> dict:
    env = dict(os.environ, UNETJAX_CACHE=str(cache))
    cmd = [
        sys.executable, str(REPO / "train.py"), f"--config={config}", f"--workdir={workdir}",
        "--config.train.num_steps=1", "--config.eval.max_val_cases=1", "--noeval",
    ]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    match = PATTERN.search(done.stdout + done.stderr)
    if done.returncode or not match:
        raise RuntimeError(f"train.py failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return {"compile_s": float(match.group(1)), "process_wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "nuclei.py"))
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = pathlib.Path(tmp) / "cache"
        for i in range(args.runs):
            row = one_run(args.config, pathlib.Path(tmp) / f"run{i}", cache)
            row["cache"] = "cold" if i == 0 else "warm"
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {
        "config": pathlib.Path(args.config).name,
        "xla_flags": os.environ.get("XLA_FLAGS", "(train.py default)"),
        "loadavg_1_5_15_end": [round(v, 2) for v in os.getloadavg()],
        "runs": rows,
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile_time.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
