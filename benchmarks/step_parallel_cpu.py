"""Does XLA:CPU use all cores in the train step? Three ways to run the same step.

    python benchmarks/step_parallel_cpu.py [--cpus 2] [--rounds 2] [--row nuclei_2d]

Each variant runs in a fresh process pinned to ``--cpus`` CPUs (XLA sizes its thread pool
from the affinity mask), compiles the default 2D config's train step and times it
(median of the steps after two warm-ups), reporting wall time, cores used (process CPU
time / wall) and CPU-seconds per step. Variants:

* ``base``: ``make_train_step`` as training uses it (one device);
* ``split2``: the same step computing the gradient as the mean of two half-batch
  gradients inside one jit: two independent chains the thunk executor may run side by
  side. Exact for the default loss (every term is a per-sample mean; instance norm is
  per sample);
* ``devices2``: two XLA host devices (``--xla_force_host_platform_device_count=2``) and
  ``make_train_step`` with the batch sharded over a ``data`` mesh axis (unetjax's own
  data parallelism), the two halves running concurrently.

The variants are alternated round by round, so machine load drifts hit all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def child(variant: str, row: str, cpus: int, reps: int) -> None:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cpus])
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import run as bench

    from unetjax.losses import segmentation_loss
    from unetjax.models import UNet
    from unetjax.training.state import create_train_state, make_optimizer
    from unetjax.training.step import compile_train_step, make_train_step

    kwargs, cin, k, patch, batch, tcfg = bench.train_case(row, True)
    model = UNet(num_classes=k, **kwargs)
    tx = make_optimizer(tcfg)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, *patch, cin)), jnp.float32)
    y = jnp.asarray(rng.integers(0, k, size=(batch, *patch)), jnp.int32)
    state = jax.jit(lambda key, ex: create_train_state(model, tx, key, ex))(
        jax.random.key(0), x[:1])
    data = {"image": x, "label": y}
    if variant == "base":
        step = make_train_step(model, tx, batch_dice=tcfg.batch_dice)
    elif variant == "split2":

        def loss_fn(params, image, label):
            out = model.apply({"params": params}, image)
            return segmentation_loss(out, label, batch_dice=tcfg.batch_dice)

        def split_step(state, b):
            half = b["image"].shape[0] // 2
            parts = [
                jax.value_and_grad(loss_fn)(state.params, b["image"][s], b["label"][s])
                for s in (slice(0, half), slice(half, None))
            ]
            loss = (parts[0][0] + parts[1][0]) / 2
            grads = jax.tree.map(lambda a, c: (a + c) / 2, parts[0][1], parts[1][1])
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
            return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

        step = jax.jit(split_step, donate_argnums=0)
    elif variant == "devices2":
        from jax.sharding import AxisType, NamedSharding
        from jax.sharding import PartitionSpec as P

        mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(AxisType.Auto,))
        rep = NamedSharding(mesh, P())
        bsh = NamedSharding(mesh, P("data"))
        state = jax.device_put(state, rep)
        data = {kk: jax.device_put(v, bsh) for kk, v in data.items()}
        step = make_train_step(
            model, tx, batch_dice=tcfg.batch_dice,
            state_sharding=jax.tree.map(lambda _: rep, state), batch_sharding=bsh,
        )
    else:
        raise ValueError(variant)
    t0 = time.perf_counter()
    compiled = compile_train_step(step.lower(state, data), len(patch))  # as train.py
    compile_s = time.perf_counter() - t0
    walls, cpu = [], []
    for _ in range(reps + 2):
        c0, t0 = time.process_time(), time.perf_counter()
        state, m = compiled(state, data)
        jax.block_until_ready((state, m))
        walls.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    walls, cpu = walls[2:], cpu[2:]
    print(json.dumps({
        "wall": float(np.median(walls)),
        "cpu_s": float(np.median(cpu)),
        "cores": float(np.median(np.array(cpu) / np.array(walls))),
        "compile": compile_s,
        "loss": float(m["loss"]),
        "devices": len(jax.devices()),
        "jax": jax.__version__,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--row", default="nuclei_2d")
    parser.add_argument("--variants", default="base,split2,devices2")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.row, args.cpus, args.reps)
        return
    variants = args.variants.split(",")
    results: dict = {v: [] for v in variants}
    print(f"{args.row}: pinned to {args.cpus} CPUs, load average {os.getloadavg()}")
    for r in range(args.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            env = dict(os.environ)
            flags = env.get("XLA_FLAGS", "")
            flags = " ".join(f for f in flags.split() if "device_count" not in f)
            if v == "devices2":
                flags += " --xla_force_host_platform_device_count=2"
            env["XLA_FLAGS"] = flags.strip()
            cmd = [sys.executable, __file__, "--child", v, "--row", args.row,
                   "--cpus", str(args.cpus), "--reps", str(args.reps)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            try:
                res = json.loads(done.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                print(f"{v}: failed\n{done.stderr[-2000:]}")
                continue
            results[v].append(res)
            print(f"  round {r} {v:9} wall {res['wall']:.3f} s, cores {res['cores']:.2f}, "
                  f"CPU {res['cpu_s']:.3f} s, loss {res['loss']:.5f}, compile "
                  f"{res['compile']:.1f} s", flush=True)
    base = min((r["wall"] for r in results.get("base", [])), default=None)
    print(f"\nbest of {args.rounds} rounds (wall s / cores used / vs base):")
    for v, rs in results.items():
        if not rs:
            continue
        best = min(rs, key=lambda r: r["wall"])
        rel = f"{base / best['wall']:.2f}x" if base else "-"
        print(f"  {v:9} {best['wall']:.3f} s  {best['cores']:.2f} cores  {rel}")


if __name__ == "__main__":
    main()
