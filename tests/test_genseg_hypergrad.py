"""Level-3 hypergradient: exact (autodiff through the unrolled step) against a brute-force
float64 central difference and against DARTS' finite-difference estimate; the
validation loss reaches the generator (genseg) and is cut off from it (released).

A small float64-clean problem: the repository's U-Net and Dice+CE compute their norms and
losses in float32, which would swamp a numerical derivative, so the segmenter here is a
two-conv net and the loss a float64 Dice+CE. The generator is GenSeg's (float64-clean),
with both its up and down cells searched.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unetjax.genseg import (
    TEST_COMPILER_OPTIONS,
    GenSegProblem,
    MaskToImageGenerator,
    darts_hypergradient,
    exact_hypergradient,
    hypergradient,
    unrolled_val_loss,
)
from unetjax.genseg.ops import fast_rng

K = 3
CONV = "native"  # XLA convs compile fastest; ops tests cover the other conv impls
# XLA CPU: ~5x faster compiles, slower code (see make_genseg_step)
jit0 = functools.partial(jax.jit, compiler_options=TEST_COMPILER_OPTIONS)


class TinySeg(nn.Module):
    @nn.compact
    def __call__(self, x):
        nd = x.ndim - 2
        x = jnp.tanh(nn.Conv(6, (3,) * nd, dtype=x.dtype, param_dtype=x.dtype)(x))
        return nn.Conv(K, (1,) * nd, dtype=x.dtype, param_dtype=x.dtype)(x)


def dice_ce64(logits, labels):
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    ce = -(onehot * jax.nn.log_softmax(logits)).sum(-1).mean()
    p, t = jax.nn.softmax(logits)[..., 1:], onehot[..., 1:]
    tp, fp, fn = (p * t).sum((1, 2)), (p * (1 - t)).sum((1, 2)), ((1 - p) * t).sum((1, 2))
    return ce + 1 - ((2 * tp + 1e-5) / (2 * tp + fp + fn + 1e-5)).mean()


def _labels(rng, n):
    lab = np.zeros((2, n, n), np.int32)
    for b in range(2):
        y, x = rng.integers(0, n - 4, 2)
        lab[b, y : y + 4, x : x + 3] = 1
        lab[b, rng.integers(0, n), :2] = 2
    return lab


@pytest.fixture(scope="module")
def problem64():
    with jax.enable_x64(True), fast_rng():  # fast_rng: ~10x faster init compiles on CPU
        rng = np.random.default_rng(0)
        n = 8
        seg = TinySeg()
        gen = MaskToImageGenerator(1, depth=2, base_features=4, search_down=True, conv_impl=CONV)
        lab, vlab = _labels(rng, n), _labels(rng, n)
        f64 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)  # noqa: E731
        real = {
            "image": jnp.asarray(rng.normal(size=(2, n, n, 1)) + lab[..., None], jnp.float64),
            "label": jnp.asarray(lab),
        }
        val = {
            "image": jnp.asarray(rng.normal(size=(2, n, n, 1)) + vlab[..., None], jnp.float64),
            "label": jnp.asarray(vlab),
        }
        masks = jax.nn.one_hot(lab, K, dtype=jnp.float64)
        # masks to synthesise from (any fixed masks do; augment_masks is tested elsewhere)
        syn = jax.nn.one_hot(np.roll(lab[::-1], (1, 2), axis=(1, 2)), K, dtype=jnp.float64)
        gvars = jit0(gen.init)(jax.random.key(2), masks)
        # spread alpha out so the mixture is not at the symmetric point
        arch = f64({k: v * 300.0 for k, v in gvars["arch"].items()})
        problem = GenSegProblem(
            segmenter=seg,
            generator=gen,
            num_classes=K,
            lambda_syn=1.0,
            inner_lr=0.5,
            seg_loss_fn=dice_ce64,
        )
        return dict(
            problem=problem,
            seg_params=f64(jit0(seg.init)(jax.random.key(3), real["image"])["params"]),
            gen_params=f64(gvars["params"]),
            arch=arch,
            real=real,
            val=val,
            syn=syn,
        )


def _args(d, problem=None):
    p = problem or d["problem"]
    return (p, d["seg_params"], d["arch"], d["gen_params"], d["real"], d["syn"], None, d["val"])


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(tree[k])) for k in sorted(tree)])


def test_exact_matches_float64_central_difference_and_darts(problem64):
    d = problem64
    with jax.enable_x64(True):
        exact = jit0(exact_hypergradient, static_argnums=(0, 8))(*_args(d), "jvp")
        assert exact.arch_grad["alpha_up"].dtype == jnp.float64
        g = _flat(exact.arch_grad)
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 1e-6
        # the literal definition (grad through the unrolled step) gives the same number
        for method in ("unroll", "fwd_rev"):
            other = jit0(exact_hypergradient, static_argnums=(0, 8))(*_args(d), method)
            np.testing.assert_allclose(_flat(other.arch_grad), g, rtol=1e-9, atol=1e-14)

        # brute force: central difference of L_val(S1(alpha)), alpha entry by entry
        f = jit0(unrolled_val_loss, static_argnums=0)
        problem, seg, arch, gen, real, syn, key, val = _args(d)
        h = 1e-5
        numeric = {}
        for name in sorted(arch):
            out = np.zeros(arch[name].shape)
            for idx in np.ndindex(*arch[name].shape):
                plus = {**arch, name: arch[name].at[idx].add(h)}
                minus = {**arch, name: arch[name].at[idx].add(-h)}
                lp = f(problem, seg, plus, gen, real, syn, key, val)
                lm = f(problem, seg, minus, gen, real, syn, key, val)
                out[idx] = (float(lp) - float(lm)) / (2 * h)
            numeric[name] = out
        num = _flat(numeric)
        # float64, h = 1e-5: truncation ~h^2 and rounding ~1e-16/h, both << 1e-7 relative
        np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-8 * np.abs(num).max())

        # DARTS: central difference along v with eps = 0.01 / |v|: O(eps^2) error
        darts = jit0(darts_hypergradient, static_argnums=0)(*_args(d))
        dg = _flat(darts.arch_grad)
        assert np.linalg.norm(dg - g) <= 1e-3 * np.linalg.norm(g)
        np.testing.assert_allclose(float(darts.val_loss), float(exact.val_loss), rtol=1e-12)
        # level 2's gradient comes out of both
        for a, b in zip(
            jax.tree.leaves(exact.seg_grad), jax.tree.leaves(darts.seg_grad), strict=True
        ):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-14)


def test_released_cuts_the_validation_loss_off_the_generator(problem64):
    """Nonzero hypergradient above; with the reference's detached, quantised synthetic
    images, d L_val(S1) / d(alpha, W) is exactly zero: S's update is independent of G."""
    d = problem64
    released = dataclasses.replace(d["problem"], detach_synthetic=True, quantize_synthetic=True)
    with jax.enable_x64(True):

        @jit0
        def grads(arch, gen_params):
            return jax.grad(
                lambda a, w: unrolled_val_loss(
                    released, d["seg_params"], a, w, d["real"], d["syn"], None, d["val"]
                ),
                argnums=(0, 1),
            )(arch, gen_params)

        g_arch, g_w = grads(d["arch"], d["gen_params"])
        assert np.all(_flat(g_arch) == 0.0)
        assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(g_w))


def test_hypergradient_dispatch():
    with pytest.raises(ValueError, match="identically zero"):
        hypergradient("first_order")
    with pytest.raises(ValueError, match="must be one of"):
        hypergradient("nope")
