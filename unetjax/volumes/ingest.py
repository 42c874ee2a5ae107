"""Streaming ingestion: one large volume (+ optional label map) into the project's store layout
(``manifest.json`` + ``cases/<case_id>/{image,label,fg}``, zarr v3), slab by slab.

Memory is bounded by one slab (``chunk`` planes along the source's contiguous axis), never the
volume. In one pass per slab: validate (NaN/Inf, integer label values in range), write the
image and label slabs, and accumulate

* intensity statistics per channel: exact ``mean, std, min, max`` (float64, Chan's parallel
  update); ``p00_5, p99_5`` from a deterministic strided subsample of at most ~4M voxels (and
  the same over foreground voxels, ``fg_*``) — an approximation, stated in the manifest;
* the voxel count per class;
* the foreground index ``fg``: per class a uniform sample (without replacement, seeded) of up to
  10,000 voxel coordinates, kept as the 10,000 smallest of per-voxel random keys across slabs
  (a bottom-k reservoir), the same format :class:`unetjax.data.pipeline.PatchSampler` reads.

Headers are checked (shapes, image/label agreement, data types) before anything is written;
problems found inside the data stop the ingestion with the file named, and as everything is
written to a temporary sibling directory renamed at the end, no incomplete store is ever left.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence

import numpy as np

from unetjax.data import store as dstore
from unetjax.data.errors import DataError
from unetjax.volumes.arrays import create_array
from unetjax.volumes.sources import VolumeSource, open_source

__all__ = ["CODECS", "codec_spec", "ingest_volume", "default_chunks"]

CODECS = ("raw", "lz4", "zstd")
PERCENTILE_SAMPLES = 4_000_000
DEFAULT_CHUNK = 64
DEFAULT_CODEC = "raw"


def codec_spec(codec: str, typesize: int) -> dict | None:
    """zarr v3 compression codec: ``raw`` (none), ``lz4`` (blosc lz4, fast) or ``zstd``."""
    if codec == "raw":
        return None
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
    return {
        "name": "blosc",
        "configuration": {
            "cname": codec,
            "clevel": 1 if codec == "lz4" else 3,
            "shuffle": "shuffle" if typesize > 1 else "bitshuffle",
            "typesize": typesize,
        },
    }


def default_chunks(shape: Sequence[int], chunk: int = DEFAULT_CHUNK) -> tuple[int, ...]:
    return tuple(max(1, min(int(n), chunk)) for n in shape)


class _Stats:
    """Streaming per-channel moments + a strided subsample for percentiles."""

    def __init__(self, channels: int, stride: int):
        self.n = np.zeros(channels, np.int64)
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)
        self.min = np.full(channels, np.inf)
        self.max = np.full(channels, -np.inf)
        self.stride = stride
        self.samples: list[np.ndarray] = []

    def add(self, flat: np.ndarray, sample: np.ndarray) -> None:
        """``flat [N, C]`` (any real dtype) and its subsample rows ``sample``."""
        if not len(flat):
            return
        for lo in range(0, len(flat), 1 << 22):  # float64 temporaries of <= 32 MiB per channel
            part = flat[lo : lo + (1 << 22)]
            for c in range(flat.shape[1]):
                x = part[:, c].astype(np.float64)
                n_b, mean_b = x.size, float(x.mean())
                m2_b = float(np.dot(x - mean_b, x - mean_b))
                n_a = self.n[c]
                delta = mean_b - self.mean[c]
                n = n_a + n_b
                self.mean[c] += delta * n_b / n
                self.m2[c] += m2_b + delta * delta * n_a * n_b / n
                self.n[c] = n
                self.min[c] = min(self.min[c], float(x.min()))
                self.max[c] = max(self.max[c], float(x.max()))
        if len(sample):
            self.samples.append(np.asarray(sample, np.float32))

    def to_dict(self, prefix: str = "") -> dict[str, list[float]]:
        sample = np.concatenate(self.samples) if self.samples else None
        lo, hi = (
            np.percentile(sample, [0.5, 99.5], axis=0)
            if sample is not None
            else (self.min, self.max)
        )
        std = np.sqrt(self.m2 / np.maximum(self.n, 1))
        vals = {
            "mean": self.mean,
            "std": std,
            "min": self.min,
            "max": self.max,
            "p00_5": lo,
            "p99_5": hi,
        }
        return {f"{prefix}{k}": [float(x) for x in v] for k, v in vals.items()}


class _ForegroundIndex:
    """Bottom-k reservoir per class: a seeded uniform sample of voxel coordinates."""

    def __init__(self, k: int = dstore.FG_SAMPLES):
        self.k = k
        self.keys: dict[int, np.ndarray] = {}
        self.coords: dict[int, np.ndarray] = {}

    def add(self, lab: np.ndarray, offset: Sequence[int], slab_index: int) -> None:
        rng = np.random.default_rng([0, slab_index])
        flat = lab.reshape(-1)
        idx_all = np.flatnonzero(flat)
        classes = flat[idx_all]
        for c in np.unique(classes):
            idx = idx_all[classes == c]
            keys = rng.random(idx.size)
            if idx.size > self.k:  # only the k smallest keys of this slab can survive
                keep = np.argpartition(keys, self.k)[: self.k]
                idx, keys = idx[keep], keys[keep]
            coords = np.stack(np.unravel_index(idx, lab.shape), 1) + np.asarray(offset)
            c = int(c)
            keys = np.concatenate([self.keys.get(c, np.zeros(0)), keys])
            coords = np.concatenate([self.coords.get(c, np.zeros((0, 3), np.int64)), coords])
            if keys.size > self.k:
                keep = np.argpartition(keys, self.k)[: self.k]
                keys, coords = keys[keep], coords[keep]
            self.keys[c], self.coords[c] = keys, coords

    def rows(self) -> np.ndarray:
        out = []
        for c, coords in sorted(self.coords.items()):
            if len(coords):
                coords = coords[np.lexsort(coords.T[::-1])]
                out.append(np.concatenate([np.full((len(coords), 1), c), coords], 1))
        if not out:
            return np.zeros((0, 4), np.int32)
        return np.concatenate(out).astype(np.int32)


def _signature(paths: Sequence[str], options: dict) -> str:
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for p in paths:
        try:
            st = pathlib.Path(p).stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\n".encode())  # URLs / specs: identified by their text only
    return h.hexdigest()


def _check_pair(image: VolumeSource, label: VolumeSource | None) -> None:
    if label is None:
        return
    if label.shape != image.shape:
        raise DataError(
            f"{label.path}: image/label shape mismatch: label {label.shape} vs image "
            f"{image.shape} ({image.path})"
        )
    if label.axis != image.axis:
        raise DataError(
            f"{label.path}: stored in another axis order than {image.path} (contiguous axis "
            f"{label.axis} vs {image.axis}); convert one of them first"
        )
    if label.dtype.kind not in "biuf":
        raise DataError(f"{label.path}: mask data type {label.dtype} is not numeric")


def ingest_volume(
    image,
    store_dir: str | os.PathLike,
    *,
    label=None,
    case_id: str = "volume",
    num_classes: int | None = None,
    label_map: Mapping[int, int] | None = None,
    spacing: Sequence[float] | None = None,
    affine=None,
    chunk: int | Sequence[int] = DEFAULT_CHUNK,
    codec: str = DEFAULT_CODEC,
    overwrite: bool = False,
    log_every_s: float = 30.0,
) -> dstore.Dataset:
    """Ingest one volume (and label map) slab by slab into a store ``open_store`` reads.

    Args:
      image: NIfTI / ``.npy`` / ``.npz`` (key ``image``) / TIFF stack or plane folder / zarr or
        N5 directory / tensorstore spec or URL (see :func:`unetjax.volumes.sources.open_source`).
      store_dir: the store to create (refused if it exists, unless ``overwrite`` and it is a
        unetjax store; an up-to-date store with the same signature is reused).
      label: optional label map, same kinds (an ``.npz`` image's ``label`` key is used when
        ``label`` is None and the archive has one).
      num_classes: K; inferred as ``max(2, max label + 1)`` when None.
      label_map: remap label values (as in ``open_dataset``).
      spacing / affine: override the geometry read from the source (NIfTI / npz keys).
      chunk: chunk edge (or shape) of the stored arrays; ``codec``: raw | lz4 | zstd.
    """
    t0 = time.perf_counter()
    store_dir = pathlib.Path(store_dir).expanduser().absolute()
    src = open_source(image)
    if label is None and str(image).endswith(".npz"):
        import zipfile

        with zipfile.ZipFile(image) as z:
            if "label.npy" in z.namelist():
                label = image
    lab_src = open_source(label, as_label=True) if label is not None else None
    _check_pair(src, lab_src)
    opts = dstore._normalize_options(num_classes, label_map, None)
    spacing_t, affine_m = _geometry(src, image, spacing, affine)
    chunks = tuple(int(c) for c in np.broadcast_to(np.asarray(chunk), (3,)))
    chunks = tuple(min(c, n) for c, n in zip(chunks, src.shape, strict=True))
    options = {
        "chunks": chunks,
        "codec": codec,
        "case_id": case_id,
        "num_classes": opts.num_classes,
        "label_map": opts.label_map,
        "spacing": spacing_t,
        "affine": affine_m.tolist(),
    }
    signature = _signature([str(image), *([str(label)] if label is not None else [])], options)
    existing = dstore._read_manifest(store_dir)
    if existing is not None and existing.signature == signature:
        return dstore.Dataset(store_dir, existing)
    if store_dir.exists() and not overwrite:
        raise DataError(f"{store_dir}: exists (pass overwrite=True to replace it)")
    codec_spec(codec, 4)  # validate before any work

    with dstore._store_lock(store_dir):
        tmp = store_dir.parent / f".{store_dir.name}.ingest-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            manifest = _write(
                src,
                lab_src,
                tmp,
                case_id,
                opts,
                chunks,
                codec,
                signature,
                spacing_t,
                affine_m,
                log_every_s,
                t0,
            )
            dstore._remove_store(store_dir)
            os.rename(tmp, store_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dstore.Dataset(store_dir, manifest)


def _geometry(src: VolumeSource, image, spacing, affine):
    if affine is None and str(image).endswith(".npz"):
        with np.load(image, allow_pickle=False) as z:
            affine = z["affine"] if "affine" in z.files else None
            if spacing is None and "spacing" in z.files:
                spacing = z["spacing"]
    aff = (
        np.asarray(affine if affine is not None else src.affine, np.float64)
        if (affine is not None or src.affine is not None)
        else None
    )
    if spacing is not None:
        sp = tuple(float(s) for s in np.ravel(spacing))
    elif src.spacing is not None:
        sp = src.spacing
    elif aff is not None:
        sp = tuple(float(s) for s in np.linalg.norm(aff[:3, :3], axis=0))
    else:
        sp = (1.0, 1.0, 1.0)
    if len(sp) != 3 or not all(np.isfinite(s) and s > 0 for s in sp):
        raise DataError(f"{src.path}: invalid spacing {sp}")
    if aff is None:
        aff = np.diag([*sp, 1.0])
    if aff.shape != (4, 4) or not np.isfinite(aff).all():
        raise DataError(f"{src.path}: invalid affine (need a finite 4x4)")
    return sp, aff


def _write(
    src, lab_src, tmp, case_id, opts, chunks, codec, signature, spacing, affine, log_every_s, t0
):
    import tensorstore as ts

    case_dir = tmp / "cases" / case_id
    case_dir.mkdir(parents=True)
    ctx = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
    C = src.channels
    img_arr = create_array(
        case_dir / "image",
        (*src.shape, C),
        np.float32,
        (*chunks, C),
        codec=codec_spec(codec, 4),
        context=ctx,
    )
    lab_arr = None
    if lab_src is not None:
        lab_arr = create_array(
            case_dir / "label", src.shape, np.uint8, chunks, codec=codec_spec(codec, 1), context=ctx
        )
    total = int(np.prod(src.shape))
    stride = max(1, total // PERCENTILE_SAMPLES)
    stats, fg_stats = _Stats(C, stride), _Stats(C, stride)
    limit = opts.num_classes if opts.num_classes is not None else 256
    counts = np.zeros(256, np.int64)
    fgi = _ForegroundIndex()
    axis, thickness = src.axis, chunks[src.axis]
    lab_iter = lab_src.slabs(thickness) if lab_src is not None else None
    last_log = time.perf_counter()
    done = 0
    for slab_index, (k0, block) in enumerate(src.slabs(thickness)):
        box = [slice(None)] * 3
        box[axis] = slice(k0, k0 + block.shape[axis])
        offset = [0, 0, 0]
        offset[axis] = k0
        img = np.asarray(block, np.float32) if block.dtype != np.float32 else block
        if src.dtype.kind == "f" and not np.isfinite(img).all():
            bad = int(img.size - np.count_nonzero(np.isfinite(img)))
            raise DataError(f"{src.path}: NaN/Inf voxels ({bad} in slab {k0}:{k0 + thickness})")
        write = img_arr[tuple(box)].write(img)
        flat = img.reshape(-1, C)
        first = (-(done % stride)) % stride  # global strided subsample, independent of slabs
        sample_idx = np.arange(first, len(flat), stride)
        stats.add(flat, flat[sample_idx])
        if lab_iter is not None:
            _, raw = next(lab_iter)
            ids = dstore._class_ids(np.asarray(raw), lab_src.path, opts.label_map)
            if ids.size and int(ids.max()) >= limit:
                vals = np.unique(ids[ids >= limit])
                raise DataError(
                    f"{lab_src.path}: mask values outside 0..{limit - 1}: "
                    f"{dstore._fmt_values(vals)}"
                )
            lab = ids.astype(np.uint8)
            lab_arr[tuple(box)].write(lab).result()
            counts += np.bincount(lab.ravel(), minlength=256)
            fgmask = lab.reshape(-1) > 0
            if fgmask.any():
                fg_stats.add(flat[fgmask], flat[sample_idx[fgmask[sample_idx]]])
            fgi.add(lab, offset, slab_index)
        write.result()
        done += len(flat)
        if time.perf_counter() - last_log > log_every_s:
            last_log = time.perf_counter()
            rate = done / (last_log - t0)
            print(f"ingest {src.path}: {done / total:.0%}, {rate / 1e6:.1f} Mvoxel/s", flush=True)

    has_label = lab_src is not None
    max_label = int(np.flatnonzero(counts).max()) if has_label and counts.any() else -1
    if opts.num_classes is not None:
        K = opts.num_classes
    else:
        K = max(2, max_label + 1) if has_label else 0
    fg_rows = fgi.rows()
    fg_rows = fg_rows[fg_rows[:, 0] < max(K, 1)] if len(fg_rows) else fg_rows
    fg_arr = create_array(
        case_dir / "fg",
        fg_rows.shape,
        np.int32,
        (max(1, fg_rows.shape[0]), fg_rows.shape[1]),
        codec=codec_spec("zstd", 4),
    )
    fg_arr.write(fg_rows).result()
    intensity = stats.to_dict()
    if fg_stats.n.sum():
        intensity.update(fg_stats.to_dict("fg_"))
    info = dstore.CaseInfo(
        case_id=case_id,
        shape=tuple(src.shape),
        spacing=tuple(spacing),
        affine=tuple(tuple(float(x) for x in r) for r in affine),
        has_label=has_label,
        class_voxels=tuple(int(x) for x in counts[:K]) if has_label else None,
        intensity=intensity,
        image_file=str(src.path),
        label_file=str(lab_src.path) if has_label else None,
    )
    manifest = dstore.Manifest(
        ndim=3,
        channels=C,
        num_classes=K,
        cases=(info,),
        signature=signature,
        source_kind="volume",
        source_dir=str(pathlib.Path(str(src.path)).parent),
        label_map=opts.label_map,
    )
    dstore._write_json_atomic(tmp / dstore.MANIFEST, manifest.to_json())
    return manifest
