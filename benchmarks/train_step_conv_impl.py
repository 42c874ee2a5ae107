"""Whole train step of the default 3D config with native vs depth-folded 3D convs.

    python benchmarks/train_step_conv_impl.py [--config configs/hippocampus.py]

Builds the config's U-Net twice (``conv_impl="native"`` and ``"folded"``, identical
parameters), times the jitted train step on a fixed random batch, alternating the two,
and prints medians and their ratio (compile excluded).
"""

import argparse
import pathlib
import time

import jax
import numpy as np

from unetjax.models import UNet
from unetjax.planning import resolve_model_config
from unetjax.training.state import create_train_state, make_optimizer
from unetjax.training.step import make_train_step


def load_config(path: str):
    namespace: dict = {}
    exec(compile(pathlib.Path(path).read_text(), path, "exec"), namespace)
    return namespace["get_config"]()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/hippocampus.py")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    config = load_config(args.config)
    patch = tuple(config.data.patch_size)
    kwargs = resolve_model_config(config.model, patch, [1.0] * len(patch))
    tx = make_optimizer(config.train)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(config.train.batch_size, *patch, args.channels)).astype("f4"),
        "label": rng.integers(0, args.classes, (config.train.batch_size, *patch)).astype("i4"),
    }
    steps, states = {}, {}
    for impl in ("native", "folded"):
        model = UNet(args.classes, conv_impl=impl, **kwargs)
        states[impl] = create_train_state(model, tx, jax.random.key(0), batch["image"][:1])
        steps[impl] = make_train_step(model, tx, batch_dice=False)
        states[impl], m = steps[impl](states[impl], batch)  # compile + warm-up
        jax.block_until_ready(m)
    times = {impl: [] for impl in steps}
    for _ in range(args.repeats):
        for impl in steps:
            start = time.perf_counter()
            states[impl], m = steps[impl](states[impl], batch)
            jax.block_until_ready(m)
            times[impl].append(time.perf_counter() - start)
    med = {impl: float(np.median(t)) for impl, t in times.items()}
    print(f"{args.config}: batch {config.train.batch_size} x {patch}, jax {jax.__version__}")
    for impl, t in med.items():
        print(f"  {impl:7s} {t * 1e3:8.1f} ms/step")
    print(f"  folded is {med['native'] / med['folded']:.1f}x faster")


if __name__ == "__main__":
    main()
