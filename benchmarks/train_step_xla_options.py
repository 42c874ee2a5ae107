"""Train step compiled with XLA's default options vs the CPU 3D options train.py uses.

    python benchmarks/train_step_xla_options.py [--rows nuclei_2d,hippocampus_3d]

For each of ``benchmarks/run.py``'s training rows, builds the step as train.py does (the
batch sharded over the host devices), compiles it twice, with XLA's defaults and with
``unetjax.training.step.CPU_3D_TRAIN_OPTIONS`` (YNNPACK off for convolutions: Eigen's run
them), and prints the median step times, alternated in one process, and their ratio.
train.py uses those options where this shows them faster: 3D steps on CPU.
"""

import argparse
import os
import sys

from unetjax.host_devices import configure_host_devices

configure_host_devices()  # before JAX starts, as train.py

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench  # noqa: E402

from unetjax.models import UNet  # noqa: E402
from unetjax.training.state import create_train_state, make_optimizer  # noqa: E402
from unetjax.training.step import CPU_3D_TRAIN_OPTIONS, make_train_step  # noqa: E402


def compare(row: str, repeats: int) -> dict:
    kwargs, cin, k, patch, batch, tcfg = bench.train_case(row, False)
    model = UNet(num_classes=k, **kwargs)
    rng = np.random.default_rng(0)
    data = {
        "image": jnp.asarray(rng.normal(size=(batch, *patch, cin)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, k, size=(batch, *patch)), jnp.int32),
    }
    tx = make_optimizer(tcfg)
    state = jax.jit(lambda key, x: create_train_state(model, tx, key, x))(
        jax.random.key(0), data["image"][:1]
    )
    mesh = bench.data_parallel_mesh(batch)
    if mesh is not None:
        state, step, data = bench.sharded_train_step(model, tx, tcfg, state, data, mesh)
    else:
        step = make_train_step(model, tx, batch_dice=tcfg.batch_dice)
    lowered = step.lower(state, data)
    compiled = {
        "defaults": lowered.compile(),
        "cpu_3d_options": lowered.compile(compiler_options=CPU_3D_TRAIN_OPTIONS),
    }
    states = {name: jax.tree.map(jnp.copy, state) for name in compiled}

    def call(name: str):
        def run_step():
            states[name], metrics = compiled[name](states[name], data)
            jax.block_until_ready((states[name], metrics))

        return run_step

    fns = {name: call(name) for name in compiled}
    for fn in fns.values():  # warm-up
        fn()
        fn()
    results = bench.alternate(fns, repeats, bench.RssSampler())
    return {name: r["seconds_median"] for name, r in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="nuclei_2d,hippocampus_3d")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)
    print(
        f"jax {jax.__version__}, {len(jax.devices())} {jax.default_backend()} devices, "
        f"load average {os.getloadavg()}; medians of {args.repeats}, alternated"
    )
    print(f"{'row':16} {'defaults ms':>12} {'3D options ms':>14} {'options/defaults':>17}")
    for row in args.rows.split(","):
        t = compare(row, args.repeats)
        print(
            f"{row:16} {t['defaults'] * 1e3:12.1f} {t['cpu_3d_options'] * 1e3:14.1f} "
            f"{t['cpu_3d_options'] / t['defaults']:17.3f}"
        )


if __name__ == "__main__":
    main()
