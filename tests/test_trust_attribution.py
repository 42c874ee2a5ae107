"""Integrated gradients (completeness, Riemann rules) and Grad-CAM (shape, sign, exactness)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params
from scipy import ndimage

from unetjax.models import UNet
from unetjax.trust.attribution import (
    _target,
    make_baseline,
    make_grad_cam_fn,
    make_integrated_gradients_fn,
    path_points,
)


def smooth_images(shape, seed=0):
    x = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=shape), (0, 1.5, 1.5, 0))
    return ((x - x.mean()) / x.std()).astype(np.float32)


class Smooth(nn.Module):
    """A smooth (tanh) segmentation net: IG's Riemann sums converge fast on it."""

    num_classes: int = 2

    @nn.compact
    def __call__(self, x):
        return nn.Conv(self.num_classes, (1, 1))(jnp.tanh(nn.Conv(4, (3, 3))(x)))


def test_path_points():
    for rule, count in [("right", 8), ("left", 8), ("midpoint", 8), ("trapezoid", 9)]:
        alphas, weights = path_points(8, rule)
        assert len(alphas) == count and weights.sum() == pytest.approx(1.0)
    alphas, weights = path_points(4, "trapezoid")
    np.testing.assert_allclose(alphas, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(weights, [0.125, 0.25, 0.25, 0.25, 0.125])
    np.testing.assert_allclose(path_points(4, "right")[0], [0.25, 0.5, 0.75, 1])
    with pytest.raises(ValueError, match="rule"):
        path_points(4, "simpson")


def test_target_rule():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 3)), jnp.float32)
    mask = np.zeros((2, 4, 4), bool)
    mask[:, :2] = True
    probs = jax.nn.softmax(logits, -1)
    np.testing.assert_allclose(
        _target(logits, 1, "prob", mask), (probs[..., 1] * mask).sum((1, 2)), rtol=1e-6
    )
    np.testing.assert_allclose(_target(logits, 2, "logit", None), logits[..., 2].sum((1, 2)))


def test_integrated_gradients_completeness_smooth_model():
    model = Smooth()
    x = smooth_images((2, 12, 12, 1))
    params = random_params(model, x)
    ig = make_integrated_gradients_fn(model, 1, steps=64, rule="trapezoid", chunk=32)
    out = ig(params, x, make_baseline(x, "zeros"))
    gap = np.asarray(out["target"] - out["baseline_target"])
    assert out["attributions"].shape == x.shape
    # completeness within 1% of f(x) - f(x') (trapezoid error ~ 1 / steps**2 on smooth f)
    np.testing.assert_array_less(np.abs(out["delta"]), 0.01 * np.abs(gap))


def test_integrated_gradients_completeness_unet():
    model = UNet(2, (4, 8), [(1, 1), (2, 2)], [(3, 3)] * 2)
    x = smooth_images((4, 16, 16, 1), seed=1)
    params = random_params(model, x)
    ig = make_integrated_gradients_fn(model, 1, steps=256, rule="trapezoid", chunk=32)
    out = ig(params, x, make_baseline(x, "blur", sigma=1.0))
    gap = np.asarray(out["target"] - out["baseline_target"])
    total = np.asarray(out["attributions"]).sum((1, 2, 3))
    np.testing.assert_allclose(np.asarray(out["delta"]), total - gap, atol=1e-4)
    # LeakyReLU kinks and instance norm make the integrand rough, so the Riemann error falls
    # unevenly with steps (128 steps: up to ~3% here, 256: < 0.6%); 2% at 256 steps.
    np.testing.assert_array_less(np.abs(out["delta"]), 0.02 * np.abs(gap))


def test_grad_cam():
    model = UNet(2, (4, 8, 8), [(1, 1), (2, 2), (2, 2)], [(3, 3)] * 3)
    x = smooth_images((2, 16, 16, 1), seed=2)
    params = random_params(model, x)
    params["head_0"]["bias"] = jnp.array([0.3, -0.2])

    # Top stage, logit target: df/dA = the 1x1 head's weights for the class, so the
    # raw map is exactly ReLU(logit_c - bias_c).
    raw = make_grad_cam_fn(model, 1, level=0, normalize=False)(params, x)
    logits = jax.jit(model.apply)({"params": params}, x)
    expected = jax.nn.relu(logits[..., 1] + 0.2)
    np.testing.assert_allclose(np.asarray(raw), np.asarray(expected), rtol=1e-4, atol=1e-4)

    cam = np.asarray(make_grad_cam_fn(model, 0, level=1)(params, x))  # 8x8 stage, upsampled
    assert cam.shape == (2, 16, 16) and cam.dtype == np.float32
    assert cam.min() >= 0.0
    np.testing.assert_allclose(cam.reshape(2, -1).max(-1), 1.0, rtol=1e-6)

    with pytest.raises(ValueError, match="level"):
        make_grad_cam_fn(model, 1, level=2)
    with pytest.raises(ValueError, match="target_class"):
        make_grad_cam_fn(model, 2)
