"""Ingestion into the zarr v3 store and the Dataset reader, on real data (small copies)."""

import concurrent.futures
import os
import pathlib
import pickle
import shutil

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from unetjax.data import store as st
from unetjax.data.errors import DataError
from unetjax.data.store import Manifest, open_dataset, open_store

NUCLEI_IDS = ("000", "001", "002", "005")
HIPPO_IDS = ("000", "001", "002")


def _copy_nuclei(src: pathlib.Path, dst: pathlib.Path, ids=NUCLEI_IDS, masks=True):
    (dst / "images").mkdir(parents=True)
    if masks:
        (dst / "masks").mkdir()
    for i in ids:
        shutil.copy2(src / "images" / f"{i}.png", dst / "images" / f"{i}.png")
        if masks:
            shutil.copy2(src / "masks" / f"{i}.png", dst / "masks" / f"{i}.png")
    return dst


@pytest.fixture
def nuclei_src(tmp_path, nuclei_dir):
    return _copy_nuclei(nuclei_dir, tmp_path / "nuclei")


@pytest.fixture
def hippo_src(tmp_path, hippocampus_dir):
    dst = tmp_path / "hippo" / "volumes"
    dst.mkdir(parents=True)
    for i in HIPPO_IDS:
        shutil.copy2(hippocampus_dir / "volumes" / f"{i}.npz", dst / f"{i}.npz")
    return dst.parent


@pytest.fixture
def count_ingest(monkeypatch):
    calls = []
    real = st._ingest

    def spy(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(st, "_ingest", spy)
    return calls


def _png(path):
    return np.asarray(Image.open(path))


def test_nuclei_round_trip(nuclei_src, tmp_path):
    ds = open_dataset(nuclei_src, tmp_path / "store")
    m = ds.manifest
    assert (m.ndim, m.channels, m.num_classes) == (2, 3, 2)
    assert m.case_ids == NUCLEI_IDS
    assert (tmp_path / "store" / "manifest.json").is_file()
    total = np.zeros(2, np.int64)
    for cid in NUCLEI_IDS:
        img = _png(nuclei_src / "images" / f"{cid}.png")
        mask = _png(nuclei_src / "masks" / f"{cid}.png")
        info = m.case(cid)
        assert info.shape == img.shape[:2]
        assert info.spacing == (1.0, 1.0) and info.affine is None and info.has_label
        assert (info.image_file, info.label_file) == (f"images/{cid}.png", f"masks/{cid}.png")
        got = ds.read_image(cid)
        assert got.dtype == np.float32 and got.shape == img.shape
        np.testing.assert_array_equal(got, img.astype(np.float32))
        lab = ds.read_label(cid)
        assert lab.dtype == np.uint8
        np.testing.assert_array_equal(lab, mask)
        counts = np.bincount(mask.ravel(), minlength=2)
        assert info.class_voxels == tuple(counts)
        total += counts
        box = (slice(10, 70), slice(3, 40))
        np.testing.assert_array_equal(ds.read_image(cid, box), img[box].astype(np.float32))
        np.testing.assert_array_equal(ds.read_label(cid, box), mask[box])
        flat = img.reshape(-1, 3).astype(np.float64)
        np.testing.assert_allclose(info.intensity["mean"], flat.mean(0), rtol=1e-6)
        np.testing.assert_allclose(info.intensity["std"], flat.std(0), rtol=1e-6)
        np.testing.assert_allclose(info.intensity["max"], flat.max(0))
        np.testing.assert_allclose(info.intensity["p99_5"], np.percentile(flat, 99.5, 0), rtol=1e-5)
        fg = flat[mask.ravel() > 0]
        np.testing.assert_allclose(info.intensity["fg_mean"], fg.mean(0), rtol=1e-6)
    assert m.class_voxels == tuple(total)
    shapes = np.array([m.case(c).shape for c in NUCLEI_IDS])
    assert m.median_shape == tuple(int(round(x)) for x in np.median(shapes, 0))
    assert m.median_spacing == (1.0, 1.0)
    # Manifest JSON round trip.
    text = (tmp_path / "store" / "manifest.json").read_text()
    assert Manifest.from_json(text) == m
    with pytest.raises(ValueError, match="outside"):
        ds.read_image("000", (slice(0, 10_000), slice(0, 5)))


def test_prediction_only_folder(tmp_path, nuclei_dir):
    src = _copy_nuclei(nuclei_dir, tmp_path / "pred", ids=("000", "001"), masks=False)
    ds = open_dataset(src, tmp_path / "store")
    assert ds.manifest.num_classes == 0 and not ds.manifest.has_labels
    assert ds.foreground_coords("001").shape == (0, 3)
    with pytest.raises(ValueError, match="no label"):
        ds.read_label("000")
    ds = open_dataset(src, tmp_path / "store2", num_classes=2)
    assert ds.manifest.num_classes == 2


def test_hippocampus_npz_round_trip(hippo_src, tmp_path):
    ds = open_dataset(hippo_src, tmp_path / "store")
    m = ds.manifest
    assert (m.ndim, m.channels, m.num_classes, m.source_kind) == (3, 1, 3, "npz")
    for cid in HIPPO_IDS:
        with np.load(hippo_src / "volumes" / f"{cid}.npz") as z:
            image, label = z["image"], z["label"]
            spacing, affine = z["spacing"], z["affine"]
        info = m.case(cid)
        assert info.shape == image.shape
        np.testing.assert_allclose(info.spacing, spacing)
        np.testing.assert_allclose(np.array(info.affine), affine)
        got = ds.read_image(cid)
        assert got.shape == (*image.shape, 1)
        np.testing.assert_array_equal(got[..., 0], image)
        np.testing.assert_array_equal(ds.read_label(cid), label)
        assert info.class_voxels == tuple(np.bincount(label.ravel(), minlength=3))
        box = (slice(2, 20), slice(5, 37), slice(0, 11))
        np.testing.assert_array_equal(ds.read_image(cid, box)[..., 0], image[box])


def test_nifti_round_trip(tmp_path, hippocampus_dir):
    with np.load(hippocampus_dir / "volumes" / "000.npz") as z:
        image, label = z["image"], z["label"]
    affine = np.diag([1.5, 2.0, 2.5, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 7.0)
    src = tmp_path / "nifti"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    nib.save(nib.Nifti1Image(image, affine), src / "images" / "case_a.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), src / "masks" / "case_a.nii.gz")
    ds = open_dataset(src, tmp_path / "store")
    info = ds.manifest.case("case_a")
    assert ds.manifest.ndim == 3 and ds.manifest.source_kind == "nifti"
    assert info.shape == image.shape
    assert info.spacing == (1.5, 2.0, 2.5)
    np.testing.assert_allclose(np.array(info.affine), affine)
    np.testing.assert_array_equal(ds.read_image("case_a")[..., 0], image)
    np.testing.assert_array_equal(ds.read_label("case_a"), label)
    assert ds.manifest.median_spacing == (1.5, 2.0, 2.5)


def test_store_reuse_and_change_detection(nuclei_src, tmp_path, count_ingest):
    store = tmp_path / "store"
    open_dataset(nuclei_src, store)
    assert len(count_ingest) == 1
    mtime = (store / "manifest.json").stat().st_mtime_ns
    ds = open_dataset(nuclei_src, store)
    assert len(count_ingest) == 1
    assert (store / "manifest.json").stat().st_mtime_ns == mtime

    # Modify one mask: new content is read back after re-ingestion into the same store.
    mask_path = nuclei_src / "masks" / "001.png"
    new_mask = _png(mask_path).copy()
    new_mask[:50] = 1
    Image.fromarray(new_mask).save(mask_path)
    ds2 = open_dataset(nuclei_src, store)
    assert len(count_ingest) == 2
    assert ds2.manifest.signature != ds.manifest.signature
    np.testing.assert_array_equal(ds2.read_label("001"), new_mask)
    assert ds2.manifest.case("001").class_voxels == tuple(np.bincount(new_mask.ravel()))

    # Touching a file (mtime only) also triggers re-ingestion; removing a case drops it.
    st_ = (nuclei_src / "images" / "000.png").stat()
    os.utime(nuclei_src / "images" / "000.png", ns=(st_.st_atime_ns, st_.st_mtime_ns + 10**9))
    open_dataset(nuclei_src, store)
    assert len(count_ingest) == 3
    (nuclei_src / "images" / "005.png").unlink()
    (nuclei_src / "masks" / "005.png").unlink()
    ds3 = open_dataset(nuclei_src, store)
    assert ds3.manifest.case_ids == ("000", "001", "002")
    assert not (store / "cases" / "005").exists()

    # Options are part of the signature: label_map swaps the classes.
    ds4 = open_dataset(nuclei_src, store, label_map={0: 1, 1: 0})
    assert len(count_ingest) == 5
    np.testing.assert_array_equal(ds4.read_label("001"), 1 - new_mask)


def test_default_store_dir_uses_cache(nuclei_src, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("UNETJAX_CACHE", str(cache))
    ds = open_dataset(nuclei_src)
    assert ds.store_dir.parent == cache / "stores"
    assert ds.store_dir.name.startswith("nuclei-")
    assert ds.store_dir == st.default_store_dir(nuclei_src)
    assert st.default_store_dir(nuclei_src, num_classes=2) != ds.store_dir
    assert not any(p.name in ("manifest.json", "cases") for p in nuclei_src.iterdir())
    assert open_store(ds.store_dir).manifest == ds.manifest


def test_foreground_coords_inside_class(hippo_src, nuclei_src, tmp_path):
    for src, name in ((hippo_src, "h"), (nuclei_src, "n")):
        ds = open_dataset(src, tmp_path / name)
        for cid in ds.case_ids:
            fg = ds.foreground_coords(cid)
            lab = ds.read_label(cid)
            assert fg.dtype == np.int32 and fg.shape[1] == 1 + lab.ndim
            np.testing.assert_array_equal(lab[tuple(fg[:, 1:].T)], fg[:, 0])
            for k in range(1, ds.manifest.num_classes):
                n = int((fg[:, 0] == k).sum())
                assert n == min(st.FG_SAMPLES, int((lab == k).sum()))
            assert len(np.unique(fg, axis=0)) == len(fg)
    # More than 10,000 voxels of class 1 in nuclei case 001: a seeded subsample.
    ds = open_dataset(nuclei_src, tmp_path / "n")
    assert (ds.foreground_coords("001")[:, 0] == 1).sum() == st.FG_SAMPLES


def test_interrupted_ingestion_leaves_no_manifest(nuclei_src, tmp_path, monkeypatch):
    store = tmp_path / "store"
    real = st._write_case
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(st, "_write_case", failing)
    with pytest.raises(KeyboardInterrupt):
        open_dataset(nuclei_src, store)
    assert not (store / "manifest.json").exists()
    assert not list(tmp_path.glob(".store.ingest-*"))
    # A crash that could not clean up (kill -9) leaves a temp dir: removed next time.
    (tmp_path / ".store.ingest-1-dead").mkdir()
    monkeypatch.setattr(st, "_write_case", real)
    ds = open_dataset(nuclei_src, store)
    assert (store / "manifest.json").exists() and len(ds.case_ids) == len(NUCLEI_IDS)
    assert not list(tmp_path.glob(".store.ingest-*"))


def test_reingest_interrupted_removes_stale_store(nuclei_src, tmp_path, monkeypatch):
    store = tmp_path / "store"
    open_dataset(nuclei_src, store)
    os.utime(nuclei_src / "masks" / "000.png", ns=(0, 10**18))

    def failing(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(st, "_write_case", failing)
    with pytest.raises(RuntimeError):
        open_dataset(nuclei_src, store)
    assert not (store / "manifest.json").exists()  # no manifest over stale arrays


def test_refuses_foreign_or_inside_store_dir(nuclei_src, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a unetjax store"):
        open_dataset(nuclei_src, foreign)
    assert (foreign / "notes.txt").exists()
    with pytest.raises(DataError, match="inside the source"):
        open_dataset(nuclei_src, nuclei_src / "store")


def test_dataset_pickle_and_threads(nuclei_src, tmp_path):
    ds = open_dataset(nuclei_src, tmp_path / "store")
    ref = {c: ds.read_image(c) for c in ds.case_ids}
    ds.foreground_coords("000")
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.manifest == ds.manifest and clone.store_dir == ds.store_dir
    assert clone._handles == {} and clone._fg == {}
    np.testing.assert_array_equal(clone.read_image("002"), ref["002"])

    fresh = pickle.loads(pickle.dumps(ds))
    jobs = [c for c in ds.case_ids for _ in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(fresh.read_image, jobs))
    for c, out in zip(jobs, outs, strict=True):
        np.testing.assert_array_equal(out, ref[c])
