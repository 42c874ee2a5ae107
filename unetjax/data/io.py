"""Readers for the source folders of ``docs/DATA_API.md``: 2D images, NIfTI and npz volumes.

Every reader returns plain numpy arrays and raises :class:`~unetjax.data.errors.DataError`
(naming the file and the problem) on any failure; library exceptions (PIL, tifffile,
nibabel, zipfile, zlib) are wrapped as "corrupt or unreadable".

Conventions
* Images are channel-last ``[*spatial, C]`` in their source dtype (bool -> uint8); the store
  converts them to float32.
* 2D images (PNG/JPEG through PIL, TIFF through tifffile): gray -> 1 channel, gray+alpha
  -> 1 (alpha dropped), RGB -> 3, RGBA -> 3 (alpha dropped), palette -> RGB, CMYK -> RGB;
  8-, 16-bit and float gray kept as stored. TIFF layouts: ``YX``, ``YXS`` and ``SYX``
  (planar) after dropping length-1 axes; anything else (stacks, time series) is refused.
  EXIF orientation is NOT applied (masks have none; applying it would misalign pairs).
* 2D masks: a single-channel label map. A mask stored as RGB(A)/gray+alpha whose colour
  channels are identical is accepted (first channel); palette PNGs give their indices.
* NIfTI: array order as stored (``np.asarray(img.dataobj)``, header scaling applied);
  spacing from ``header.get_zooms()[:3]``; affine from ``img.affine``; a 4D image
  ``(X, Y, Z, C)`` (or 5D ``(X, Y, Z, 1, C)``) is channel-last; a 4D label must have a
  last axis of length 1.
* npz (``allow_pickle=False``, keys ``image``, optional ``label``, ``spacing``, ``affine``;
  other keys ignored). ``image`` is 3D (one channel) or 4D channel-last. **Channel rule**:
  a 4D image is accepted only when it is clearly channel-last: with a label, the label's
  shape equals ``image.shape[:3]``; without one, the last axis has at most 16 entries and is
  shorter than every spatial axis. A channel-first-looking image is refused.
  Missing spacing comes from the affine's column norms (or 1.0); a missing affine is
  ``diag(spacing)``; when both are given they must agree (rtol 1e-3).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import zipfile
import zlib

import numpy as np

from unetjax.data.errors import DataError

__all__ = [
    "IMAGE_EXTS_2D",
    "NIFTI_EXTS",
    "LoadedCase",
    "SourceCase",
    "SourceLayout",
    "case_stem",
    "load_case",
    "read_image_2d",
    "read_mask_2d",
    "read_nifti",
    "read_nifti_case",
    "read_npz_case",
    "scan_source",
]

IMAGE_EXTS_2D = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
NIFTI_EXTS = (".nii.gz", ".nii")
NPZ_EXT = ".npz"
_MAX_NPZ_CHANNELS = 16
_SPACING_RTOL = 1e-3

PathLike = str | os.PathLike


def _corrupt(path: PathLike, exc: BaseException) -> DataError:
    return DataError(f"{path}: corrupt or unreadable file ({type(exc).__name__}: {exc})")


# --------------------------------------------------------------------------------------
# Folder layout
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SourceCase:
    """One case of a source folder (paths absolute, ``*_file`` relative to the root)."""

    case_id: str
    image_path: pathlib.Path
    label_path: pathlib.Path | None
    image_file: str
    label_file: str | None


@dataclasses.dataclass(frozen=True)
class SourceLayout:
    """A scanned source folder: its kind (``"2d"``, ``"nifti"``, ``"npz"``) and cases."""

    root: pathlib.Path
    kind: str
    cases: tuple[SourceCase, ...]  # sorted by case_id

    @property
    def ndim(self) -> int:
        return 2 if self.kind == "2d" else 3

    @property
    def files(self) -> tuple[pathlib.Path, ...]:
        """Every source file that takes part in the dataset (for the signature)."""
        out = []
        for c in self.cases:
            out.append(c.image_path)
            if c.label_path is not None:
                out.append(c.label_path)
        return tuple(out)


def case_stem(name: str) -> str:
    """File name without its (double, for ``.nii.gz``) extension."""
    low = name.lower()
    for ext in (*NIFTI_EXTS, NPZ_EXT, *IMAGE_EXTS_2D):
        if low.endswith(ext):
            return name[: -len(ext)]
    return pathlib.Path(name).stem


def _ext(name: str) -> str:
    low = name.lower()
    if low.endswith(".nii.gz"):
        return ".nii.gz"
    return pathlib.Path(low).suffix


def _list_files(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())


def _by_stem(files: list[pathlib.Path], folder: pathlib.Path) -> dict[str, pathlib.Path]:
    out: dict[str, pathlib.Path] = {}
    for p in files:
        stem = case_stem(p.name)
        if stem in out:
            raise DataError(
                f"{p}: duplicate case id {stem!r} in {folder} (also {out[stem].name}); "
                "keep one file per case"
            )
        out[stem] = p
    return out


def scan_source(source_dir: PathLike) -> SourceLayout:
    """Finds the cases of a source folder; pairing problems raise :class:`DataError`.

    Layouts: ``volumes/*.npz`` (3D npz), or ``images/`` (+ optional ``masks/``) with
    PNG/TIFF/JPEG (2D) or ``.nii.gz``/``.nii`` (3D NIfTI) files paired by file stem.
    Hidden files and sub-folders are ignored; so are files with other extensions.
    """
    root = pathlib.Path(source_dir).expanduser()
    if not root.exists():
        raise DataError(f"{root}: data folder does not exist (missing folder)")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    root = root.resolve()
    volumes, images, masks = root / "volumes", root / "images", root / "masks"

    if volumes.is_dir():
        all_files = _list_files(volumes)
        files = [p for p in all_files if _ext(p.name) == NPZ_EXT]
        if not files:
            raise DataError(
                f"{volumes}: empty folder: no .npz volumes found" + _other_exts_note(all_files)
            )
        _by_stem(files, volumes)
        cases = tuple(
            SourceCase(
                case_id=case_stem(p.name),
                image_path=p,
                label_path=None,
                image_file=p.relative_to(root).as_posix(),
                label_file=None,
            )
            for p in sorted(files, key=lambda p: case_stem(p.name))
        )
        return SourceLayout(root=root, kind="npz", cases=cases)

    if not images.is_dir():
        raise DataError(
            f"{root}: missing folder: expected images/ (+ masks/) or volumes/ inside it"
        )
    all_images = _list_files(images)
    nifti = [p for p in all_images if _ext(p.name) in NIFTI_EXTS]
    flat = [p for p in all_images if _ext(p.name) in IMAGE_EXTS_2D]
    if nifti and flat:
        raise DataError(
            f"{images}: mixed NIfTI ({nifti[0].name}) and 2D image ({flat[0].name}) files; "
            "a dataset is either 2D or 3D"
        )
    if not nifti and not flat:
        raise DataError(
            f"{images}: empty folder: no image files ({', '.join(IMAGE_EXTS_2D + NIFTI_EXTS)})"
            + _other_exts_note(all_images)
        )
    kind = "nifti" if nifti else "2d"
    exts = NIFTI_EXTS if nifti else IMAGE_EXTS_2D
    image_by = _by_stem(nifti or flat, images)

    mask_by: dict[str, pathlib.Path] | None = None
    if masks.is_dir():
        mask_files = [p for p in _list_files(masks) if _ext(p.name) in exts]
        mask_by = _by_stem(mask_files, masks)
        for stem in sorted(image_by):
            if stem not in mask_by:
                raise DataError(
                    f"{image_by[stem]}: image without mask partner: no masks/{stem}.* "
                    f"({'/'.join(exts)})"
                )
        for stem in sorted(mask_by):
            if stem not in image_by:
                raise DataError(f"{mask_by[stem]}: mask without image partner: no images/{stem}.*")

    cases = []
    for stem in sorted(image_by):
        ip = image_by[stem]
        lp = mask_by[stem] if mask_by is not None else None
        cases.append(
            SourceCase(
                case_id=stem,
                image_path=ip,
                label_path=lp,
                image_file=ip.relative_to(root).as_posix(),
                label_file=lp.relative_to(root).as_posix() if lp is not None else None,
            )
        )
    return SourceLayout(root=root, kind=kind, cases=tuple(cases))


def _other_exts_note(files: list[pathlib.Path]) -> str:
    exts = sorted({_ext(p.name) or p.name for p in files})
    return f" (found only: {', '.join(exts)})" if exts else ""


# --------------------------------------------------------------------------------------
# 2D readers
# --------------------------------------------------------------------------------------


def _check_dtype(path: PathLike, arr: np.ndarray) -> np.ndarray:
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise DataError(f"{path}: unsupported pixel type {arr.dtype}")
    return arr


def _read_pil(path: pathlib.Path, *, for_mask: bool) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "P" and not for_mask:
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                mode = im.mode
            elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
                mode = "RGB"
            elif mode == "PA" and not for_mask:
                im = im.convert("RGBA")
                mode = im.mode
            arr = np.array(im)
    except DataError:
        raise
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        raise _corrupt(path, exc) from exc
    if mode in ("LA", "La", "PA"):
        arr = arr[..., :1]
    elif mode in ("RGBA", "RGBa", "RGBX"):
        arr = arr[..., :3]
    return arr


def _read_tiff(path: pathlib.Path) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes = series.axes
            arr = series.asarray()
            photometric = tif.pages[0].photometric
            extrasamples = tuple(getattr(tif.pages[0], "extrasamples", ()) or ())
    except Exception as exc:
        raise _corrupt(path, exc) from exc
    keep = [i for i, n in enumerate(arr.shape) if n != 1 or axes[i] in "YX"]
    arr = arr.reshape([arr.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    if axes == "YX":
        arr = arr[..., None]
    elif axes == "SYX":
        arr = np.moveaxis(arr, 0, -1)
    elif axes != "YXS":
        raise DataError(
            f"{path}: unsupported TIFF layout (axes {axes!r}, shape {arr.shape}); "
            "expected a single 2D image, gray or with channels"
        )
    # Drop an alpha channel (RGB + 1 extra sample, or gray + 1 extra sample).
    is_rgb = int(photometric) == 2
    if extrasamples and arr.shape[-1] == (3 if is_rgb else 1) + len(extrasamples):
        arr = arr[..., : 3 if is_rgb else 1]
    return arr


def _read_2d_any(path: PathLike, *, for_mask: bool) -> np.ndarray:
    path = pathlib.Path(path)
    ext = _ext(path.name)
    if ext in (".tif", ".tiff"):
        arr = _read_tiff(path)
    elif ext in IMAGE_EXTS_2D:
        arr = _read_pil(path, for_mask=for_mask)
    else:
        raise DataError(f"{path}: unsupported file type {ext!r}")
    arr = _check_dtype(path, arr)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{path}: not a 2D image (array shape {arr.shape})")
    return arr


def read_image_2d(path: PathLike) -> np.ndarray:
    """A 2D image as ``[H, W, C]`` in its stored dtype (see the module notes)."""
    return _read_2d_any(path, for_mask=False)


def read_mask_2d(path: PathLike) -> np.ndarray:
    """A 2D mask as ``[H, W]`` in its stored dtype; must be a single-channel label map."""
    arr = _read_2d_any(path, for_mask=True)
    n = arr.shape[-1]
    if n > 1 and not all(np.array_equal(arr[..., 0], arr[..., c]) for c in range(1, n)):
        raise DataError(
            f"{path}: mask has {n} different colour channels; "
            "expected a single-channel integer label map"
        )
    return arr[..., 0]


# --------------------------------------------------------------------------------------
# 3D readers
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoadedCase:
    """A case in memory: image ``[*spatial, C]``, label ``[*spatial]`` (raw values)."""

    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, ...] | None  # None for 2D (the store uses spacing_2d)
    affine: np.ndarray | None  # 4x4 for 3D


def read_nifti(path: PathLike) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    """``(data, spacing, affine)`` of a NIfTI file; data as stored (scaling applied)."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:
        raise _corrupt(path, exc) from exc
    data = _check_dtype(path, np.asarray(data))
    if data.ndim < 3:
        raise DataError(f"{path}: not a 3D volume (array shape {data.shape})")
    return data, zooms, affine


def read_nifti_case(image_path: PathLike, label_path: PathLike | None) -> LoadedCase:
    """Image (+ label) NIfTI pair; shapes, spacings and affines must agree."""
    image, spacing, affine = read_nifti(image_path)
    if image.ndim == 5 and image.shape[3] == 1:
        image = image[:, :, :, 0, :]
    if image.ndim == 3:
        image = image[..., None]
    if image.ndim != 4:
        raise DataError(f"{image_path}: unsupported NIfTI image shape {image.shape}")
    _check_spacing(image_path, spacing)
    label = None
    if label_path is not None:
        label, lspacing, laffine = read_nifti(label_path)
        if label.ndim == 4 and label.shape[3] == 1:
            label = label[..., 0]
        if label.shape != image.shape[:3]:
            raise DataError(
                f"{label_path}: image/label shape mismatch: label {label.shape} vs image "
                f"{image.shape[:3]} ({pathlib.Path(image_path).name})"
            )
        if not np.allclose(lspacing, spacing, rtol=_SPACING_RTOL, atol=1e-6):
            raise DataError(
                f"{label_path}: image/label spacing mismatch: label {lspacing} vs image "
                f"{spacing} ({pathlib.Path(image_path).name})"
            )
        if not np.allclose(laffine, affine, rtol=_SPACING_RTOL, atol=1e-3):
            raise DataError(
                f"{label_path}: image/label affine mismatch: label "
                f"{np.round(laffine, 4).tolist()} vs image {np.round(affine, 4).tolist()} "
                f"({pathlib.Path(image_path).name})"
            )
    return LoadedCase(image=image, label=label, spacing=spacing, affine=affine)


def _check_spacing(path: PathLike, spacing) -> None:
    s = np.asarray(spacing, dtype=np.float64)
    if s.shape != (3,) or not np.all(np.isfinite(s)) or not np.all(s > 0):
        raise DataError(f"{path}: invalid spacing {tuple(s.tolist())}: need 3 positive values")


def read_npz_case(path: PathLike) -> LoadedCase:
    """A ``volumes/NAME.npz`` case (see the module notes for the channel rule)."""
    try:
        z = np.load(path, allow_pickle=False)
        if not hasattr(z, "files"):
            raise DataError(f"{path}: not an npz archive (a single .npy array)")
        with z:
            if "image" not in z.files:
                raise DataError(f"{path}: missing key 'image' (keys: {sorted(z.files)})")
            image = z["image"]
            label = z["label"] if "label" in z.files else None
            spacing = z["spacing"] if "spacing" in z.files else None
            affine = z["affine"] if "affine" in z.files else None
    except DataError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc):
            raise DataError(
                f"{path}: contains object (pickled) arrays, refused (allow_pickle=False)"
            ) from exc
        raise _corrupt(path, exc) from exc
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as exc:
        raise _corrupt(path, exc) from exc

    image = _check_dtype(path, np.asarray(image))
    if label is not None:
        label = _check_dtype(path, np.asarray(label))
    if image.ndim == 3:
        image = image[..., None]
    elif image.ndim == 4:
        if label is not None:
            if label.shape != image.shape[:3]:
                layout = "channel-first " if label.shape == image.shape[1:] else ""
                raise DataError(
                    f"{path}: image/label shape mismatch: image {image.shape} "
                    f"({layout}4D) vs label {label.shape}; store a 4D image channel-last "
                    "[D, H, W, C]"
                )
        else:
            c = image.shape[-1]
            if not (c <= _MAX_NPZ_CHANNELS and c < min(image.shape[:3])):
                raise DataError(
                    f"{path}: ambiguous 4D image shape {image.shape}: not clearly "
                    "channel-last; store it as [D, H, W, C] with a short last axis"
                )
    else:
        raise DataError(
            f"{path}: image must be a 3D volume [D, H, W] or [D, H, W, C], got shape {image.shape}"
        )
    if min(image.shape[:3]) == 0:
        raise DataError(f"{path}: empty volume (shape {image.shape})")
    if label is not None and label.shape != image.shape[:3]:
        raise DataError(
            f"{path}: image/label shape mismatch: image {image.shape[:3]} vs label {label.shape}"
        )

    if affine is not None:
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise DataError(f"{path}: invalid affine (shape {affine.shape}): need a finite 4x4")
    if spacing is not None:
        spacing_t = tuple(float(s) for s in np.asarray(spacing, dtype=np.float64).ravel())
        _check_spacing(path, spacing_t)
    elif affine is not None:
        spacing_t = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
        _check_spacing(path, spacing_t)
    else:
        spacing_t = (1.0, 1.0, 1.0)
    if affine is None:
        affine = np.diag([*spacing_t, 1.0])
    else:
        norms = np.linalg.norm(affine[:3, :3], axis=0)
        if not np.allclose(norms, spacing_t, rtol=_SPACING_RTOL, atol=1e-6):
            raise DataError(
                f"{path}: spacing/affine mismatch: spacing {spacing_t} but the affine's "
                f"column norms are {tuple(round(float(n), 6) for n in norms)}"
            )
    return LoadedCase(image=image, label=label, spacing=spacing_t, affine=affine)


def load_case(case: SourceCase, kind: str) -> LoadedCase:
    """Reads one case of a :class:`SourceLayout` (2D image+mask, NIfTI pair or npz)."""
    if kind == "npz":
        return read_npz_case(case.image_path)
    if kind == "nifti":
        return read_nifti_case(case.image_path, case.label_path)
    if kind != "2d":
        raise ValueError(f"unknown source kind {kind!r}")
    image = read_image_2d(case.image_path)
    label = None
    if case.label_path is not None:
        label = read_mask_2d(case.label_path)
        if label.shape != image.shape[:2]:
            raise DataError(
                f"{case.label_path}: image/mask size mismatch: mask is "
                f"{label.shape[0]}x{label.shape[1]}, image {case.image_path.name} is "
                f"{image.shape[0]}x{image.shape[1]}"
            )
    return LoadedCase(image=image, label=label, spacing=None, affine=None)
