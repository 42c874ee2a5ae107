"""Per-voxel predictive uncertainty from test-time-augmentation or MC-dropout samples.

Given ``S`` sampled probability maps ``p_s = softmax(logits_s)`` of a voxel (float32, nats):

* ``probs`` = ``mean_s p_s``; ``entropy`` (predictive entropy) = ``H(probs)`` with
  ``H(p) = -sum_k p_k log p_k`` (``0 log 0 = 0``); ``expected_entropy`` = ``mean_s H(p_s)``.
* ``mutual_info`` (BALD) = ``max(entropy - expected_entropy, 0)`` (clipped: rounding can
  make it slightly negative); ``variance`` = per-class population variance
  ``mean_s (p_s - probs)**2`` (``[..., K]``).

Samples (:func:`make_uncertainty_fn`), for a batch of tiles ``[B, *patch, C]``:

* ``mode="tta"``: sample ``s`` mirrors the tiles over the ``s % F``-th subset of
  ``mirror_axes`` (all ``F = 2**len(mirror_axes)`` subsets in the order of
  ``sliding_window.mirror_average``, the empty subset -- identity -- first), optionally
  applies a random small affine (``affine > 0``), predicts, and maps the logits back (inverse
  affine, then the same mirroring). ``num_samples`` defaults to ``F``; without ``affine``
  samples beyond ``F`` repeat the mirrorings.
* ``mode="mc_dropout"``: the model is applied with ``train=True`` and its own ``"dropout"``
  key per sample (needs ``UNet(dropout_rate > 0)``, else every sample is the same and the
  mutual information is 0). ``mirror_axes`` (default none) and ``affine`` combine with it
  exactly as in ``"tta"``.
* Keys: ``jax.random.split(key, (2, S))`` -> row 0 the dropout keys, row 1 the affine keys.
* All samples are stacked ``[S, B, *patch, C]`` and the model is applied once under
  ``jax.vmap`` (one copy of the network in the compiled program); the whole set is one jitted
  call. Device memory grows with ``S * B``: lower the sliding window's ``batch_size``.
* Affine: ``A = I + U(-affine, affine)^{d x d}`` per sample (about the tile centre,
  ``(n - 1) / 2``), applied by pulling the input from ``A (p - c) + c`` and the logits back from
  ``A^-1 (p - c) + c``; linear interpolation, edge values outside (``mode="nearest"``).

Sliding-window blending (:func:`sliding_window_uncertainty`): the per-tile *sufficient
statistics* that are linear in the samples -- ``probs``, ``expected_entropy`` and the second
moment ``variance + probs**2`` -- are blended with the Gaussian weights of
``sliding_window.py``; ``entropy``, ``mutual_info`` and ``variance`` are then recomputed from the
blended statistics. This treats every (tile, sample) pair covering a voxel as one member of a
Gaussian-weighted mixture, so the blended ``probs`` equal what ``sliding_window_predict``
blends (mean of the per-sample softmaxes) and the maps stay consistent with them (blending the
maps themselves would not be: entropy is not linear).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.ndimage import map_coordinates
from jax.scipy.special import entr
from scipy import special as sp_special

from unetjax.inference.sliding_window import TileGrid, gaussian_importance_map, mirror_subsets

__all__ = [
    "MODES",
    "case_uncertainty",
    "entropy",
    "make_uncertainty_fn",
    "sliding_window_uncertainty",
    "summarize_samples",
]

MODES = ("tta", "mc_dropout")

UncertaintyFn = Callable[[object, jax.Array, jax.Array], dict]


def entropy(probs: jax.Array, axis: int = -1) -> jax.Array:
    """Shannon entropy in nats over ``axis`` (``0 log 0 = 0``)."""
    return entr(probs).sum(axis=axis)


def summarize_samples(probs: jax.Array) -> dict[str, jax.Array]:
    """Uncertainty maps of sampled probabilities ``[S, ..., K]`` (module rules; traceable).

    Returns ``probs [..., K]``, ``entropy``, ``expected_entropy``, ``mutual_info`` (``[...]``)
    and ``variance [..., K]``, float32. Also usable for ensembles (``S`` checkpoints).
    """
    probs = jnp.asarray(probs, jnp.float32)
    mean = probs.mean(axis=0)
    h = entropy(mean)
    expected = entropy(probs).mean(axis=0)
    return {
        "probs": mean,
        "entropy": h,
        "expected_entropy": expected,
        "mutual_info": jnp.maximum(h - expected, 0.0),
        "variance": probs.var(axis=0),
    }


def _warp(x: jax.Array, matrix: jax.Array) -> jax.Array:
    """``out[p] = x[matrix @ (p - c) + c]`` per tile and channel (``x [B, *S, C]``)."""
    spatial = x.shape[1:-1]
    grid = jnp.stack(
        jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in spatial], indexing="ij")
    )
    centre = ((jnp.asarray(spatial, jnp.float32) - 1) / 2).reshape(-1, *[1] * len(spatial))
    src = jnp.einsum("ij,j...->i...", matrix, grid - centre) + centre
    coords = list(src)

    def one(image):  # [*S]
        return map_coordinates(image, coords, order=1, mode="nearest")

    return jax.vmap(jax.vmap(one, in_axes=-1, out_axes=-1))(x)


def make_uncertainty_fn(
    model,
    mode: str = "tta",
    num_samples: int | None = None,
    *,
    mirror_axes: Sequence[int] | None = None,
    affine: float = 0.0,
) -> UncertaintyFn:
    """Jitted ``(params, tiles [B, *patch, C], key) -> maps`` (see :func:`summarize_samples`).

    ``model`` is a ``UNet`` (deep supervision: the full-resolution head is used). ``mode`` is
    ``"tta"`` or ``"mc_dropout"``; ``num_samples`` (``S``) defaults to the number of
    mirrorings in ``"tta"`` and is required for ``"mc_dropout"``. ``mirror_axes`` are spatial
    axes (0-based); ``None`` means all spatial axes for ``"tta"`` and none for
    ``"mc_dropout"``. ``affine`` > 0 adds a random affine per sample (module notes). The key
    is a typed PRNG key (``jax.random.key``); it is unused by a sampling without randomness.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "mc_dropout" and num_samples is None:
        raise ValueError("mode='mc_dropout' needs num_samples")
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if affine < 0:
        raise ValueError(f"affine must be >= 0, got {affine}")
    dropout = mode == "mc_dropout"

    def apply(params, x, key):
        if dropout:
            out = model.apply({"params": params}, x, train=True, rngs={"dropout": key})
        else:
            out = model.apply({"params": params}, x)
        return (out[0] if isinstance(out, tuple) else out).astype(jnp.float32)

    def uncertainty(params, tiles, key):
        ndim = tiles.ndim - 2
        if mirror_axes is None:
            axes = tuple(range(ndim)) if mode == "tta" else ()
        else:
            axes = tuple(int(a) for a in mirror_axes)
        if len(set(axes)) != len(axes) or any(not 0 <= a < ndim for a in axes):
            raise ValueError(f"mirror_axes {axes} invalid for {ndim} spatial axes")
        flips = [tuple(a + 1 for a in f) for f in mirror_subsets(axes)]  # as batch axes
        count = num_samples or len(flips)
        sample_flips = [flips[s % len(flips)] for s in range(count)]
        drop_keys, affine_keys = jax.random.split(key, (2, count))
        # One model instance under vmap for all samples: [S, B, *patch, C].
        x = jnp.stack([jnp.flip(tiles, f) if f else tiles for f in sample_flips])
        if affine > 0:
            eye = jnp.eye(ndim)
            matrices = eye + jax.vmap(
                lambda k: jax.random.uniform(k, (ndim, ndim), minval=-affine, maxval=affine)
            )(affine_keys)
            x = jax.vmap(_warp)(x, matrices)
        logits = jax.vmap(apply, in_axes=(None, 0, 0))(params, x, drop_keys)
        if affine > 0:
            logits = jax.vmap(_warp)(logits, jnp.linalg.inv(matrices))
        logits = jnp.stack(
            [jnp.flip(y, f) if f else y for y, f in zip(logits, sample_flips, strict=True)]
        )
        return summarize_samples(jax.nn.softmax(logits, axis=-1))

    return jax.jit(uncertainty)


def sliding_window_uncertainty(
    image: np.ndarray,
    uncertainty_fn: UncertaintyFn,
    params,
    key: jax.Array,
    patch_size: Sequence[int],
    num_classes: int,
    *,
    step: float = 0.5,
    batch_size: int = 4,
    pad_value: float = 0.0,
) -> dict[str, np.ndarray]:
    """Gaussian-blended uncertainty maps of one image ``[*spatial, C]`` (float32 numpy).

    Windows, Gaussian weights and centred padding as in ``sliding_window_predict``;
    ``uncertainty_fn`` (from :func:`make_uncertainty_fn`) is always called with exactly
    ``batch_size`` tiles (zero-filled last batch) and key ``jax.random.fold_in(key, i)`` for
    the ``i``-th batch. Blending as in the module notes. Returns ``probs`` and ``variance``
    ``[*spatial, K]``, ``entropy``, ``expected_entropy`` and ``mutual_info`` ``[*spatial]``.
    """
    grid = TileGrid(image, patch_size, step, batch_size, pad_value)
    patch_size, padded = grid.patch_size, grid.padded
    gaussian = gaussian_importance_map(patch_size)
    acc_p = np.zeros((*padded, num_classes), np.float32)
    acc_m2 = np.zeros((*padded, num_classes), np.float32)
    acc_h = np.zeros(padded, np.float32)
    weight = np.zeros(padded, np.float32)
    for i, (batch_windows, tiles) in enumerate(grid.batches()):
        out = uncertainty_fn(params, tiles, jax.random.fold_in(key, i))
        probs = np.asarray(out["probs"])
        if probs.shape != (batch_size, *patch_size, num_classes):
            raise ValueError(
                f"uncertainty_fn returned probs {probs.shape}, expected "
                f"{(batch_size, *patch_size, num_classes)}"
            )
        second = np.asarray(out["variance"]) + probs**2
        expected = np.asarray(out["expected_entropy"])
        for j, sl in enumerate(batch_windows):
            acc_p[sl] += probs[j] * gaussian[..., None]
            acc_m2[sl] += second[j] * gaussian[..., None]
            acc_h[sl] += expected[j] * gaussian
            weight[sl] += gaussian
    crop = grid.crop
    w = weight[crop]
    probs = acc_p[crop] / w[..., None]
    expected = acc_h[crop] / w
    h = sp_special.entr(probs).sum(-1)
    return {
        "probs": probs.astype(np.float32),
        "entropy": h.astype(np.float32),
        "expected_entropy": expected.astype(np.float32),
        "mutual_info": np.maximum(h - expected, 0.0).astype(np.float32),
        "variance": np.maximum(acc_m2[crop] / w[..., None] - probs**2, 0.0).astype(np.float32),
    }


def case_uncertainty(maps: dict, background: int = 0) -> dict[str, float]:
    """Per-case scores from (blended) maps with ``probs [*spatial, K]`` and ``entropy`` etc.

    ``mean_entropy`` / ``mean_mutual_info``: means over all voxels. ``foreground_*``: means over
    the predicted foreground (``argmax probs != background``), NaN when it is empty;
    ``foreground_voxels``: its size. ``score`` = ``foreground_entropy``, or ``mean_entropy`` when
    nothing is predicted as foreground (one number per case, e.g. to rank likely failures).
    """
    probs = np.asarray(maps["probs"])
    h = np.asarray(maps["entropy"], np.float64)
    mi = np.asarray(maps["mutual_info"], np.float64)
    fg = probs.argmax(-1) != background
    n = int(fg.sum())
    fg_h = float(h[fg].mean()) if n else float("nan")
    return {
        "mean_entropy": float(h.mean()),
        "mean_mutual_info": float(mi.mean()),
        "foreground_entropy": fg_h,
        "foreground_mutual_info": float(mi[fg].mean()) if n else float("nan"),
        "foreground_voxels": n,
        "score": fg_h if n else float(h.mean()),
    }
