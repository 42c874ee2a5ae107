"""Attribution maps for a segmentation class: integrated gradients and (Seg-)Grad-CAM.

Both explain a scalar per image, the *target*
``f(x) = sum_v mask[v] * s(x)[v, c]`` over the voxels ``v`` of an optional region ``mask``
(``[B, *spatial]``, default all voxels) for class ``c``, where ``s`` is the class's softmax
probability (``output="prob"``) or logit (``output="logit"``) of the model's full-resolution
head. Images are batches ``[B, *spatial, C]`` in the normalised input space (2D and 3D alike).
Images in a batch do not interact (instance norm), so one gradient of the batch sum gives
every image's gradient.

Integrated gradients (:func:`make_integrated_gradients_fn`), baseline ``x'``:
``IG = (x - x') * sum_k w_k grad f(x' + a_k (x - x'))`` with ``m = steps`` and

* ``"right"``: ``a_k = k / m``, ``k = 1..m``, ``w_k = 1 / m`` (``m`` gradients);
* ``"left"``: ``k = 0..m-1``; ``"midpoint"``: ``a_k = (k + 1/2) / m``, ``k = 0..m-1``;
* ``"trapezoid"`` (default): ``k = 0..m``, ``w = 1 / m`` except ``1 / (2m)`` at both ends
  (``m + 1`` gradients).

Completeness: ``sum IG ~= f(x) - f(x')``; the returned ``delta`` is the gap. Gradients are
taken ``chunk`` path points at a time (``jax.lax.map``), bounding memory to ``chunk`` batched
forward/backward passes. Baselines (:func:`make_baseline`): ``"blur"`` (default; Gaussian blur
of the image, sigma in voxels) or ``"zeros"`` (the mean intensity in z-scored space).
Caveat on ``"zeros"``: the U-Net's first conv has no bias and is followed by instance norm, so
the network is invariant to scaling its input (``f(a x) ~= f(x)`` for ``a`` down to ~1e-2;
only the norm's epsilon breaks it). On the straight path from ``0`` the target is then flat
except right next to ``0``, where it jumps: the attributions are ~0 and completeness fails.
The integrand of a ReLU/instance-norm network is also rough (kinks), so completeness improves
only slowly with ``steps``: check ``delta``.

Grad-CAM (:func:`make_grad_cam_fn`) on the output ``A [B, *s, F]`` of one U-Net submodule,
by default decoder stage ``level``'s last conv block ``decoder_{level}_conv_{convs - 1}``
(level 0: full resolution; ``len(features) - 2``: the lowest decoder stage): channel weights
``alpha_f = mean_v df/dA[v, f]`` (global average of the gradient), map
``ReLU(sum_f alpha_f A[..., f])``, resized to the input's spatial size (linear,
``jax.image.resize``); with ``normalize`` divided by its per-image maximum (all-zero maps stay
zero). The activations and their gradient are taken with ``flax.linen.intercept_methods``
(a zero perturbation added to the submodule's output), so the model needs no changes.
Default target: the logit (Seg-Grad-CAM); IG default: the probability (bounded, so
completeness is easy to read).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

__all__ = [
    "RULES",
    "integrated_gradients",
    "make_baseline",
    "make_grad_cam_fn",
    "make_integrated_gradients_fn",
    "path_points",
]

RULES = ("right", "left", "midpoint", "trapezoid")
OUTPUTS = ("prob", "logit")


def path_points(steps: int, rule: str = "trapezoid") -> tuple[np.ndarray, np.ndarray]:
    """``(alphas, weights)`` of the Riemann rule (module notes); weights sum to 1."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    m = steps
    if rule == "right":
        alphas, weights = np.arange(1, m + 1) / m, np.full(m, 1 / m)
    elif rule == "left":
        alphas, weights = np.arange(m) / m, np.full(m, 1 / m)
    elif rule == "midpoint":
        alphas, weights = (np.arange(m) + 0.5) / m, np.full(m, 1 / m)
    elif rule == "trapezoid":
        alphas, weights = np.arange(m + 1) / m, np.full(m + 1, 1 / m)
        weights[[0, -1]] = 0.5 / m
    else:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    return alphas.astype(np.float32), weights.astype(np.float32)


def _logits(model, params, images):
    out = model.apply({"params": params}, images)
    return (out[0] if isinstance(out, tuple) else out).astype(jnp.float32)


def _target(logits, target_class: int, output: str, mask):
    """Per-image target ``[B]`` (module notes)."""
    if output == "prob":
        score = jax.nn.softmax(logits, axis=-1)[..., target_class]
    else:
        score = logits[..., target_class]
    if mask is not None:
        score = score * jnp.asarray(mask, score.dtype)
    return score.reshape(score.shape[0], -1).sum(-1)


def _check_target(model, target_class: int, output: str) -> None:
    if not 0 <= target_class < model.num_classes:
        raise ValueError(f"target_class must be in [0, {model.num_classes}), got {target_class}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")


def make_baseline(images: np.ndarray, kind: str = "blur", sigma: float = 5.0) -> np.ndarray:
    """IG baseline for ``images [B, *spatial, C]``: ``"blur"`` (Gaussian blur with ``sigma``
    voxels on every spatial axis, ``reflect`` borders) or ``"zeros"``; float32."""
    images = np.asarray(images, np.float32)
    if kind == "zeros":
        return np.zeros_like(images)
    if kind == "blur":
        sigmas = (0,) + (sigma,) * (images.ndim - 2) + (0,)
        return ndimage.gaussian_filter(images, sigmas, mode="reflect").astype(np.float32)
    raise ValueError(f"baseline kind must be 'zeros' or 'blur', got {kind!r}")


def make_integrated_gradients_fn(
    model,
    target_class: int,
    *,
    steps: int = 64,
    rule: str = "trapezoid",
    output: str = "prob",
    chunk: int = 16,
) -> Callable:
    """Jitted ``(params, images, baselines, mask=None) -> dict`` of integrated gradients.

    ``images`` and ``baselines`` ``[B, *spatial, C]``; ``mask [B, *spatial]`` or ``None``.
    Returns ``attributions [B, *spatial, C]``, ``target`` ``f(x)`` ``[B]``,
    ``baseline_target`` ``f(x')`` ``[B]`` and ``delta = sum(attributions) - (f(x) - f(x'))``
    ``[B]`` (float32).
    """
    _check_target(model, target_class, output)
    alphas, weights = path_points(steps, rule)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")

    def f(params, images, mask):
        return _target(_logits(model, params, images), target_class, output, mask)

    def ig(params, images, baselines, mask=None):
        images = jnp.asarray(images, jnp.float32)
        baselines = jnp.asarray(baselines, jnp.float32)
        diff = images - baselines
        grad_fn = jax.grad(lambda x: f(params, x, mask).sum())

        def point(alpha_weight):
            alpha, weight = alpha_weight
            return weight * grad_fn(baselines + alpha * diff)

        grads = jax.lax.map(
            point, (jnp.asarray(alphas), jnp.asarray(weights)), batch_size=min(chunk, len(alphas))
        ).sum(0)
        attributions = diff * grads
        target, base = f(params, images, mask), f(params, baselines, mask)
        total = attributions.reshape(attributions.shape[0], -1).sum(-1)
        return {
            "attributions": attributions,
            "target": target,
            "baseline_target": base,
            "delta": total - (target - base),
        }

    return jax.jit(ig)


def integrated_gradients(
    model,
    params,
    images: np.ndarray,
    target_class: int,
    mask: np.ndarray | None = None,
    *,
    baseline: str | np.ndarray = "blur",
    sigma: float = 5.0,
    **kwargs,
) -> dict:
    """One-off :func:`make_integrated_gradients_fn` call (compiles each time; for many
    calls keep the function). ``baseline``: an array or a :func:`make_baseline` kind."""
    baselines = make_baseline(images, baseline, sigma) if isinstance(baseline, str) else baseline
    fn = make_integrated_gradients_fn(model, target_class, **kwargs)
    return fn(params, images, baselines, mask)


def _stage_layer(model, level: int) -> str:
    num_decoder = len(model.features) - 1
    if not 0 <= level < num_decoder:
        raise ValueError(f"level must be in [0, {num_decoder}) for this U-Net, got {level}")
    return f"decoder_{level}_conv_{model.convs_per_stage - 1}"


def _forward_with_probe(model, params, images, layer: str, delta):
    """Logits, and the output of submodule ``layer`` (``delta`` added to it unless None)."""
    captured = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if (
            context.method_name == "__call__"
            and context.module.name == layer
            and isinstance(context.module.parent, type(model))
        ):
            captured.append(out)
            if delta is not None:
                out = out + delta.astype(out.dtype)
        return out

    with nn.intercept_methods(interceptor):
        logits = _logits(model, params, images)
    if len(captured) != 1:
        raise ValueError(f"submodule {layer!r} was called {len(captured)} times, expected 1")
    return logits, captured[0]


def make_grad_cam_fn(
    model,
    target_class: int,
    *,
    level: int = 0,
    layer: str | None = None,
    output: str = "logit",
    normalize: bool = True,
) -> Callable:
    """Jitted ``(params, images [B, *spatial, C], mask=None) -> cam [B, *spatial]`` (>= 0).

    ``layer`` (any direct submodule of the U-Net, e.g. ``"encoder_2_conv_1"``) overrides the
    default ``decoder_{level}_conv_{convs_per_stage - 1}``. Rules in the module notes.
    """
    _check_target(model, target_class, output)
    layer = layer or _stage_layer(model, level)

    def cam(params, images, mask=None):
        images = jnp.asarray(images, jnp.float32)
        shape = jax.eval_shape(
            lambda x: _forward_with_probe(model, params, x, layer, None)[1], images
        )

        def target(delta):
            logits, act = _forward_with_probe(model, params, images, layer, delta)
            return _target(logits, target_class, output, mask).sum(), act

        zeros = jnp.zeros(shape.shape, jnp.float32)
        grads, act = jax.grad(target, has_aux=True)(zeros)
        act = act.astype(jnp.float32)
        spatial_axes = tuple(range(1, act.ndim - 1))
        alpha = grads.mean(axis=spatial_axes)  # [B, F]
        weights = alpha.reshape(alpha.shape[0], *[1] * len(spatial_axes), alpha.shape[1])
        heat = jax.nn.relu((act * weights).sum(-1))
        if heat.shape[1:] != images.shape[1:-1]:
            heat = jax.image.resize(heat, (heat.shape[0], *images.shape[1:-1]), "linear")
            heat = jax.nn.relu(heat)
        if normalize:
            peak = heat.reshape(heat.shape[0], -1).max(-1)
            peak = peak.reshape(-1, *[1] * (heat.ndim - 1))
            heat = jnp.where(peak > 0, heat / jnp.where(peak > 0, peak, 1.0), 0.0)
        return heat

    return jax.jit(cam)
