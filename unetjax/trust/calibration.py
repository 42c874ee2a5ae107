"""Voxel-wise calibration: expected calibration error, reliability data, temperature scaling.

numpy/scipy, host side. Inputs are per-voxel class probabilities ``probs [..., K]`` (or logits)
and integer labels ``[...]`` of the same leading shape (e.g. one case ``[*spatial, K]`` and
``[*spatial]``); an optional boolean ``mask [...]`` keeps only the voxels where it is true.

* Bins: ``num_bins`` equal-width bins on [0, 1]; bin ``b`` holds confidences in
  ``[b / M, (b + 1) / M)``, the last bin also holds 1.0 (confidences are clipped to [0, 1]).
* Top-label: confidence = ``max_k p_k``, correct = ``argmax_k p_k == label`` (ties: first
  index, as ``np.argmax``).
* Class-wise (one-vs-rest, per class ``c``): confidence = ``p_c``, correct = ``label == c``.
* ECE = ``sum_b (n_b / N) * |acc_b - conf_b|`` over non-empty bins (``acc_b``, ``conf_b``:
  mean correctness and confidence in bin ``b``; ``N``: voxels counted). ``classwise_ece`` is the
  unweighted mean of the per-class ECEs. NaN when no voxel is counted.
* Bin statistics (:func:`calibration_bins`) are sums, so those of several cases add up
  (:func:`merge_bins`) to the statistics of all their voxels: dataset-level ECE without
  holding every voxel in memory.
* Temperature scaling: ``softmax(logits / T)``; :func:`fit_temperature` minimises the mean
  negative log-likelihood over voxels with a bounded scalar search (scipy's bounded Brent) on
  ``log T``. The NLL is convex in ``1 / T``, so the minimum found is the global one within the
  bounds. Only probabilities at hand (e.g. Gaussian-blended sliding-window output)? Use
  ``np.log(probs)`` as logits: softmax is shift-invariant, so this is exact for one softmax
  and a consistent post-hoc rescaling for blended ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import optimize, special

__all__ = [
    "apply_temperature",
    "bin_statistics",
    "calibration_bins",
    "ece_from_bins",
    "expected_calibration_error",
    "fit_temperature",
    "log_probs",
    "merge_bins",
    "reliability_diagram",
    "temperature_scale_probs",
]


def _flatten(probs: np.ndarray, labels: np.ndarray, mask: np.ndarray | None):
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    if probs.shape[:-1] != labels.shape:
        raise ValueError(
            f"probs {probs.shape} must be labels {labels.shape} plus a trailing class axis"
        )
    if mask is not None and np.shape(mask) != labels.shape:
        raise ValueError(f"mask {np.shape(mask)} must have the labels' shape {labels.shape}")
    probs = probs.reshape(-1, probs.shape[-1])
    labels = labels.reshape(-1).astype(np.int64)
    if mask is not None:
        keep = np.asarray(mask, bool).reshape(-1)
        probs, labels = probs[keep], labels[keep]
    num_classes = probs.shape[-1]
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must be in [0, {num_classes}), got {labels.min()}..{labels.max()}"
        )
    return probs, labels


def bin_statistics(confidence: np.ndarray, correct: np.ndarray, num_bins: int = 15) -> np.ndarray:
    """``[3, num_bins]`` float64 rows: count, sum of confidence, sum of correctness per bin."""
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    conf = np.clip(np.asarray(confidence, np.float64).reshape(-1), 0.0, 1.0)
    correct = np.asarray(correct, np.float64).reshape(-1)
    idx = np.minimum((conf * num_bins).astype(np.int64), num_bins - 1)
    return np.stack(
        [
            np.bincount(idx, minlength=num_bins).astype(np.float64),
            np.bincount(idx, weights=conf, minlength=num_bins),
            np.bincount(idx, weights=correct, minlength=num_bins),
        ]
    )


def calibration_bins(
    probs: np.ndarray, labels: np.ndarray, num_bins: int = 15, mask: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Summable bin statistics: ``{"top_label": [3, M], "classwise": [K, 3, M]}``.

    Rows are (count, sum of confidence, sum of correctness); see the module rules.
    """
    probs, labels = _flatten(probs, labels, mask)
    top = bin_statistics(probs.max(-1), probs.argmax(-1) == labels, num_bins)
    classwise = np.stack(
        [bin_statistics(probs[:, c], labels == c, num_bins) for c in range(probs.shape[-1])]
    )
    return {"top_label": top, "classwise": classwise}


def merge_bins(*stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Sum of :func:`calibration_bins` results (same ``num_bins`` and classes)."""
    if not stats:
        raise ValueError("merge_bins needs at least one set of bin statistics")
    return {k: sum(s[k] for s in stats) for k in stats[0]}


def ece_from_bins(stats: np.ndarray) -> np.ndarray | float:
    """ECE of bin statistics ``[..., 3, M]`` (one value per leading index); NaN if empty."""
    stats = np.asarray(stats, np.float64)
    count, conf_sum, acc_sum = stats[..., 0, :], stats[..., 1, :], stats[..., 2, :]
    total = count.sum(-1)
    gap = np.abs(acc_sum - conf_sum)  # n_b * |acc_b - conf_b|
    with np.errstate(invalid="ignore", divide="ignore"):
        ece = np.where(total > 0, gap.sum(-1) / total, np.nan)
    return float(ece) if ece.ndim == 0 else ece


def expected_calibration_error(
    probs: np.ndarray, labels: np.ndarray, num_bins: int = 15, mask: np.ndarray | None = None
) -> dict:
    """``{"ece": top-label ECE, "classwise_ece": mean over classes, "per_class_ece": [K]}``."""
    return _ece_dict(calibration_bins(probs, labels, num_bins, mask))


def _ece_dict(stats: dict[str, np.ndarray]) -> dict:
    per_class = np.asarray(ece_from_bins(stats["classwise"]))
    return {
        "ece": ece_from_bins(stats["top_label"]),
        "classwise_ece": float(np.nanmean(per_class)) if np.isfinite(per_class).any() else np.nan,
        "per_class_ece": per_class,
    }


def reliability_diagram(stats: np.ndarray) -> dict[str, np.ndarray]:
    """Reliability-diagram data of one bin-statistics array ``[3, M]``.

    E.g. ``reliability_diagram(calibration_bins(p, y)["top_label"])`` or ``["classwise"][c]``.
    Returns ``bin_edges [M + 1]``, ``confidence [M]`` and ``accuracy [M]`` (bin means, NaN for
    empty bins) and ``count [M]`` (int64).
    """
    stats = np.asarray(stats, np.float64)
    if stats.ndim != 2 or stats.shape[0] != 3:
        raise ValueError(f"expected bin statistics [3, M], got shape {stats.shape}")
    count = stats[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.where(count > 0, stats[1] / count, np.nan)
        accuracy = np.where(count > 0, stats[2] / count, np.nan)
    return {
        "bin_edges": np.linspace(0.0, 1.0, stats.shape[1] + 1),
        "confidence": confidence,
        "accuracy": accuracy,
        "count": count.astype(np.int64),
    }


# ----------------------------------------------------------------------------- temperature


def log_probs(probs: np.ndarray, floor: float = 1e-12) -> np.ndarray:
    """``log(max(probs, floor))``: logits standing in for probabilities (see module notes)."""
    return np.log(np.maximum(np.asarray(probs, np.float64), floor))


def apply_temperature(logits, temperature: float):
    """``logits / temperature`` (numpy or JAX arrays); softmax of it is the calibrated output."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return logits / temperature


def temperature_scale_probs(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(probs) / T)`` over the last axis (float32), for probability outputs."""
    scaled = apply_temperature(log_probs(probs), temperature)
    return special.softmax(scaled, axis=-1).astype(np.float32)


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    return float(np.mean(special.logsumexp(z, axis=-1) - z[np.arange(len(labels)), labels]))


def fit_temperature(
    logits: np.ndarray | Sequence[np.ndarray],
    labels: np.ndarray | Sequence[np.ndarray],
    mask: np.ndarray | Sequence[np.ndarray] | None = None,
    *,
    bounds: tuple[float, float] = (0.05, 20.0),
    max_voxels: int | None = 2_000_000,
    seed: int = 0,
) -> float:
    """Scalar ``T`` in ``bounds`` minimising the mean NLL of ``softmax(logits / T)``.

    ``logits [..., K]`` with ``labels [...]`` (and optional ``mask [...]``), or sequences of
    them (e.g. one entry per validation case; their voxels are pooled). When more than
    ``max_voxels`` voxels remain, a uniform random subset of that size (``seed``) is used.
    The search is scipy's bounded Brent on ``log T`` (``xatol=1e-5``).
    """
    if isinstance(logits, np.ndarray) or not isinstance(logits, Sequence):
        logits, labels, mask = [logits], [labels], [mask]
    elif mask is None:
        mask = [None] * len(logits)
    if not len(logits) == len(labels) == len(mask):
        raise ValueError("logits, labels and mask need one entry per case")
    parts = [_flatten(z, y, m) for z, y, m in zip(logits, labels, mask, strict=True)]
    z = np.concatenate([p[0] for p in parts]).astype(np.float64)
    y = np.concatenate([p[1] for p in parts])
    if y.size == 0:
        raise ValueError("fit_temperature needs at least one voxel")
    if max_voxels is not None and y.size > max_voxels:
        keep = np.random.default_rng(seed).choice(y.size, max_voxels, replace=False)
        z, y = z[keep], y[keep]
    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds}")
    result = optimize.minimize_scalar(
        lambda log_t: _nll(z, y, float(np.exp(log_t))),
        bounds=(np.log(lo), np.log(hi)),
        method="bounded",
        options={"xatol": 1e-5},
    )
    return float(np.exp(result.x))
