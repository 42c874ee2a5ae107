"""Cost of one GenSeg iteration against one plain segmenter step at equal batch.

``python -m unetjax.genseg.bench [--nd 2] [--size 64] [--batch 2]``: builds a small
segmenter U-Net, generator and PatchGAN, compiles every mode's step once, then times
them interleaved (``--rounds`` rounds of ``--iters`` iterations each; the median per
iteration is reported, with its ratio to the plain step measured in the same run).
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unetjax.genseg.discriminator import PatchDiscriminator
from unetjax.genseg.generator import MaskToImageGenerator
from unetjax.genseg.step import (
    TEST_COMPILER_OPTIONS,
    GenSegConfig,
    GenSegModels,
    GenSegOptimizers,
    init_genseg_state,
    make_genseg_step,
    make_plain_step,
)
from unetjax.models.unet import UNet


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nd", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seg-features", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--gen-depth", type=int, default=4)
    ap.add_argument("--gen-width", type=int, default=16)
    ap.add_argument("--disc-layers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument(
        "--modes",
        nargs="+",
        default=["genseg", "genseg_unroll", "genseg_darts", "released", "separate", "pretrain"],
    )
    ap.add_argument("--fast-compile", action="store_true", help="TEST_COMPILER_OPTIONS")
    ap.add_argument(
        "--plain-batches",
        type=int,
        nargs="*",
        default=[],
        help="also time the plain step at these batch sizes (e.g. 2 x batch: the real + "
        "synthetic images one genseg segmenter step sees)",
    )
    args = ap.parse_args(argv)
    nd, n, b, k = args.nd, args.size, args.batch, 2
    feats = tuple(args.seg_features)
    strides = ((1,) * nd,) + ((2,) * nd,) * (len(feats) - 1)
    seg = UNet(k, feats, strides, ((3,) * nd,) * len(feats))
    gen = MaskToImageGenerator(1, depth=args.gen_depth, base_features=args.gen_width)
    disc = PatchDiscriminator(base_features=args.gen_width, n_layers=args.disc_layers)
    models = GenSegModels(seg, gen, disc)
    opts = GenSegOptimizers(segmenter=optax.sgd(0.01, momentum=0.9))
    rng = np.random.default_rng(0)

    def pair(b=b):
        lab = (rng.random((b, *(n,) * nd)) < 0.3).astype(np.int32)
        img = rng.normal(size=(*lab.shape, 1)) + lab[..., None]
        return {"image": jnp.asarray(img, jnp.float32), "label": jnp.asarray(lab)}

    batch = {"train": pair(), "val": pair()}
    state0 = init_genseg_state(jax.random.key(0), models, opts, batch["train"]["image"], k)

    runners, compile_s = {}, {}
    plain = make_plain_step(
        seg, opts.segmenter, compiler_options=TEST_COMPILER_OPTIONS if args.fast_compile else None
    )
    p_state = [
        jax.tree.map(jnp.copy, state0.seg_params),
        opts.segmenter.init(state0.seg_params),
    ]

    def run_plain():
        p_state[0], p_state[1], loss = plain(p_state[0], p_state[1], batch)
        return loss

    runners["plain"] = run_plain
    for pb in args.plain_batches:  # same step and parameters, another batch size
        other = {"train": pair(pb)}
        holder = [jax.tree.map(jnp.copy, p_state[0]), opts.segmenter.init(state0.seg_params)]

        def run_plain_b(other=other, holder=holder):
            holder[0], holder[1], loss = plain(holder[0], holder[1], other)
            return loss

        runners[f"plain_b{pb}"] = run_plain_b
    for mode in args.modes:
        if mode == "genseg_darts":
            cfg = GenSegConfig(mode="genseg", hypergradient="darts")
        elif mode in ("genseg_unroll", "genseg_fwd_rev"):
            cfg = GenSegConfig(mode="genseg", exact_method=mode.removeprefix("genseg_"))
        else:
            cfg = GenSegConfig(mode=mode)
        options = TEST_COMPILER_OPTIONS if args.fast_compile else None
        step = make_genseg_step(models, opts, cfg, k, compiler_options=options)
        holder = [jax.tree.map(jnp.copy, state0)]

        def run(step=step, holder=holder):
            holder[0], metrics = step(holder[0], batch)
            return metrics

        runners[mode] = run
    for name, fn in runners.items():
        t = time.perf_counter()
        jax.block_until_ready(fn())
        compile_s[name] = time.perf_counter() - t
    times = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, fn in runners.items():
            jax.block_until_ready(fn())
            t = time.perf_counter()
            for _ in range(args.iters):
                out = fn()
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - t) / args.iters)
    base = statistics.median(times["plain"])
    print(
        f"backend {jax.default_backend()}, {nd}D {n}^{nd}, batch {b}, seg features {feats}, "
        f"generator depth {args.gen_depth} width {args.gen_width}, PatchGAN {args.disc_layers}"
    )
    print(f"{'step':<14}{'ms/iter':>10}{'x plain':>10}{'first call s':>14}")
    for name in runners:
        med = statistics.median(times[name])
        print(f"{name:<14}{med * 1e3:>10.1f}{med / base:>10.2f}{compile_s[name]:>14.1f}")


if __name__ == "__main__":
    main()
