"""GenSeg mask augmentation: one-hot validity (2D/3D, multi-class, nearest and
linear+argmax), identity parameters give the identity, flips are exact, jit/vmap."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unetjax.genseg import TEST_COMPILER_OPTIONS, MaskAugmentConfig, augment_masks

jit0 = functools.partial(jax.jit, compiler_options=TEST_COMPILER_OPTIONS)


def _masks(nd, n, classes=3, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    lab = np.zeros((batch, *(n,) * nd), np.int32)
    for b in range(batch):
        for c in range(1, classes):
            lo = rng.integers(0, n // 2, nd)
            lab[(b, *(slice(a, a + n // 3) for a in lo))] = c
    return jax.nn.one_hot(lab, classes, dtype=jnp.float32)


@functools.lru_cache
def _augment(cfg):
    return jit0(lambda key, masks: augment_masks(key, masks, cfg))


@pytest.mark.parametrize("nd,n", [(2, 16), (3, 8)])
@pytest.mark.parametrize("interpolation", ["nearest", "linear"])
def test_augmented_masks_stay_one_hot(nd, n, interpolation):
    masks = _masks(nd, n)
    cfg = MaskAugmentConfig(interpolation=interpolation)
    out = np.asarray(_augment(cfg)(jax.random.key(0), masks))
    assert out.shape == masks.shape
    assert set(np.unique(out)) <= {0.0, 1.0}
    np.testing.assert_array_equal(out.sum(-1), 1.0)
    assert not np.array_equal(out, np.asarray(masks))  # it does transform
    assert out[..., 1:].sum() > 0  # foreground survives the mild default ranges
    again = np.asarray(_augment(cfg)(jax.random.key(0), masks))
    np.testing.assert_array_equal(out, again)  # deterministic in the key


@pytest.mark.parametrize("nd,n", [(2, 16), (3, 8)])
def test_identity_parameters_give_identity(nd, n):
    masks = _masks(nd, n)
    for interpolation in ("nearest", "linear"):
        cfg = MaskAugmentConfig.identity()
        cfg = MaskAugmentConfig(**{**cfg.__dict__, "interpolation": interpolation})
        out = _augment(cfg)(jax.random.key(3), masks)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(masks))


def test_certain_flip_flips_every_axis_exactly():
    masks = _masks(2, 16)
    cfg = MaskAugmentConfig(**{**MaskAugmentConfig.identity().__dict__, "flip_prob": 1.0})
    out = _augment(cfg)(jax.random.key(0), masks)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(masks[:, ::-1, ::-1]))
