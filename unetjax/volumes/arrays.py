"""Opening chunked arrays by path, URL or tensorstore spec, and volume geometry.

A *volume* here is a tensorstore array ``[*spatial]`` or ``[*spatial, C]`` (channel-last) read
lazily box by box; nothing in :mod:`unetjax.volumes` ever reads a whole one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from unetjax.data.errors import DataError

__all__ = [
    "Geometry",
    "open_array",
    "array_spec",
    "create_array",
    "read_box",
    "read_boxes",
    "with_channels",
]

DEFAULT_CACHE_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Physical placement of a volume: voxel spacing (mm) and the 4x4 voxel-to-world affine."""

    spacing: tuple[float, ...]
    affine: tuple[tuple[float, ...], ...] | None = None

    def to_dict(self) -> dict:
        aff = [list(r) for r in self.affine] if self.affine is not None else None
        return {"spacing": list(self.spacing), "affine": aff}

    @classmethod
    def from_dict(cls, d: Mapping | None, ndim: int = 3) -> Geometry:
        if not d:
            return cls((1.0,) * ndim)
        aff = d.get("affine")
        return cls(
            tuple(float(s) for s in d["spacing"]),
            tuple(tuple(float(x) for x in r) for r in aff) if aff is not None else None,
        )

    def affine_matrix(self) -> np.ndarray:
        """The affine, or ``diag(spacing, 1)`` when none was recorded."""
        if self.affine is not None:
            return np.asarray(self.affine, np.float64)
        return np.diag([*self.spacing, 1.0])


def _driver_for_dir(path: pathlib.Path) -> str | None:
    if (path / "zarr.json").exists():
        return "zarr3"
    if (path / ".zarray").exists():
        return "zarr"
    if (path / "attributes.json").exists():
        return "n5"
    return None


def array_spec(source: str | os.PathLike | Mapping) -> dict | str:
    """A tensorstore spec for ``source``: a dict spec (as is), a JSON string, a tensorstore URL
    (``file:///x|zarr3:``, ``gs://...|zarr:``, ...), or a local directory holding a zarr v3,
    zarr v2 or N5 array (driver detected from its metadata file)."""
    if isinstance(source, Mapping):
        return dict(source)
    text = str(source)
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{text[:80]}: not a valid JSON tensorstore spec ({exc})") from exc
    if "://" in text or "|" in text:
        return text
    path = pathlib.Path(text).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such array (a zarr/N5 directory, spec or URL expected)")
    driver = _driver_for_dir(path)
    if driver is None:
        raise DataError(
            f"{path}: not a zarr v3, zarr v2 or N5 array (no zarr.json, .zarray or "
            "attributes.json); convert it with unetjax.volumes.ingest first"
        )
    return {"driver": driver, "kvstore": {"driver": "file", "path": str(path.absolute())}}


def open_array(
    source, *, cache_bytes: int = DEFAULT_CACHE_BYTES, context=None, write: bool = False
):
    """Open an existing array read-only (or read/write) with a bounded chunk cache."""
    import tensorstore as ts

    spec = array_spec(source)
    if context is None:
        context = ts.Context({"cache_pool": {"total_bytes_limit": int(cache_bytes)}})
    try:
        return ts.open(spec, open=True, read=True, write=write, context=context).result()
    except Exception as exc:  # tensorstore raises ValueError/RuntimeError subclasses
        raise DataError(f"{_describe(spec)}: cannot open as an array ({exc})") from exc


def _describe(spec) -> str:
    if isinstance(spec, dict):
        kv = spec.get("kvstore", {})
        return str(kv.get("path", kv) if isinstance(kv, dict) else kv)
    return str(spec)


def create_array(
    path: str | os.PathLike,
    shape: Sequence[int],
    dtype,
    chunks: Sequence[int],
    *,
    codec: dict | None = None,
    fill_value=0,
    context=None,
):
    """Create (replacing) a zarr v3 array on the local file system; returns the open handle."""
    import tensorstore as ts

    codecs = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if codec is not None:
        codecs.append(codec)
    spec = {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {
            "shape": [int(s) for s in shape],
            "data_type": np.dtype(dtype).name,
            "chunk_grid": {
                "name": "regular",
                "configuration": {"chunk_shape": [int(c) for c in chunks]},
            },
            "codecs": codecs,
            "fill_value": fill_value,
        },
        "create": True,
        "delete_existing": True,
    }
    kwargs = {"context": context} if context is not None else {}
    return ts.open(spec, **kwargs).result()


def with_channels(array, ndim: int):
    """``array`` as ``[*spatial, C]``: a rank-``ndim`` array gets a trailing unit channel axis."""
    if array.rank == ndim:
        return array[..., None] if hasattr(array, "__getitem__") else array
    if array.rank != ndim + 1:
        raise DataError(
            f"array of shape {tuple(array.shape)} is neither [*spatial] nor [*spatial, C] "
            f"with {ndim} spatial axes"
        )
    return array


def read_box(array, lo: Sequence[int], hi: Sequence[int], pad_value: float = 0.0, transform=None):
    """Start reading the box ``[lo, hi)`` of ``array [*spatial, C]``; returns a callable that
    waits and gives float32. ``transform`` (e.g. normalisation) is applied to the part inside
    the array; the parts outside are ``pad_value`` (after ``transform``)."""
    shape = np.asarray(array.shape[:-1], np.int64)
    lo, hi = np.asarray(lo, np.int64), np.asarray(hi, np.int64)
    clo, chi = np.clip(lo, 0, shape), np.clip(hi, 0, shape)
    future = None
    if (chi > clo).all():
        box = tuple(slice(int(a), int(b)) for a, b in zip(clo, chi, strict=True))
        future = array[box].read()

    def result() -> np.ndarray:
        out = np.full((*(hi - lo), array.shape[-1]), pad_value, np.float32)
        if future is not None:
            inner = tuple(slice(int(a), int(b)) for a, b in zip(clo - lo, chi - lo, strict=True))
            data = np.asarray(future.result(), np.float32)
            out[inner] = data if transform is None else transform(data)
        return out

    return result


def read_boxes(array, boxes, pad_value: float = 0.0) -> list[np.ndarray]:
    """Read many ``(lo, hi)`` boxes of ``array [*spatial, C]`` concurrently: every read is
    issued (tensorstore futures) before the first is waited for."""
    pending = [read_box(array, lo, hi, pad_value) for lo, hi in boxes]
    return [result() for result in pending]
