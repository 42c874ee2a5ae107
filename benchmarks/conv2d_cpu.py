"""2D convolution on XLA:CPU vs PyTorch, per layer and per direction, plus wgrad rewrites.

    python benchmarks/conv2d_cpu.py [--threads 1] [--repeats 7] [--no-torch]

For every 3x3 conv layer shape of the default 2D config's U-Net (batch 8, 128^2, features
16..256; stride-2 convs included), prints the median time of

* forward, input gradient (dgrad) and weight gradient (wgrad) separately: JAX
  (``conv_native``, each direction jitted alone, so XLA compiles only that direction) and
  PyTorch (``F.conv2d`` / ``aten::convolution_backward`` with one output mask), and the
  JAX/PyTorch time ratio per direction;
* the weight gradient in three JAX formulations: XLA's own (autodiff of
  ``conv_general_dilated``: XLA rewrites it as a convolution whose window is the whole
  feature map, with transposed copies of the activation and the output gradient),
  im2col (9 shifted slices concatenated, one ``[9*C_in, B*H*W] x [B*H*W, C_out]`` matmul),
  and 9 per-tap matmuls summed.

All variants of a row are alternated (the order flips each repeat). ``--threads 1``
(the default) pins the process to one CPU and PyTorch to one thread: per-core efficiency,
robust to other load on a shared machine; ``--threads 0`` uses every CPU.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

_pre = argparse.ArgumentParser(add_help=False)
_pre.add_argument("--threads", type=int, default=1)
_THREADS = _pre.parse_known_args()[0].threads
if _THREADS:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:_THREADS])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from unetjax.models.layers import conv_native  # noqa: E402

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover
    torch = None

BATCH = 8
SHAPES = [  # (spatial, c_in, c_out, stride, layers of this shape in the network)
    (128, 3, 16, 1, 1),
    (128, 16, 16, 1, 2),
    (128, 32, 16, 1, 1),
    (128, 16, 32, 2, 1),
    (64, 32, 32, 1, 2),
    (64, 64, 32, 1, 1),
    (64, 32, 64, 2, 1),
    (32, 64, 64, 1, 2),
    (32, 128, 64, 1, 1),
    (32, 64, 128, 2, 1),
    (16, 128, 128, 1, 2),
    (16, 256, 128, 1, 1),
    (16, 128, 256, 2, 1),
    (8, 256, 256, 1, 1),
]


def _taps(x, kshape, strides, out_hw):
    kh, kw = kshape[:2]
    xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    (sh, sw), (oh, ow) = strides, out_hw
    return [
        xp[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]


def wgrad_xla(x, dy, kshape, strides):
    w = jnp.zeros(kshape, x.dtype)
    return jax.vjp(lambda w: conv_native(x, w, strides), w)[1](dy)[0]


def wgrad_im2col(x, dy, kshape, strides):
    kh, kw, ci, co = kshape
    patches = jnp.concatenate(_taps(x, kshape, strides, dy.shape[1:3]), axis=-1)
    return (patches.reshape(-1, kh * kw * ci).T @ dy.reshape(-1, co)).reshape(kshape)


def wgrad_taps(x, dy, kshape, strides):
    ci, co = kshape[2:]
    d = dy.reshape(-1, co)
    taps = _taps(x, kshape, strides, dy.shape[1:3])
    return jnp.stack([t.reshape(-1, ci).T @ d for t in taps]).reshape(kshape)


def dgrad_xla(x, w, dy, strides):
    return jax.vjp(lambda x: conv_native(x, w, strides), x)[1](dy)[0]


def run_row(spatial, cin, cout, stride, repeats, use_torch, rng):
    strides = (stride, stride)
    x = jnp.asarray(rng.normal(size=(BATCH, spatial, spatial, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, cin, cout)) * 0.1, jnp.float32)
    dy = jnp.asarray(
        rng.normal(size=(BATCH, spatial // stride, spatial // stride, cout)), jnp.float32
    )
    kshape = w.shape
    jfwd = jax.jit(functools.partial(conv_native, strides=strides))
    jdgrad = jax.jit(functools.partial(dgrad_xla, strides=strides))
    wgrads = {
        n: jax.jit(functools.partial(f, kshape=kshape, strides=strides))
        for n, f in (("xla", wgrad_xla), ("im2col", wgrad_im2col), ("taps", wgrad_taps))
    }
    ref = wgrads["xla"](x, dy)
    for n, f in wgrads.items():
        np.testing.assert_allclose(
            f(x, dy), ref, rtol=1e-3, atol=1e-3 * float(jnp.abs(ref).max()), err_msg=n
        )
    calls = {
        "jax fwd": lambda: jax.block_until_ready(jfwd(x, w)),
        "jax dgrad": lambda: jax.block_until_ready(jdgrad(x, w, dy)),
        **{
            f"jax wgrad {n}": (lambda f=f: jax.block_until_ready(f(x, dy)))
            for n, f in wgrads.items()
        },
    }
    if use_torch:
        xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1)))
        wt = torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(w), (3, 2, 0, 1))))
        dyt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(dy), -1, 1)))
        ref_t = F.conv2d(xt, wt, stride=stride, padding=1)
        np.testing.assert_allclose(
            np.moveaxis(ref_t.numpy(), 1, -1), np.asarray(jfwd(x, w)), rtol=1e-3, atol=1e-3
        )

        def t_bwd(mask):
            return torch.ops.aten.convolution_backward(
                dyt, xt, wt, None, [stride, stride], [1, 1], [1, 1], False, [0, 0], 1, mask
            )

        def t_fwd():
            with torch.no_grad():
                F.conv2d(xt, wt, stride=stride, padding=1)

        calls.update({
            "torch fwd": t_fwd,
            "torch dgrad": lambda: t_bwd([True, False, False]),
            "torch wgrad": lambda: t_bwd([False, True, False]),
        })
    for c in calls.values():  # compile / warm-up
        c()
    times = {n: [] for n in calls}
    names = list(calls)
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            calls[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: float(np.median(v)) * 1e3 for n, v in times.items()}


def conv_gflop(spatial: int, cin: int, cout: int, stride: int) -> float:
    """GFLOP of one direction of a 3x3 conv layer at batch ``BATCH`` (2 per multiply-add)."""
    out = spatial // stride
    return 2 * BATCH * out * out * 9 * cin * cout / 1e9


def matmul_peak_gflops(use_torch: bool, n: int = 2048, repeats: int = 5) -> dict:
    """Achieved float32 GFLOP/s of an ``n^3`` matmul: the practical peak of these CPUs."""

    def gflops(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 2 * n**3 / float(np.median(times)) / 1e9

    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    peak = {"jax": gflops(lambda: matmul(a).block_until_ready())}
    if use_torch:
        ta = torch.ones(n, n)
        peak["torch"] = gflops(lambda: ta @ ta)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="pin to this many CPUs (PyTorch threads too); 0 = all")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    use_torch = torch is not None and not args.no_torch
    n_cpu = len(os.sched_getaffinity(0))
    if use_torch:
        torch.set_num_threads(n_cpu)
    print(f"jax {jax.__version__}, torch {torch.__version__ if use_torch else None}; "
          f"{n_cpu} CPU(s); load average {os.getloadavg()}; batch {BATCH}; ms, medians of "
          f"{args.repeats}")
    head = f"{'HxW':>8} {'cin':>4} {'cout':>4} {'s':>2} {'n':>2} |"
    head += f"{'fwd':>7} {'dgrad':>7} {'wgrad':>7} |"
    if use_torch:
        head += f"{'PT fwd':>7} {'dgrad':>7} {'wgrad':>7} | JAX/PT: {'fwd':>5} {'dgr':>5} "
        head += f"{'wgr':>5} |"
    head += f" wgrad: {'im2col':>7} {'taps':>7}"
    print(head)
    rng = np.random.default_rng(0)
    totals: dict = {}
    for spatial, cin, cout, stride, count in SHAPES:
        t = run_row(spatial, cin, cout, stride, args.repeats, use_torch, rng)
        for k, v in t.items():
            totals[k] = totals.get(k, 0.0) + count * v
        line = f"{spatial:>4}x{spatial:<3} {cin:4} {cout:4} {stride:2} {count:2} |"
        line += f"{t['jax fwd']:7.1f} {t['jax dgrad']:7.1f} {t['jax wgrad xla']:7.1f} |"
        if use_torch:
            line += (f"{t['torch fwd']:7.1f} {t['torch dgrad']:7.1f} {t['torch wgrad']:7.1f} |"
                     f"         {t['jax fwd'] / t['torch fwd']:5.2f} "
                     f"{t['jax dgrad'] / t['torch dgrad']:5.2f} "
                     f"{t['jax wgrad xla'] / t['torch wgrad']:5.2f} |")
        line += f"        {t['jax wgrad im2col']:7.1f} {t['jax wgrad taps']:7.1f}"
        print(line, flush=True)
    print("\nwhole network (each shape x its layer count; the first layer's dgrad is not "
          "needed in training but included):")
    jf, jd, jw = totals["jax fwd"], totals["jax dgrad"], totals["jax wgrad xla"]
    print(f"  JAX     fwd {jf:7.1f}  dgrad {jd:7.1f}  wgrad {jw:7.1f}  total "
          f"{jf + jd + jw:7.1f} ms")
    if use_torch:
        tf, td, tw = totals["torch fwd"], totals["torch dgrad"], totals["torch wgrad"]
        print(f"  PyTorch fwd {tf:7.1f}  dgrad {td:7.1f}  wgrad {tw:7.1f}  total "
              f"{tf + td + tw:7.1f} ms")
        print(f"  JAX/PT  fwd {jf / tf:7.2f}  dgrad {jd / td:7.2f}  wgrad {jw / tw:7.2f}  total "
              f"{(jf + jd + jw) / (tf + td + tw):7.2f}")
    print(f"  JAX wgrad: XLA {jw:.1f}, im2col {totals['jax wgrad im2col']:.1f}, "
          f"per-tap matmuls {totals['jax wgrad taps']:.1f} ms")
    gflop = sum(count * conv_gflop(sp, ci, co, st) for sp, ci, co, st, count in SHAPES)
    peak = matmul_peak_gflops(use_torch)
    print(f"\nGFLOP/s per direction ({gflop:.2f} GFLOP each over the network) vs the "
          f"2048^3 float32 matmul peak on {n_cpu} CPU(s): "
          + ", ".join(f"{k} {v:.0f}" for k, v in peak.items()))
    best_peak = max(peak.values())
    frameworks = [("JAX", "jax", "jax wgrad xla")]
    if use_torch:
        frameworks.append(("PyTorch", "torch", "torch wgrad"))
    for label, prefix, wgrad_key in frameworks:
        rates = [gflop / (totals[k] / 1e3) for k in (f"{prefix} fwd", f"{prefix} dgrad",
                                                     wgrad_key)]
        print(f"  {label:7} fwd {rates[0]:6.0f}  dgrad {rates[1]:6.0f}  wgrad {rates[2]:6.0f}"
              f"  ({', '.join(f'{r / best_peak:.0%}' for r in rates)} of the best peak)")


if __name__ == "__main__":
    main()
