"""GenSeg models: candidate ops are exact 2x up/down maps (2D, 3D), the fused mixture
equals the textbook mixture, generator/discriminator shapes and arch variables."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unetjax.genseg import TEST_COMPILER_OPTIONS, MaskToImageGenerator, PatchDiscriminator, ops


def _inputs(nd, n, cin=3, cout=5, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(2, *(n,) * nd, cin)), jnp.float32)
    kernels = [
        jnp.asarray(rng.normal(size=(*(k,) * nd, cin, cout)), jnp.float32)
        for k, _ in ops.CANDIDATES
    ]
    weights = jax.nn.softmax(jnp.asarray(rng.normal(size=len(ops.CANDIDATES)), jnp.float32))
    return x, kernels, weights


@pytest.mark.parametrize("nd,n", [(2, 6), (3, 4)])
def test_every_candidate_doubles_and_halves_exactly(nd, n):
    x, kernels, weights = _inputs(nd, n)
    x2 = jnp.zeros((2, *(2 * n,) * nd, 3))
    for kernel, (k, p) in zip(kernels, ops.CANDIDATES, strict=True):
        up = jax.eval_shape(lambda a, w, p=p: ops.up_reference(a, w, p), x, kernel)
        down = jax.eval_shape(lambda a, w, p=p: ops.down_reference(a, w, p), x2, kernel)
        assert up.shape == (2, *(2 * n,) * nd, 5), (k, p)
        assert down.shape == (2, *(n,) * nd, 5), (k, p)
    for impl in ("reference", "fused"):
        for direction, inp, size in (("up", x, 2 * n), ("down", x2, n)):
            out = jax.eval_shape(
                lambda a, ks, w, d=direction, i=impl: ops.mixed_op(a, ks, w, ops.CANDIDATES, d, i),
                inp,
                kernels,
                weights,
            )
            assert out.shape == (2, *(size,) * nd, 5), (impl, direction)


@pytest.mark.parametrize("nd,n", [(2, 6), (3, 4)])
def test_fused_mixture_equals_reference_mixture(nd, n):
    x, kernels, weights = _inputs(nd, n)
    x2 = jnp.asarray(np.random.default_rng(1).normal(size=(2, *(2 * n,) * nd, 3)), jnp.float32)

    @functools.partial(jax.jit, compiler_options=TEST_COMPILER_OPTIONS)
    def both(x, x2, kernels, weights):
        out = {}
        for impl in ("reference", "fused"):
            out[impl] = (
                ops.mixed_op(x, kernels, weights, ops.CANDIDATES, "up", impl, "native"),
                ops.mixed_op(x2, kernels, weights, ops.CANDIDATES, "down", impl, "native"),
                # the single pix2pix op (unsearched cells)
                ops.mixed_op(x, kernels[:1], weights[:1], ops.DEFAULT_OP, "up", impl, "native"),
            )
        # reference up op == jax.lax.conv_transpose with padding k - 1 - p
        k, p = ops.CANDIDATES[1]
        dn = ops._dimension_numbers(nd)
        out["ct"] = (
            ops.up_reference(x, kernels[1], p),
            jax.lax.conv_transpose(
                x, kernels[1], (2,) * nd, [(k - 1 - p, k - 1 - p)] * nd, dimension_numbers=dn
            ),
        )
        return out

    out = both(x, x2, kernels, weights)
    for ref, fused in zip(out["reference"], out["fused"], strict=True):
        scale = float(jnp.abs(ref).max())
        np.testing.assert_allclose(np.asarray(fused), np.asarray(ref), atol=1e-5 * scale)
    np.testing.assert_allclose(*map(np.asarray, out["ct"]), atol=1e-5)


@pytest.mark.parametrize(
    "nd,n,k,stride,pad", [(2, 4, 5, 1, (2, 2)), (2, 8, 8, 2, (3, 3)), (3, 4, 3, 2, (1, 0))]
)
def test_conv_impls_agree_with_gradients(nd, n, k, stride, pad):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, *(n,) * nd, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(*(k,) * nd, 3, 4)), jnp.float32)
    impls = ["native", "im2col"] + (["folded"] if nd == 3 else [])

    @functools.partial(jax.jit, compiler_options=TEST_COMPILER_OPTIONS)
    def run(x, w):
        def f(x, w, impl):
            return ops.conv_nd(x, w, (stride,) * nd, [pad] * nd, impl=impl)

        return {
            i: (f(x, w, i), jax.grad(lambda x, w, i=i: jnp.sum(f(x, w, i) ** 2), (0, 1))(x, w))
            for i in impls
        }

    out = run(x, w)
    ref = jax.tree.leaves(out["native"])
    for impl in impls[1:]:
        for a, b in zip(jax.tree.leaves(out[impl]), ref, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("nd,n", [(2, 8), (3, 8)])
def test_generator_and_discriminator_shapes(nd, n):
    masks = jnp.zeros((2, *(n,) * nd, 3))
    gen = MaskToImageGenerator(2, depth=2, base_features=4, search_down=True, dropout=True)
    variables = jax.eval_shape(lambda: gen.init(jax.random.key(0), masks))
    assert variables["arch"]["alpha_up"].shape == (2, 3)
    assert variables["arch"]["alpha_down"].shape == (2, 3)
    out = jax.eval_shape(
        lambda v: gen.apply(v, masks, train=True, rngs={"dropout": jax.random.key(1)}),
        variables,
    )
    assert out.shape == (2, *(n,) * nd, 2)
    disc = PatchDiscriminator(base_features=4, n_layers=1)
    dvars = jax.eval_shape(lambda: disc.init(jax.random.key(0), masks, jnp.zeros(out.shape)))
    logits = jax.eval_shape(lambda v: disc.apply(v, masks, jnp.zeros(out.shape)), dvars)
    assert logits.shape[-1] == 1 and logits.ndim == nd + 2
    with pytest.raises(ValueError, match="divisible"):
        gen.init(jax.random.key(0), jnp.zeros((1, *(n + 2,) * nd, 3)))


def test_pix2pix_losses():
    from unetjax.genseg import discriminator_loss, gan_loss, generator_loss

    zeros, big = jnp.zeros((2, 3, 3, 1)), jnp.full((2, 3, 3, 1), 30.0)
    np.testing.assert_allclose(float(gan_loss(zeros, True)), np.log(2), rtol=1e-6)
    assert float(gan_loss(big, True)) < 1e-6 and float(gan_loss(big, False)) > 29
    assert float(gan_loss(zeros, True, "lsgan")) == 1.0
    assert float(gan_loss(zeros, False, "lsgan")) == 0.0
    np.testing.assert_allclose(float(discriminator_loss(zeros, zeros)), np.log(2), rtol=1e-6)
    fake, real = jnp.zeros((2, 4, 4, 1)), jnp.full((2, 4, 4, 1), 0.5)
    total, parts = generator_loss(zeros, fake, real, lambda_l1=100.0)
    np.testing.assert_allclose(float(parts["g_l1"]), 0.5)
    np.testing.assert_allclose(float(total), np.log(2) + 50.0, rtol=1e-6)
    with pytest.raises(ValueError, match="gan_mode"):
        gan_loss(zeros, True, "wgan")
