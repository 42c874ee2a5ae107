"""Ingestion of a source folder into a zarr v3 store (tensorstore) and the ``Dataset`` reader.

See ``docs/DATA_API.md`` for the contract. Implementation notes:

* Ingestion = (1) scan + validate every case (nothing is written before all cases passed;
  the first problem raises :class:`DataError`), (2) remove an outdated store at
  ``store_dir``, (3) write all arrays and ``manifest.json`` (last, atomically) into a
  temporary sibling directory ``.<name>.ingest-*``, (4) rename it to ``store_dir``. An
  interrupted ingestion therefore never leaves a ``store_dir`` with a manifest; leftovers
  are removed by the next ingestion. A lock file ``.<name>.lock`` (``fcntl.flock``)
  serialises concurrent ingestions of the same store across processes.
* Arrays: ``zarr3`` driver, ``file`` kvstore, blosc(zstd) compression. Chunks: 2D
  ``min(dim, 256)`` per spatial axis, 3D ``min(dim, 64)``; all channels in one chunk.
* Labels: integer values ``>= 0`` (floats must be integral), ``label_map`` applied, then
  checked against ``0..num_classes-1``. ``num_classes=None`` infers
  ``K = max(2, max label + 1)`` over all cases; a mask containing 255 is then refused
  (a 0/255 binary mask, fix it with ``label_map={255: 1}``) instead of giving K = 256.
  A dataset without any mask gets ``num_classes`` as given, or 0 (unknown).
* Foreground coordinates: per case ``np.random.default_rng(0)``; for each class 1..K-1 up to
  10,000 voxels drawn without replacement (all of them when fewer), rows sorted.
* ``CaseInfo.intensity`` holds per-channel lists ``mean, std, min, max, p00_5, p99_5``
  over all voxels, plus ``fg_mean, fg_std, fg_min, fg_max, fg_p00_5, fg_p99_5`` over the
  foreground (label > 0) voxels when the case has a label with foreground.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from unetjax.data import io as dio
from unetjax.data.errors import DataError

__all__ = [
    "FORMAT_VERSION",
    "CaseInfo",
    "Dataset",
    "Manifest",
    "default_store_dir",
    "open_dataset",
    "open_store",
    "source_signature",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
FG_SAMPLES = 10_000
CHUNK_2D = 256
CHUNK_3D = 64
MANIFEST = "manifest.json"
_READ_CACHE_BUDGET = 256 << 20  # raw bytes of decoded cases kept between the two passes
_MAX_LISTED = 10


# --------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CaseInfo:
    case_id: str  # file stem, e.g. "000"
    shape: tuple[int, ...]  # spatial shape, (H, W) or (D, H, W)
    spacing: tuple[float, ...]  # physical size per spatial axis (mm); 2D default 1.0
    affine: tuple | None  # 4x4 nested tuples for 3D, else None
    has_label: bool
    class_voxels: tuple[int, ...] | None  # voxel count per class 0..K-1
    intensity: dict  # per-channel lists: mean, std, min, max, p00_5, p99_5 (+ fg_*)
    image_file: str  # source path relative to the source dir
    label_file: str | None

    def to_dict(self) -> dict:
        return {
            "case_id": self.case_id,
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "affine": [list(r) for r in self.affine] if self.affine is not None else None,
            "has_label": self.has_label,
            "class_voxels": list(self.class_voxels) if self.class_voxels is not None else None,
            "intensity": self.intensity,
            "image_file": self.image_file,
            "label_file": self.label_file,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> CaseInfo:
        aff = d.get("affine")
        cv = d.get("class_voxels")
        return cls(
            case_id=str(d["case_id"]),
            shape=tuple(int(x) for x in d["shape"]),
            spacing=tuple(float(x) for x in d["spacing"]),
            affine=tuple(tuple(float(x) for x in r) for r in aff) if aff is not None else None,
            has_label=bool(d["has_label"]),
            class_voxels=tuple(int(x) for x in cv) if cv is not None else None,
            intensity={k: [float(x) for x in v] for k, v in d["intensity"].items()},
            image_file=str(d["image_file"]),
            label_file=d.get("label_file"),
        )


@dataclasses.dataclass(frozen=True)
class Manifest:
    ndim: int  # 2 or 3
    channels: int
    num_classes: int  # 0 when unknown (no masks and num_classes not given)
    cases: tuple[CaseInfo, ...]  # sorted by case_id
    signature: str  # hash of the source files (relative path, size, mtime_ns) + options
    format_version: int = FORMAT_VERSION
    source_kind: str = ""  # "2d", "nifti" or "npz"
    source_dir: str = ""  # absolute source path at ingestion (informational)
    label_map: tuple[tuple[int, int], ...] | None = None

    @property
    def case_ids(self) -> tuple[str, ...]:
        return tuple(c.case_id for c in self.cases)

    def case(self, case_id: str) -> CaseInfo:
        idx = self._index()
        if case_id not in idx:
            raise KeyError(f"unknown case id {case_id!r}")
        return self.cases[idx[case_id]]

    def _index(self) -> dict[str, int]:
        idx = self.__dict__.get("_case_index")
        if idx is None:
            idx = {c.case_id: i for i, c in enumerate(self.cases)}
            object.__setattr__(self, "_case_index", idx)
        return idx

    @property
    def median_shape(self) -> tuple[int, ...]:
        """Per-axis median of the case shapes (rounded to int)."""
        shapes = np.array([c.shape for c in self.cases], dtype=np.float64)
        return tuple(int(round(x)) for x in np.median(shapes, axis=0))

    @property
    def median_spacing(self) -> tuple[float, ...]:
        sp = np.array([c.spacing for c in self.cases], dtype=np.float64)
        return tuple(float(x) for x in np.median(sp, axis=0))

    @property
    def has_labels(self) -> bool:
        return any(c.has_label for c in self.cases)

    @property
    def class_voxels(self) -> tuple[int, ...] | None:
        """Voxel count per class summed over the labelled cases (None without labels)."""
        rows = [c.class_voxels for c in self.cases if c.class_voxels is not None]
        if not rows:
            return None
        return tuple(int(x) for x in np.sum(np.array(rows, dtype=np.int64), axis=0))

    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "ndim": self.ndim,
            "channels": self.channels,
            "num_classes": self.num_classes,
            "signature": self.signature,
            "source_kind": self.source_kind,
            "source_dir": self.source_dir,
            "label_map": [list(p) for p in self.label_map] if self.label_map else None,
            "median_shape": list(self.median_shape) if self.cases else None,
            "median_spacing": list(self.median_spacing) if self.cases else None,
            "cases": [c.to_dict() for c in self.cases],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: Mapping) -> Manifest:
        lm = d.get("label_map")
        return cls(
            ndim=int(d["ndim"]),
            channels=int(d["channels"]),
            num_classes=int(d["num_classes"]),
            cases=tuple(CaseInfo.from_dict(c) for c in d["cases"]),
            signature=str(d["signature"]),
            format_version=int(d.get("format_version", 0)),
            source_kind=str(d.get("source_kind", "")),
            source_dir=str(d.get("source_dir", "")),
            label_map=tuple((int(a), int(b)) for a, b in lm) if lm else None,
        )

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        return cls.from_dict(json.loads(text))

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_case_index", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)


# --------------------------------------------------------------------------------------
# Dataset (reader)
# --------------------------------------------------------------------------------------


class Dataset:
    """Reads cases of a complete store. Picklable; thread-safe.

    Tensorstore handles are opened lazily on first use in each process and cached (the
    cache is dropped when pickled). ``cache_bytes`` sizes tensorstore's chunk cache.
    """

    def __init__(
        self, store_dir: str | os.PathLike, manifest: Manifest, *, cache_bytes: int = 64 << 20
    ):
        self.store_dir = pathlib.Path(store_dir)
        self.manifest = manifest
        self.cache_bytes = int(cache_bytes)
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._handles: dict[tuple[str, str], object] = {}
        self._fg: dict[str, np.ndarray] = {}
        self._context = None

    def __getstate__(self):
        return {
            "store_dir": str(self.store_dir),
            "manifest": self.manifest,
            "cache_bytes": self.cache_bytes,
        }

    def __setstate__(self, state):
        self.store_dir = pathlib.Path(state["store_dir"])
        self.manifest = state["manifest"]
        self.cache_bytes = state["cache_bytes"]
        self._init_runtime()

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"Dataset({str(self.store_dir)!r}, {len(m.cases)} cases, ndim={m.ndim}, "
            f"channels={m.channels}, num_classes={m.num_classes})"
        )

    def __len__(self) -> int:
        return len(self.manifest.cases)

    @property
    def case_ids(self) -> tuple[str, ...]:
        return self.manifest.case_ids

    # ---- handles
    def _handle(self, case_id: str, name: str):
        key = (case_id, name)
        h = self._handles.get(key)
        if h is not None:
            return h
        import tensorstore as ts

        with self._lock:
            h = self._handles.get(key)
            if h is None:
                if self._context is None:
                    self._context = ts.Context(
                        {"cache_pool": {"total_bytes_limit": self.cache_bytes}}
                    )
                path = self.store_dir / "cases" / case_id / name
                h = ts.open(
                    {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}},
                    open=True,
                    read=True,
                    context=self._context,
                ).result()
                self._handles[key] = h
        return h

    def _box(self, info: CaseInfo, box) -> tuple[slice, ...]:
        if box is None:
            return tuple(slice(0, n) for n in info.shape)
        box = tuple(box)
        if len(box) != len(info.shape):
            raise ValueError(
                f"box {box} has {len(box)} axes; case {info.case_id} has "
                f"{len(info.shape)} spatial axes"
            )
        out = []
        for s, n in zip(box, info.shape, strict=True):
            if not isinstance(s, slice) or s.step not in (None, 1):
                raise ValueError(f"box entries must be unit-step slices, got {s!r}")
            start = 0 if s.start is None else int(s.start)
            stop = n if s.stop is None else int(s.stop)
            if not 0 <= start <= stop <= n:
                raise ValueError(f"box {box} outside case {info.case_id} of shape {info.shape}")
            out.append(slice(start, stop))
        return tuple(out)

    # ---- reads
    def image_array(self, case_id: str):
        """The case's image as a lazily read tensorstore array ``[*spatial, C]`` (raw)."""
        self.manifest.case(case_id)
        return self._handle(case_id, "image")

    def label_array(self, case_id: str):
        """The case's label map as a lazily read tensorstore array ``[*spatial]`` (uint8)."""
        if not self.manifest.case(case_id).has_label:
            raise ValueError(f"case {case_id!r} has no label")
        return self._handle(case_id, "label")

    def read_image(self, case_id: str, box=None) -> np.ndarray:
        """float32 ``[*box, C]`` raw intensities."""
        info = self.manifest.case(case_id)
        idx = self._box(info, box)
        arr = self._handle(case_id, "image")[idx + (slice(None),)].read().result()
        return np.asarray(arr, dtype=np.float32)

    def read_label(self, case_id: str, box=None) -> np.ndarray:
        """uint8 ``[*box]`` class ids; ValueError for a case without a mask."""
        info = self.manifest.case(case_id)
        if not info.has_label:
            raise ValueError(f"case {case_id!r} has no label")
        idx = self._box(info, box)
        arr = self._handle(case_id, "label")[idx].read().result()
        return np.asarray(arr, dtype=np.uint8)

    def foreground_coords(self, case_id: str) -> np.ndarray:
        """int32 ``[N, 1 + ndim]`` rows ``(class, *coords)``; empty for unlabelled cases."""
        fg = self._fg.get(case_id)
        if fg is not None:
            return fg
        info = self.manifest.case(case_id)
        fg = np.asarray(self._handle(case_id, "fg").read().result(), dtype=np.int32)
        fg.setflags(write=False)
        with self._lock:
            self._fg[info.case_id] = fg
        return fg


# --------------------------------------------------------------------------------------
# Options, signature, store location
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Options:
    num_classes: int | None
    label_map: tuple[tuple[int, int], ...] | None
    spacing_2d: tuple[float, float]

    def to_json(self) -> str:
        return json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "num_classes": self.num_classes,
                "label_map": [list(p) for p in self.label_map] if self.label_map else None,
                "spacing_2d": list(self.spacing_2d),
            },
            sort_keys=True,
        )


def _normalize_options(num_classes, label_map, spacing_2d) -> _Options:
    if num_classes is not None:
        if isinstance(num_classes, bool) or int(num_classes) != num_classes:
            raise ValueError(f"num_classes must be an int, got {num_classes!r}")
        num_classes = int(num_classes)
        if not 1 <= num_classes <= 256:
            raise ValueError(f"num_classes must be in 1..256 (uint8 labels), got {num_classes}")
    lm = None
    if label_map:
        pairs = []
        for k, v in dict(label_map).items():
            try:
                ki, vi = int(k), int(v)
            except (TypeError, ValueError):
                raise ValueError(f"label_map entries must be integers, got {k!r}: {v!r}") from None
            if ki < 0 or not 0 <= vi <= 255:
                raise ValueError(f"label_map {k!r}: {v!r}: keys >= 0, values in 0..255")
            pairs.append((ki, vi))
        lm = tuple(sorted(pairs))
    if spacing_2d is None:
        sp = (1.0, 1.0)
    elif np.isscalar(spacing_2d):
        sp = (float(spacing_2d), float(spacing_2d))
    else:
        sp = tuple(float(s) for s in spacing_2d)
    if len(sp) != 2 or not all(np.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing_2d must be a positive float or two, got {spacing_2d!r}")
    return _Options(num_classes=num_classes, label_map=lm, spacing_2d=sp)  # type: ignore[arg-type]


def source_signature(layout: dio.SourceLayout, options: _Options) -> str:
    """sha256 over sorted (relative path, size, mtime_ns) of the source files + options."""
    h = hashlib.sha256(options.to_json().encode())
    rows = []
    for p in layout.files:
        st = p.stat()
        rows.append((p.relative_to(layout.root).as_posix(), st.st_size, st.st_mtime_ns))
    for rel, size, mtime in sorted(rows):
        h.update(f"{rel}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


def _cache_root() -> pathlib.Path:
    env = os.environ.get("UNETJAX_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "unetjax"


def default_store_dir(
    source_dir: str | os.PathLike, *, num_classes=None, label_map=None, spacing_2d=None
) -> pathlib.Path:
    """``$UNETJAX_CACHE or ~/.cache/unetjax`` / ``stores/<folder>-<hash(abs path+options)>``."""
    opts = _normalize_options(num_classes, label_map, spacing_2d)
    return _default_store_dir(pathlib.Path(source_dir).expanduser().resolve(), opts)


def _default_store_dir(root: pathlib.Path, opts: _Options) -> pathlib.Path:
    digest = hashlib.sha256(f"{root}\0{opts.to_json()}".encode()).hexdigest()[:16]
    return _cache_root() / "stores" / f"{root.name}-{digest}"


# --------------------------------------------------------------------------------------
# Validation (pass 1)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Checked:
    case: dio.SourceCase
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    affine: tuple | None
    counts: np.ndarray | None  # bincount of class ids (length max+1)
    intensity: dict
    loaded: dio.LoadedCase | None  # kept in memory when within the budget


def _fmt_values(vals: np.ndarray) -> str:
    vals = np.asarray(vals)
    shown = [v.item() for v in vals[:_MAX_LISTED]]
    more = f" ... ({len(vals)} distinct)" if len(vals) > _MAX_LISTED else ""
    return f"{shown}{more}"


def _class_ids(raw: np.ndarray, path, label_map) -> np.ndarray:
    """Validated integer class ids (int64 or unsigned) after ``label_map``."""
    if np.issubdtype(raw.dtype, np.floating):
        finite = np.isfinite(raw)
        if not finite.all():
            raise DataError(f"{path}: mask values non-integer: contains NaN/Inf")
        frac = raw != np.round(raw)
        if frac.any():
            raise DataError(
                f"{path}: mask values non-integer: {_fmt_values(np.unique(raw[frac]))}; "
                "masks must be integer label maps"
            )
        lab = raw.astype(np.int64)
    else:
        lab = raw
    if np.issubdtype(lab.dtype, np.signedinteger) and lab.size and lab.min() < 0:
        raise DataError(
            f"{path}: mask values negative (must be >= 0): {_fmt_values(np.unique(lab[lab < 0]))}"
        )
    if label_map:
        mx = int(lab.max()) if lab.size else 0
        size = max(mx, max(k for k, _ in label_map)) + 1
        if size <= 1 << 16:
            lut = np.arange(size, dtype=np.int64)
            for k, v in label_map:
                lut[k] = v
            lab = lut[lab]
        else:
            uniq, inv = np.unique(lab, return_inverse=True)
            m = dict(label_map)
            lab = np.array([m.get(int(u), int(u)) for u in uniq], dtype=np.int64)[inv]
            lab = lab.reshape(raw.shape)
    return lab


_STAT_KEYS = ("mean", "std", "min", "max", "p00_5", "p99_5")
_HIST_RANGE = 1 << 20


def _sorted_at(cum: np.ndarray, offset: int, q: float, n: int) -> float:
    """``np.percentile(x, q)`` (linear) from the cumulative histogram of integer ``x``."""
    pos = q / 100.0 * (n - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, n - 1)
    vlo = float(np.searchsorted(cum, lo, side="right") + offset)
    vhi = float(np.searchsorted(cum, hi, side="right") + offset)
    return vlo + (vhi - vlo) * (pos - lo)


def _stats_1d(xc: np.ndarray) -> tuple[float, ...]:
    """(mean, std, min, max, p0.5, p99.5) of one channel; exact, histogram for integers."""
    n = xc.size
    if np.issubdtype(xc.dtype, np.integer):
        mn, mx = int(xc.min()), int(xc.max())
        if mx - mn <= _HIST_RANGE:
            shifted = xc if mn == 0 and xc.dtype.itemsize <= 4 else xc.astype(np.int64) - mn
            counts = np.bincount(shifted, minlength=1).astype(np.float64)
            values = np.arange(mn, mn + counts.size, dtype=np.float64)
            mean = float(counts @ values) / n
            var = float(counts @ (values - mean) ** 2) / n
            cum = np.cumsum(counts)
            return (
                mean,
                var**0.5,
                float(mn),
                float(mx),
                _sorted_at(cum, mn, 0.5, n),
                _sorted_at(cum, mn, 99.5, n),
            )
    x64 = xc.astype(np.float64)
    mean = float(x64.mean())
    d = x64 - mean
    lo, hi = np.percentile(xc, [0.5, 99.5])
    return (
        mean,
        float(np.sqrt(np.dot(d, d) / n)),
        float(xc.min()),
        float(xc.max()),
        float(lo),
        float(hi),
    )


def _channel_stats(x: np.ndarray, prefix: str = "") -> dict[str, list[float]]:
    """Per-channel stats of ``x`` [N, C] (source dtype)."""
    out: dict[str, list[float]] = {f"{prefix}{k}": [] for k in _STAT_KEYS}
    for xc in np.ascontiguousarray(x.T):
        for k, v in zip(_STAT_KEYS, _stats_1d(xc), strict=True):
            out[f"{prefix}{k}"].append(v)
    return out


def _prepare_case(
    layout: dio.SourceLayout, case: dio.SourceCase, opts: _Options
) -> tuple[dio.LoadedCase, np.ndarray | None]:
    """Reads and validates one case; returns it with its uint8 class ids (or None)."""
    loaded = dio.load_case(case, layout.kind)
    img = loaded.image
    if np.issubdtype(img.dtype, np.floating):
        bad = int(np.size(img) - np.count_nonzero(np.isfinite(img)))
        if bad:
            raise DataError(f"{case.image_path}: NaN/Inf pixels ({bad} non-finite values)")
    if img.size == 0:
        raise DataError(f"{case.image_path}: empty image (shape {img.shape})")
    lab = None
    if loaded.label is not None:
        path = case.label_path or case.image_path
        ids = _class_ids(loaded.label, path, opts.label_map)
        limit = opts.num_classes if opts.num_classes is not None else 256
        if ids.size and int(ids.max()) >= limit:
            vals = np.unique(ids[ids >= limit])
            hint = ""
            if 255 in vals:
                hint = " (a 0/255 binary mask? pass label_map={255: 1})"
            raise DataError(
                f"{path}: mask values outside 0..{limit - 1}: {_fmt_values(vals)}{hint}"
            )
        if opts.num_classes is None and ids.size and int(ids.max()) == 255:
            raise DataError(
                f"{path}: mask values {_fmt_values(np.unique(ids))} look like a 0/255 "
                "binary mask, not class ids; pass label_map={255: 1} "
                "(values are not remapped silently)"
            )
        lab = ids.astype(np.uint8)
    return loaded, lab


def _validate(layout: dio.SourceLayout, opts: _Options) -> tuple[list[_Checked], int, int]:
    """Pass 1: reads every case; returns (checked cases, channels, num_classes)."""
    checked: list[_Checked] = []
    channels = None
    first = None
    budget = _READ_CACHE_BUDGET
    has_label_first = None
    max_label = -1
    for case in layout.cases:
        loaded, lab = _prepare_case(layout, case, opts)
        img = loaded.image
        c = int(img.shape[-1])
        if channels is None:
            channels, first = c, case
        elif c != channels:
            raise DataError(
                f"{case.image_path}: inconsistent channel counts: {c} channel(s), but "
                f"{first.image_file} has {channels}"
            )
        has_label = lab is not None
        if has_label_first is None:
            has_label_first = has_label
        elif has_label != has_label_first:
            raise DataError(
                f"{case.image_path}: {'has' if has_label else 'lacks'} a label, unlike "
                f"{first.image_file}; either every case has a label or none"
            )
        flat = img.reshape(-1, c)
        intensity = _channel_stats(flat)
        counts = None
        if lab is not None:
            counts = np.bincount(lab.ravel(), minlength=1)
            max_label = max(max_label, len(counts) - 1)
            fgmask = lab.ravel() > 0
            if fgmask.any():
                intensity.update(_channel_stats(flat[fgmask], prefix="fg_"))
        if layout.ndim == 2:
            spacing, affine = opts.spacing_2d, None
        else:
            spacing = tuple(float(s) for s in loaded.spacing)
            affine = tuple(tuple(float(x) for x in row) for row in loaded.affine)
        nbytes = img.nbytes + (lab.nbytes if lab is not None else 0)
        keep = nbytes <= budget
        if keep:
            budget -= nbytes
            loaded.label = lab  # keep the validated class ids
        checked.append(
            _Checked(
                case=case,
                shape=tuple(int(n) for n in img.shape[:-1]),
                spacing=tuple(spacing),
                affine=affine,
                counts=counts,
                intensity=intensity,
                loaded=loaded if keep else None,
            )
        )
    assert channels is not None  # scan_source guarantees at least one case

    if opts.num_classes is not None:
        num_classes = opts.num_classes
    elif max_label < 0:
        num_classes = 0
    else:
        num_classes = max(2, max_label + 1)
    return checked, channels, num_classes


# --------------------------------------------------------------------------------------
# Writing (pass 2)
# --------------------------------------------------------------------------------------


def _chunks(shape: Sequence[int], ndim: int) -> list[int]:
    c = CHUNK_2D if ndim == 2 else CHUNK_3D
    return [max(1, min(int(n), c)) for n in shape]


def _blosc(typesize: int, shuffle: str) -> dict:
    return {
        "name": "blosc",
        "configuration": {
            "cname": "zstd",
            "clevel": 3,
            "shuffle": shuffle,
            "typesize": typesize,
        },
    }


def _write_array(path: pathlib.Path, arr: np.ndarray, chunks: Sequence[int], codec: dict):
    import tensorstore as ts

    spec = {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {
            "shape": list(arr.shape),
            "data_type": np.dtype(arr.dtype).name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, codec],
        },
        "create": True,
        "delete_existing": True,
    }
    t = ts.open(spec).result()
    t.write(arr).result()


def _foreground_coords(lab: np.ndarray, num_classes: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    flat = lab.ravel()
    rows = []
    for k in range(1, max(num_classes, 1)):
        idx = np.flatnonzero(flat == k)
        if idx.size == 0:
            continue
        if idx.size > FG_SAMPLES:
            idx = np.sort(rng.choice(idx, size=FG_SAMPLES, replace=False))
        coords = np.stack(np.unravel_index(idx, lab.shape), axis=1)
        rows.append(np.concatenate([np.full((idx.size, 1), k), coords], axis=1))
    if not rows:
        return np.zeros((0, 1 + lab.ndim), np.int32)
    return np.concatenate(rows, axis=0).astype(np.int32)


def _write_case(
    case_dir: pathlib.Path,
    image: np.ndarray,
    lab: np.ndarray | None,
    ndim: int,
    num_classes: int,
) -> None:
    """Writes image / label / fg arrays of one case (the unit an interruption can hit)."""
    spatial = image.shape[:-1]
    ch = _chunks(spatial, ndim)
    _write_array(
        case_dir / "image",
        np.ascontiguousarray(image, dtype=np.float32),
        [*ch, image.shape[-1]],
        _blosc(4, "shuffle"),
    )
    if lab is not None:
        fg = _foreground_coords(lab, num_classes)
        _write_array(
            case_dir / "label", np.ascontiguousarray(lab, np.uint8), ch, _blosc(1, "bitshuffle")
        )
    else:
        fg = np.zeros((0, 1 + ndim), np.int32)
    _write_array(case_dir / "fg", fg, [max(1, fg.shape[0]), fg.shape[1]], _blosc(4, "shuffle"))


def _write_json_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


_STORE_ENTRIES = {MANIFEST, "cases"}


def _remove_store(store_dir: pathlib.Path) -> None:
    """Deletes an outdated/incomplete store, refusing anything that is not a store."""
    if not store_dir.exists() and not store_dir.is_symlink():
        return
    if not store_dir.is_dir() or store_dir.is_symlink():
        raise DataError(f"{store_dir}: store_dir exists and is not a directory")
    names = {p.name for p in store_dir.iterdir()}
    foreign = {n for n in names if n not in _STORE_ENTRIES and not n.startswith(f".{MANIFEST}")}
    if foreign:
        raise DataError(
            f"{store_dir}: store_dir exists and is not a unetjax store (contains "
            f"{sorted(foreign)[:5]}); refusing to delete it — choose another store_dir"
        )
    # Manifest first, so a crash in the middle never leaves a manifest over partial arrays.
    with contextlib.suppress(FileNotFoundError):
        (store_dir / MANIFEST).unlink()
    shutil.rmtree(store_dir)


@contextlib.contextmanager
def _store_lock(store_dir: pathlib.Path) -> Iterator[None]:
    store_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = store_dir.parent / f".{store_dir.name}.lock"
    with open(lock_path, "a+") as f:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX
            yield
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _clean_stale_tmp(store_dir: pathlib.Path) -> None:
    """Removes temporary directories of earlier, interrupted ingestions (lock held)."""
    for p in store_dir.parent.glob(f".{store_dir.name}.ingest-*"):
        shutil.rmtree(p, ignore_errors=True)


def _ingest(
    layout: dio.SourceLayout, store_dir: pathlib.Path, opts: _Options, signature: str
) -> Manifest:
    log.info("validating %d cases in %s", len(layout.cases), layout.root)
    checked, channels, num_classes = _validate(layout, opts)

    infos = []
    for ch in checked:
        cv = None
        if ch.counts is not None:
            counts = np.zeros(max(num_classes, len(ch.counts)), np.int64)
            counts[: len(ch.counts)] = ch.counts
            cv = tuple(int(x) for x in counts[:num_classes])
        infos.append(
            CaseInfo(
                case_id=ch.case.case_id,
                shape=ch.shape,
                spacing=ch.spacing,
                affine=ch.affine,
                has_label=ch.counts is not None,
                class_voxels=cv,
                intensity=ch.intensity,
                image_file=ch.case.image_file,
                label_file=ch.case.label_file,
            )
        )
    manifest = Manifest(
        ndim=layout.ndim,
        channels=channels,
        num_classes=num_classes,
        cases=tuple(infos),
        signature=signature,
        source_kind=layout.kind,
        source_dir=str(layout.root),
        label_map=opts.label_map,
    )

    _remove_store(store_dir)
    _clean_stale_tmp(store_dir)
    tmp = store_dir.parent / f".{store_dir.name}.ingest-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    log.info("ingesting %d cases into %s", len(checked), store_dir)
    try:
        tmp.mkdir(parents=True)
        for ch in checked:
            if ch.loaded is not None:
                image, lab = ch.loaded.image, ch.loaded.label
                ch.loaded = None
            else:
                loaded, lab = _prepare_case(layout, ch.case, opts)
                image = loaded.image
            _write_case(tmp / "cases" / ch.case.case_id, image, lab, layout.ndim, num_classes)
        _write_json_atomic(tmp / MANIFEST, manifest.to_json())
        os.rename(tmp, store_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


def _read_manifest(store_dir: pathlib.Path) -> Manifest | None:
    """The store's manifest, or None when absent/unreadable/of another format version."""
    try:
        m = Manifest.from_json((store_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return m if m.format_version == FORMAT_VERSION else None


def open_store(store_dir: str | os.PathLike) -> Dataset:
    """Opens an existing, complete store without its source folder (no signature check)."""
    store_dir = pathlib.Path(store_dir).expanduser()
    m = _read_manifest(store_dir)
    if m is None:
        raise DataError(f"{store_dir}: not a complete unetjax store (no valid {MANIFEST})")
    return Dataset(store_dir, m)


def open_dataset(
    source_dir: str | os.PathLike,
    store_dir: str | os.PathLike | None = None,
    *,
    num_classes: int | None = None,
    label_map: Mapping[int, int] | None = None,
    spacing_2d: float | Sequence[float] | None = None,
) -> Dataset:
    """Ingests ``source_dir`` on first use (or when it changed) and returns its Dataset."""
    layout = dio.scan_source(source_dir)
    opts = _normalize_options(num_classes, label_map, spacing_2d)
    store = (
        pathlib.Path(store_dir).expanduser().absolute()
        if store_dir is not None
        else _default_store_dir(layout.root, opts)
    )
    resolved = store.resolve()
    if resolved == layout.root or layout.root in resolved.parents:
        raise DataError(f"{store}: store_dir must not be inside the source folder {layout.root}")
    signature = source_signature(layout, opts)
    m = _read_manifest(store)
    if m is not None and m.signature == signature:
        return Dataset(store, m)
    with _store_lock(store):
        m = _read_manifest(store)  # another process may have finished meanwhile
        if m is not None and m.signature == signature:
            return Dataset(store, m)
        m = _ingest(layout, store, opts, signature)
    return Dataset(store, m)
