"""Where does the JAX train step spend its time? Phases, XLA ops by kind, vs PyTorch.

    python benchmarks/profile_step.py [--row nuclei_2d] [--repeats 5] [--threads N]
                                      [--xla-defaults]

For one of ``benchmarks/run.py``'s training rows (default: the default 2D config) prints

1. phase times, JAX vs PyTorch eager alternated (medians; cores used = CPU time / wall):
   forward only, forward + loss + backward, the whole step (with the optimizer);
2. the JAX step broken down by XLA op kind, from a ``jax.profiler`` trace of the compiled
   step (each thunk's duration, classified from the optimized HLO: 3x3 conv forward or
   input gradient, conv weight gradient (XLA writes it as a convolution whose window is
   the whole feature map), strided-conv input gradient, transposes/copies, reductions,
   elementwise fusions, dots), plus the top thunks and the thread-time / wall ratio;
3. PyTorch's step broken down by operator (``torch.profiler``, self CPU time).

The step is compiled as train.py does (``compile_train_step``: on CPU a 3D step uses Eigen's
convolutions); ``--xla-defaults`` compiles it with XLA's default options instead.

``--threads 1`` pins the process to one CPU (``os.sched_setaffinity``, before JAX starts,
so XLA's pool has one thread too) and gives PyTorch one thread: per-core efficiency,
much less sensitive to other load on the machine than the 2-thread numbers.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

# --threads must act before JAX creates its CPU client
_pre = argparse.ArgumentParser(add_help=False)
_pre.add_argument("--threads", type=int, default=0)
_THREADS = _pre.parse_known_args()[0].threads
if _THREADS:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:_THREADS])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench  # noqa: E402

from unetjax.losses import segmentation_loss  # noqa: E402
from unetjax.models import UNet  # noqa: E402
from unetjax.training.state import create_train_state, make_optimizer  # noqa: E402
from unetjax.training.step import compile_train_step, make_train_step  # noqa: E402

try:
    import torch
    import torch_unet
except ImportError:  # pragma: no cover
    torch = None


def hlo_classifier(hlo: str):
    """Thunk name -> op kind, from the optimized HLO text of the compiled program."""
    comps = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^(?:ENTRY )?%(\S+) \(.*?\{\n(.*?)^\}", hlo, re.M | re.S)
    }
    calls = {}
    for m in re.finditer(r"^\s+(?:ROOT )?%(\S+) = (.*)$", hlo, re.M):
        c = re.search(r"calls=%([\w.\-]+)", m.group(2))
        calls[m.group(1)] = comps.get(c.group(1), m.group(2)) if c else m.group(2)

    def describe(name: str) -> str:
        body = calls.get(name, "")
        conv = re.search(r"(f32|bf16)\[[\d,]*\][^ ]* convolution\(.*?window=\{([^}]*)\}", body)
        if conv:
            return conv.group(0)[:60] + "... window={" + conv.group(2) + "}"
        return ""

    def classify(name: str) -> str:
        body = calls.get(name)
        if body is None:
            return "runtime"
        if " convolution(" in body:
            w = re.search(r"window=\{size=(\d+)x(\d+)", body)
            if w and int(w.group(1)) > 3:
                return "conv weight gradient"
            if "lhs_dilate" in body:
                return "conv input gradient (strided)"
            if w and w.group(1) == "1":
                return "conv 1x1 (heads)"
            return "conv 3x3 forward / input gradient"
        if " dot(" in body:
            return "dot (upsampling matmul)"
        if "transpose" in name or name.startswith("copy"):
            return "transpose / copy"
        if " reduce(" in body or " reduce-window(" in body:
            return "reduction (norm statistics, loss, grad norm)"
        if any(k in name for k in ("concatenate", "pad", "slice")):
            return "concatenate / pad / slice"
        return "elementwise fusion"

    return classify, describe


def profile_jax(compiled, run_step, steps: int) -> dict:
    classify, describe = hlo_classifier(compiled.as_text())
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        for _ in range(steps):
            run_step()
        jax.profiler.stop_trace()
        path = sorted(glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True))[-1]
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    names = {
        e["tid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    kinds: dict = collections.defaultdict(float)
    thunks: dict = collections.defaultdict(float)
    first, last = float("inf"), 0.0
    for e in events:
        if e.get("ph") != "X" or e["name"].startswith(("ThunkExecutor", "$", "end: ")):
            continue
        if "XLA" not in names.get(e.get("tid"), ""):  # XLAEigen / XLAPjRtCpuClient threads
            continue
        kinds[classify(e["name"])] += e["dur"]
        thunks[e["name"]] += e["dur"]
        first, last = min(first, e["ts"]), max(last, e["ts"] + e["dur"])
    n = steps
    busy = sum(kinds.values())
    return {
        "wall_ms_per_step": (last - first) / n / 1e3,
        "thunk_ms_per_step": busy / n / 1e3,
        "kinds_ms_per_step": {
            k: v / n / 1e3 for k, v in sorted(kinds.items(), key=lambda x: -x[1])
        },
        "top_thunks": [
            (k, v / n / 1e3, classify(k), describe(k))
            for k, v in sorted(thunks.items(), key=lambda x: -x[1])[:15]
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--row", default="nuclei_2d",
                        choices=["nuclei_2d", "classic_2d", "hippocampus_3d"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0,
                        help="pin to this many CPUs (PyTorch threads too); 0 = all")
    parser.add_argument("--quick", action="store_true", help="classic_2d at batch 1")
    parser.add_argument("--json", default="", help="also write the numbers here")
    parser.add_argument("--xla-defaults", action="store_true",
                        help="compile the step with XLA's default options, not train.py's")
    args = parser.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)
    n_cpu = bench.cores()
    if torch is not None:
        torch.set_num_threads(n_cpu)
    print(f"jax {jax.__version__}, torch {torch.__version__ if torch else None}, "
          f"{n_cpu} CPUs in affinity, load average {os.getloadavg()}")

    kwargs, cin, k, patch, batch, tcfg = bench.train_case(args.row, args.quick)
    model = UNet(num_classes=k, **kwargs)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *patch, cin)).astype(np.float32)
    y = rng.integers(0, k, size=(batch, *patch)).astype(np.int32)
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    tx = make_optimizer(tcfg)
    state = jax.jit(lambda key, ex: create_train_state(model, tx, key, ex))(
        jax.random.key(0), xj[:1])
    params = jax.device_get(state.params)
    step = make_train_step(model, tx, batch_dice=tcfg.batch_dice)
    batch_ = {"image": xj, "label": yj}
    lowered = step.lower(state, batch_)
    compiled = lowered.compile() if args.xla_defaults else compile_train_step(lowered, len(patch))
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x))
    grad = jax.jit(jax.value_and_grad(
        lambda p, x, y: segmentation_loss(model.apply({"params": p}, x), y)))
    holder = {"state": state}

    def jax_step():
        holder["state"], m = compiled(holder["state"], batch_)
        jax.block_until_ready((holder["state"], m))

    fns = {
        "jax forward": lambda: jax.block_until_ready(fwd(params, xj)),
        "jax fwd+bwd": lambda: jax.block_until_ready(grad(params, xj, yj)),
        "jax step": jax_step,
    }
    if torch is not None:
        twin = torch_unet.twin_of(model, cin)
        torch_unet.load_flax_params(twin, params)
        opt, clip = torch_unet.make_optimizer(twin, tcfg)
        tstep = torch_unet.make_train_step(twin, opt, clip, tcfg.batch_dice)
        xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
        yt = torch.from_numpy(y.astype(np.int64))

        def t_fwd():
            with torch.no_grad():
                twin(xt)

        def t_grad():
            twin.zero_grad(set_to_none=True)
            torch_unet.segmentation_loss(twin(xt), yt).backward()

        fns.update({"torch forward": t_fwd, "torch fwd+bwd": t_grad,
                    "torch step": lambda: tstep(xt, yt)})
    for f in fns.values():  # warm-up (compiles the jitted forward / grad)
        f()
        f()
    sampler = bench.RssSampler()
    res = bench.alternate(fns, args.repeats, sampler)
    print(f"\n1. Phases ({args.row}, batch {batch}, medians of {args.repeats}, alternated):")
    print(f"{'':16} {'JAX ms':>9} {'cores':>6} {'PyTorch ms':>11} {'cores':>6} {'JAX/PT time':>12}")
    out = {"phases": res}
    for phase in ("forward", "fwd+bwd", "step"):
        j = res[f"jax {phase}"]
        t = res.get(f"torch {phase}")
        line = f"{phase:16} {j['seconds_median'] * 1e3:9.1f} {j['cores_used_median']:6.2f}"
        if t:
            line += (f" {t['seconds_median'] * 1e3:11.1f} {t['cores_used_median']:6.2f}"
                     f" {j['seconds_median'] / t['seconds_median']:12.2f}")
        print(line)
    jb = res["jax fwd+bwd"]["seconds_median"] - res["jax forward"]["seconds_median"]
    if torch is not None:
        tb = res["torch fwd+bwd"]["seconds_median"] - res["torch forward"]["seconds_median"]
        print(f"{'backward (diff)':16} {jb * 1e3:9.1f} {'':6} {tb * 1e3:11.1f} {'':6} "
              f"{jb / tb:12.2f}")

    prof = profile_jax(compiled, jax_step, 3)
    out["jax_profile"] = prof
    print(f"\n2. JAX step by XLA op kind (profiler trace, 3 steps): span "
          f"{prof['wall_ms_per_step']:.0f} ms/step, thunk time {prof['thunk_ms_per_step']:.0f} "
          f"ms/step (thunk time / wall = {prof['thunk_ms_per_step'] / prof['wall_ms_per_step']:.2f}"
          "; a thunk's own inner threads are not added)")
    total = prof["thunk_ms_per_step"]
    for kind, ms in prof["kinds_ms_per_step"].items():
        print(f"  {ms:8.1f} ms {100 * ms / total:5.1f}%  {kind}")
    print("  top thunks:")
    for name, ms, kind, desc in prof["top_thunks"]:
        print(f"  {ms:8.1f} ms  {name:28} {kind:34} {desc}")

    if torch is not None:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(3):
                tstep(xt, yt)
        rows = sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
        total_t = sum(e.self_cpu_time_total for e in p.key_averages())
        print("\n3. PyTorch step by operator (torch.profiler, self CPU time, 3 steps):")
        out["torch_profile"] = {}
        for e in rows:
            ms = e.self_cpu_time_total / 3 / 1e3
            out["torch_profile"][e.key] = ms
            print(f"  {ms:8.1f} ms {100 * e.self_cpu_time_total / total_t:5.1f}%  {e.key}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    sampler.stop()


if __name__ == "__main__":
    main()
