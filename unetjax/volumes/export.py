"""Prediction stores: opening them and exporting an array to NIfTI slab by slab."""

from __future__ import annotations

import gzip
import json
import os
import pathlib

import numpy as np

from unetjax.data.errors import DataError
from unetjax.volumes.arrays import Geometry, open_array
from unetjax.volumes.streaming import VOLUME_JSON

__all__ = ["open_prediction", "export_nifti"]


def open_prediction(store_dir: str | os.PathLike, name: str = "labels"):
    """``(array, geometry, meta)`` of a complete prediction store written by ``predict_volume``."""
    store_dir = pathlib.Path(store_dir)
    try:
        meta = json.loads((store_dir / VOLUME_JSON).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{store_dir}: not a complete prediction store ({exc})") from exc
    if name not in meta.get("arrays", []):
        raise DataError(f"{store_dir}: has no {name!r} array (has {meta.get('arrays')})")
    geometry = Geometry.from_dict(meta.get("geometry"), len(meta["shape"]))
    return open_array(store_dir / name), geometry, meta


def export_nifti(
    store_dir: str | os.PathLike,
    path: str | os.PathLike,
    name: str = "labels",
    slab: int = 64,
) -> pathlib.Path:
    """Write array ``name`` of a prediction store as NIfTI-1 (``.nii`` or ``.nii.gz``) with the
    store's affine, reading ``slab`` planes of the last spatial axis at a time.

    NIfTI stores the first axis fastest (Fortran order), so each plane ``[..., k]`` is one
    contiguous run of the file. Written to a temporary name and renamed.
    """
    import nibabel as nib

    array, geometry, _ = open_prediction(store_dir, name)
    shape = tuple(int(s) for s in array.shape)
    if len(shape) not in (3, 4):
        raise DataError(f"{store_dir}/{name}: NIfTI export needs a 3D array, got shape {shape}")
    dtype = np.dtype(array.dtype.numpy_dtype)
    header = nib.Nifti1Header()
    header.set_data_shape(shape if len(shape) == 3 else (*shape[:3], 1, shape[3]))
    header.set_data_dtype(dtype)
    affine = geometry.affine_matrix()
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_zooms(tuple(geometry.spacing) + ((1.0, 1.0) if len(shape) == 4 else ()))
    header.set_xyzt_units("mm")
    header["vox_offset"] = 352
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(tmp, "wb") as f:
        f.write(header.binaryblock)
        f.write(b"\0\0\0\0")  # no extensions
        if len(shape) == 3:
            for k0 in range(0, shape[2], slab):
                block = np.asarray(
                    array[:, :, k0 : min(k0 + slab, shape[2])].read().result(), dtype
                )
                for k in range(block.shape[2]):
                    f.write(block[:, :, k].tobytes(order="F"))
        else:  # [x, y, z, K] -> NIfTI [x, y, z, 1, K]: one whole volume per class
            for c in range(shape[3]):
                for k0 in range(0, shape[2], slab):
                    block = np.asarray(
                        array[:, :, k0 : min(k0 + slab, shape[2]), c].read().result(), dtype
                    )
                    for k in range(block.shape[2]):
                        f.write(block[:, :, k].tobytes(order="F"))
    os.replace(tmp, path)
    return path
