"""Streaming Gaussian sliding-window prediction: a chunked volume in, a zarr v3 store out.

Same windows, weights, padding and blending as the in-memory
:func:`unetjax.inference.sliding_window.sliding_window_predict` (nnU-Net: ``sigma = patch / 8``,
``step = 0.5``, optional mirror TTA on logits), but the volume is never materialised:

* A *region* is a box: an axis-0 row slab times an in-plane block of the padded plane. The
  plane is split into blocks (:func:`plane_blocks`) so that the host accumulator
  (``patch_0 * block * K`` float32) stays under ``max_accumulator_bytes``; small planes are one
  block. Blocks are done one after the other, each top to bottom.
* Within a block, windows are grouped by their start along axis 0 (``z``); each group holds the
  windows that touch the block (a window on a block border is computed for every block it
  touches) and adds only its part inside the block. Group ``k`` covers rows
  ``[z_k, z_k + patch_0)``; once it is done no later window touches rows ``< z_{k+1}``, so
  the box of rows ``[z_k, z_{k+1})`` is final: it is normalised and written out.
* The summed Gaussian weight is separable (the map is a product of 1D Gaussians on a product
  grid of windows), so it is computed per box from 1D sums, not accumulated.
* Tiles are read with concurrent tensorstore futures, the next batch while the model runs
  on the current one; batches never span groups or blocks (the last one of a group is
  zero-filled), so every tile is computed in the same batch whether a run was resumed or not.
* Restart: ``progress.json`` records finished boxes; a rerun with the same settings and block
  layout skips them and recomputes only the windows that overlap the unfinished rows of the
  current block. The store is built under ``.<name>.partial`` and renamed to ``<name>`` when
  complete.

Output store (zarr v3 directory): ``probabilities`` float32 ``[*spatial, K]`` and/or
``labels`` uint8 ``[*spatial]``, plus ``volume.json`` (shape, geometry, settings, timings).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import pathlib
import shutil
import time
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from unetjax.inference.sliding_window import (
    _weighted_softmax,
    gaussian_importance_map,
    window_starts,
    with_mirror_tta,
)
from unetjax.volumes.arrays import Geometry, create_array, read_box, with_channels

__all__ = ["StreamResult", "predict_volume", "plane_blocks", "region_bounds", "RegionPlan"]

log = logging.getLogger(__name__)

PROGRESS = "progress.json"
VOLUME_JSON = "volume.json"
FORMAT = "unetjax-prediction-v1"
DEFAULT_MAX_ACCUMULATOR_BYTES = 256 * 2**20


@dataclasses.dataclass
class StreamResult:
    """What :func:`predict_volume` did."""

    out_dir: str
    complete: bool
    regions_total: int
    regions_done: int  # finished regions, including those of earlier runs
    regions_skipped: int  # finished by an earlier run, not recomputed
    tiles_computed: int
    voxels_written: int
    seconds: float
    read_wait_s: float  # host time blocked on tile reads
    compute_wait_s: float  # host time blocked on the model (dispatch + device)
    accumulate_s: float  # host Gaussian accumulation
    write_s: float  # normalising + writing regions
    accumulator_bytes: int  # size of the host accumulator (patch_0 x largest block x K float32)

    @property
    def voxels_per_s(self) -> float:
        return self.voxels_written / self.seconds if self.seconds > 0 else float("nan")


def region_bounds(z_starts: Sequence[int], size0: int) -> list[tuple[int, int]]:
    """Rows ``[z_k, z_{k+1})`` final after window group ``k`` (the last ends at ``size0``)."""
    ends = [*z_starts[1:], size0]
    return list(zip(z_starts, ends, strict=True))


def plane_blocks(
    plane: Sequence[int], patch: Sequence[int], max_voxels: int | None
) -> list[list[tuple[int, int]]]:
    """Per in-plane axis, the ``[lo, hi)`` bounds of near-equal blocks with at most
    ``max_voxels`` voxels per block (``None``: one block). The axis with the longest block is
    split next; no block edge gets shorter than the patch (so a window touches at most two
    blocks per axis), which can leave blocks above ``max_voxels`` (edges stay ``< 2 * patch``)."""
    n = [1] * len(plane)

    def edges() -> list[int]:
        return [-(-s // k) for s, k in zip(plane, n, strict=True)]

    while max_voxels is not None and np.prod(edges()) > max_voxels:
        can = [j for j, p in enumerate(patch) if plane[j] // (n[j] + 1) >= p]
        if not can:
            break
        n[max(can, key=edges().__getitem__)] += 1
    return [
        [(i * s // k, (i + 1) * s // k) for i in range(k)] for s, k in zip(plane, n, strict=True)
    ]


class RegionPlan:
    """Windows of a (centre-padded) volume, its regions (boxes: row slab x in-plane block, in
    processing order) and per-axis summed Gaussian weights.

    ``max_block_voxels``: in-plane voxels per block (see :func:`plane_blocks`; ``None``: the
    whole plane is one block)."""

    def __init__(self, shape, patch_size, step: float, max_block_voxels: int | None = None):
        self.shape = tuple(int(s) for s in shape)
        self.patch = tuple(int(p) for p in patch_size)
        if len(self.shape) != len(self.patch):
            raise ValueError(f"volume {self.shape} and patch {self.patch} differ in rank")
        need = [max(p - s, 0) for s, p in zip(self.shape, self.patch, strict=True)]
        self.pad_before = tuple(n // 2 for n in need)
        self.padded = tuple(max(s, p) for s, p in zip(self.shape, self.patch, strict=True))
        self.starts = window_starts(self.padded, self.patch, step)
        self.regions = region_bounds(self.starts[0], self.padded[0])  # row slabs
        self.block_bounds = plane_blocks(self.padded[1:], self.patch[1:], max_block_voxels)
        self.blocks = list(itertools.product(*self.block_bounds))
        self.boxes = [(rows, *block) for block in self.blocks for rows in self.regions]
        self.block_shape = tuple(max(hi - lo for lo, hi in b) for b in self.block_bounds)
        self.gaussian = gaussian_importance_map(self.patch)
        self.axis_weights = []
        for starts, p, n in zip(self.starts, self.patch, self.padded, strict=True):
            g1 = gaussian_importance_map((p,)).astype(np.float64)
            w = np.zeros(n, np.float64)
            for s in starts:
                w[s : s + p] += g1
            self.axis_weights.append(w)

    def corners(self, block) -> list[tuple[int, ...]]:
        """In-plane corners of the windows that touch ``block`` (``[lo, hi)`` per axis)."""
        touching = [
            [s for s in starts if s < hi and s + p > lo]
            for starts, p, (lo, hi) in zip(self.starts[1:], self.patch[1:], block, strict=True)
        ]
        return list(itertools.product(*touching))

    def first_group(self, slabs_done: int) -> int:
        """The first window group that touches an unfinished row slab (``slabs_done`` are)."""
        if slabs_done >= len(self.regions):
            return len(self.regions)
        row = self.regions[slabs_done][0]
        return next(k for k, z in enumerate(self.starts[0]) if z + self.patch[0] > row)

    def weight(self, box) -> np.ndarray:
        """Summed Gaussian weight of the padded box (``[lo, hi)`` per axis), float32."""
        w = np.ones((), np.float64)
        for axis_w, (lo, hi) in zip(self.axis_weights, box, strict=True):
            w = np.multiply.outer(w, axis_w[lo:hi])
        return w.astype(np.float32)

    def output_box(self, box) -> list[tuple[int, int]]:
        """A padded box (``[lo, hi)`` per leading axes) in the unpadded volume (clipped)."""
        return [
            (min(max(lo - b, 0), n), min(max(hi - b, 0), n))
            for (lo, hi), b, n in zip(box, self.pad_before, self.shape, strict=False)
        ]

    def output_voxels(self, box) -> int:
        """Voxels of the unpadded volume in a padded box."""
        return int(np.prod([hi - lo for lo, hi in self.output_box(box)]))


def region_plan(shape, patch_size, step: float, num_classes: int, max_accumulator_bytes: int):
    """The :class:`RegionPlan` whose float32 accumulator (``patch_0 x block x classes``) fits
    ``max_accumulator_bytes`` (as :func:`predict_volume` plans)."""
    per_voxel = 4 * num_classes * int(patch_size[0])
    return RegionPlan(shape, patch_size, step, max(max_accumulator_bytes // per_voxel, 1))


def _signature(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _write_json(path: pathlib.Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _read_progress(partial: pathlib.Path, signature: str) -> int:
    try:
        p = json.loads((partial / PROGRESS).read_text())
    except (OSError, ValueError):
        return -1
    return int(p["regions_done"]) if p.get("signature") == signature else -1


class _Progress:
    def __init__(self, enabled: bool, total_voxels: int, done_voxels: int):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=total_voxels,
                    initial=done_voxels,
                    unit="vox",
                    unit_scale=True,
                    desc="sliding window",
                    smoothing=0.1,
                )
            except ImportError:  # pragma: no cover
                self.bar = None
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.voxels = 0

    def update(self, voxels: int, region: int, total: int) -> None:
        self.voxels += voxels
        if self.bar is not None:
            self.bar.update(voxels)
        elif self.enabled:
            rate = self.voxels / max(time.perf_counter() - self.t0, 1e-9)
            log.info("region %d/%d, %.3g voxels/s", region + 1, total, rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def predict_volume(
    volume,
    predict_fn: Callable,
    patch_size: Sequence[int],
    num_classes: int,
    out_dir: str | os.PathLike,
    *,
    step: float = 0.5,
    batch_size: int = 4,
    mirror_axes: Sequence[int] = (),
    pad_value: float = 0.0,
    normalize: Callable[[np.ndarray], np.ndarray] | None = None,
    outputs: Sequence[str] = ("labels",),
    geometry: Geometry | None = None,
    identity: str = "",
    chunks: Sequence[int] | None = None,
    stop_after_regions: int | None = None,
    max_accumulator_bytes: int = DEFAULT_MAX_ACCUMULATOR_BYTES,
    progress: bool = True,
) -> StreamResult:
    """Gaussian sliding-window prediction of a chunked volume into a zarr v3 store.

    Args:
      volume: tensorstore array ``[*spatial]`` or ``[*spatial, C]`` (raw or normalised).
      predict_fn: ``[batch_size, *patch, C] -> [batch_size, *patch, K]`` logits (e.g.
        :func:`unetjax.training.step.make_predict_fn` bound to parameters, with a mesh so tiles
        are sharded over ``data``); always called with exactly ``batch_size`` tiles.
      patch_size, num_classes, step, batch_size, mirror_axes, pad_value: as in
        ``sliding_window_predict``.
      normalize: applied to the voxels each tile reads (float32 ``[..., C]``) before padding
        (``pad_value`` is in normalised space, as for ``sliding_window_predict`` of the
        normalised image); must be voxel-wise (e.g. z-score with whole-volume statistics).
      outputs: any of ``"probabilities"`` (float32 ``[*spatial, K]``) and ``"labels"``
        (uint8 argmax ``[*spatial]``).
      geometry: spacing/affine stored in ``volume.json`` (for NIfTI export).
      identity: identifies the model/parameters (e.g. checkpoint path and step): a rerun
        resumes only when it and every setting match, else starts over.
      chunks: output chunk shape (spatial); default ``min(dim, 64)`` per axis.
      stop_after_regions: stop after finishing this many regions (boxes) in this call (an
        interruption, for tests); the partial store is resumed by the next call.
      max_accumulator_bytes: bound of the host accumulator (``patch_0 x block x K`` float32):
        the padded plane is split into in-plane blocks to fit (:func:`plane_blocks`; a block
        edge is never shorter than the patch, windows on block borders are computed once per
        block they touch). The default keeps planes up to 591^2 (patch 64, 3 classes) whole.
      progress: show a progress bar (voxels/s).

    Returns:
      :class:`StreamResult`; the store is at ``out_dir`` once ``complete``.
    """
    t_start = time.perf_counter()
    patch = tuple(int(p) for p in patch_size)
    ndim = len(patch)
    volume = with_channels(volume, ndim)
    shape = tuple(int(s) for s in volume.shape[:ndim])
    outputs = tuple(outputs)
    if not outputs or any(o not in ("probabilities", "labels") for o in outputs):
        raise ValueError(f"outputs must be among ('probabilities', 'labels'), got {outputs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    mirror_axes = tuple(int(a) for a in mirror_axes)
    predict_fn = with_mirror_tta(predict_fn, mirror_axes, ndim)

    plan = region_plan(shape, patch, step, num_classes, max_accumulator_bytes)
    out_dir = pathlib.Path(out_dir).absolute()
    partial = out_dir.with_name(f".{out_dir.name}.partial")
    settings = {
        "format": FORMAT,
        "shape": shape,
        "channels": int(volume.shape[-1]),
        "patch": patch,
        "step": step,
        "batch_size": batch_size,
        "mirror_axes": mirror_axes,
        "pad_value": pad_value,
        "num_classes": num_classes,
        "outputs": outputs,
        "identity": identity,
        "plane_blocks": plan.block_bounds,
    }
    signature = _signature(settings)
    done = _read_progress(partial, signature)
    chunks = tuple(int(c) for c in chunks) if chunks else tuple(min(s, 64) for s in shape)
    if done < 0:
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        _write_json(partial / "zarr.json", {"zarr_format": 3, "node_type": "group"})
        if "probabilities" in outputs:
            create_array(
                partial / "probabilities", (*shape, num_classes), np.float32, (*chunks, num_classes)
            )
        if "labels" in outputs:
            create_array(partial / "labels", shape, np.uint8, chunks)
        _write_json(partial / PROGRESS, {"signature": signature, "regions_done": 0})
        done = 0
    import tensorstore as ts

    arrays = {
        name: ts.open(
            {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(partial / name)}},
            open=True,
            write=True,
        ).result()
        for name in outputs
    }

    timers = dict(read=0.0, compute=0.0, accumulate=0.0, write=0.0)
    n_rows, n_regions = len(plan.regions), len(plan.boxes)
    bar = _Progress(
        progress, int(np.prod(shape)), sum(plan.output_voxels(box) for box in plan.boxes[:done])
    )
    acc = np.zeros((patch[0], *plan.block_shape, num_classes), np.float32)
    gaussian_dev = jnp.asarray(plan.gaussian)
    tiles_computed = voxels_written = 0
    finished_now = 0
    expected = (batch_size, *patch, num_classes)

    def start_reads(z: int, corners):
        readers = []
        for c in corners:
            lo = np.asarray((z, *c), np.int64) - np.asarray(plan.pad_before)
            readers.append(read_box(volume, lo, lo + np.asarray(patch), pad_value, normalize))
        return readers

    def gather(readers) -> np.ndarray:
        t = time.perf_counter()
        tiles = np.zeros((batch_size, *patch, volume.shape[-1]), np.float32)
        for i, r in enumerate(readers):
            tiles[i] = r()
        timers["read"] += time.perf_counter() - t
        return tiles

    # (block, group, corners): per block, the groups from the first one touching an unfinished
    # row slab, each group's windows in batches of batch_size
    batches = []
    for b, block in enumerate(plan.blocks):
        corners = plan.corners(block)
        first = plan.first_group(min(max(done - b * n_rows, 0), n_rows))
        batches += [
            (b, k, corners[i : i + batch_size])
            for k in range(first, n_rows)
            for i in range(0, len(corners), batch_size)
        ]
    try:
        next_readers = (
            start_reads(plan.starts[0][batches[0][1]], batches[0][2]) if batches else None
        )
        for bi, (b, k, corners) in enumerate(batches):
            tiles = gather(next_readers)
            if bi + 1 < len(batches):
                _, nk, ncorners = batches[bi + 1]
                next_readers = start_reads(plan.starts[0][nk], ncorners)
            block = plan.blocks[b]
            if bi == 0 or batches[bi - 1][0] != b:  # a new block: its own (zeroed) accumulator
                block_acc = acc[(slice(None), *(slice(0, hi - lo) for lo, hi in block))]
                block_acc[...] = 0
            t = time.perf_counter()
            logits = predict_fn(tiles)
            if tuple(logits.shape) != expected:
                raise ValueError(
                    f"predict_fn returned shape {tuple(logits.shape)}, expected {expected}"
                )
            out = np.asarray(_weighted_softmax(logits, gaussian_dev))
            timers["compute"] += time.perf_counter() - t
            t = time.perf_counter()
            for tile, c in zip(out, corners, strict=False):
                src, dst = [slice(None)], [slice(None)]  # the tile's part inside the block
                for s, p, (lo, hi) in zip(c, patch[1:], block, strict=True):
                    src.append(slice(max(lo - s, 0), min(hi - s, p)))
                    dst.append(slice(max(s - lo, 0), min(s + p, hi) - lo))
                block_acc[tuple(dst)] += tile[tuple(src)]
            timers["accumulate"] += time.perf_counter() - t
            tiles_computed += len(corners)
            if bi + 1 < len(batches) and batches[bi + 1][:2] == (b, k):
                continue  # not the last batch of the group
            region = b * n_rows + k
            z0, z1 = plan.regions[k]
            if region >= done:
                t = time.perf_counter()
                written = _write_region(arrays, plan, block_acc[: z1 - z0], plan.boxes[region])
                _write_json(
                    partial / PROGRESS, {"signature": signature, "regions_done": region + 1}
                )
                timers["write"] += time.perf_counter() - t
                voxels_written += written
                finished_now += 1
                bar.update(written, region, n_regions)
            d = z1 - z0
            for row in range(patch[0] - d):  # row by row: no temporary copy of the accumulator
                block_acc[row] = block_acc[row + d]
            block_acc[patch[0] - d :] = 0
            if stop_after_regions is not None and finished_now >= stop_after_regions:
                break
    finally:
        bar.close()

    regions_done = done + finished_now
    complete = regions_done >= n_regions
    seconds = time.perf_counter() - t_start
    if complete:
        meta = {
            **settings,
            "geometry": (geometry or Geometry((1.0,) * ndim)).to_dict(),
            "arrays": list(outputs),
        }
        _write_json(partial / VOLUME_JSON, meta)
        (partial / PROGRESS).unlink()
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(partial, out_dir)
    return StreamResult(
        out_dir=str(out_dir),
        complete=complete,
        regions_total=n_regions,
        regions_done=regions_done,
        regions_skipped=done,
        tiles_computed=tiles_computed,
        voxels_written=voxels_written,
        seconds=seconds,
        read_wait_s=timers["read"],
        compute_wait_s=timers["compute"],
        accumulate_s=timers["accumulate"],
        write_s=timers["write"],
        accumulator_bytes=acc.nbytes,
    )


def _write_region(
    arrays: dict, plan: RegionPlan, acc_rows: np.ndarray, box, rows_per_write: int = 8
) -> int:
    """Normalise the padded ``box`` (whose corner is ``acc_rows[0, 0, ...]``), crop it to the
    volume and write it, a few rows at a time (bounded temporaries)."""
    out = plan.output_box(box)
    (r0, r1), plane = out[0], out[1:]
    for a0 in range(r0, r1, rows_per_write):
        part = [(a0, min(a0 + rows_per_write, r1)), *plane]
        padded = [(lo + b, hi + b) for (lo, hi), b in zip(part, plan.pad_before, strict=True)]
        local = tuple(slice(lo - o, hi - o) for (lo, hi), (o, _) in zip(padded, box, strict=True))
        probs = acc_rows[local] / plan.weight(padded)[..., None]
        target = tuple(slice(lo, hi) for lo, hi in part)
        futures = []
        if "probabilities" in arrays:
            futures.append(arrays["probabilities"][target].write(probs))
        if "labels" in arrays:
            futures.append(arrays["labels"][target].write(probs.argmax(-1).astype(np.uint8)))
        for f in futures:
            f.result()
    return plan.output_voxels(box)
