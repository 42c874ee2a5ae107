"""Every bad-input case of docs/DATA_API.md raises DataError naming the file and problem.

Each test builds the smallest real-looking broken folder in tmp (real images copied, then
broken) and checks that nothing was written to the store (validation comes first).
"""

import shutil

import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image

from unetjax.data.errors import DataError
from unetjax.data.store import open_dataset


@pytest.fixture
def nuclei2(tmp_path, nuclei_dir):
    """Two real nuclei pairs (000: 256x256, 001: 256x320)."""
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    for i in ("000", "001"):
        shutil.copy(nuclei_dir / "images" / f"{i}.png", src / "images")
        shutil.copy(nuclei_dir / "masks" / f"{i}.png", src / "masks")
    return src


@pytest.fixture
def hippo2(tmp_path, hippocampus_dir):
    src = tmp_path / "src3d"
    (src / "volumes").mkdir(parents=True)
    for i in ("000", "001"):
        shutil.copy(hippocampus_dir / "volumes" / f"{i}.npz", src / "volumes")
    return src


def _fails(src, tmp_path, *needles, **kwargs) -> str:
    store = tmp_path / "store"
    with pytest.raises(DataError) as info:
        open_dataset(src, store, **kwargs)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert not store.exists(), "nothing may be written before validation passed"
    assert not list(tmp_path.glob(".store.ingest-*"))
    return msg


def _npz_arrays(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


# ---- folders and pairing


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(tmp_path / "nope", tmp_path / "store")


def test_folder_without_images_or_volumes(tmp_path):
    (tmp_path / "src").mkdir()
    _fails(tmp_path / "src", tmp_path, "src", "missing folder")


def test_empty_images_folder(tmp_path):
    (tmp_path / "src" / "images").mkdir(parents=True)
    (tmp_path / "src" / "images" / "notes.txt").write_text("x")
    _fails(tmp_path / "src", tmp_path, "images", "empty", ".txt")


def test_empty_volumes_folder(tmp_path):
    (tmp_path / "src" / "volumes").mkdir(parents=True)
    _fails(tmp_path / "src", tmp_path, "volumes", "empty")


def test_image_without_mask(nuclei2, tmp_path):
    (nuclei2 / "masks" / "001.png").unlink()
    _fails(nuclei2, tmp_path, "001.png", "without mask partner")


def test_mask_without_image(nuclei2, tmp_path):
    (nuclei2 / "images" / "000.png").unlink()
    _fails(nuclei2, tmp_path, "000.png", "without image partner")


def test_duplicate_case_id(nuclei2, tmp_path):
    img = np.asarray(Image.open(nuclei2 / "images" / "000.png"))
    tifffile.imwrite(nuclei2 / "images" / "000.tif", img)
    _fails(nuclei2, tmp_path, "000", "duplicate case id")


# ---- unreadable files


def test_truncated_png(nuclei2, tmp_path):
    path = nuclei2 / "images" / "001.png"
    path.write_bytes(path.read_bytes()[:300])
    _fails(nuclei2, tmp_path, "001.png", "corrupt or unreadable")


def test_garbage_png_mask(nuclei2, tmp_path):
    (nuclei2 / "masks" / "000.png").write_bytes(b"this is not a png" * 10)
    _fails(nuclei2, tmp_path, "masks/000.png", "corrupt or unreadable")


def test_corrupt_npz(hippo2, tmp_path):
    path = hippo2 / "volumes" / "001.npz"
    path.write_bytes(path.read_bytes()[:2000])
    _fails(hippo2, tmp_path, "001.npz", "corrupt or unreadable")


def test_corrupt_nifti(tmp_path, hippocampus_dir):
    arrays = _npz_arrays(hippocampus_dir / "volumes" / "000.npz")
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    nib.save(nib.Nifti1Image(arrays["image"], np.eye(4)), src / "images" / "a.nii.gz")
    nib.save(nib.Nifti1Image(arrays["label"], np.eye(4)), src / "masks" / "a.nii.gz")
    path = src / "images" / "a.nii.gz"
    path.write_bytes(path.read_bytes()[:1000])
    _fails(src, tmp_path, "a.nii.gz", "corrupt or unreadable")


def test_npz_with_pickled_objects(hippo2, tmp_path):
    arrays = _npz_arrays(hippo2 / "volumes" / "000.npz")
    arrays["label"] = np.array([arrays["label"]], dtype=object)
    np.savez(hippo2 / "volumes" / "000.npz", **arrays)
    _fails(hippo2, tmp_path, "000.npz", "pickle")


def test_npz_missing_image_key(hippo2, tmp_path):
    arrays = _npz_arrays(hippo2 / "volumes" / "001.npz")
    np.savez(hippo2 / "volumes" / "001.npz", img=arrays["image"])
    _fails(hippo2, tmp_path, "001.npz", "missing key 'image'")


# ---- geometry


def test_image_mask_size_mismatch(nuclei2, tmp_path):
    mask = np.asarray(Image.open(nuclei2 / "masks" / "001.png"))
    Image.fromarray(mask[:200, :300]).save(nuclei2 / "masks" / "001.png")
    _fails(nuclei2, tmp_path, "001.png", "size mismatch", "200x300", "256x320")


def test_npz_shape_mismatch(hippo2, tmp_path):
    arrays = _npz_arrays(hippo2 / "volumes" / "001.npz")
    arrays["label"] = arrays["label"][:-1]
    np.savez_compressed(hippo2 / "volumes" / "001.npz", **arrays)
    _fails(hippo2, tmp_path, "001.npz", "shape mismatch")


def test_npz_channel_first_refused(hippo2, tmp_path):
    arrays = _npz_arrays(hippo2 / "volumes" / "000.npz")
    arrays["image"] = np.stack([arrays["image"]] * 2, axis=0)  # [C, D, H, W]
    np.savez_compressed(hippo2 / "volumes" / "000.npz", **arrays)
    _fails(hippo2, tmp_path, "000.npz", "channel-first")


def test_npz_spacing_affine_mismatch(hippo2, tmp_path):
    arrays = _npz_arrays(hippo2 / "volumes" / "001.npz")
    arrays["spacing"] = np.array([1.0, 2.0, 1.0], np.float32)
    np.savez_compressed(hippo2 / "volumes" / "001.npz", **arrays)
    _fails(hippo2, tmp_path, "001.npz", "spacing/affine mismatch")


def _nifti_pair(src, arrays, image_affine, label_affine, label=None):
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    label = arrays["label"] if label is None else label
    nib.save(nib.Nifti1Image(arrays["image"], image_affine), src / "images" / "b.nii.gz")
    nib.save(nib.Nifti1Image(label, label_affine), src / "masks" / "b.nii.gz")


def test_nifti_affine_mismatch(tmp_path, hippocampus_dir):
    arrays = _npz_arrays(hippocampus_dir / "volumes" / "000.npz")
    shifted = np.eye(4)
    shifted[:3, 3] = 5.0
    _nifti_pair(tmp_path / "src", arrays, np.eye(4), shifted)
    _fails(tmp_path / "src", tmp_path, "b.nii.gz", "affine mismatch")


def test_nifti_spacing_mismatch(tmp_path, hippocampus_dir):
    arrays = _npz_arrays(hippocampus_dir / "volumes" / "000.npz")
    _nifti_pair(tmp_path / "src", arrays, np.eye(4), np.diag([1.0, 1.0, 2.0, 1.0]))
    _fails(tmp_path / "src", tmp_path, "b.nii.gz", "spacing mismatch")


def test_nifti_shape_mismatch(tmp_path, hippocampus_dir):
    arrays = _npz_arrays(hippocampus_dir / "volumes" / "000.npz")
    _nifti_pair(tmp_path / "src", arrays, np.eye(4), np.eye(4), label=arrays["label"][:, :-2])
    _fails(tmp_path / "src", tmp_path, "b.nii.gz", "shape mismatch")


# ---- values


def test_mask_0_255_not_remapped(nuclei2, tmp_path):
    mask = np.asarray(Image.open(nuclei2 / "masks" / "001.png"))
    Image.fromarray((mask * 255).astype(np.uint8)).save(nuclei2 / "masks" / "001.png")
    msg = _fails(nuclei2, tmp_path, "001.png", "label_map={255: 1}")
    assert "255" in msg
    _fails(nuclei2, tmp_path, "001.png", "outside 0..1", "[255]", num_classes=2)
    ds = open_dataset(nuclei2, tmp_path / "ok", label_map={255: 1})
    np.testing.assert_array_equal(ds.read_label("001"), mask)
    assert ds.manifest.num_classes == 2


def test_mask_values_outside_num_classes(nuclei2, tmp_path):
    mask = np.asarray(Image.open(nuclei2 / "masks" / "000.png")).copy()
    mask[:5, :5] = 3
    Image.fromarray(mask).save(nuclei2 / "masks" / "000.png")
    _fails(nuclei2, tmp_path, "000.png", "outside 0..1", "[3]", num_classes=2)


def test_mask_values_non_integer(nuclei2, tmp_path):
    mask = np.asarray(Image.open(nuclei2 / "masks" / "001.png")).astype(np.float32)
    mask[0, :3] = 0.5
    (nuclei2 / "masks" / "001.png").unlink()
    tifffile.imwrite(nuclei2 / "masks" / "001.tif", mask)
    _fails(nuclei2, tmp_path, "001.tif", "non-integer", "0.5")


def test_mask_negative_values(hippo2, tmp_path):
    arrays = _npz_arrays(hippo2 / "volumes" / "000.npz")
    arrays["label"] = arrays["label"].astype(np.int16)
    arrays["label"][0, 0, 0] = -1
    np.savez_compressed(hippo2 / "volumes" / "000.npz", **arrays)
    _fails(hippo2, tmp_path, "000.npz", "negative", "-1")


def test_mask_with_colours(nuclei2, tmp_path):
    mask = np.asarray(Image.open(nuclei2 / "masks" / "000.png"))
    rgb = np.stack([mask, mask * 0, mask], axis=-1) * 200
    Image.fromarray(rgb.astype(np.uint8)).save(nuclei2 / "masks" / "000.png")
    _fails(nuclei2, tmp_path, "000.png", "single-channel")


def test_nan_pixels(nuclei2, tmp_path):
    img = np.asarray(Image.open(nuclei2 / "images" / "001.png")).astype(np.float32)
    img[10, 10, 1] = np.nan
    img[11, 10, 0] = np.inf
    (nuclei2 / "images" / "001.png").unlink()
    tifffile.imwrite(nuclei2 / "images" / "001.tif", img, photometric="rgb")
    _fails(nuclei2, tmp_path, "001.tif", "NaN/Inf", "2 non-finite")


def test_inf_voxels_npz(hippo2, tmp_path):
    arrays = _npz_arrays(hippo2 / "volumes" / "001.npz")
    arrays["image"][3, 4, 5] = -np.inf
    np.savez_compressed(hippo2 / "volumes" / "001.npz", **arrays)
    _fails(hippo2, tmp_path, "001.npz", "NaN/Inf")


def test_inconsistent_channel_counts(nuclei2, tmp_path):
    gray = Image.open(nuclei2 / "images" / "001.png").convert("L")
    gray.save(nuclei2 / "images" / "001.png")
    _fails(nuclei2, tmp_path, "001.png", "inconsistent channel counts", "1 channel", "has 3")


def test_first_error_is_reported(nuclei2, tmp_path):
    for i in ("000", "001"):
        path = nuclei2 / "images" / f"{i}.png"
        path.write_bytes(path.read_bytes()[:300])
    msg = _fails(nuclei2, tmp_path, "000.png", "corrupt")
    assert "001.png" not in msg
