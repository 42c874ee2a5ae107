"""Tests for unetjax.inference.sliding_window (tiny shapes, CPU)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unetjax.inference.sliding_window import (
    gaussian_importance_map,
    make_tta_predict_fn,
    sliding_window_predict,
    window_starts,
)

C, K = 2, 3
RNG = np.random.default_rng(0)
W = RNG.normal(size=(C, K)).astype(np.float32)
B = RNG.normal(size=(K,)).astype(np.float32)


def pointwise_np(x):
    return x @ W + B


@jax.jit
def pointwise_fn(tiles):
    return tiles @ jnp.asarray(W) + jnp.asarray(B)


def ramp(patch):
    """A position-in-tile dependent logit offset [*patch, K] (not flip-symmetric)."""
    grids = np.meshgrid(*[np.arange(p, dtype=np.float32) / p for p in patch], indexing="ij")
    pos = sum((i + 1.0) * g for i, g in enumerate(grids))
    return np.stack([pos * (k - 1.0) * 2.0 for k in range(K)], axis=-1).astype(np.float32)


def make_translation_fn(patch):
    r = jnp.asarray(ramp(patch))

    @jax.jit
    def fn(tiles):
        return tiles @ jnp.asarray(W) + jnp.asarray(B) + r

    return fn


def softmax_np(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference_blend(image, patch, step, pad_value, tile_logits_np):
    """Independent numpy reference: pad, loop over windows, Gaussian-blend softmax."""
    spatial = image.shape[:-1]
    pads = [
        ((max(p - s, 0)) // 2, max(p - s, 0) - max(p - s, 0) // 2)
        for s, p in zip(spatial, patch, strict=True)
    ]
    img = np.pad(image, [*pads, (0, 0)], constant_values=pad_value)
    size = img.shape[:-1]
    per_axis = []
    for s, p in zip(size, patch, strict=True):
        n = int(np.ceil((s - p) / (p * step))) + 1
        actual = (s - p) / (n - 1) if n > 1 else 0
        per_axis.append([int(np.round(actual * i)) for i in range(n)])
    g = np.ones(patch)
    for ax, p in enumerate(patch):
        x = np.arange(p) - (p - 1) / 2
        shape = [1] * len(patch)
        shape[ax] = p
        g = g * np.exp(-(x**2) / (2 * (p / 8) ** 2)).reshape(shape)
    g = (g / g.max()).astype(np.float32)
    acc = np.zeros((*size, K), np.float64)
    wsum = np.zeros(size, np.float64)
    for corner in itertools.product(*per_axis):
        sl = tuple(slice(c, c + p) for c, p in zip(corner, patch, strict=True))
        probs = softmax_np(tile_logits_np(img[sl]).astype(np.float64))
        acc[sl] += probs * g[..., None]
        wsum[sl] += g
    out = acc / wsum[..., None]
    crop = tuple(slice(b, b + s) for (b, _), s in zip(pads, spatial, strict=True))
    return out[crop]


# ----------------------------------------------------------------------------- window_starts


@pytest.mark.parametrize(
    "size,patch,step,expected",
    [
        (100, 64, 0.5, [0, 18, 36]),  # ceil(36/32)+1 = 3 steps
        (100, 64, 1.0, [0, 36]),
        (64, 64, 0.5, [0]),
        (37, 16, 0.5, [0, 7, 14, 21]),
        (53, 16, 0.5, [0, 7, 15, 22, 30, 37]),
        (13, 8, 0.5, [0, 2, 5]),  # 2.5 rounds half-to-even like nnU-Net's np.round
        (17, 8, 0.5, [0, 3, 6, 9]),
        (11, 8, 0.5, [0, 3]),
    ],
)
def test_window_starts_nnunet_values(size, patch, step, expected):
    assert window_starts([size], [patch], step) == [expected]


def test_window_starts_cover_image():
    rng = np.random.default_rng(1)
    for _ in range(200):
        patch = int(rng.integers(4, 40))  # patch * step >= 1: no duplicate starts
        size = patch + int(rng.integers(0, 200))
        step = float(rng.choice([0.25, 0.5, 0.7, 1.0]))
        (starts,) = window_starts([size], [patch], step)
        assert starts[0] == 0 and starts[-1] == size - patch
        assert starts == sorted(set(starts))
        assert all(b - a <= patch * step + 1 for a, b in itertools.pairwise(starts))
        assert len(starts) == math.ceil((size - patch) / (patch * step)) + 1
    assert window_starts((37, 53), (16, 16)) == [[0, 7, 14, 21], [0, 7, 15, 22, 30, 37]]


def test_window_starts_rejects_bad_input():
    with pytest.raises(ValueError):
        window_starts([10], [16])
    with pytest.raises(ValueError):
        window_starts([20], [16], step=0.0)


# ----------------------------------------------------------------------------- gaussian


@pytest.mark.parametrize("patch", [(16, 16), (15, 24), (8, 8, 8), (5, 8, 11)])
def test_gaussian_importance_map(patch):
    g = gaussian_importance_map(patch)
    assert g.shape == patch and g.dtype == np.float32
    assert g.max() == 1.0 and g.min() > 0
    for ax in range(len(patch)):
        np.testing.assert_array_equal(g, np.flip(g, ax))
    # Analytic separable Gaussian, sigma = patch / 8, centre (p - 1) / 2, normalised to max 1.
    idx = tuple(p // 3 for p in patch)
    centre_val = math.prod(
        math.exp(-(((p % 2 == 0) * 0.5) ** 2) / (2 * (p / 8) ** 2)) for p in patch
    )
    val = math.prod(
        math.exp(-((i - (p - 1) / 2) ** 2) / (2 * (p / 8) ** 2))
        for i, p in zip(idx, patch, strict=True)
    )
    np.testing.assert_allclose(g[idx], val / centre_val, rtol=1e-6)


def test_gaussian_no_zeros_after_underflow():
    g = gaussian_importance_map((16, 16, 16), sigma_scale=1 / 32, dtype=np.float16)
    assert g.dtype == np.float16 and g.max() == 1 and (g > 0).all()
    x = (np.arange(16) - 7.5) / (16 / 32)
    raw = np.exp(-0.5 * (x[:, None, None] ** 2 + x[None, :, None] ** 2 + x[None, None] ** 2))
    raw = (raw / raw.max()).astype(np.float16)
    assert (raw == 0).any()  # the map really underflowed
    np.testing.assert_array_equal(g[raw == 0], raw[raw > 0].min())
    np.testing.assert_array_equal(g[raw > 0], raw[raw > 0])


# ----------------------------------------------------------------------------- pointwise


@pytest.mark.parametrize(
    "shape,patch",
    [
        ((37, 53), (16, 16)),
        ((10, 5), (16, 16)),  # smaller than the patch on both axes
        ((20, 7), (16, 16)),  # smaller on one axis
        ((13, 17, 11), (8, 8, 8)),
        ((5, 9, 3), (8, 8, 8)),
    ],
)
def test_pointwise_equals_whole_image(shape, patch):
    image = np.random.default_rng(2).normal(size=(*shape, C)).astype(np.float32)
    out = sliding_window_predict(
        image, pointwise_fn, patch, K, step=0.5, batch_size=3, pad_value=0.7
    )
    assert out.shape == (*shape, K) and out.dtype == np.float32
    np.testing.assert_allclose(out, softmax_np(pointwise_np(image)), atol=1e-5)
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)


# ----------------------------------------------------------------------------- blending


@pytest.mark.parametrize(
    "shape,patch,step",
    [
        ((37, 53), (16, 16), 0.5),
        ((37, 53), (16, 16), 0.3),
        ((10, 20), (16, 16), 0.5),
        ((13, 17, 11), (8, 8, 8), 0.5),
        ((5, 9, 3), (8, 8, 8), 0.5),
    ],
)
def test_translation_dependent_matches_reference(shape, patch, step):
    image = np.random.default_rng(3).normal(size=(*shape, C)).astype(np.float32)
    fn = make_translation_fn(patch)
    r = ramp(patch)
    out = sliding_window_predict(image, fn, patch, K, step=step, batch_size=4, pad_value=-1.5)
    ref = reference_blend(image, patch, step, -1.5, lambda t: t @ W + B + r)
    assert out.shape == (*shape, K)
    np.testing.assert_allclose(out, ref, atol=2e-5)
    # Blending really mixes windows: differs from any single-tile answer.
    assert not np.allclose(out, softmax_np(pointwise_np(image)), atol=1e-3)


# ----------------------------------------------------------------------------- fixed batch shape


def test_fixed_batch_shape_and_single_trace():
    patch, bs = (16, 16), 4
    shapes = []

    def recording_fn(tiles):
        shapes.append(tuple(tiles.shape))
        return pointwise_np(np.asarray(tiles))

    image = np.random.default_rng(4).normal(size=(37, 53, C)).astype(np.float32)
    out = sliding_window_predict(image, recording_fn, patch, K, batch_size=bs)
    n_windows = 4 * 6
    assert set(shapes) == {(bs, *patch, C)}
    assert len(shapes) == math.ceil(n_windows / bs)
    np.testing.assert_allclose(out, softmax_np(pointwise_np(image)), atol=1e-5)

    shapes.clear()
    sliding_window_predict(image[:, :23], recording_fn, patch, K, batch_size=bs)  # 4*2 windows
    assert set(shapes) == {(bs, *patch, C)} and len(shapes) == 2
    shapes.clear()
    sliding_window_predict(image[:21, :17], recording_fn, patch, K, batch_size=bs)  # 3 windows
    assert set(shapes) == {(bs, *patch, C)} and len(shapes) == 1

    traces = []

    @jax.jit
    def jitted(tiles):
        traces.append(tiles.shape)
        return tiles @ jnp.asarray(W) + jnp.asarray(B)

    sliding_window_predict(image, jitted, patch, K, batch_size=bs)
    sliding_window_predict(image[:20, :31], jitted, patch, K, batch_size=bs)
    sliding_window_predict(image[:9, :40], jitted, patch, K, batch_size=bs)
    assert traces == [(bs, *patch, C)]


def test_bad_predict_fn_shape_raises():
    image = np.zeros((20, 20, C), np.float32)
    with pytest.raises(ValueError, match="predict_fn returned shape"):
        sliding_window_predict(image, pointwise_fn, (16, 16), K + 1)
    with pytest.raises(ValueError):
        sliding_window_predict(image[..., 0], pointwise_fn, (16, 16), K)


# ----------------------------------------------------------------------------- mirror TTA


def manual_tta(apply_np, tiles, mirror_axes):
    outs = []
    for r in range(len(mirror_axes) + 1):
        for axes in itertools.combinations(mirror_axes, r):
            ax = tuple(a + 1 for a in axes)
            outs.append(np.flip(apply_np(np.flip(tiles, ax)), ax))
    return np.mean(outs, axis=0)


def test_tta_pointwise_equals_no_tta():
    image = np.random.default_rng(5).normal(size=(13, 17, 11, C)).astype(np.float32)
    plain = sliding_window_predict(image, pointwise_fn, (8, 8, 8), K)
    tta = sliding_window_predict(image, pointwise_fn, (8, 8, 8), K, mirror_axes=(0, 1, 2))
    np.testing.assert_allclose(tta, plain, atol=1e-5)


def test_tta_flip_sensitive_equals_manual_average():
    patch, axes = (16, 16), (0, 1)
    fn = make_translation_fn(patch)
    r = ramp(patch)

    def apply_np(t):
        return t @ W + B + r

    tiles = np.random.default_rng(6).normal(size=(2, *patch, C)).astype(np.float32)
    tta_fn = make_tta_predict_fn(fn, axes)
    got = np.asarray(tta_fn(tiles))
    np.testing.assert_allclose(got, manual_tta(apply_np, tiles, axes), atol=1e-5)
    assert not np.allclose(got, apply_np(tiles), atol=1e-3)
    # Single axis: only {} and {axis}.
    got1 = np.asarray(make_tta_predict_fn(fn, (1,))(tiles))
    np.testing.assert_allclose(got1, manual_tta(apply_np, tiles, (1,)), atol=1e-5)

    image = np.random.default_rng(7).normal(size=(37, 30, C)).astype(np.float32)
    out = sliding_window_predict(image, fn, patch, K, mirror_axes=axes, batch_size=4)
    ref = sliding_window_predict(
        image, lambda t: manual_tta(apply_np, np.asarray(t), axes), patch, K, batch_size=4
    )
    np.testing.assert_allclose(out, ref, atol=1e-5)
    ref_blend = reference_blend(
        image, patch, 0.5, 0.0, lambda t: manual_tta(apply_np, t[None], axes)[0]
    )
    np.testing.assert_allclose(out, ref_blend, atol=2e-5)
