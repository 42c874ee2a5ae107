"""Gaussian-weighted sliding-window inference (nnU-Net style) for 2D images and 3D volumes.

Arrays are channel-last, ``[*spatial, C]``; 2D and 3D share one code path.

* Windows: per axis, nnU-Net's ``compute_steps_for_sliding_window``:
  ``n = ceil((size - patch) / (patch * step)) + 1`` starts, evenly spaced from ``0`` to
  ``size - patch`` and rounded (:func:`window_starts`).
* Weights: a separable Gaussian with ``sigma = patch * sigma_scale`` (default ``patch / 8``)
  per axis, centred on the patch, normalised to max 1, zeros replaced by the smallest nonzero
  value (:func:`gaussian_importance_map`).
* Padding: an axis shorter than the patch is padded with a constant to the patch size,
  centred like nnU-Net's ``pad_nd_image`` (``(patch - size) // 2`` before, the rest after);
  the output is cropped back to the input's spatial shape.
* Blending: each tile's softmax probabilities are multiplied by the Gaussian and summed on the
  host (float32); the sum is divided by the summed Gaussian weights.
* Mirror TTA (:func:`make_tta_predict_fn`): like nnU-Net v2, the *logits* are averaged over
  all mirrorings and the softmax is taken afterwards.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "gaussian_importance_map",
    "make_tta_predict_fn",
    "mirror_average",
    "TileGrid",
    "sliding_window_predict",
    "window_starts",
]

PredictFn = Callable[[jax.Array], jax.Array]


def gaussian_importance_map(
    patch_size: Sequence[int], sigma_scale: float = 1.0 / 8, dtype=np.float32
) -> np.ndarray:
    """Gaussian importance map of shape ``patch_size`` (nnU-Net's ``compute_gaussian``).

    ``sigma = patch_size[i] * sigma_scale`` per axis (default ``patch / 8``), centred at
    ``(patch - 1) / 2`` so the map is exactly mirror-symmetric (nnU-Net centres at
    ``patch // 2``), evaluated analytically in float64, normalised to max 1, cast to ``dtype``;
    zeros (underflow) are replaced by the smallest nonzero value.
    """
    patch_size = tuple(int(p) for p in patch_size)
    if not patch_size or min(patch_size) < 1:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    g = np.ones((), np.float64)
    for p in patch_size:
        x = np.arange(p, dtype=np.float64) - (p - 1) / 2.0
        sigma = p * sigma_scale
        g = np.multiply.outer(g, np.exp(-0.5 * (x / sigma) ** 2))
    g = (g / g.max()).astype(dtype)
    zero = g == 0
    if zero.any():
        g[zero] = g[~zero].min()
    return g


def window_starts(
    image_size: Sequence[int], patch_size: Sequence[int], step: float = 0.5
) -> list[list[int]]:
    """Per-axis window start indices (nnU-Net's ``compute_steps_for_sliding_window``).

    For each axis, ``n = ceil((size - patch) / (patch * step)) + 1`` starts evenly spaced from
    ``0`` to ``size - patch`` (rounded with ``np.round``); requires ``size >= patch`` and
    ``0 < step <= 1``. E.g. size 100, patch 64, step 0.5 -> ``[0, 18, 36]``.
    """
    image_size = [int(s) for s in image_size]
    patch_size = [int(p) for p in patch_size]
    if len(image_size) != len(patch_size):
        raise ValueError(f"image_size {image_size} and patch_size {patch_size} differ in rank")
    if not 0 < step <= 1:
        raise ValueError(f"step must be in (0, 1], got {step}")
    starts = []
    for size, patch in zip(image_size, patch_size, strict=True):
        if size < patch:
            raise ValueError(f"image size {image_size} is smaller than patch {patch_size}")
        n = math.ceil((size - patch) / (patch * step)) + 1
        stride = (size - patch) / (n - 1) if n > 1 else 0.0
        starts.append([int(np.round(stride * i)) for i in range(n)])
    return starts


def mirror_subsets(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    axes = tuple(int(a) for a in mirror_axes)
    if len(set(axes)) != len(axes):
        raise ValueError(f"mirror_axes has duplicates: {axes}")
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def mirror_average(apply_fn: PredictFn, tiles: jax.Array, mirror_axes: Sequence[int]) -> jax.Array:
    """Float32 logits of ``apply_fn`` averaged over all mirrorings of ``mirror_axes`` (traceable).

    ``mirror_axes`` are spatial axis indices (0-based); for a batch ``[B, *spatial, C]`` they
    flip batch axes ``a + 1``. For every subset of ``mirror_axes`` (the empty one included) the
    tiles are flipped, passed through ``apply_fn``, flipped back, and the logits averaged.
    """
    subsets = mirror_subsets(mirror_axes)
    total = None
    for axes in subsets:
        batch_axes = tuple(a + 1 for a in axes)
        x = jnp.flip(tiles, batch_axes) if axes else tiles
        y = apply_fn(x)
        y = (jnp.flip(y, batch_axes) if axes else y).astype(jnp.float32)
        total = y if total is None else total + y
    return total / len(subsets)


def make_tta_predict_fn(apply_fn: PredictFn, mirror_axes: Sequence[int]) -> PredictFn:
    """Jitted ``tiles -> logits`` averaged over all mirrorings (nnU-Net v2 mirror TTA), all
    ``2**len(mirror_axes)`` passes in one compiled call (see :func:`mirror_average`)."""
    return jax.jit(functools.partial(mirror_average, apply_fn, mirror_axes=tuple(mirror_axes)))


@functools.lru_cache(maxsize=4)
def _cached_tta(predict_fn: PredictFn, mirror_axes: tuple[int, ...]) -> PredictFn:
    # One wrapper per (predict_fn, mirror_axes) so repeated calls reuse the compiled program.
    return make_tta_predict_fn(predict_fn, mirror_axes)


def with_mirror_tta(predict_fn: PredictFn, mirror_axes: Sequence[int], ndim: int) -> PredictFn:
    """``predict_fn`` wrapped for mirror TTA over ``mirror_axes`` (unchanged when empty);
    the wrapper is cached per ``(predict_fn, mirror_axes)`` when ``predict_fn`` is hashable."""
    mirror_axes = tuple(int(a) for a in mirror_axes)
    if any(not 0 <= a < ndim for a in mirror_axes):
        raise ValueError(f"mirror_axes {mirror_axes} out of range for {ndim} spatial axes")
    if not mirror_axes:
        return predict_fn
    try:
        return _cached_tta(predict_fn, mirror_axes)
    except TypeError:  # unhashable callable: build an uncached wrapper
        return make_tta_predict_fn(predict_fn, mirror_axes)


@jax.jit
def _weighted_softmax(logits, weight):
    """``softmax(logits) * weight`` over the class axis, float32, on device."""
    probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    return probs * weight[None, ..., None]


class TileGrid:
    """An image padded to at least the patch (centred, nnU-Net ``pad_nd_image``) and its
    sliding windows, served as fixed-size, zero-filled tile batches."""

    def __init__(self, image, patch_size, step: float, batch_size: int, pad_value: float = 0.0):
        image = np.asarray(image, np.float32)
        self.patch_size = tuple(int(p) for p in patch_size)
        ndim = len(self.patch_size)
        if image.ndim != ndim + 1:
            raise ValueError(
                f"image must be [*spatial, C] with {ndim} spatial axes, got shape {image.shape}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        spatial = image.shape[:ndim]
        pads = [
            (max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2)
            for s, p in zip(spatial, self.patch_size, strict=True)
        ]
        if any(before or after for before, after in pads):
            image = np.pad(image, [*pads, (0, 0)], mode="constant", constant_values=pad_value)
        self.image = image
        self.padded = image.shape[:ndim]
        self.crop = tuple(
            slice(before, before + s) for (before, _), s in zip(pads, spatial, strict=True)
        )
        self.windows = [
            tuple(slice(s, s + p) for s, p in zip(corner, self.patch_size, strict=True))
            for corner in itertools.product(*window_starts(self.padded, self.patch_size, step))
        ]

    def batches(self):
        """Yield ``(windows, tiles [batch_size, *patch, C])``; the last batch zero-filled."""
        for b in range(0, len(self.windows), self.batch_size):
            batch_windows = self.windows[b : b + self.batch_size]
            tiles = np.zeros((self.batch_size, *self.patch_size, self.image.shape[-1]), np.float32)
            for i, sl in enumerate(batch_windows):
                tiles[i] = self.image[sl]
            yield batch_windows, tiles


def sliding_window_predict(
    image: np.ndarray,
    predict_fn: PredictFn,
    patch_size: Sequence[int],
    num_classes: int,
    *,
    step: float = 0.5,
    batch_size: int = 4,
    mirror_axes: Sequence[int] = (),
    pad_value: float = 0.0,
) -> np.ndarray:
    """Gaussian-blended sliding-window softmax probabilities for one image/volume.

    Args:
      image: float32 ``[*spatial, C]`` (already normalised), 2D or 3D.
      predict_fn: ``[batch_size, *patch_size, C] -> [batch_size, *patch_size, num_classes]``
        logits (normally jitted). It is always called with exactly ``batch_size`` tiles (the
        last batch is zero-filled, the extra outputs dropped), so it compiles once for every
        image size.
      patch_size: spatial tile size.
      num_classes: number of output classes ``K``.
      step: window step as a fraction of the patch (nnU-Net's ``tile_step_size``); windows
        per axis as in :func:`window_starts`.
      batch_size: tiles per ``predict_fn`` call.
      mirror_axes: spatial axes for mirror TTA; non-empty wraps ``predict_fn`` with
        :func:`make_tta_predict_fn` (logits averaged over mirrorings; needs a JAX-traceable
        ``predict_fn``). The wrapper is cached per ``(predict_fn, mirror_axes)``.
      pad_value: constant for padding axes shorter than the patch (centred, nnU-Net style;
        the output is cropped back).

    Returns:
      float32 ``[*spatial, num_classes]``: per-tile softmax probabilities averaged with
      Gaussian weights (``sigma = patch / 8``); same spatial shape as ``image``.
    """
    grid = TileGrid(image, patch_size, step, batch_size, pad_value)
    patch_size, ndim = grid.patch_size, len(grid.patch_size)
    predict_fn = with_mirror_tta(predict_fn, mirror_axes, ndim)

    gaussian = gaussian_importance_map(patch_size)
    gaussian_dev = jnp.asarray(gaussian)
    acc = np.zeros((*grid.padded, num_classes), np.float32)
    weight = np.zeros(grid.padded, np.float32)
    expected = (batch_size, *patch_size, num_classes)

    def consume(out, batch_windows):
        out = np.asarray(out)
        for tile, sl in zip(out, batch_windows, strict=False):
            acc[sl] += tile
            weight[sl] += gaussian

    # Dispatch batch k+1 before pulling batch k back, so host and device work overlap.
    pending = None
    for batch_windows, tiles in grid.batches():
        logits = predict_fn(tiles)
        if tuple(logits.shape) != expected:
            raise ValueError(
                f"predict_fn returned shape {tuple(logits.shape)}, expected {expected}"
            )
        out = _weighted_softmax(logits, gaussian_dev)
        if pending is not None:
            consume(*pending)
        pending = (out, batch_windows)
    consume(*pending)

    probs = acc / weight[..., None]
    crop = grid.crop
    return np.ascontiguousarray(probs[crop], dtype=np.float32)
