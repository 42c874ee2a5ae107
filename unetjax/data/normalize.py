"""Intensity normalisation shared by training (patch pipeline) and evaluation/inference.

One function, :func:`normalize`, maps raw float32 intensities (channel-last ``[..., C]``)
to the network's input space. Schemes:

- ``"zscore"`` (default, nnU-Net's non-CT scheme): per case and per channel,
  ``(x - mean) / max(std, 1e-8)`` with the case's stats from the manifest
  (``case_info.intensity["mean"]`` / ``["std"]``, computed over the whole case at
  ingestion). Because the stats are per case, normalising a patch read from a box gives
  exactly the values of the normalised whole case at those voxels.
- ``"ct"`` (nnU-Net's CT scheme): clip to the dataset-level foreground percentiles
  ``[p00_5, p99_5]``, then z-score with the dataset-level foreground mean/std. Those
  statistics are passed in as ``ct_stats`` (see :func:`foreground_intensity_stats`).
- ``"none"``: cast to float32 only.

numpy only (no JAX): this runs in host data threads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from unetjax.data.errors import DataError

SCHEMES = ("zscore", "ct", "none")
STD_FLOOR = 1e-8


def _per_channel(values, channels: int, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float32).reshape(-1)
    if arr.size == 1 and channels != 1:
        arr = np.repeat(arr, channels)
    if arr.size != channels:
        raise ValueError(f"{name}: expected {channels} per-channel values, got {arr.size}")
    return arr


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown normalization scheme {scheme!r}; expected one of {SCHEMES}")
    return scheme


def normalize(
    image: np.ndarray,
    case_info=None,
    scheme: str = "zscore",
    *,
    ct_stats: Mapping | None = None,
) -> np.ndarray:
    """Normalise ``image`` (``[..., C]``, channel-last) and return float32.

    Args:
      image: raw intensities, any real dtype, channel axis last.
      case_info: the case's ``CaseInfo`` (needs ``.intensity["mean"/"std"]``); required for
        ``"zscore"``, unused otherwise.
      scheme: ``"zscore"``, ``"ct"`` or ``"none"``.
      ct_stats: for ``"ct"``: mapping with per-channel (or scalar) ``mean``, ``std``,
        ``p00_5``, ``p99_5`` of the dataset's foreground voxels.
    """
    check_scheme(scheme)
    x = np.asarray(image, dtype=np.float32)
    channels = x.shape[-1]
    if scheme == "none":
        return x
    if scheme == "zscore":
        if case_info is None:
            raise ValueError("zscore normalisation needs the case's CaseInfo")
        stats = case_info.intensity
        mean = _per_channel(stats["mean"], channels, "intensity mean")
        std = np.maximum(_per_channel(stats["std"], channels, "intensity std"), STD_FLOOR)
        return ((x - mean) / std).astype(np.float32, copy=False)
    # ct
    if ct_stats is None:
        raise ValueError(
            "ct normalisation needs ct_stats (dataset foreground mean/std/p00_5/p99_5)"
        )
    lo = _per_channel(ct_stats["p00_5"], channels, "ct p00_5")
    hi = _per_channel(ct_stats["p99_5"], channels, "ct p99_5")
    mean = _per_channel(ct_stats["mean"], channels, "ct mean")
    std = np.maximum(_per_channel(ct_stats["std"], channels, "ct std"), STD_FLOOR)
    x = np.clip(x, lo, hi)
    return ((x - mean) / std).astype(np.float32, copy=False)


def foreground_intensity_stats(
    dataset,
    case_ids: Iterable[str] | None = None,
    *,
    max_voxels_per_case: int = 10_000,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Dataset-level foreground intensity statistics for the ``"ct"`` scheme.

    Reads, per case, the bounding box of the stored foreground coordinates
    (``dataset.foreground_coords``: sampled voxels of classes > 0) and gathers the image
    values there (at most ``max_voxels_per_case``, seeded). Returns per-channel lists
    ``mean``, ``std``, ``p00_5``, ``p99_5`` (nnU-Net's CT fingerprint). Compute it on the
    training cases and store it with the run so evaluation uses the same numbers.
    """
    manifest = dataset.manifest
    ids = list(manifest.case_ids if case_ids is None else case_ids)
    rng = np.random.default_rng(seed)
    values = []
    for case_id in ids:
        coords = np.asarray(dataset.foreground_coords(case_id))
        if coords.size == 0:
            continue
        coords = coords[coords[:, 0] > 0, 1:]
        if len(coords) == 0:
            continue
        if len(coords) > max_voxels_per_case:
            coords = coords[rng.choice(len(coords), max_voxels_per_case, replace=False)]
        lo = coords.min(axis=0)
        hi = coords.max(axis=0) + 1
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        region = dataset.read_image(case_id, box)
        local = coords - lo
        values.append(region[tuple(local.T)])  # [n, C]
    if not values:
        raise DataError("ct normalisation: no foreground voxels in the given cases")
    v = np.concatenate(values, axis=0).astype(np.float64)
    return {
        "mean": v.mean(axis=0).tolist(),
        "std": v.std(axis=0).tolist(),
        "p00_5": np.percentile(v, 0.5, axis=0).tolist(),
        "p99_5": np.percentile(v, 99.5, axis=0).tolist(),
    }
