"""Slab readers: one volume file (or array) read a slab at a time, never whole.

Each source knows its spatial ``shape``, ``channels`` (None for a label map), ``dtype``, the
``axis`` along which slabs are contiguous on disk (NIfTI and Fortran-order ``.npy``: the last
spatial axis; C-order arrays, TIFF stacks and tensorstore arrays: the first) and, where the
format has them, ``spacing`` and ``affine``. ``slabs(thickness)`` yields ``(start, block)`` in
order; blocks are ``[..., C]`` channel-last for images.
"""

from __future__ import annotations

import os
import pathlib
import zipfile
from collections.abc import Iterator

import numpy as np

from unetjax.data.errors import DataError

__all__ = ["open_source", "VolumeSource"]


class VolumeSource:
    """Base: subclasses set the attributes and implement :meth:`_read`."""

    path: str
    shape: tuple[int, ...]  # spatial
    channels: int | None  # None: no channel axis (label map)
    dtype: np.dtype
    axis: int = 0
    spacing: tuple[float, ...] | None = None
    affine: np.ndarray | None = None

    def _read(self, k0: int, k1: int) -> np.ndarray:
        raise NotImplementedError

    def slabs(self, thickness: int) -> Iterator[tuple[int, np.ndarray]]:
        n = self.shape[self.axis]
        for k0 in range(0, n, thickness):
            k1 = min(k0 + thickness, n)
            try:
                block = self._read(k0, k1)
            except DataError:
                raise
            except Exception as exc:
                raise DataError(f"{self.path}: unreadable at slab {k0}:{k1} ({exc})") from exc
            yield k0, block

    def _finish(self, shape, as_label: bool):
        shape = tuple(int(s) for s in shape)
        if as_label:
            if len(shape) != 3:
                raise DataError(f"{self.path}: a label volume must be 3D, got shape {shape}")
            self.shape, self.channels = shape, None
        elif len(shape) == 3:
            self.shape, self.channels = shape, 1
        elif len(shape) == 4:
            self.shape, self.channels = shape[:3], shape[3]
        else:
            raise DataError(
                f"{self.path}: a volume must be [D, H, W] or [D, H, W, C], got shape {shape}"
            )
        if min(self.shape) == 0:
            raise DataError(f"{self.path}: empty volume (shape {shape})")
        kind = self.dtype.kind
        if kind not in "biuf":
            raise DataError(f"{self.path}: unsupported data type {self.dtype} (numbers expected)")

    def _channel_last(self, block: np.ndarray) -> np.ndarray:
        return block[..., None] if self.channels is not None and block.ndim == 3 else block


class _Nifti(VolumeSource):
    def __init__(self, path, as_label):
        import nibabel as nib

        self.path = str(path)
        try:
            img = nib.load(self.path)
            self._proxy = img.dataobj
            self.spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
            self.affine = np.asarray(img.affine, np.float64)
            shape = img.shape
            self.dtype = np.dtype(img.get_data_dtype())
            if getattr(self._proxy, "slope", 1.0) != 1.0 or getattr(self._proxy, "inter", 0.0):
                self.dtype = np.dtype(np.float32)
        except Exception as exc:
            raise DataError(f"{path}: unreadable or corrupt NIfTI ({exc})") from exc
        if len(shape) == 5 and shape[3] == 1:  # [x, y, z, 1, C]
            shape = (*shape[:3], shape[4])
            self._squeeze = True
        else:
            self._squeeze = False
        self.axis = 2  # Fortran order on disk: planes along the last spatial axis are contiguous
        self._finish(shape, as_label)

    def _read(self, k0, k1):
        block = np.asanyarray(self._proxy[:, :, k0:k1])
        if self._squeeze:
            block = block[:, :, :, 0]
        return self._channel_last(np.asarray(block))


class _Npy(VolumeSource):
    """A ``.npy`` file or one member of an ``.npz`` (read as a byte stream, never unpickled)."""

    def __init__(self, path, member, as_label):
        self.path = f"{path}[{member}]" if member else str(path)
        self._file, self._member = str(path), member
        with self._open() as f:
            shape, fortran, dtype = self._header(f)
        self.dtype = dtype
        self._fortran = fortran
        self._shape_full = shape
        self._finish(shape, as_label)
        if fortran:
            self.axis = 2

    def _open(self):
        if self._member is None:
            return open(self._file, "rb")
        try:
            z = zipfile.ZipFile(self._file)
            names = z.namelist()
            name = f"{self._member}.npy"
            if name not in names:
                keys = sorted(n.removesuffix(".npy") for n in names)
                raise DataError(f"{self._file}: missing key {self._member!r} (keys: {keys})")
            return z.open(name)
        except zipfile.BadZipFile as exc:
            raise DataError(f"{self._file}: not an npz archive ({exc})") from exc

    def _header(self, f):
        fmt = np.lib.format
        try:
            version = fmt.read_magic(f)
            reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = reader(f)
        except ValueError as exc:
            raise DataError(f"{self.path}: not a valid .npy array ({exc})") from exc
        if dtype.hasobject:
            raise DataError(f"{self.path}: object (pickled) array refused (allow_pickle=False)")
        return tuple(shape), bool(fortran), np.dtype(dtype)

    def slabs(self, thickness):
        shape = self._shape_full
        n = shape[self.axis]
        with self._open() as f:
            self._header(f)
            itemsize = self.dtype.itemsize
            for k0 in range(0, n, thickness):
                k1 = min(k0 + thickness, n)
                if self._fortran:  # planes of the last spatial axis (and channels) contiguous
                    plane = shape[:2]
                    count = int(np.prod(plane)) * (k1 - k0)
                    sub = (*plane, k1 - k0)
                else:
                    count = int(np.prod(shape[1:])) * (k1 - k0)
                    sub = (k1 - k0, *shape[1:])
                data = f.read(count * itemsize)
                if len(data) != count * itemsize:
                    raise DataError(f"{self.path}: truncated array data at slab {k0}:{k1}")
                block = np.frombuffer(data, self.dtype).reshape(
                    sub, order="F" if self._fortran else "C"
                )
                if self._fortran and len(shape) == 4:
                    raise DataError(f"{self.path}: Fortran-order 4D arrays are not supported")
                yield k0, self._channel_last(block)


class _Tiff(VolumeSource):
    """A multi-page TIFF stack (one page per plane) or a folder of single-plane TIFFs."""

    def __init__(self, path, as_label):
        import tifffile

        path = pathlib.Path(path)
        self.path = str(path)
        try:
            if path.is_dir():
                self._files = sorted(
                    p for p in path.iterdir() if p.suffix.lower() in (".tif", ".tiff")
                )
                if not self._files:
                    raise DataError(f"{path}: folder holds no .tif/.tiff planes")
                with tifffile.TiffFile(self._files[0]) as tif:
                    page = tif.pages[0]
                    plane, self.dtype = page.shape, np.dtype(page.dtype)
                shape = (len(self._files), *plane)
            else:
                self._files = None
                with tifffile.TiffFile(path) as tif:
                    page = tif.pages[0]
                    plane, self.dtype = page.shape, np.dtype(page.dtype)
                    shape = (len(tif.pages), *plane)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{path}: unreadable or corrupt TIFF ({exc})") from exc
        self._finish(shape, as_label)

    def _read(self, k0, k1):
        import tifffile

        if self._files is not None:
            planes = []
            for p in self._files[k0:k1]:
                plane = tifffile.imread(p)
                if plane.shape != self.shape[1:] + (
                    () if self.channels in (None, 1) else (self.channels,)
                ):
                    raise DataError(f"{p}: plane shape {plane.shape} differs from the first plane")
                planes.append(plane)
            block = np.stack(planes)
        else:
            with tifffile.TiffFile(self.path) as tif:
                block = np.stack([tif.pages[i].asarray() for i in range(k0, k1)])
        return self._channel_last(block)


class _Tensorstore(VolumeSource):
    def __init__(self, source, as_label):
        from unetjax.volumes.arrays import open_array

        self.array = open_array(source)
        self.path = str(source)
        self.dtype = np.dtype(self.array.dtype.numpy_dtype)
        self._finish(self.array.shape, as_label)

    def _read(self, k0, k1):
        return self._channel_last(np.asarray(self.array[k0:k1].read().result()))


def open_source(source, *, as_label: bool = False, npz_key: str | None = None) -> VolumeSource:
    """A slab reader for a NIfTI file, ``.npy``, ``.npz`` (key ``image``/``label``), TIFF stack
    (file or folder of planes), or anything :func:`unetjax.volumes.arrays.open_array` opens
    (zarr v2/v3, N5 directory; tensorstore spec or URL)."""
    if not isinstance(source, str | os.PathLike):
        return _Tensorstore(source, as_label)
    text = str(source)
    if "://" in text or "|" in text or text.lstrip().startswith("{"):
        return _Tensorstore(text, as_label)
    path = pathlib.Path(text).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return _Nifti(path, as_label)
    if name.endswith(".npy"):
        return _Npy(path, None, as_label)
    if name.endswith(".npz"):
        return _Npy(path, npz_key or ("label" if as_label else "image"), as_label)
    if name.endswith((".tif", ".tiff")) or (
        path.is_dir() and any(p.suffix.lower() in (".tif", ".tiff") for p in path.iterdir())
    ):
        return _Tiff(path, as_label)
    if path.is_dir():
        return _Tensorstore(path, as_label)
    raise DataError(
        f"{path}: unknown volume format (expected .nii/.nii.gz, .npy, .npz, .tif/.tiff, "
        "a folder of TIFF planes, or a zarr/N5 directory)"
    )
