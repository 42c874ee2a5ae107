"""U-Net shapes, exact parameter counts, and the fast layers' equivalences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unetjax.models import UNet, stage_features, unet_param_count
from unetjax.models.layers import (
    UpsampleMatmul,
    conv3d_depth_folded,
    conv_native,
    max_pool,
    to_conv_transpose_kernel,
)


def _count(params) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


@pytest.mark.parametrize(
    "spatial,strides,kernels,deep",
    [
        ((32, 48), [(1, 1), (2, 2), (2, 2), (2, 2)], [(3, 3)] * 4, False),
        ((32, 48), [(1, 1), (2, 2), (2, 2)], [(3, 3)] * 3, True),
        ((8, 16, 12), [(1, 1, 1), (1, 2, 2), (2, 2, 2)], [(1, 3, 3), (3, 3, 3), (3, 3, 3)], True),
    ],
)
def test_shapes_and_param_count(spatial, strides, kernels, deep):
    features = stage_features(len(strides), 4, 12)
    model = UNet(3, features, strides, kernels, deep_supervision=deep)
    x = jnp.zeros((2, *spatial, 2))
    variables = model.init(jax.random.key(0), x)
    out = model.apply(variables, x)
    expected = unet_param_count(2, 3, features, kernels, strides, deep_supervision=deep)
    assert _count(variables["params"]) == expected
    if not deep:
        assert out.shape == (2, *spatial, 3)
        return
    assert len(out) == len(strides) - 1
    cumulative = np.ones(len(spatial), int)
    for level, logits in enumerate(out):
        if level:
            cumulative *= np.asarray(strides[level])
        assert logits.shape == (2, *(np.asarray(spatial) // cumulative), 3)


def test_features_rule():
    assert stage_features(7, 32, 512) == (32, 64, 128, 256, 512, 512, 512)


def test_input_size_rule_is_enforced():
    model = UNet(2, (4, 8, 8), [(1, 1), (2, 2), (2, 2)], [(3, 3)] * 3)
    with pytest.raises(ValueError, match="not divisible by the U-Net's total stride 4"):
        model.init(jax.random.key(0), jnp.zeros((1, 30, 32, 1)))


def test_maxpool_variant_and_bfloat16():
    model = UNet(
        2, (4, 8), [(1, 1), (2, 2)], [(3, 3)] * 2, downsample="maxpool", dtype=jnp.bfloat16
    )
    x = jnp.ones((1, 16, 16, 1))
    variables = model.init(jax.random.key(0), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    out = model.apply(variables, x)
    assert out.shape == (1, 16, 16, 2) and out.dtype == jnp.float32
    # max-pool variant: the first conv of stage 1 is not strided, so params differ only in
    # nothing; the count formula holds for both
    assert _count(variables["params"]) == unet_param_count(
        1, 2, (4, 8), [(3, 3)] * 2, [(1, 1), (2, 2)]
    )


@pytest.mark.parametrize("factors", [(2, 2), (1, 2, 2), (2, 2, 2)])
def test_upsample_matmul_equals_conv_transpose(factors):
    rng = np.random.default_rng(0)
    nd = len(factors)
    x = jnp.asarray(rng.normal(size=(2, *([3] * nd), 5)), jnp.float32)
    layer = UpsampleMatmul(4, factors)
    variables = layer.init(jax.random.key(1), x)
    ours = layer.apply(variables, x)
    kernel = to_conv_transpose_kernel(variables["params"]["kernel"]["kernel"], factors)
    spec = ("NHWC", "HWIO", "NHWC") if nd == 2 else ("NDHWC", "DHWIO", "NDHWC")
    ref = jax.lax.conv_transpose(x, jnp.asarray(kernel), factors, "VALID", dimension_numbers=spec)
    ref = ref + variables["params"]["bias"]
    assert ours.shape == (2, *(3 * f for f in factors), 4)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_max_pool_equals_reduce_window():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 6, 4, 3)), jnp.float32)
    ref = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1, 1), (1, 2, 2, 1, 1), "VALID")
    np.testing.assert_array_equal(np.asarray(max_pool(x, (2, 2, 1))), np.asarray(ref))


@pytest.mark.parametrize(
    "kernel,strides,padding",
    [  # depth stride 1 (and kd > 1) takes the output-folded forward, the rest input-folded
        ((3, 3, 3), (1, 1, 1), None),
        ((3, 3, 3), (1, 2, 2), None),
        ((5, 3, 3), (1, 1, 1), ((0, 3), (1, 1), (2, 0))),
        ((3, 3, 3), (1, 1, 1), ((4, 0), (0, 0), (1, 1))),
        ((3, 3, 3), (2, 2, 2), None),
        ((1, 3, 3), (1, 2, 2), None),
        ((3, 1, 3), (2, 1, 1), ((0, 1), (0, 0), (1, 1))),
        ((1, 1, 1), (1, 1, 1), None),
    ],
)
@pytest.mark.parametrize("cin,cout", [(3, 5), (5, 3)])  # C_in > F differentiates out-folded
def test_depth_folded_conv3d_equals_native(kernel, strides, padding, cin, cout):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 6, 8, 4, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(*kernel, cin, cout)), jnp.float32)

    def loss(fn, x, w):
        return jnp.sum(jnp.sin(fn(x, w, strides, padding)))

    for argnum in (None, 0, 1):
        if argnum is None:
            a = conv_native(x, w, strides, padding)
            b = conv3d_depth_folded(x, w, strides, padding)
        else:
            a = jax.grad(loss, argnums=argnum + 1)(conv_native, x, w)
            b = jax.grad(loss, argnums=argnum + 1)(conv3d_depth_folded, x, w)
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cin,cout", [(2, 3), (3, 2)])
def test_depth_folded_conv3d_forward_mode_matches_native(cin, cout):
    """Forward mode (used by GenSeg's reverse-over-forward hypergradient) works too."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 5, 6, 4, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, cin, cout)), jnp.float32)
    x_dot, w_dot = (jnp.asarray(rng.normal(size=a.shape), jnp.float32) for a in (x, w))
    tangents = [
        jax.jvp(lambda x, w, fn=fn: fn(x, w, (1, 1, 1)), (x, w), (x_dot, w_dot))[1]
        for fn in (conv_native, conv3d_depth_folded)
    ]
    native, folded = (np.asarray(t) for t in tangents)
    np.testing.assert_allclose(native, folded, rtol=1e-4, atol=1e-4)


def test_unet_conv_impls_agree():
    args = (2, (4, 8), [(1, 1, 1), (2, 2, 2)], [(3, 3, 3)] * 2)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 8, 8, 8, 1)), jnp.float32)
    variables = UNet(*args, conv_impl="native").init(jax.random.key(0), x)
    native = UNet(*args, conv_impl="native").apply(variables, x)
    folded = UNet(*args, conv_impl="folded").apply(variables, x)
    np.testing.assert_allclose(np.asarray(native), np.asarray(folded), rtol=1e-4, atol=1e-4)


def test_remat_same_params_outputs_and_gradients():
    args = (2, (4, 8), [(1, 1), (2, 2)], [(3, 3)] * 2)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 1)), jnp.float32)
    plain, remat = UNet(*args), UNet(*args, remat=True)
    variables = plain.init(jax.random.key(0), x)
    assert jax.tree.structure(variables) == jax.tree.structure(
        jax.eval_shape(remat.init, jax.random.key(0), x)
    )

    def loss(model, params):
        return jnp.sum(model.apply({"params": params}, x) ** 2)

    g_plain = jax.grad(lambda p: loss(plain, p))(variables["params"])
    g_remat = jax.grad(lambda p: loss(remat, p))(variables["params"])
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
