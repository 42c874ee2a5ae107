"""Streaming ingestion (unetjax.volumes.ingest): slab by slab equals the source, the statistics
and foreground index match the whole-volume ones, bad input names the file."""

import nibabel as nib
import numpy as np
import pytest
import tifffile

from unetjax.data.errors import DataError
from unetjax.data.store import open_store
from unetjax.volumes.ingest import ingest_volume

SHAPE = (21, 13, 11)  # odd: slabs of 4 leave a partial last slab


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(0)
    img = (rng.normal(size=SHAPE) * 50 + 100).astype(np.int16)  # integer source dtype
    lab = np.zeros(SHAPE, np.uint8)
    lab[3:9, 2:8, 1:6] = 1
    lab[15:19, 5:11, 4:10] = 2
    return img, lab


def _check_store(ds, img, lab):
    info = ds.manifest.case("volume")
    np.testing.assert_array_equal(ds.read_image("volume")[..., 0], img.astype(np.float32))
    x = img.astype(np.float64).ravel()
    np.testing.assert_allclose(info.intensity["mean"][0], x.mean(), rtol=1e-9)
    np.testing.assert_allclose(info.intensity["std"][0], x.std(), rtol=1e-9)
    assert info.intensity["min"][0] == x.min() and info.intensity["max"][0] == x.max()
    if lab is not None:
        np.testing.assert_array_equal(ds.read_label("volume"), lab)
        assert info.class_voxels == tuple(np.bincount(lab.ravel()))
        fg = ds.foreground_coords("volume")
        assert (lab[tuple(fg[:, 1:].T)] == fg[:, 0]).all()  # every indexed voxel is that class
        assert sorted(set(fg[:, 0])) == [1, 2]
        np.testing.assert_allclose(info.intensity["fg_mean"][0], x[lab.ravel() > 0].mean())


@pytest.mark.parametrize("kind", ["nifti", "npz", "tiff_folder"])
def test_ingest_slab_by_slab_equals_source(tmp_path, volume, kind):
    img, lab = volume
    affine = np.diag([0.5, 0.75, 2.0, 1.0])
    if kind == "nifti":  # contiguous along the last axis
        nib.save(nib.Nifti1Image(img, affine), tmp_path / "img.nii.gz")
        nib.save(nib.Nifti1Image(lab, affine), tmp_path / "lab.nii.gz")
        kw = dict(image=tmp_path / "img.nii.gz", label=tmp_path / "lab.nii.gz")
    elif kind == "npz":  # a compressed zip member read as a stream
        np.savez_compressed(tmp_path / "v.npz", image=img, label=lab, affine=affine)
        kw = dict(image=tmp_path / "v.npz")
    else:
        (tmp_path / "planes").mkdir()
        for z in range(SHAPE[0]):
            tifffile.imwrite(tmp_path / "planes" / f"{z:03d}.tif", img[z])
        kw = dict(image=tmp_path / "planes", spacing=(0.5, 0.75, 2.0))
        lab = None
    ds = ingest_volume(store_dir=tmp_path / "store", chunk=4, codec="lz4", **kw)
    _check_store(open_store(tmp_path / "store"), img, lab)
    info = ds.manifest.case("volume")
    assert info.spacing == (0.5, 0.75, 2.0)
    if kind != "tiff_folder":
        np.testing.assert_allclose(info.affine, affine)
        assert ds.manifest.num_classes == 3
    # same source and options: the store is reused, not rewritten
    again = ingest_volume(store_dir=tmp_path / "store", chunk=4, codec="lz4", **kw)
    assert again.manifest.signature == ds.manifest.signature


def test_bad_input_names_the_file(tmp_path, volume):
    img, lab = volume
    np.save(tmp_path / "img.npy", img)
    np.save(tmp_path / "short.npy", lab[:-1])
    with pytest.raises(DataError, match="short.npy.*shape mismatch"):
        ingest_volume(tmp_path / "img.npy", tmp_path / "s1", label=tmp_path / "short.npy")
    bad = lab.copy()
    bad[-1, -1, -1] = 7  # in the last slab: found mid-stream, nothing left behind
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(DataError, match=r"bad.npy.*outside 0..2.*\[7\]"):
        ingest_volume(
            tmp_path / "img.npy", tmp_path / "s2", label=tmp_path / "bad.npy", num_classes=3,
            chunk=4,
        )  # fmt: skip
    assert not (tmp_path / "s2").exists() and not list(tmp_path.glob(".s2.ingest-*"))
    nan = img.astype(np.float32)
    nan[5, 5, 5] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    with pytest.raises(DataError, match="nan.npy.*NaN/Inf"):
        ingest_volume(tmp_path / "nan.npy", tmp_path / "s3")
    np.savez(tmp_path / "obj.npz", image=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match=r"obj.npz\[image\].*pickled"):
        ingest_volume(tmp_path / "obj.npz", tmp_path / "s4")
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(DataError, match="junk.nii.gz"):
        ingest_volume(tmp_path / "junk.nii.gz", tmp_path / "s5")
    with pytest.raises(DataError, match="missing.npy: no such file"):
        ingest_volume(tmp_path / "missing.npy", tmp_path / "s6")
