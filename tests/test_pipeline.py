"""Grain training pipeline: determinism, resume, foreground oversampling, coverage, shapes.

Most tests use a tiny in-memory dataset that implements the ``Dataset`` contract of
docs/DATA_API.md (and checks that every read box lies inside the case); a few run on the
real store (``unetjax.data.store.open_dataset``) over small subsets of the bundled data.
"""

import dataclasses
import itertools
import pickle
import shutil

import numpy as np
import pytest
from scipy import ndimage

from unetjax.data.augment import (
    AugmentConfig,
    augment_intensity,
    mirror,
    resample_patch,
    sample_spatial_matrix,
)
from unetjax.data.errors import DataError
from unetjax.data.normalize import (
    foreground_intensity_stats,
    normalize,
)
from unetjax.data.pipeline import (
    check_patch_size,
    default_patch_size,
    fg_elements_per_batch,
    make_train_loader,
    patch_origin_bounds,
)

NO_AUG = AugmentConfig.disabled()


# ------------------------------------------------------------------ in-memory dataset


@dataclasses.dataclass(frozen=True)
class FakeCase:
    case_id: str
    shape: tuple
    spacing: tuple
    affine: tuple | None
    has_label: bool
    class_voxels: tuple | None
    intensity: dict
    image_file: str
    label_file: str | None


@dataclasses.dataclass(frozen=True)
class FakeManifest:
    ndim: int
    channels: int
    num_classes: int
    cases: tuple
    signature: str = "fake"

    @property
    def case_ids(self):
        return tuple(c.case_id for c in self.cases)

    def case(self, case_id):
        return {c.case_id: c for c in self.cases}[case_id]


class FakeDataset:
    """Same methods as ``unetjax.data.store.Dataset``, arrays held in memory."""

    def __init__(self, images: dict, labels: dict, num_classes: int):
        self.images, self.labels = images, labels
        cases = []
        for cid in sorted(images):
            img, lbl = images[cid], labels[cid]
            flat = img.reshape(-1, img.shape[-1]).astype(np.float64)
            cases.append(
                FakeCase(
                    case_id=cid,
                    shape=lbl.shape,
                    spacing=(1.0,) * lbl.ndim,
                    affine=None,
                    has_label=True,
                    class_voxels=tuple(int((lbl == k).sum()) for k in range(num_classes)),
                    intensity={
                        "mean": flat.mean(0).tolist(),
                        "std": flat.std(0).tolist(),
                        "min": flat.min(0).tolist(),
                        "max": flat.max(0).tolist(),
                        "p00_5": np.percentile(flat, 0.5, 0).tolist(),
                        "p99_5": np.percentile(flat, 99.5, 0).tolist(),
                    },
                    image_file=f"images/{cid}.png",
                    label_file=f"masks/{cid}.png",
                )
            )
        self.manifest = FakeManifest(
            ndim=next(iter(labels.values())).ndim,
            channels=next(iter(images.values())).shape[-1],
            num_classes=num_classes,
            cases=tuple(cases),
        )
        self.voxels_read = 0

    def _check_box(self, case_id, box):
        shape = self.labels[case_id].shape
        assert len(box) == len(shape)
        for s, n in zip(box, shape, strict=True):
            assert 0 <= s.start < s.stop <= n, (box, shape)

    def read_image(self, case_id, box=None):
        if box is None:
            return self.images[case_id].astype(np.float32)
        self._check_box(case_id, box)
        out = self.images[case_id][box].astype(np.float32)
        self.voxels_read += out.size // out.shape[-1]
        return out

    def read_label(self, case_id, box=None):
        if box is None:
            return self.labels[case_id]
        self._check_box(case_id, box)
        return self.labels[case_id][box]

    def foreground_coords(self, case_id):
        lbl = self.labels[case_id]
        rows = []
        rng = np.random.default_rng(0)
        for k in range(1, self.manifest.num_classes):
            idx = np.argwhere(lbl == k)
            if len(idx) > 10_000:
                idx = idx[rng.choice(len(idx), 10_000, replace=False)]
            rows.append(np.concatenate([np.full((len(idx), 1), k), idx], axis=1))
        if not rows:
            return np.zeros((0, 1 + lbl.ndim), np.int32)
        return np.concatenate(rows).astype(np.int32)


def _fake(shapes, channels, num_classes, seed=0, fg_fraction=0.02):
    """Random images; labels: small sparse blobs (so random patches often miss them)."""
    rng = np.random.default_rng(seed)
    images, labels = {}, {}
    for i, shape in enumerate(shapes):
        field = ndimage.gaussian_filter(rng.normal(size=shape), 2)
        label = np.zeros(shape, np.uint8)
        thresholds = np.quantile(field, 1 - fg_fraction * np.arange(1, num_classes))
        for k, t in reversed(list(enumerate(thresholds, start=1))):  # class 1 innermost
            label[field > t] = k
        image = rng.normal(size=(*shape, channels)).astype(np.float32) * 10 + 50
        image += label[..., None] * 20
        images[f"{i:03d}"], labels[f"{i:03d}"] = image, label
    return FakeDataset(images, labels, num_classes)


@pytest.fixture(scope="module")
def fake2d():
    return _fake([(40, 48), (64, 56), (36, 60), (50, 50)], channels=3, num_classes=2)


@pytest.fixture(scope="module")
def fake3d():
    return _fake([(20, 24, 18), (26, 22, 20), (18, 30, 24)], channels=1, num_classes=3)


def _subset(src, dst, folders, names):
    """Copy a few cases of a source folder (keeps real-store tests fast)."""
    for folder in folders:
        if not (src / folder).exists():
            continue
        (dst / folder).mkdir(parents=True)
        for f in sorted((src / folder).iterdir()):
            if f.name.split(".")[0] in names:
                shutil.copy(f, dst / folder / f.name)
    return dst


@pytest.fixture(scope="module")
def nuclei_ds(nuclei_dir, tmp_path_factory):
    """Real store over 3 nuclei images: 256x256 gray, 256x320 colour, 360x360 gray."""
    from unetjax.data.store import open_dataset

    tmp = tmp_path_factory.mktemp("nuclei")
    src = _subset(nuclei_dir, tmp / "src", ["images", "masks"], {"000", "001", "002"})
    return open_dataset(src, store_dir=tmp / "store")


@pytest.fixture(scope="module")
def hippo_ds(hippocampus_dir, tmp_path_factory):
    """Real store over 4 MSD hippocampus volumes (3D, labels 0..2)."""
    from unetjax.data.store import open_dataset

    tmp = tmp_path_factory.mktemp("hippo")
    src = _subset(hippocampus_dir, tmp / "src", ["volumes"], {"000", "001", "002", "003"})
    return open_dataset(src, store_dir=tmp / "store")


def _take(loader, n):
    out = list(itertools.islice(loader, n))
    loader.close()
    return out


def _loader(ds, **kw):
    args = dict(
        patch_size=(24, 32),
        batch_size=4,
        seed=0,
        augment=AugmentConfig(),
        num_threads=2,
        prefetch=1,
    )
    args.update(kw)
    return make_train_loader(ds, kw.pop("case_ids", ds.manifest.case_ids), **args)


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("batch_size,p", [(4, 0.33), (5, 0.5), (2, 0.33), (3, 0.0)])
def test_foreground_oversampling_ratio(fake2d, batch_size, p):
    n_fg = fg_elements_per_batch(batch_size, p)
    assert n_fg == batch_size - round(batch_size * (1 - p))
    loader = _loader(
        fake2d,
        patch_size=(16, 16),
        batch_size=batch_size,
        fg_oversample=p,
        augment=NO_AUG,
        with_meta=True,
        seed=5,
    )
    batches = _take(loader, 30)
    forced = np.stack([b["fg_forced"] for b in batches])
    expected = np.arange(batch_size) >= batch_size - n_fg
    assert (forced == expected).all()  # exactly the last n_fg of every batch
    labels = np.concatenate([b["label"] for b in batches])
    has_fg = labels.reshape(len(labels), -1).max(axis=1) > 0
    flags = forced.reshape(-1)
    assert has_fg[flags].all()  # every forced patch contains foreground
    if (~flags).any():  # sparse foreground: random patches often miss it
        assert has_fg[~flags].mean() < 0.9


def test_foreground_class_choice_covers_all_classes():
    label = np.zeros((24, 24, 24), np.uint8)
    label[6:9, 6:9, 6:9] = 1  # tiny class 1
    label[12:20, 12:20, 12:20] = 2  # large class 2: classes are chosen uniformly anyway
    image = label[..., None].astype(np.float32) + 1.0
    ds = FakeDataset({"000": image}, {"000": label}, num_classes=3)
    loader = _loader(
        ds, patch_size=(8, 8, 8), batch_size=2, fg_oversample=1.0, augment=NO_AUG, seed=2
    )
    labels = np.concatenate([b["label"] for b in _take(loader, 20)])
    # every patch is centred on a voxel of a randomly chosen foreground class
    centres = labels[:, 4, 4, 4]
    assert (centres > 0).all()
    assert 0.25 < (centres == 1).mean() < 0.75


def test_all_positions_reachable_and_patch_content(fake2d):
    ds = _fake([(20, 26)], channels=2, num_classes=2, seed=3)
    loader = _loader(
        ds,
        patch_size=(8, 10),
        batch_size=4,
        fg_oversample=0.0,
        augment=NO_AUG,
        with_meta=True,
        seed=0,
    )
    origins = []
    image = normalize(ds.images["000"], ds.manifest.cases[0])
    for b in _take(loader, 150):
        for o, img, lbl in zip(b["origin"], b["image"], b["label"], strict=True):
            origins.append(o)
            box = (slice(o[0], o[0] + 8), slice(o[1], o[1] + 10))
            np.testing.assert_allclose(img, image[box], rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(lbl, ds.labels["000"][box])
    origins = np.array(origins)
    assert set(origins[:, 0]) == set(range(0, 20 - 8 + 1))
    assert set(origins[:, 1]) == set(range(0, 26 - 10 + 1))


def test_patch_larger_than_some_cases_is_padded():
    ds = _fake([(12, 40), (30, 40)], channels=1, num_classes=2, seed=4)
    lb, ub = patch_origin_bounds((12, 40), (20, 16))
    assert lb[0] == ub[0] == -4
    loader = _loader(
        ds,
        patch_size=(20, 16),
        batch_size=2,
        fg_oversample=0.5,
        augment=NO_AUG,
        with_meta=True,
        seed=1,
    )
    seen_small = False
    for b in _take(loader, 6):
        for ci, o, img, lbl in zip(
            b["case_index"], b["origin"], b["image"], b["label"], strict=True
        ):
            if ci != 0:
                continue
            seen_small = True
            assert o[0] == -4
            assert (img[:4] == 0).all() and (img[16:] == 0).all()  # normalised pad value
            assert (lbl[:4] == 0).all() and (lbl[16:] == 0).all()
            assert np.abs(img[4:16]).sum() > 0
    assert seen_small


def test_reads_only_the_needed_box():
    ds = _fake([(200, 220)], channels=1, num_classes=2, seed=5)
    loader = _loader(ds, patch_size=(16, 16), batch_size=2, augment=NO_AUG, num_threads=1)
    _take(loader, 3)
    # 6 patches (+ at most one prefetched batch) of 16x16 voxels, never the whole image
    assert ds.voxels_read <= 4 * 2 * 16 * 16


def test_cases_visited_in_shuffled_epochs(fake2d):
    n = len(fake2d.manifest.cases)
    loader = _loader(
        fake2d, patch_size=(8, 8), batch_size=2, augment=NO_AUG, with_meta=True, seed=9
    )
    idx = np.concatenate([b["case_index"] for b in _take(loader, 2 * n)])
    epochs = idx.reshape(-1, n)
    for e in epochs:
        assert sorted(e) == list(range(n))
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled per epoch


def test_spatial_augmentation_keeps_alignment_through_store():
    """Image == label (normalisation off): rotated/scaled patches stay aligned, and the
    larger read region means rotated patches are not zero-padded inside the case."""
    ds = _fake([(80, 90), (70, 100)], channels=1, num_classes=2, seed=6, fg_fraction=0.3)
    for cid in ds.images:
        ds.images[cid] = ds.labels[cid].astype(np.float32)[..., None]
    cfg = AugmentConfig(
        p_rotation=1.0,
        p_scale=1.0,
        p_mirror=0.5,
        p_noise=0.0,
        p_brightness=0.0,
        p_contrast=0.0,
        p_gamma=0.0,
        p_gamma_inverted=0.0,
    )
    loader = _loader(
        ds, patch_size=(24, 24), batch_size=4, augment=cfg, normalization="none", seed=0
    )
    for b in _take(loader, 3):
        agree = ((b["image"][..., 0] > 0.5) == (b["label"] > 0)).mean()
        assert agree > 0.97, agree


def test_pipeline_element_equals_augmenting_the_whole_case(fake2d):
    """Reading only the (enlarged) box then augmenting == augmenting the whole normalised
    case with the element's generator: the box logic loses nothing."""
    cfg = AugmentConfig(
        p_rotation=1.0, p_scale=1.0, p_noise=1.0, p_brightness=1.0, p_contrast=0.0, p_gamma=0.0
    )  # contrast/gamma use patch stats
    loader = _loader(fake2d, patch_size=(20, 28), batch_size=3, augment=cfg, with_meta=True, seed=7)
    cases = fake2d.manifest.cases
    for b in _take(loader, 3):
        for i in range(3):
            info = cases[int(b["case_index"][i])]
            whole = normalize(fake2d.images[info.case_id], info)
            rng = np.random.default_rng([7, int(b["index"][i])]).spawn(2)[1]
            m = sample_spatial_matrix(rng, cfg, 2)
            img, lbl = resample_patch(
                whole, fake2d.labels[info.case_id], np.zeros(2), b["origin"][i], (20, 28), m
            )
            img = augment_intensity(img, rng, cfg)
            img, lbl = mirror(img, lbl, rng, cfg)
            np.testing.assert_allclose(b["image"][i], img, atol=1e-4)
            np.testing.assert_array_equal(b["label"][i], lbl)


def test_intensity_augmentation_leaves_labels(fake2d):
    plain = _take(_loader(fake2d, augment=NO_AUG, seed=2), 2)
    cfg = AugmentConfig(
        p_rotation=0.0,
        p_scale=0.0,
        p_mirror=0.0,
        p_noise=1.0,
        p_brightness=1.0,
        p_contrast=1.0,
        p_gamma=1.0,
    )
    aug = _take(_loader(fake2d, augment=cfg, seed=2), 2)
    for p, a in zip(plain, aug, strict=True):
        np.testing.assert_array_equal(p["label"], a["label"])
        assert not np.allclose(p["image"], a["image"])


def test_normalization_schemes(fake2d):
    info = fake2d.manifest.cases[0]
    img = fake2d.images[info.case_id]
    z = normalize(img, info)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z.mean(axis=(0, 1)), 0, atol=1e-4)
    np.testing.assert_allclose(z.std(axis=(0, 1)), 1, atol=1e-4)
    np.testing.assert_array_equal(normalize(img, None, "none"), img)
    flat = dataclasses.replace(info, intensity={**info.intensity, "std": [0.0, 0.0, 0.0]})
    assert np.isfinite(normalize(img, flat)).all()  # std floor
    stats = foreground_intensity_stats(fake2d)
    assert stats["p00_5"][0] < stats["mean"][0] < stats["p99_5"][0]
    ct = normalize(img, None, "ct", ct_stats=stats)
    lo = (np.array(stats["p00_5"]) - stats["mean"]) / np.array(stats["std"])
    hi = (np.array(stats["p99_5"]) - stats["mean"]) / np.array(stats["std"])
    assert (ct >= lo - 1e-5).all() and (ct <= hi + 1e-5).all()
    with pytest.raises(ValueError):
        normalize(img, info, "minmax")
    (batch,) = _take(_loader(fake2d, normalization="ct", augment=NO_AUG), 1)
    assert batch["image"].min() >= lo.min() - 1e-5


def test_too_large_patch_raises_data_error(fake2d):
    with pytest.raises(DataError, match=r"\(65, 16\).*\(64, 60\)"):
        _loader(fake2d, patch_size=(65, 16))
    with pytest.raises(DataError, match="axes"):
        _loader(fake2d, patch_size=(16, 16, 16))
    # larger than some cases only: fine
    assert check_patch_size(fake2d.manifest, (60, 16)) == (60, 16)


def test_default_patch_size(fake2d, fake3d):
    assert default_patch_size(fake2d.manifest, 10**6, divisor=8) == (40, 48)
    assert default_patch_size(fake2d.manifest, 32 * 32, divisor=8) == (32, 32)
    assert default_patch_size(fake3d.manifest, 10**6, divisor=4) == (20, 24, 20)
    p = default_patch_size(fake3d.manifest, 8 * 8 * 8, divisor=(2, 4, 4))
    assert int(np.prod(p)) <= 512 and all(s % d == 0 for s, d in zip(p, (2, 4, 4), strict=True))


# ------------------------------------------------------------- real store (open_dataset)


def test_shapes_and_dtypes_2d_rgb(nuclei_ds):
    assert nuclei_ds.manifest.ndim == 2 and nuclei_ds.manifest.channels == 3
    (batch,) = _take(_loader(nuclei_ds, patch_size=(64, 96), batch_size=3), 1)
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (3, 64, 96, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (3, 64, 96) and batch["label"].dtype == np.int32
    assert np.isfinite(batch["image"]).all()
    assert set(np.unique(batch["label"])) <= {0, 1}


def test_sampler_is_picklable(nuclei_ds):
    loader = _loader(nuclei_ds, patch_size=(32, 32), batch_size=2, seed=2)
    copy = pickle.loads(pickle.dumps(loader.sampler))
    for index in (0, 1, 17):
        a, b = loader.sampler(index), copy(index)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    loader.close()


def test_shapes_and_dtypes_3d(hippo_ds):
    m = hippo_ds.manifest
    assert m.ndim == 3 and m.num_classes == 3
    patch = default_patch_size(m, 32**3, divisor=8)
    assert int(np.prod(patch)) <= 32**3 and all(p % 8 == 0 for p in patch)
    (batch,) = _take(_loader(hippo_ds, patch_size=patch, batch_size=2), 1)
    assert batch["image"].shape == (2, *patch, m.channels)
    assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
    assert batch["label"].shape == (2, *patch)
    assert set(np.unique(batch["label"])) <= {0, 1, 2}


def test_determinism_same_seed_any_thread_count(nuclei_ds):
    kw = dict(patch_size=(64, 64), batch_size=3, seed=3)
    a = _take(_loader(nuclei_ds, num_threads=1, **kw), 3)
    b = _take(_loader(nuclei_ds, num_threads=3, prefetch=3, **kw), 3)
    _assert_batches_equal(a, b)
    c = _take(_loader(nuclei_ds, **{**kw, "seed": 4}), 3)
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_resume_from_start_step_and_state(hippo_ds):
    kw = dict(patch_size=(24, 32, 24), batch_size=2, seed=1)
    fresh = _take(_loader(hippo_ds, **kw), 5)
    resumed = _take(_loader(hippo_ds, start_step=3, **kw), 2)
    _assert_batches_equal(resumed, fresh[3:5])

    loader = _loader(hippo_ds, **kw)
    next(loader)
    assert loader.get_state() == {"step": 1}
    loader.set_state({"step": 4})
    _assert_batches_equal([next(loader)], fresh[4:5])
    assert loader.get_state() == {"step": 5}
    loader.set_state({"step": 0})
    _assert_batches_equal([next(loader)], fresh[0:1])
    loader.close()


@pytest.mark.parametrize("name,patch", [("nuclei_ds", (32, 32)), ("hippo_ds", (16, 16, 16))])
def test_forced_foreground_patches_on_real_data(request, name, patch):
    ds = request.getfixturevalue(name)
    loader = _loader(
        ds,
        patch_size=patch,
        batch_size=3,
        fg_oversample=0.33,
        augment=NO_AUG,
        with_meta=True,
        seed=0,
    )
    batches = _take(loader, 8)
    forced = np.stack([b["fg_forced"] for b in batches])
    assert (forced == [False, False, True]).all()
    for b in batches:
        assert b["label"][2].any()


def test_ct_stats_real_store(hippo_ds):
    stats = foreground_intensity_stats(hippo_ds)
    # hippocampus has < 10,000 foreground voxels per class: the stored sample is every
    # foreground voxel, so the pooled mean/std equal the store's per-case fg stats pooled
    cases = hippo_ds.manifest.cases
    n = np.array([sum(c.class_voxels[1:]) for c in cases], np.float64)
    means = np.array([c.intensity["fg_mean"][0] for c in cases])
    stds = np.array([c.intensity["fg_std"][0] for c in cases])
    pooled_mean = (n * means).sum() / n.sum()
    pooled_std = np.sqrt((n * (stds**2 + means**2)).sum() / n.sum() - pooled_mean**2)
    np.testing.assert_allclose(stats["mean"], [pooled_mean], rtol=1e-4)
    np.testing.assert_allclose(stats["std"], [pooled_std], rtol=1e-3)
    assert min(c.intensity["fg_p00_5"][0] for c in cases) <= stats["p00_5"][0]
    assert stats["p00_5"][0] < stats["mean"][0] < stats["p99_5"][0]
    (batch,) = _take(
        _loader(
            hippo_ds, patch_size=(16, 16, 16), batch_size=2, normalization="ct", augment=NO_AUG
        ),
        1,
    )
    assert np.isfinite(batch["image"]).all()


def test_too_large_patch_real_store(nuclei_ds):
    with pytest.raises(DataError, match=r"\(400, 64\).*\(360, 360\)"):
        _loader(nuclei_ds, patch_size=(400, 64))
    _take(_loader(nuclei_ds, patch_size=(300, 64), batch_size=2), 1)  # > some cases: padded


def test_process_slices_make_up_the_single_process_batch(fake2d):
    """Multi-host: each of P processes loads its B/P elements; together the global batch."""
    whole = _take(_loader(fake2d, batch_size=4, with_meta=True, start_step=3), 2)
    parts = [
        _take(
            _loader(
                fake2d, batch_size=4, with_meta=True, start_step=3, process_index=i, process_count=2
            ),
            2,
        )
        for i in range(2)
    ]
    for step, batch in enumerate(whole):
        for key in batch:
            joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
            np.testing.assert_array_equal(joined, batch[key])
    assert parts[0][0]["image"].shape[0] == 2
    with pytest.raises(ValueError, match="not divisible"):
        _loader(fake2d, batch_size=3, process_count=2)
