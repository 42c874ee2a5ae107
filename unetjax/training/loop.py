"""``train_and_evaluate(config, workdir)``: the training loop, resumable and interrupt-safe.

Rerunning the same command on a workdir resumes from its latest checkpoint exactly: the
batch of step s depends only on (seed, s), the step key is ``fold_in(seed, s)``, and the
optimizer state is restored with the parameters.
"""

import json
import logging
import pathlib
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import tqdm

from unetjax.checkpointing import Checkpointer, abstract_like
from unetjax.data.augment import AugmentConfig
from unetjax.data.pipeline import make_train_loader
from unetjax.evaluation import mean_foreground_dice, score_cases
from unetjax.experiment import Experiment, build_experiment, save_config
from unetjax.sharding import (
    batch_sharding,
    global_batch,
    local_batch_size,
    make_mesh,
    maybe_initialize_distributed,
    state_shardings,
)
from unetjax.training.state import init_train_state, make_optimizer
from unetjax.training.step import compile_train_step, make_predict_fn, make_train_step
from unetjax.training.writer import MetricWriter

log = logging.getLogger("unetjax")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss or gradient; the last good checkpoint is kept."""


def enable_compilation_cache() -> None:
    """Persist compiled programs across runs (``$UNETJAX_CACHE`` or ~/.cache/unetjax/jax)."""
    import os

    root = pathlib.Path(os.environ.get("UNETJAX_CACHE", "~/.cache/unetjax")).expanduser()
    jax.config.update("jax_compilation_cache_dir", str(root / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def validate(exp: Experiment, predict, params) -> float:
    """Mean foreground Dice on the validation split (sliding window, whole cases)."""
    case_ids = exp.split["val"]
    if exp.config.eval.max_val_cases:
        case_ids = case_ids[: exp.config.eval.max_val_cases]
    return mean_foreground_dice(score_cases(exp, predict, params, case_ids))


def _compile(step_fn, state, batch):
    start = time.perf_counter()
    compiled = compile_train_step(step_fn.lower(state, batch), batch["image"].ndim - 2)
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    temp = getattr(memory, "temp_size_in_bytes", 0) / 2**20 if memory is not None else 0.0
    log.info("train step compiled in %.1f s (temp buffers %.0f MiB)", seconds, temp)
    return compiled, seconds


def sharded_setup(exp: Experiment, tx, mesh):
    """(fresh state on the mesh, train step compiled for it, state shardings)."""
    fsdp = exp.config.mesh.fsdp_pattern

    def init():
        return init_train_state(exp, tx)

    shardings = state_shardings(jax.eval_shape(init), mesh, fsdp)
    state = jax.jit(init, out_shardings=shardings)()
    step = make_train_step(
        exp.model,
        tx,
        batch_dice=exp.config.train.batch_dice,
        seed=exp.config.seed,
        state_sharding=shardings,
        batch_sharding=batch_sharding(mesh, len(exp.patch_size)),
    )
    return state, step


def train_and_evaluate(
    config, workdir: str | pathlib.Path, stop_at: int | None = None, devices=None
) -> dict:
    """Train ``config`` into ``workdir`` (resuming if it holds checkpoints); returns a summary.

    ``stop_at`` ends the run early at that step with a checkpoint, as an interruption would
    (for time-sliced jobs); rerunning continues to ``train.num_steps``. ``devices`` limits
    the mesh to those devices (tests); by default ``config.mesh`` spans all of them.
    """
    maybe_initialize_distributed(config.mesh)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    enable_compilation_cache()
    exp = build_experiment(config, workdir)
    primary = jax.process_index() == 0
    if primary:
        save_config(config, workdir)
        (workdir / "plan.json").write_text(json.dumps(exp.plan(), indent=2))
    tc = config.train
    log.info("plan: %s", json.dumps(exp.plan()))
    mesh = make_mesh(config.mesh, devices, batch_size=tc.batch_size)
    local_batch_size(tc.batch_size, mesh)  # validates divisibility before any work
    log.info("mesh %s over %d processes", dict(mesh.shape), jax.process_count())

    tx = make_optimizer(tc)
    state, train_step = sharded_setup(exp, tx, mesh)
    checkpointer = Checkpointer(workdir, keep=tc.keep_checkpoints)
    start_step = 0
    if checkpointer.latest_step() is not None:
        state, _ = checkpointer.restore_latest(abstract_like(state))
        start_step = int(state.step)
        log.info("resumed from %s at step %d", checkpointer.latest.directory, start_step)

    loader = make_train_loader(
        exp.dataset,
        exp.split["train"],
        patch_size=exp.patch_size,
        batch_size=tc.batch_size,
        seed=config.seed,
        fg_oversample=config.data.fg_oversample,
        augment=AugmentConfig.from_config(config.data.augment),
        normalization=config.data.normalization,
        num_threads=config.data.num_threads,
        prefetch=config.data.prefetch,
        concurrent_reads=config.data.get("concurrent_reads", False),  # older workdirs lack it
        start_step=start_step,
        ct_stats=exp.ct_stats,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    run = Run(
        exp=exp,
        train_step=train_step,
        predict=make_predict_fn(exp.model, mesh=mesh),
        loader=loader,
        checkpointer=checkpointer,
        writer=MetricWriter(workdir, enabled=primary),
        batch_sharding=batch_sharding(mesh, len(exp.patch_size)),
    )
    summary = {"start_step": start_step, "num_steps": tc.num_steps}
    try:
        with GracefulStop() as stop:
            summary.update(_loop(run, state, start_step, stop_at, stop))
    finally:
        checkpointer.wait()
        checkpointer.close()
        loader.close()
        run.writer.close()
    return summary


class Run(NamedTuple):
    """What the loop uses besides the state."""

    exp: Experiment
    train_step: Callable
    predict: Callable
    loader: Any
    checkpointer: Checkpointer
    writer: MetricWriter
    batch_sharding: Any


class GracefulStop:
    """SIGINT/SIGTERM handlers for the loop: the first signal asks it to stop after the
    current step (which is then checkpointed, so nothing computed is lost); a second one
    interrupts at once (orbax only ever renames complete checkpoints into place)."""

    def __init__(self):
        self.requested = 0

    def _handle(self, signum, frame):
        self.requested += 1
        if self.requested > 1:
            raise KeyboardInterrupt(f"signal {signum}")
        print(f"signal {signum}: stopping after this step (send it again to abort)", flush=True)

    def __enter__(self):
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # else: signals not ours
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _loop(run: Run, state, start_step: int, stop_at: int | None, stop: GracefulStop) -> dict:
    exp, loader, checkpointer, writer = run.exp, run.loader, run.checkpointer, run.writer
    tc = exp.config.train
    end = tc.num_steps if stop_at is None else min(stop_at, tc.num_steps)
    compiled = None
    pending = None  # (step, metrics still on device): read one step late
    best = -np.inf
    progress = tqdm.tqdm(
        total=tc.num_steps,
        initial=start_step,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        disable=jax.process_index() != 0,
    )
    t0 = time.perf_counter()
    for step in range(start_step, end):
        batch = global_batch(next(loader), run.batch_sharding)
        if compiled is None:
            compiled, _ = _compile(run.train_step, state, batch)
            t0 = time.perf_counter()
        state, step_metrics = compiled(state, batch)
        if pending is not None:
            _log_metrics(pending, writer, progress, checkpointer)
            pending = None
        done = step + 1
        if done % tc.log_every == 0 or done == tc.num_steps:
            pending = (done, step_metrics)
        progress.update(1)
        is_last = done == tc.num_steps
        if done % tc.eval_every == 0 or is_last:
            if pending is not None:
                _log_metrics(pending, writer, progress, checkpointer)
                pending = None
            dice = validate(exp, run.predict, state.params)
            writer.write(done, {"val_dice": dice})
            progress.write(f"step {done}: validation Dice {dice:.4f}")
            checkpointer.save_best(done, state, dice if np.isfinite(dice) else -1.0)
            best = max(best, dice)
        if done % tc.checkpoint_every == 0 or done == end or stop.requested:
            checkpointer.save(done, state, loader.get_state(), force=done == end or stop.requested)
        if stop.requested and done < end:
            progress.close()
            raise KeyboardInterrupt(f"stopped by a signal after step {done} (checkpointed)")
    if pending is not None:
        _log_metrics(pending, writer, progress, checkpointer)
    progress.close()
    train_seconds = time.perf_counter() - t0
    return {"train_seconds": train_seconds, "best_val_dice": float(best), "state": state}


def _log_metrics(pending, writer, progress, checkpointer) -> None:
    step, metrics = pending
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    nonfinite = values.pop("nonfinite_steps")
    writer.write(step, values)
    progress.set_postfix(loss=f"{values['loss']:.4f}")
    if int(nonfinite):
        last = checkpointer.latest_step()
        raise NonFiniteLossError(
            f"non-finite loss or gradient at or before step {step} (loss {values['loss']}); "
            f"training stopped. Those updates were skipped, and the last checkpoint "
            f"(step {last}) under {checkpointer.latest.directory} is intact. Lower "
            f"train.learning_rate or check the data, then rerun to resume."
        )
