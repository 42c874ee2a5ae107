"""The Grain training pipeline: nnU-Net-style patch sampling + augmentation, batched.

Determinism contract: the batch of training step ``s`` is a pure function of
``(seed, s)`` (and the dataset/arguments) — never of thread timing or of where a run was
resumed. Element ``i = s * batch_size + j`` (``j`` = position in the batch) is computed
by :class:`PatchSampler` from ``np.random.default_rng([seed, i])`` alone; Grain's
``MapDataset`` hands out indices in order and its thread pool returns them in order.

Per element:
- case: seeded shuffled epochs over ``case_ids`` (element ``i`` is position
  ``i % n`` of permutation number ``i // n``, that permutation seeded by ``(seed, i // n)``);
  every case is visited once per ``n`` consecutive elements.
- foreground forcing, nnU-Net's per-batch rule: the LAST ``fg_elements_per_batch(B, p) =
  B - round(B * (1 - p))`` elements of every batch are foreground patches (exact ratio,
  no Bernoulli noise). A foreground patch picks a class uniformly among the classes > 0
  present in ``dataset.foreground_coords(case)``, a random stored voxel of that class, and
  centres the patch on it (shifted to stay inside the allowed range, so the voxel is in
  the patch); cases without foreground fall back to a random patch.
- random patch: origin uniform in ``[lb, ub]`` per axis with nnU-Net's bounds:
  ``need = max(patch - shape, 0)``, ``lb = -(need // 2)``, ``ub = shape + need // 2 +
  need % 2 - patch``. A patch fits inside any case at least as large as it; a case
  smaller than the patch along an axis is centred in it and padded.
- read only the needed box (patch, or with rotation/scaling the bounding box of the
  transformed patch) clipped to the case bounds; normalise; pad the rest with 0 (the
  normalised mean) and the label with 0; then augment (:mod:`unetjax.data.augment`).

The loader (:class:`TrainLoader`) yields ``{"image": float32 [B, *patch, C], "label":
int32 [B, *patch]}`` forever. ``start_step=k`` makes it yield exactly the batches of
steps ``k, k+1, ...``. Its state is its position: ``get_state() == {"step": s}`` where
``s`` is the step of the next batch, and ``set_state`` moves there (Grain's own
iterator state is the element position ``s * batch_size`` of the same stream).
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Mapping, Sequence

import grain
import numpy as np

from unetjax.data.augment import (
    AugmentConfig,
    augment_intensity,
    mirror,
    required_box,
    resample_patch,
    sample_spatial_matrix,
)
from unetjax.data.errors import DataError
from unetjax.data.normalize import check_scheme, foreground_intensity_stats, normalize

# Length of the (virtually infinite) element index space.
_INDEX_LIMIT = 2**62
_CASE_STREAM = 0x5EED_CA5E  # separates the case-permutation stream from element streams


def fg_elements_per_batch(batch_size: int, fg_oversample: float) -> int:
    """How many elements (the last ones) of each batch are forced foreground (nnU-Net)."""
    return batch_size - int(round(batch_size * (1.0 - fg_oversample)))


def _case_table(manifest) -> dict:
    return {c.case_id: c for c in manifest.cases}


def check_patch_size(manifest, patch_size, case_ids=None) -> tuple[int, ...]:
    """Validate ``patch_size`` against the cases; returns it as a tuple of ints.

    Raises ``DataError`` when the patch is larger than EVERY case along some axis (it would
    be mostly padding); patches larger than only some cases are fine (those are padded).
    """
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != manifest.ndim:
        raise DataError(
            f"patch size {patch} has {len(patch)} axes; the dataset is {manifest.ndim}D"
        )
    if min(patch) < 1:
        raise DataError(f"patch size {patch} must be positive")
    table = _case_table(manifest)
    cases = [table[c] for c in case_ids] if case_ids is not None else list(manifest.cases)
    if not cases:
        raise DataError("no cases to sample patches from")
    shapes = np.array([c.shape for c in cases])
    max_shape = tuple(int(s) for s in shapes.max(axis=0))
    too_big = [a for a in range(len(patch)) if patch[a] > max_shape[a]]
    if too_big:
        largest = cases[int(np.argmax(shapes.prod(axis=1)))]
        raise DataError(
            f"patch size {patch} is larger than every case along axis {too_big}: the largest "
            f"extent per axis is {max_shape} (largest case {largest.case_id!r} has shape "
            f"{tuple(largest.shape)}); use a patch size <= {max_shape}"
        )
    return patch


def default_patch_size(manifest, max_voxels: int, divisor: int | Sequence[int] = 16):
    """nnU-Net-like default patch size.

    The median case shape, each axis rounded down to a multiple of ``divisor`` (at least
    ``divisor``), then — while the patch has more than ``max_voxels`` voxels — the largest
    axis is shrunk by its divisor (first such axis on ties) until it fits or every axis is
    at its divisor.
    """
    shapes = np.array([c.shape for c in manifest.cases])
    median = np.median(shapes, axis=0)
    div = np.broadcast_to(np.asarray(divisor, np.int64), median.shape).copy()
    if (div < 1).any():
        raise ValueError(f"divisor must be positive, got {divisor}")
    patch = np.maximum(np.floor(median / div).astype(np.int64) * div, div)
    while int(np.prod(patch)) > max_voxels:
        shrinkable = patch > div
        if not shrinkable.any():
            break
        axis = int(np.argmax(np.where(shrinkable, patch, -1)))
        patch[axis] -= div[axis]
    return tuple(int(p) for p in patch)


def patch_origin_bounds(shape, patch_size) -> tuple[np.ndarray, np.ndarray]:
    """nnU-Net's inclusive bounds ``[lb, ub]`` of a patch origin per axis."""
    shape = np.asarray(shape, np.int64)
    patch = np.asarray(patch_size, np.int64)
    need = np.maximum(patch - shape, 0)
    lb = -(need // 2)
    ub = shape + need // 2 + need % 2 - patch
    return lb, ub


class PatchSampler:
    """Element function: global element index -> one (augmented) training patch.

    Picklable and thread-safe; everything random comes from
    ``np.random.default_rng([seed, index])``.
    """

    def __init__(
        self,
        dataset,
        case_ids,
        *,
        patch_size,
        batch_size,
        seed,
        fg_oversample,
        augment,
        normalization,
        ct_stats=None,
        with_meta=False,
        fg_cache_size=256,
    ):
        self.dataset = dataset
        self.case_ids = tuple(case_ids)
        table = _case_table(dataset.manifest)
        self.infos = tuple(table[c] for c in self.case_ids)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.n_fg = fg_elements_per_batch(self.batch_size, fg_oversample)
        self.augment = augment
        self.normalization = normalization
        self.ct_stats = ct_stats
        self.with_meta = with_meta
        self.fg_cache_size = fg_cache_size
        self._init_cache()

    def _init_cache(self):
        self._fg_cache = collections.OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_fg_cache"], state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_cache()

    # -- per-element decisions (pure functions of seed and index) --------------------

    def case_index(self, index: int) -> int:
        n = len(self.case_ids)
        epoch, pos = divmod(int(index), n)
        perm = np.random.default_rng([self.seed, _CASE_STREAM, epoch]).permutation(n)
        return int(perm[pos])

    def is_fg_forced(self, index: int) -> bool:
        return int(index) % self.batch_size >= self.batch_size - self.n_fg

    def _foreground(self, case_id) -> np.ndarray:
        with self._lock:
            hit = self._fg_cache.get(case_id)
            if hit is not None:
                self._fg_cache.move_to_end(case_id)
                return hit
        coords = np.asarray(self.dataset.foreground_coords(case_id))
        coords = coords[coords[:, 0] > 0] if coords.size else coords.reshape(0, 1)
        with self._lock:
            self._fg_cache[case_id] = coords
            while len(self._fg_cache) > self.fg_cache_size:
                self._fg_cache.popitem(last=False)
        return coords

    def sample_origin(self, rng, case_id, shape, fg_forced: bool) -> np.ndarray:
        lb, ub = patch_origin_bounds(shape, self.patch_size)
        if fg_forced:
            coords = self._foreground(case_id)
            if len(coords):
                classes = np.unique(coords[:, 0])
                cls = classes[rng.integers(len(classes))]
                rows = coords[coords[:, 0] == cls]
                voxel = rows[rng.integers(len(rows)), 1:].astype(np.int64)
                half = np.asarray(self.patch_size, np.int64) // 2
                return np.clip(voxel - half, lb, ub)
        return rng.integers(lb, ub + 1)

    def read_region(self, case_id, info, lo, hi):
        """Normalised image ``[*(hi-lo), C]`` and label of the source box ``[lo, hi)``;
        the part outside the case is 0 (image, after normalisation) and 0 (label)."""
        return self.start_read(case_id, info, lo, hi)()

    def start_read(self, case_id, info, lo, hi):
        """Issue the reads of :meth:`read_region` now (tensorstore futures where the dataset
        exposes ``image_array``/``label_array``); returns a function that waits and finishes."""
        shape = np.asarray(info.shape, np.int64)
        clo = np.clip(lo, 0, shape)
        chi = np.clip(hi, 0, shape)
        size = tuple(int(s) for s in hi - lo)
        channels = int(self.dataset.manifest.channels)
        if (chi <= clo).any():  # box entirely outside the case
            return lambda: (np.zeros((*size, channels), np.float32), np.zeros(size, np.uint8))
        box = tuple(slice(int(a), int(b)) for a, b in zip(clo, chi, strict=True))
        if hasattr(self.dataset, "image_array"):
            image_f = self.dataset.image_array(case_id)[box + (slice(None),)].read()
            label_f = self.dataset.label_array(case_id)[box].read()

            def raw():
                image = np.asarray(image_f.result(), np.float32)
                return image, np.asarray(label_f.result(), np.uint8)
        else:

            def raw():
                return self.dataset.read_image(case_id, box), self.dataset.read_label(case_id, box)

        def finish():
            image, label = raw()
            image = normalize(image, info, self.normalization, ct_stats=self.ct_stats)
            label = np.asarray(label)
            before = clo - lo
            after = hi - chi
            if before.any() or after.any():
                pad = [(int(b), int(a)) for b, a in zip(before, after, strict=True)]
                image = np.pad(image, [*pad, (0, 0)])
                label = np.pad(label, pad)
            return image, label

        return finish

    def plan(self, index) -> dict:
        """The random decisions of element ``index``: case, origin, spatial transform, box."""
        index = int(index)
        rng_pos, rng_aug = np.random.default_rng([self.seed, index]).spawn(2)
        ci = self.case_index(index)
        case_id, info = self.case_ids[ci], self.infos[ci]
        fg_forced = self.is_fg_forced(index)
        origin = self.sample_origin(rng_pos, case_id, info.shape, fg_forced)
        matrix = sample_spatial_matrix(rng_aug, self.augment, len(self.patch_size))
        lo, hi = required_box(origin, self.patch_size, matrix)
        return dict(
            index=index,
            rng_aug=rng_aug,
            ci=ci,
            case_id=case_id,
            info=info,
            fg_forced=fg_forced,
            origin=origin,
            matrix=matrix,
            lo=lo,
            hi=hi,
        )

    def finish(self, plan: dict, image, label) -> dict:
        """Augment the region read for ``plan`` into the training element."""
        cfg, rng_aug, matrix = self.augment, plan["rng_aug"], plan["matrix"]
        if matrix is not None:
            image, label = resample_patch(
                image,
                label,
                plan["lo"],
                plan["origin"],
                self.patch_size,
                matrix,
                image_order=cfg.image_order,
            )
        image = augment_intensity(image, rng_aug, cfg)
        image, label = mirror(image, label, rng_aug, cfg)
        out = {
            "image": np.ascontiguousarray(image, dtype=np.float32),
            "label": np.ascontiguousarray(label, dtype=np.int32),
        }
        if self.with_meta:
            out.update(
                index=np.int64(plan["index"]),
                case_index=np.int32(plan["ci"]),
                origin=plan["origin"].astype(np.int32),
                fg_forced=np.bool_(plan["fg_forced"]),
            )
        return out

    def start(self, index):
        """Plan element ``index`` and issue its reads; returns a function giving the element."""
        plan = self.plan(index)
        wait = self.start_read(plan["case_id"], plan["info"], plan["lo"], plan["hi"])
        return lambda: self.finish(plan, *wait())

    def __call__(self, index) -> dict:
        return self.start(index)()


class BatchSampler:
    """Grain element function: step -> the whole (process-local) batch, with the reads of all
    its elements in flight at once (tensorstore futures), then each element finished in order.
    Gives exactly the batches of ``PatchSampler`` + ``batch`` (same pure functions)."""

    def __init__(self, sampler: PatchSampler, process_slice: ProcessSlice):
        self.sampler = sampler
        self.slice = process_slice

    def __call__(self, step) -> dict:
        b = self.slice.local_size
        pending = [self.sampler.start(self.slice(int(step) * b + j)) for j in range(b)]
        elements = [finish() for finish in pending]
        return {k: np.stack([e[k] for e in elements]) for k in elements[0]}


class ProcessSlice:
    """Local element k of a process -> its global element index.

    Each process loads its own contiguous ``B / P`` elements of every global batch of size
    ``B``, so the union over processes is exactly the single-process batch.
    """

    def __init__(self, global_size: int, process_index: int, process_count: int):
        self.global_size = global_size
        self.local_size = global_size // process_count
        self.offset = process_index * self.local_size

    def __call__(self, k: int) -> int:
        k = int(k)
        step, j = divmod(k, self.local_size)
        return step * self.global_size + self.offset + j


class TrainLoader:
    """Infinite iterator of training batches; see the module docstring.

    ``get_state()`` returns ``{"step": s}`` (JSON-friendly): the step of the next batch.
    ``set_state(state)`` repositions the stream there. Because batches depend only on
    ``(seed, step)``, state == position: no RNG or buffer state needs saving.
    """

    def __init__(
        self,
        sampler: PatchSampler,
        *,
        num_threads: int,
        prefetch: int,
        start_step: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        concurrent_reads: bool = False,
    ):
        self.sampler = sampler
        self.concurrent_reads = bool(concurrent_reads)
        if sampler.batch_size % process_count:
            raise ValueError(
                f"batch size {sampler.batch_size} is not divisible by {process_count} processes"
            )
        self.slice = ProcessSlice(sampler.batch_size, process_index, process_count)
        self.batch_size = self.slice.local_size
        self.num_threads = int(num_threads)
        self.prefetch = int(prefetch)
        self._it = None
        self._start(int(start_step))

    def _start(self, step: int):
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self.close()
        b = self.batch_size
        if self.concurrent_reads:  # one grain element per batch, its reads issued together
            dataset = grain.MapDataset.range(step, _INDEX_LIMIT // b).map(
                BatchSampler(self.sampler, self.slice)
            )
            options = grain.ReadOptions(
                num_threads=max(1, self.num_threads), prefetch_buffer_size=max(1, self.prefetch)
            )
            self.grain_dataset = dataset.to_iter_dataset(options)
        else:
            dataset = grain.MapDataset.range(step * b, _INDEX_LIMIT)
            dataset = dataset.map(self.slice).map(self.sampler)
            options = grain.ReadOptions(
                num_threads=max(1, self.num_threads), prefetch_buffer_size=max(1, self.prefetch) * b
            )
            self.grain_dataset = dataset.to_iter_dataset(options).batch(b, drop_remainder=True)
        self._it = iter(self.grain_dataset)
        self.step = step

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._it)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        return {"step": int(self.step)}

    def set_state(self, state: Mapping) -> None:
        self._start(int(state["step"]))

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()

    def __del__(self):
        with contextlib.suppress(Exception):  # e.g. at interpreter shutdown
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_train_loader(
    dataset,
    case_ids,
    *,
    patch_size,
    batch_size: int,
    seed: int,
    fg_oversample: float = 0.33,
    augment: AugmentConfig | None,
    normalization: str = "zscore",
    num_threads: int = 2,
    prefetch: int = 2,
    start_step: int = 0,
    ct_stats: Mapping | None = None,
    with_meta: bool = False,
    process_index: int = 0,
    process_count: int = 1,
    concurrent_reads: bool = False,
) -> TrainLoader:
    """Build the infinite, deterministic training iterator (see module docstring).

    Args:
      dataset: a ``unetjax.data.store.Dataset`` (cases must have labels).
      case_ids: the training cases.
      patch_size: spatial patch shape, one entry per axis.
      batch_size: elements per batch.
      seed: non-negative int; with the step it fixes every batch.
      fg_oversample: fraction of each batch forced to foreground (nnU-Net: last
        ``B - round(B * (1 - p))`` elements).
      augment: :class:`AugmentConfig` (``None`` = no augmentation).
      normalization: ``"zscore"`` | ``"ct"`` | ``"none"`` (see :mod:`normalize`).
      num_threads / prefetch: Grain threads and batches buffered ahead.
      start_step: first step yielded (resume).
      ct_stats: dataset foreground stats for ``"ct"``; computed from ``case_ids`` when None.
      with_meta: also yield ``index``, ``case_index``, ``origin`` (un-augmented patch
        origin) and ``fg_forced`` per element (for tests/debugging).
      process_index / process_count: multi-process runs; ``batch_size`` is the global batch
        and this process yields its ``batch_size / process_count`` elements of each.
      concurrent_reads: build each batch in one grain element with all its patch reads in
        flight together (:class:`BatchSampler`; same batches) — for large chunked volumes.
    """
    manifest = dataset.manifest
    case_ids = list(case_ids)
    if not case_ids:
        raise DataError("make_train_loader: no training cases")
    table = _case_table(manifest)
    missing = [c for c in case_ids if c not in table]
    if missing:
        raise DataError(f"training cases not in the dataset: {missing[:10]}")
    unlabelled = [c for c in case_ids if not table[c].has_label]
    if unlabelled:
        raise DataError(f"training cases without a label: {unlabelled[:10]}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0.0 <= float(fg_oversample) <= 1.0:
        raise ValueError(f"fg_oversample must be in [0, 1], got {fg_oversample}")
    if int(seed) < 0 or int(seed) != seed:
        raise ValueError(f"seed must be a non-negative int, got {seed}")
    if int(start_step) != start_step or int(start_step) < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    patch = check_patch_size(manifest, patch_size, case_ids)
    check_scheme(normalization)
    if normalization == "ct" and ct_stats is None:
        ct_stats = foreground_intensity_stats(dataset, case_ids)
    if augment is None:
        augment = AugmentConfig.disabled()
    sampler = PatchSampler(
        dataset,
        case_ids,
        patch_size=patch,
        batch_size=int(batch_size),
        seed=int(seed),
        fg_oversample=float(fg_oversample),
        augment=augment,
        normalization=normalization,
        ct_stats=ct_stats,
        with_meta=with_meta,
    )
    return TrainLoader(
        sampler,
        num_threads=num_threads,
        prefetch=prefetch,
        start_step=int(start_step),
        process_index=process_index,
        process_count=process_count,
        concurrent_reads=concurrent_reads,
    )
