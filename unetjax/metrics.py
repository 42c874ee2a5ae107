"""Segmentation metrics for 2D/3D integer label maps (numpy + scipy.ndimage, no JAX).

Conventions follow MONAI / nnU-Net; every rule is stated where it applies:

* Overlap (per class ``c``; ``TP/FP/FN`` from ``pred == c`` vs ``target == c``):
  Dice = 2TP/(2TP+FP+FN), IoU = TP/(TP+FP+FN); both NaN when the class is absent from
  prediction and ground truth (empty vs empty), 0 when exactly one of them is empty.
  precision = TP/(TP+FP), NaN when the prediction is empty;
  recall = TP/(TP+FN), NaN when the ground truth is empty.
* Surface: the boundary voxels of a mask are ``mask XOR binary_erosion(mask)`` with the
  full-connectivity (3^d) structuring element. The image is treated as zero-padded (as MONAI's
  cropped ``get_mask_edges`` does), so mask voxels on the image border are surface voxels;
  an object filling the image therefore still has a surface.
* Distances: ``distance_transform_edt(~surface, sampling=spacing)``, in physical units, from each
  surface voxel of one mask to the nearest surface voxel of the other.
* HD95 = max(p95(d pred->gt), p95(d gt->pred)) -- MONAI's
  ``compute_hausdorff_distance(percentile=95)``, i.e. the larger of the two *directed* 95th
  percentiles (``np.percentile``, linear interpolation), not the 95th percentile of the union.
* ASSD = mean of the concatenation of both directed distance sets -- MONAI's
  ``compute_average_surface_distance(symmetric=True)``.
* HD95 and ASSD are NaN when either mask is empty. MONAI returns inf when exactly one is empty;
  NaN is used instead so the case is excluded from means rather than making them infinite
  (the failure is still visible through Dice = 0).
* Aggregation (:func:`summarize`) excludes NaN everywhere.
* Distance transforms run only on the bounding box of ``pred | target`` grown by 1 voxel
  (zero-padded where that leaves the image), so small objects in large volumes are cheap; the
  result is identical to computing on the whole (zero-padded) array.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "METRICS",
    "case_metrics",
    "confusion_counts",
    "summarize",
    "surface_distances",
]

#: Metrics that :func:`summarize` also averages over classes (the ``"mean"`` entry).
METRICS: tuple[str, ...] = ("dice", "iou", "precision", "recall", "hd95", "assd")


def confusion_counts(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class ``[tp, fp, fn]`` counts, shape ``[num_classes, 3]``, int64.

    ``pred`` and ``target`` are integer label maps of equal shape with values in
    ``[0, num_classes)``. Row ``c`` counts class ``c`` one-vs-rest (background included).
    """
    pred = np.asarray(pred)
    target = np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch: pred {pred.shape} vs target {target.shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    p = pred.astype(np.int64, copy=False).ravel()
    t = target.astype(np.int64, copy=False).ravel()
    for name, a in (("pred", p), ("target", t)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(
                f"{name} labels must lie in [0, {num_classes}), got [{a.min()}, {a.max()}]"
            )
    # confusion[t, p] = number of voxels with target t and prediction p
    confusion = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    confusion = confusion.reshape(num_classes, num_classes).astype(np.int64)
    tp = np.diag(confusion)
    fp = confusion.sum(axis=0) - tp
    fn = confusion.sum(axis=1) - tp
    return np.stack([tp, fp, fn], axis=1)


def _spacing(spacing: float | Sequence[float] | None, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim, dtype=np.float64)
    s = np.asarray(spacing, dtype=np.float64)
    if s.ndim == 0:
        s = np.full(ndim, float(s))
    if s.shape != (ndim,):
        raise ValueError(f"spacing {tuple(s)} does not match {ndim} spatial dims")
    if np.any(s <= 0) or not np.all(np.isfinite(s)):
        raise ValueError(f"spacing must be positive and finite, got {tuple(s)}")
    return s


def _crop_pad(mask: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``mask[lo-1 : hi+1]`` per axis, zero-padded where that window leaves the image."""
    start = np.maximum(lo - 1, 0)
    stop = np.minimum(hi + 1, mask.shape)
    sub = mask[tuple(slice(a, b) for a, b in zip(start, stop, strict=True))]
    pad = [
        (int(a - (lo_ - 1)), int((hi_ + 1) - b))
        for a, b, lo_, hi_ in zip(start, stop, lo, hi, strict=True)
    ]
    return np.pad(sub, pad)


def _surface(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    # ``mask`` has a zero ring on its border (see _crop_pad), so border_value is irrelevant.
    return mask ^ ndimage.binary_erosion(mask, structure=structure)


def surface_distances(
    pred_mask: np.ndarray,
    target_mask: np.ndarray,
    spacing: float | Sequence[float] | None = None,
    *,
    connectivity: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances ``(pred->target, target->pred)`` in physical units.

    The first array has one entry per surface voxel of ``pred_mask``: its Euclidean distance
    (with voxel ``spacing``, default 1 per axis; a scalar applies to all axes) to the nearest
    surface voxel of ``target_mask``; the second is the reverse. Surface = ``mask XOR
    erosion(mask)``, the image treated as zero-padded (mask voxels on the image border are
    surface). ``connectivity`` selects the structuring element
    (``generate_binary_structure(ndim, connectivity)``); default ``ndim`` = full 3^d
    neighbourhood (MONAI's ``get_mask_edges`` uses scipy's default, ``connectivity=1``).
    Computed on the bounding box of ``pred | target`` grown by 1 voxel. When either mask is
    empty the distances are undefined and both arrays are empty.
    """
    pred_mask = np.asarray(pred_mask, dtype=bool)
    target_mask = np.asarray(target_mask, dtype=bool)
    if pred_mask.shape != target_mask.shape:
        raise ValueError(f"shape mismatch: {pred_mask.shape} vs {target_mask.shape}")
    ndim = pred_mask.ndim
    sampling = _spacing(spacing, ndim)
    if not pred_mask.any() or not target_mask.any():
        return np.zeros(0), np.zeros(0)

    union = pred_mask | target_mask
    lo = np.empty(ndim, dtype=np.int64)
    hi = np.empty(ndim, dtype=np.int64)
    for ax in range(ndim):
        hit = np.flatnonzero(union.any(axis=tuple(a for a in range(ndim) if a != ax)))
        lo[ax], hi[ax] = hit[0], hit[-1] + 1
    p = _crop_pad(pred_mask, lo, hi)
    t = _crop_pad(target_mask, lo, hi)

    structure = ndimage.generate_binary_structure(
        ndim, ndim if connectivity is None else connectivity
    )
    surf_p = _surface(p, structure)
    surf_t = _surface(t, structure)
    dist_to_t = ndimage.distance_transform_edt(~surf_t, sampling=sampling)
    dist_to_p = ndimage.distance_transform_edt(~surf_p, sampling=sampling)
    return dist_to_t[surf_p], dist_to_p[surf_t]


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else float("nan")


def case_metrics(
    pred: np.ndarray,
    target: np.ndarray,
    num_classes: int,
    spacing: float | Sequence[float] | None = None,
    classes: Iterable[int] | None = None,
) -> dict[int, dict[str, float]]:
    """Metrics of one case, ``{class: {name: value}}``.

    ``classes`` defaults to the foreground ``1..num_classes-1`` (background 0 excluded).
    Each class gets ``dice, iou, precision, recall, hd95, assd`` (floats, NaN rules in the
    module docstring: Dice/IoU NaN only for empty vs empty, precision NaN for an empty
    prediction, recall NaN for an empty ground truth, HD95/ASSD NaN when either is empty)
    and the counts ``tp, fp, fn, pred_voxels, target_voxels`` (ints). ``spacing`` (default 1)
    gives HD95/ASSD in physical units.
    """
    pred = np.asarray(pred)
    target = np.asarray(target)
    counts = confusion_counts(pred, target, num_classes)
    classes = range(1, num_classes) if classes is None else classes
    out: dict[int, dict[str, float]] = {}
    for c in classes:
        c = int(c)
        if not 0 <= c < num_classes:
            raise ValueError(f"class {c} outside [0, {num_classes})")
        tp, fp, fn = (int(v) for v in counts[c])
        n_pred, n_target = tp + fp, tp + fn
        row: dict[str, float] = {
            "dice": _ratio(2 * tp, 2 * tp + fp + fn),
            "iou": _ratio(tp, tp + fp + fn),
            "precision": _ratio(tp, n_pred),
            "recall": _ratio(tp, n_target),
            "hd95": float("nan"),
            "assd": float("nan"),
        }
        if n_pred > 0 and n_target > 0:
            d_pt, d_tp = surface_distances(pred == c, target == c, spacing)
            row["hd95"] = float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))
            row["assd"] = float(np.concatenate([d_pt, d_tp]).mean())
        row.update(tp=tp, fp=fp, fn=fn, pred_voxels=n_pred, target_voxels=n_target)
        out[c] = row
    return out


def _stats(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def summarize(rows: list[dict[int, dict[str, float]]]) -> dict:
    """Aggregate :func:`case_metrics` outputs over cases.

    Returns ``{class: {metric: {"mean", "std", "n"}}, ..., "mean": {metric: {...}}}``.
    Per class, every key present is summarised over the cases that contain the class: NaN
    values are excluded (nanmean; population std, ddof=0), ``n`` = number of non-NaN values;
    a class that is NaN in all cases gets mean = std = NaN, n = 0. The ``"mean"`` entry
    covers :data:`METRICS`: each case is first averaged over its classes (NaN classes
    excluded; NaN if all are NaN), then these per-case values are summarised the same way
    (``n`` counts cases). Without NaNs its mean equals the mean of the per-class means.
    """
    class_ids = sorted({c for row in rows for c in row})
    result: dict = {}
    for c in class_ids:
        present = [row[c] for row in rows if c in row]
        keys = list(dict.fromkeys(k for r in present for k in r))
        result[c] = {k: _stats([r.get(k, np.nan) for r in present]) for k in keys}
    mean: dict[str, dict[str, float]] = {}
    for m in METRICS:
        per_case = []
        for row in rows:
            vals = np.asarray([r[m] for r in row.values() if m in r], dtype=np.float64)
            vals = vals[~np.isnan(vals)]
            per_case.append(float(vals.mean()) if vals.size else float("nan"))
        mean[m] = _stats(per_case)
    result["mean"] = mean
    return result
