"""JAX (unetjax) vs PyTorch eager on the same U-Nets: one command, one table.

    python benchmarks/run.py [--quick] [--out benchmarks/results] [--only train,infer,data]

Measures in one process, side by side, with warm-up excluded and medians over repeats, JAX
and PyTorch alternated (the order flips every repeat, so drifting machine load hits both):

* training-step throughput (forward + loss + backward + clip + AdamW) of
  ``unetjax.training.step.make_train_step`` vs the PyTorch twin
  (``benchmarks/torch_unet.py``: same layers, same parameter count, same loss, started
  from the same parameters; the first-step losses are compared) for
  (a) the default 2D config (configs/nuclei.py: batch 8 of 128x128x3, 2 classes),
  (b) a classic U-Net, features 64..1024, 5 stages, 256x256x1, max-pool downsampling,
      no deep supervision (batch 2; 1 with --quick),
  (c) the default 3D config (configs/hippocampus.py: batch 4 of 32x48x32x1, 3 classes);
* sliding-window inference (``sliding_window_predict`` + ``make_predict_fn`` vs the same
  windows, Gaussian and tile batch in PyTorch): a 520x696 RGB image (the largest nuclei
  size) with the 2D model, a 36x50x35 volume (hippocampus-sized) with the 3D model;
* data pipeline: the Grain training loader on the bundled nuclei data (batches/s);
* first-step compile time of each JAX train step (lower + compile; no persistent cache);
* peak RSS per framework and train row, each in a fresh process (``--memory-probe``,
  skipped with ``--quick`` or ``--no-memory``): VmHWM above the post-import baseline over
  the first step (JAX: with compilation) and over a later step alone; XLA's planned
  temporaries from ``compiled.memory_analysis()``; and the whole run's peak RSS;
* cores used per timed call (process CPU time / wall time): on a shared machine this shows
  how much of the CPU the run actually got;
* FLOPs per step from XLA's cost analysis of the lowered JAX program, so every
  throughput is also achieved GFLOP/s (the same FLOP count for both frameworks: same
  maths), and MFU where a peak is known (GPU table below, or ``--peak-tflops``).

Writes ``<out>/<device>.json`` (all numbers, versions, date) and ``<out>/<device>.md``
(a table with the JAX/PyTorch throughput ratio per row: > 1 means JAX is faster).

Threads: PyTorch gets ``torch.set_num_threads(<CPUs available>)``; XLA:CPU sizes its own
thread pool from the process's CPU affinity (there is no JAX API for it). ``--threads N``
pins the process to N CPUs first (results in ``<device>-<N>thread.*``): with ``--threads
1`` both frameworks run on one core, a per-core comparison that stays meaningful when
other work shares the machine (PyTorch's OpenMP threads slow down several-fold when a core
they wait for is taken by another process; XLA's pool degrades gracefully). Without
PyTorch installed (e.g. on an accelerator machine), the JAX columns are still measured;
without Grain, the data row is skipped.

--quick: 2 repeats (1 for the classic U-Net, at batch 1), no memory probes; full: 5
repeats (3 for the classic U-Net), memory probes. Measured on the 2-core dev machine:
quick 2 min 45 s and full 5 min 40 s when nearly idle; about 5 and 12-15 minutes at load
average 5-7 (JAX compilation and the classic U-Net's steps take most of it).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import os
import pathlib
import platform
import re
import resource
import sys
import tempfile
import threading
import time

# --threads N pins the process to N CPUs before JAX creates its CPU client (XLA sizes its
# thread pool from the affinity mask); PyTorch then gets N threads as well.
_pre = argparse.ArgumentParser(add_help=False)
_pre.add_argument("--threads", type=int, default=0)
_THREADS = _pre.parse_known_args()[0].threads
if _THREADS:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:_THREADS])

from unetjax.host_devices import configure_host_devices  # noqa: E402

configure_host_devices()  # as train.py: data parallelism over the CPU's cores

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from unetjax.config import default_config  # noqa: E402
from unetjax.inference.sliding_window import sliding_window_predict  # noqa: E402
from unetjax.models import UNet, unet_param_count  # noqa: E402
from unetjax.planning import resolve_model_config  # noqa: E402
from unetjax.sharding import (  # noqa: E402
    batch_sharding,
    make_mesh,
    replicated,
    state_shardings,
)
from unetjax.training.state import create_train_state, make_optimizer  # noqa: E402
from unetjax.training.step import (  # noqa: E402
    compile_train_step,
    make_predict_fn,
    make_train_step,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

try:
    import torch
    import torch_unet
except ImportError:  # JAX-only run (e.g. an accelerator machine without PyTorch)
    torch = None
    torch_unet = None

# Dense peak FLOP/s for float32 maths as XLA runs it by default (TF32 tensor cores on
# NVIDIA Ampere/Hopper). Matched against jax.devices()[0].device_kind; extend as needed.
PEAK_FLOPS = {
    "H100": 494.7e12,  # SXM TF32 dense (bf16: 989e12)
    "H200": 494.7e12,
    "A100": 156e12,  # TF32 dense
}


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def load_config(name: str):
    namespace: dict = {}
    path = REPO / "configs" / f"{name}.py"
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    return namespace["get_config"]()


# ----------------------------------------------------------------------------- measurement


class RssSampler(threading.Thread):
    """Samples the process RSS (``/proc/self/statm``) every ``period`` s; tracks a peak."""

    def __init__(self, period: float = 0.002):
        super().__init__(daemon=True)
        self.period = period
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.current()
        self._stop = threading.Event()

    def current(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self.page
        except OSError:  # pragma: no cover - not Linux
            return 0

    def run(self):
        while not self._stop.wait(self.period):
            rss = self.current()
            if rss > self.peak:
                self.peak = rss

    def stop(self):
        self._stop.set()

    @contextlib.contextmanager
    def window(self, out: dict):
        """Measures wall time, CPU time / wall (cores used), peak RSS increase of a block."""
        start_rss = self.current()
        self.peak = start_rss
        c0, t0 = time.process_time(), time.perf_counter()
        yield
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        out["wall"] = wall
        out["cores"] = cpu / wall if wall > 0 else float("nan")
        out["rss_delta"] = max(self.peak, self.current()) - start_rss


def median(values):
    return float(np.median(values)) if values else float("nan")


def summarise(samples: list[dict]) -> dict:
    return {
        "seconds_median": median([s["wall"] for s in samples]),
        "seconds_all": [round(s["wall"], 5) for s in samples],
        "cores_used_median": median([s["cores"] for s in samples]),
        "peak_rss_delta_mb": max(s["rss_delta"] for s in samples) / 2**20,
    }


def alternate(fns: dict, repeats: int, sampler: RssSampler) -> dict:
    """Calls each fn ``repeats`` times, alternating, order reversed every other round."""
    names = list(fns)
    samples = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            m: dict = {}
            with sampler.window(m):
                fns[n]()
            samples[n].append(m)
    return {n: summarise(s) for n, s in samples.items()}


def count_params(tree) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(tree))


def data_parallel_mesh(batch: int):
    """The mesh train.py and eval.py use (``data`` over the devices that split ``batch``);
    None when that is a single device."""
    mesh = make_mesh(default_config().mesh, batch_size=batch)
    return mesh if mesh.shape["data"] > 1 else None


def sharded_train_step(model, tx, tcfg, state, batch: dict, mesh):
    """(state, step, batch) placed on ``mesh`` as training does (``sharded_setup``)."""
    shardings = state_shardings(jax.eval_shape(lambda: state), mesh)
    bsh = batch_sharding(mesh, batch["image"].ndim - 2)
    step = make_train_step(model, tx, batch_dice=tcfg.batch_dice, state_sharding=shardings,
                           batch_sharding=bsh)
    return jax.device_put(state, shardings), step, jax.device_put(batch, bsh)


def compile_step(step, state, batch) -> tuple:
    """(compiled, lower seconds, compile seconds, XLA FLOPs, memory analysis)."""
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    t1 = time.perf_counter()
    compiled = compile_train_step(lowered, batch["image"].ndim - 2)  # as train.py
    t2 = time.perf_counter()
    cost = lowered.cost_analysis()
    flops = float(cost["flops"]) if cost and "flops" in cost else float("nan")
    return compiled, t1 - t0, t2 - t1, flops, compiled.memory_analysis()


# ----------------------------------------------------------------------------- training


def train_case(name: str, quick: bool):
    """(flax model kwargs, in channels, num classes, patch, batch, train config, description)."""
    if name == "nuclei_2d":
        cfg = load_config("nuclei")
        cin, k = 3, 2
    elif name == "hippocampus_3d":
        cfg = load_config("hippocampus")
        cin, k = 1, 3
    elif name == "classic_2d":
        cfg = load_config("nuclei")  # AdamW recipe; the network below overrides the model
        cfg.data.patch_size = (256, 256)
        cfg.model.base_features, cfg.model.max_features, cfg.model.num_stages = 64, 1024, 5
        cfg.model.downsample = "maxpool"
        cfg.model.deep_supervision = False
        cfg.train.batch_size = 1 if quick else 2
        cin, k = 1, 2
    else:
        raise ValueError(name)
    patch = tuple(cfg.data.patch_size)
    kwargs = resolve_model_config(cfg.model, patch, [1.0] * len(patch))
    return kwargs, cin, k, patch, cfg.train.batch_size, cfg.train



def bench_train(name: str, quick: bool, repeats: int, sampler: RssSampler, log) -> dict:
    kwargs, cin, k, patch, batch, tcfg = train_case(name, quick)
    model = UNet(num_classes=k, **kwargs)
    n_params = unet_param_count(
        cin, k, kwargs["features"], kwargs["kernel_sizes"], kwargs["strides"],
        convs_per_stage=kwargs["convs_per_stage"], deep_supervision=kwargs["deep_supervision"],
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *patch, cin)).astype(np.float32)
    y = rng.integers(0, k, size=(batch, *patch)).astype(np.int32)
    tx = make_optimizer(tcfg)
    init = jax.jit(lambda key, ex: create_train_state(model, tx, key, ex))  # op-by-op is slow
    state = init(jax.random.key(0), jnp.asarray(x[:1]))
    if count_params(state.params) != n_params:
        raise AssertionError("Flax init disagrees with unet_param_count")
    host_state = jax.device_get(state)  # the state is donated by the step
    host_params = host_state.params
    jbatch = {"image": jnp.asarray(x), "label": jnp.asarray(y)}
    mesh = data_parallel_mesh(batch)
    if mesh is not None:  # "jax" = data parallel as train.py runs it; "jax_1dev" = one device
        dp_state, dp_step, dp_batch = sharded_train_step(model, tx, tcfg, host_state, jbatch, mesh)
        t0 = time.perf_counter()
        compiled_1dev, *_ = compile_step(
            make_train_step(model, tx, batch_dice=tcfg.batch_dice), state, jbatch)
        compile_1dev_s = time.perf_counter() - t0
        state, jbatch = dp_state, dp_batch
        step = dp_step
    else:
        step = make_train_step(model, tx, batch_dice=tcfg.batch_dice)

    t0 = time.perf_counter()
    compiled, lower_s, compile_s, flops, mem = compile_step(step, state, jbatch)
    t2 = time.perf_counter()

    row = {
        "kind": "train",
        "xla_memory_mb": {
            "arguments": mem.argument_size_in_bytes / 2**20,
            "outputs": mem.output_size_in_bytes / 2**20,
            "aliased": mem.alias_size_in_bytes / 2**20,
            "temporaries": mem.temp_size_in_bytes / 2**20,
        } if mem is not None else None,
        "model": {k_: (list(v) if isinstance(v, tuple) else v) for k_, v in kwargs.items()},
        "in_channels": cin,
        "num_classes": k,
        "patch": list(patch),
        "batch": batch,
        "optimizer": tcfg.optimizer,
        "grad_clip": tcfg.grad_clip,
        "params": n_params,
        "flops_per_step": flops,
        "samples_per_call": batch,
        "voxels_per_call": batch * int(np.prod(patch)),
        "jax_lower_s": lower_s,
        "jax_compile_s": compile_s,
        "jax_devices": mesh.shape["data"] if mesh is not None else 1,
    }
    holder = {"state": state}

    def jax_step():
        holder["state"], metrics = compiled(holder["state"], jbatch)
        jax.block_until_ready((holder["state"], metrics))
        return metrics

    t3 = time.perf_counter()
    metrics = jax_step()
    row["jax_first_step_s"] = (t2 - t0) + (time.perf_counter() - t3)
    row["jax_first_loss"] = float(metrics["loss"])
    log(f"  {name}: {n_params:,} params, {flops / 1e9:.1f} GFLOP/step, JAX compile "
        f"{row['jax_compile_s']:.1f} s (+ lower {row['jax_lower_s']:.1f} s)")
    fns = {"jax": jax_step}
    if mesh is not None:
        row["jax_1dev_compile_s"] = compile_1dev_s
        holder_1dev = {"state": jax.device_put(host_state, jax.devices()[0])}
        batch_1dev = jax.device_put({"image": x, "label": y}, jax.devices()[0])

        def jax_1dev_step():
            holder_1dev["state"], metrics = compiled_1dev(holder_1dev["state"], batch_1dev)
            jax.block_until_ready((holder_1dev["state"], metrics))
            return metrics

        row["jax_1dev_first_loss"] = float(jax_1dev_step()["loss"])
        fns["jax_1dev"] = jax_1dev_step

    if torch is not None:
        twin = torch_unet.twin_of(model, cin)
        torch_unet.load_flax_params(twin, host_params)
        opt, clip = torch_unet.make_optimizer(twin, tcfg)
        tstep = torch_unet.make_train_step(twin, opt, clip, tcfg.batch_dice)
        xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
        yt = torch.from_numpy(y.astype(np.int64))
        t4 = time.perf_counter()
        row["torch_first_loss"] = tstep(xt, yt)
        row["torch_first_step_s"] = time.perf_counter() - t4
        fns["torch"] = lambda: tstep(xt, yt)
        log(f"  first-step loss: JAX {row['jax_first_loss']:.6f}, "
            f"PyTorch {row['torch_first_loss']:.6f} (same parameters and batch)")
    for fn in fns.values():  # warm-up (second step: caches, allocator, optimizer state)
        fn()
    row.update(timed(fns, repeats, sampler, row))
    return row


def timed(fns: dict, repeats: int, sampler: RssSampler, row: dict) -> dict:
    out = {}
    for fw, s in alternate(fns, repeats, sampler).items():
        t = s["seconds_median"]
        out[fw] = s
        s["samples_per_s"] = row["samples_per_call"] / t
        s["mvoxels_per_s"] = row["voxels_per_call"] / t / 1e6
        s["gflops_per_s"] = row["flops_per_step"] / t / 1e9
        peak = device_peak_flops()
        s["mfu"] = row["flops_per_step"] / t / peak if peak else None
    if "torch" in out:
        for fw in ("jax", "jax_1dev"):
            if fw in out:
                out[f"{fw}_over_torch_throughput"] = (
                    out["torch"]["seconds_median"] / out[fw]["seconds_median"]
                )
    if "jax_1dev" in out:
        out["jax_over_jax_1dev_throughput"] = (
            out["jax_1dev"]["seconds_median"] / out["jax"]["seconds_median"]
        )
    return out


# ----------------------------------------------------------------------------- memory


def memory_probe(spec: str, quick: bool) -> None:
    """Child process: one framework's train step for one row; prints its RSS as JSON.

    ``baseline`` is the RSS after the imports, before the framework allocates anything;
    ``peak`` is the process's peak RSS over the first step (compile included for JAX);
    ``steady`` the peak during a second step alone (the high-water mark reset before it).
    """
    name, fw = spec.split(":")
    sampler = RssSampler()
    baseline = sampler.current()
    kwargs, cin, k, patch, batch, tcfg = train_case(name, quick)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *patch, cin)).astype(np.float32)
    y = rng.integers(0, k, size=(batch, *patch)).astype(np.int32)
    if fw == "jax":
        model = UNet(num_classes=k, **kwargs)
        tx = make_optimizer(tcfg)
        state = jax.jit(lambda key, ex: create_train_state(model, tx, key, ex))(
            jax.random.key(0), jnp.asarray(x[:1])
        )
        step = make_train_step(model, tx, batch_dice=tcfg.batch_dice)
        batch_ = {"image": jnp.asarray(x), "label": jnp.asarray(y)}
        mesh = data_parallel_mesh(batch)
        if mesh is not None:
            state, step, batch_ = sharded_train_step(model, tx, tcfg, state, batch_, mesh)
        for i in range(2):
            if i == 1:
                first = vm_hwm()
                reset_hwm()
            state, metrics = step(state, batch_)
            jax.block_until_ready((state, metrics))
    else:
        torch.set_num_threads(cores())
        twin = torch_unet.build_twin(
            cin, k, kwargs["features"], kwargs["strides"], kwargs["kernel_sizes"],
            convs_per_stage=kwargs["convs_per_stage"], downsample=kwargs["downsample"],
            deep_supervision=kwargs["deep_supervision"],
        )
        opt, clip = torch_unet.make_optimizer(twin, tcfg)
        tstep = torch_unet.make_train_step(twin, opt, clip, tcfg.batch_dice)
        xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
        yt = torch.from_numpy(y.astype(np.int64))
        for i in range(2):
            if i == 1:
                first = vm_hwm()
                reset_hwm()
            tstep(xt, yt)
    steady = vm_hwm()
    print(json.dumps({"baseline_mb": baseline / 2**20, "peak_mb": first / 2**20,
                      "step_peak_mb": (first - baseline) / 2**20,
                      "steady_step_peak_mb": (steady - baseline) / 2**20}))


def vm_hwm() -> int:
    """This process's peak RSS in bytes (VmHWM; unlike ru_maxrss, not inherited on exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_hwm() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def probe_memory(name: str, fw: str, quick: bool, log) -> dict | None:
    """Runs :func:`memory_probe` in a fresh interpreter (clean peak RSS per framework)."""
    import subprocess

    cmd = [sys.executable, __file__, "--memory-probe", f"{name}:{fw}"]
    cmd += ["--quick"] if quick else []
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as err:
        log(f"  memory probe {name}:{fw} failed: {err}")
        return None


# ----------------------------------------------------------------------------- inference


def bench_infer(name: str, quick: bool, repeats: int, sampler: RssSampler, log) -> dict:
    case = {"infer_2d": "nuclei_2d", "infer_3d": "hippocampus_3d"}[name]
    kwargs, cin, k, patch, _, _ = train_case(case, quick)
    shape = (520, 696) if name == "infer_2d" else (36, 50, 35)
    tile_batch = 8  # eval.batch_size of both configs
    model = UNet(num_classes=k, **kwargs)
    rng = np.random.default_rng(1)
    image = rng.normal(size=(*shape, cin)).astype(np.float32)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, *patch, cin)))["params"]
    predict = make_predict_fn(model)
    tiles = jnp.zeros((tile_batch, *patch, cin))
    t0 = time.perf_counter()
    lowered = predict.lower(params, tiles)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    cost = lowered.cost_analysis()
    flops_call = float(cost["flops"]) if cost and "flops" in cost else float("nan")
    from unetjax.inference.sliding_window import window_starts

    n_windows = int(np.prod([len(s) for s in window_starts(
        [max(s, p) for s, p in zip(shape, patch, strict=True)], patch, 0.5)]))
    n_calls = -(-n_windows // tile_batch)
    row = {
        "kind": "infer",
        "model": {k_: (list(v) if isinstance(v, tuple) else v) for k_, v in kwargs.items()},
        "image_shape": [*shape, cin],
        "patch": list(patch),
        "tile_batch": tile_batch,
        "windows": n_windows,
        "predict_calls": n_calls,
        "flops_per_step": flops_call * n_calls,
        "samples_per_call": 1,
        "voxels_per_call": int(np.prod(shape)),
        "jax_compile_s": compile_s,
    }
    mesh = data_parallel_mesh(tile_batch)
    jax_predict = functools.partial(compiled, params)
    results = {}

    def window_fn(predict_fn, fw):
        def run():
            results[fw] = sliding_window_predict(
                image, predict_fn, patch, k, step=0.5, batch_size=tile_batch
            )

        return run

    fns = {"jax": window_fn(jax_predict, "jax")}
    if mesh is not None:  # as eval.py: tiles sharded over the host devices
        row["jax_devices"] = mesh.shape["data"]
        dp_predict = make_predict_fn(model, mesh=mesh)
        dp_params = jax.device_put(params, replicated(mesh))
        fns = {"jax": window_fn(functools.partial(dp_predict, dp_params), "jax"),
               "jax_1dev": window_fn(jax_predict, "jax_1dev")}
    if torch is not None:
        twin = torch_unet.twin_of(model, cin)
        torch_unet.load_flax_params(twin, jax.device_get(params))
        twin.eval()

        def run_torch():
            results["torch"] = torch_unet.sliding_window_predict_torch(
                image, twin, patch, k, step=0.5, batch_size=tile_batch
            )

        fns["torch"] = run_torch
    for fn in fns.values():  # warm-up
        fn()
    if "torch" in results:
        row["max_abs_prob_diff"] = float(np.abs(results["jax"] - results["torch"]).max())
    if "jax_1dev" in results:
        row["max_abs_prob_diff_1dev"] = float(np.abs(results["jax"] - results["jax_1dev"]).max())
    log(f"  {name}: image {row['image_shape']}, {n_windows} windows in {n_calls} calls of "
        f"{tile_batch}, {row['flops_per_step'] / 1e9:.1f} GFLOP/image")
    row.update(timed(fns, repeats, sampler, row))
    return row


# ----------------------------------------------------------------------------- data


def bench_data(quick: bool, sampler: RssSampler, log) -> dict:
    from unetjax.data.augment import AugmentConfig
    from unetjax.data.pipeline import make_train_loader
    from unetjax.experiment import build_experiment

    cfg = load_config("nuclei")
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        exp = build_experiment(cfg, workdir)
        open_s = time.perf_counter() - t0
    loader = make_train_loader(
        exp.dataset,
        exp.split["train"],
        patch_size=exp.patch_size,
        batch_size=cfg.train.batch_size,
        seed=cfg.seed,
        fg_oversample=cfg.data.fg_oversample,
        augment=AugmentConfig.from_config(cfg.data.augment),
        normalization=cfg.data.normalization,
        num_threads=cfg.data.num_threads,
        prefetch=cfg.data.prefetch,
    )
    chunk, chunks = (5, 3) if quick else (10, 5)
    try:
        for _ in range(3):  # warm-up: thread start, first reads
            next(loader)
        samples = []
        for _ in range(chunks):
            m: dict = {}
            with sampler.window(m):
                for _ in range(chunk):
                    next(loader)
            samples.append(m)
    finally:
        loader.close()
    s = summarise(samples)
    t = s["seconds_median"] / chunk
    row = {
        "kind": "data",
        "batch": cfg.train.batch_size,
        "patch": list(exp.patch_size),
        "num_threads": cfg.data.num_threads,
        "prefetch": cfg.data.prefetch,
        "open_dataset_s": open_s,
        "jax": {
            **s,
            "seconds_per_batch": t,
            "batches_per_s": 1 / t,
            "samples_per_s": cfg.train.batch_size / t,
        },
    }
    log(f"  data: {row['jax']['batches_per_s']:.1f} batches/s of {cfg.train.batch_size} "
        f"({row['jax']['cores_used_median']:.2f} cores)")
    return row


# ----------------------------------------------------------------------------- report


@functools.cache
def device_peak_flops() -> float | None:
    if ARGS_PEAK[0]:
        return ARGS_PEAK[0] * 1e12
    kind = jax.devices()[0].device_kind
    for key, peak in PEAK_FLOPS.items():
        if key.lower() in kind.lower():
            return peak
    return None


ARGS_PEAK: list = [None]


def package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def device_name() -> str:
    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"cpu-{os.cpu_count()}core"
    return re.sub(r"[^a-z0-9]+", "-", d.device_kind.lower()).strip("-")


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


LABELS = {
    "nuclei_2d": "train, default 2D (nuclei: 8x128²x3, 16..256, DS)",
    "classic_2d": "train, classic U-Net (64..1024, 256²x1, maxpool)",
    "hippocampus_3d": "train, default 3D (hippocampus: 4x32x48x32, 8..64, DS)",
    "infer_2d": "sliding window 2D (520x696x3, tiles 8x128²)",
    "infer_3d": "sliding window 3D (36x50x35, tiles 8x32x48x32)",
    "data": "data pipeline (Grain, nuclei, batch 8, 2 threads)",
}


def fmt(v, spec=".2f"):
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return format(v, spec)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# unetjax vs PyTorch eager — {report['device']}",
        "",
        f"{env['date']}; {env['device_kind']} ({env['cpu_model']}, {env['cores']} cores"
        f"{', process pinned to them' if env.get('pinned_threads') else ''}); "
        f"jax {env['jax']}, torch {env['torch']}, Python {env['python']}; "
        f"mode: {report['mode']}. Medians over {report['repeats']} alternated repeats, "
        "warm-up excluded. Ratio = JAX throughput / PyTorch throughput (> 1: JAX faster). "
        "JAX runs as train.py/eval.py do: the batch sharded over the host devices "
        "(`unetjax.host_devices`); 'JAX 1 dev' is the same program on one device. "
        "GFLOP/s from XLA's FLOP count of the JAX program (the same maths for both).",
        "",
        "| benchmark | batch | JAX s/call | JAX 1 dev s/call | PyTorch s/call | JAX/PyTorch "
        "| JAX 1 dev/PyTorch | unit | JAX | PyTorch | GFLOP/call | JAX GFLOP/s "
        "| PyTorch GFLOP/s | MFU JAX | cores used JAX/PT |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    used = [r["jax"]["cores_used_median"] for r in report["rows"].values() if "jax" in r]
    if env["cores"] > 1 and used and max(used) < 0.75 * env["cores"]:
        lines[2:2] = [
            f"**Warning: contended run** — no timed call got more than {max(used):.2f} of "
            f"{env['cores']} cores (other work on the machine). Multi-threaded PyTorch "
            "(OpenMP) slows down far more than XLA when cores are taken away: compare with "
            "a `--threads 1` run or rerun on an idle machine before quoting these ratios.",
            "",
        ]
    for name, row in report["rows"].items():
        j, t = row.get("jax", {}), row.get("torch", {})
        if row["kind"] == "data":
            lines.append(
                f"| {LABELS[name]} | {row['batch']} | {fmt(j['seconds_per_batch'], '.3f')} | – "
                f"| – | – | – | batches/s | {fmt(j['batches_per_s'], '.1f')} | – | – | – | – | – "
                f"| {fmt(j['cores_used_median'])}/– |"
            )
            continue
        unit = "Mvox/s" if len(row["patch"]) == 3 else "img/s"
        key = "mvoxels_per_s" if unit == "Mvox/s" else "samples_per_s"
        batch = row.get("batch", f"{row.get('tile_batch')} tiles")
        mfu = j.get("mfu")
        one = row.get("jax_1dev", {})
        lines.append(
            f"| {LABELS[name]} | {batch} | {fmt(j['seconds_median'], '.3f')} "
            f"| {fmt(one.get('seconds_median'), '.3f')} "
            f"| {fmt(t.get('seconds_median'), '.3f')} "
            f"| **{fmt(row.get('jax_over_torch_throughput'))}** "
            f"| {fmt(row.get('jax_1dev_over_torch_throughput'))} | {unit} "
            f"| {fmt(j[key])} | {fmt(t.get(key))} | {row['flops_per_step'] / 1e9:.1f} "
            f"| {fmt(j['gflops_per_s'], '.1f')} | {fmt(t.get('gflops_per_s'), '.1f')} "
            f"| {fmt(100 * mfu, '.1f') + '%' if mfu else '–'} "
            f"| {fmt(j['cores_used_median'])}/{fmt(t.get('cores_used_median'))} |"
        )
    lines += ["", "| JAX compile (lower + compile, first call) | seconds |", "|---|---|"]
    for name, row in report["rows"].items():
        if "jax_compile_s" in row:
            first = row.get("jax_first_step_s")
            extra = f" (first step incl. compile {first:.1f} s)" if first else ""
            lines.append(
                f"| {LABELS[name]} | {row.get('jax_lower_s', 0) + row['jax_compile_s']:.1f}"
                f"{extra} |"
            )
    mem_rows = [(n, r) for n, r in report["rows"].items() if r.get("peak_rss_fresh_process")]
    if mem_rows:
        lines += [
            "",
            "| peak RSS above the post-import baseline, fresh process (MB) "
            "| JAX: compile + first step(s) | PyTorch: first step(s) | JAX: a later step "
            "| PyTorch: a later step | JAX/PyTorch (later step) | XLA temporaries |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, row in mem_rows:
            m = row["peak_rss_fresh_process"]
            j, t = m.get("jax") or {}, m.get("torch") or {}
            js, ts = j.get("steady_step_peak_mb"), t.get("steady_step_peak_mb")
            xla = (row.get("xla_memory_mb") or {}).get("temporaries")
            lines.append(
                f"| {LABELS[name]} | {fmt(j.get('step_peak_mb'), '.0f')} "
                f"| {fmt(t.get('step_peak_mb'), '.0f')} | {fmt(js, '.0f')} | {fmt(ts, '.0f')} "
                f"| {fmt(js / ts if js and ts else None)} | {fmt(xla, '.0f')} |"
            )
    load = (env.get("loadavg_1_5_15_start"), env.get("loadavg_1_5_15_end"))
    lines += [
        "",
        f"Process peak RSS of this run: {report['peak_rss_mb']:.0f} MB (both frameworks in "
        f"one process). Load average (1/5/15 min) at start {load[0]}, at end {load[1]} "
        f"on {env['cores']} cores: 'cores used' well below {env['cores']} means the run shared "
        "the CPU with other work.",
    ]
    checks = []
    for name, row in report["rows"].items():
        if "torch_first_loss" in row:
            checks.append(f"{name}: first-step loss JAX {row['jax_first_loss']:.5f} vs "
                          f"PyTorch {row['torch_first_loss']:.5f}")
        if "max_abs_prob_diff" in row:
            checks.append(f"{name}: max |p_JAX - p_PyTorch| = {row['max_abs_prob_diff']:.1e}")
    if checks:
        lines += ["", "Same-maths checks: " + "; ".join(checks) + "."]
    lines += ["", "Notes: " + " ".join(report["notes"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats, classic U-Net at batch 1, no memory probes")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--only", default="", help="comma list of: train,infer,data or row "
                        "names (nuclei_2d, classic_2d, hippocampus_3d, infer_2d, infer_3d)")
    parser.add_argument("--repeats", type=int, default=0, help="override the repeat count")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="device peak (TFLOP/s) for MFU where the table has none")
    parser.add_argument("--threads", type=int, default=0,
                        help="pin the process to this many CPUs (XLA pool and PyTorch threads); "
                        "0 = all. Results go to <device>-<N>thread.*")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the per-framework peak-RSS probes (fresh processes)")
    parser.add_argument("--memory-probe", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        memory_probe(args.memory_probe, args.quick)
        return
    ARGS_PEAK[0] = args.peak_tflops
    jax.config.update("jax_enable_compilation_cache", False)  # measure real compiles
    n = cores()
    if torch is not None:
        torch.set_num_threads(n)
    repeats = args.repeats or (2 if args.quick else 5)
    big_repeats = args.repeats or (1 if args.quick else 3)  # the classic U-Net is slow
    selected = {s.strip() for s in args.only.split(",") if s.strip()}

    def wanted(name: str, group: str) -> bool:
        return not selected or name in selected or group in selected

    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    sampler = RssSampler()
    sampler.start()
    load_start = os.getloadavg()
    rows = {}
    log(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch "
        f"{torch.__version__ if torch else 'absent'} with {n} threads")
    for name in ("nuclei_2d", "classic_2d", "hippocampus_3d"):
        if wanted(name, "train"):
            log(f"train {name}")
            reps = big_repeats if name == "classic_2d" else repeats
            rows[name] = bench_train(name, args.quick, reps, sampler, log)
            gc.collect()
    if not args.no_memory and not args.quick:
        for name, row in rows.items():
            if row["kind"] != "train":
                continue
            log(f"memory probe {name} (fresh processes)")
            row["peak_rss_fresh_process"] = {
                fw: probe_memory(name, fw, args.quick, log)
                for fw in (["jax", "torch"] if torch is not None else ["jax"])
            }
    for name in ("infer_2d", "infer_3d"):
        if wanted(name, "infer"):
            log(f"inference {name}")
            rows[name] = bench_infer(name, args.quick, repeats, sampler, log)
            gc.collect()
    if wanted("data", "data"):
        try:
            import grain  # noqa: F401
        except ImportError:
            log("data: grain not installed, skipped")
        else:
            log("data pipeline")
            rows["data"] = bench_data(args.quick, sampler, log)
    sampler.stop()

    d = jax.devices()[0]
    report = {
        "device": device_name(),
        "mode": "quick" if args.quick else "full",
        "repeats": repeats,
        "environment": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "device_kind": d.device_kind,
            "platform": d.platform,
            "cpu_model": cpu_model(),
            "cores": n,
            "pinned_threads": args.threads or None,
            "jax": jax.__version__,
            "jaxlib": package_version("jaxlib"),
            "torch": torch.__version__ if torch else None,
            "torch_threads": torch.get_num_threads() if torch else None,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "peak_flops": device_peak_flops(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "loadavg_1_5_15_start": [round(v, 2) for v in load_start],
            "loadavg_1_5_15_end": [round(v, 2) for v in os.getloadavg()],
        },
        "rows": rows,
        "peak_rss_mb": vm_hwm() / 2**20,
        "wall_s": time.perf_counter() - start,
        "notes": [
            "JAX and PyTorch start every train row from the same parameters and batch.",
            "The JAX step includes the NaN guard, the learning-rate schedule and grad-norm "
            "metrics (as used in training); the PyTorch step uses a constant learning rate.",
            f"PyTorch threads = {n} (torch.set_num_threads); XLA:CPU uses its own thread "
            "pool, sized to the CPUs the process may run on.",
            "Cores = process CPU time / wall time during the timed call.",
            "FLOPs: XLA cost analysis of the lowered JAX program (train: whole step; "
            "inference: one predict call x calls per image).",
        ],
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = report["device"] + (f"-{args.threads}thread" if args.threads else "")
    stem += "-quick" if args.quick else ""
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(report))
    log(f"wrote {out / stem}.json and .md")
    print(markdown(report))


if __name__ == "__main__":
    main()
