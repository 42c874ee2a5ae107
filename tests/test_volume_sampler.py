"""Patch sampling from an ingested volume store: concurrent batch reads give the same batches,
foreground oversampling statistics, reachability of every position, determinism by seed."""

import itertools

import numpy as np
import pytest

from unetjax.data.augment import AugmentConfig
from unetjax.data.pipeline import make_train_loader, patch_origin_bounds
from unetjax.volumes.ingest import ingest_volume

SHAPE, PATCH = (30, 26, 22), (8, 8, 8)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampler")
    rng = np.random.default_rng(0)
    image = rng.normal(size=SHAPE).astype(np.float32)
    label = np.zeros(SHAPE, np.uint8)
    label[3:5, 20:22, 4:6] = 1  # a tiny structure: random patches rarely hit it
    image[label > 0] += 3
    np.save(root / "image.npy", image)
    np.save(root / "label.npy", label)
    ds = ingest_volume(root / "image.npy", root / "store", label=root / "label.npy", chunk=8)
    return ds, label


def loader(ds, **kw):
    args = dict(patch_size=PATCH, batch_size=3, seed=0, augment=None, num_threads=2)
    return make_train_loader(ds, ["volume"], **{**args, **kw})


def test_concurrent_reads_give_the_same_batches(store):
    ds, _ = store
    aug = AugmentConfig(p_rotation=0.5, p_scale=0.5)  # boxes larger than the patch, padding
    a = loader(ds, augment=aug, concurrent_reads=True, with_meta=True)
    b = loader(ds, augment=aug, concurrent_reads=False, with_meta=True)
    for batch_a, batch_b in zip(itertools.islice(a, 4), itertools.islice(b, 4), strict=True):
        assert batch_a.keys() == batch_b.keys()
        for k in batch_a:
            np.testing.assert_array_equal(batch_a[k], batch_b[k])
    a.set_state({"step": 2})  # resume: the same stream from step 2
    c = loader(ds, augment=aug, concurrent_reads=True, start_step=2)
    np.testing.assert_array_equal(next(a)["image"], next(c)["image"])


def test_foreground_fraction_matches_oversampling(store):
    ds, label = store
    it = loader(ds, fg_oversample=0.33, concurrent_reads=True, with_meta=True)
    batches = list(itertools.islice(it, 100))
    has_fg = np.concatenate([(b["label"] > 0).any(axis=(1, 2, 3)) for b in batches])
    forced = np.concatenate([b["fg_forced"] for b in batches])
    assert forced.mean() == pytest.approx(1 / 3)  # nnU-Net: 3 - round(3 * 0.67) = 1 per batch
    assert has_fg[forced].all()  # the foreground index always lands the patch on foreground
    # random patches hit foreground with the exact probability q of a uniform origin
    lb, ub = patch_origin_bounds(SHAPE, PATCH)
    ranges = [range(int(a), int(b) + 1) for a, b in zip(lb, ub, strict=True)]
    hits = [label[tuple(slice(o, o + p) for o, p in zip(org, PATCH, strict=True))].any()
            for org in itertools.product(*ranges)]  # fmt: skip
    q = float(np.mean(hits))
    n = int((~forced).sum())
    assert abs(has_fg[~forced].mean() - q) < 4 * np.sqrt(q * (1 - q) / n) + 1e-9
    expected = 1 / 3 + 2 / 3 * q
    assert abs(has_fg.mean() - expected) < 4 * np.sqrt(expected * (1 - expected) / len(has_fg))


def test_every_position_reachable_and_deterministic_by_seed(store):
    ds, _ = store
    sampler = loader(ds, fg_oversample=0.0).sampler
    origins = np.array([sampler.plan(i)["origin"] for i in range(600)])
    lb, ub = patch_origin_bounds(SHAPE, PATCH)
    for axis in range(3):
        assert set(origins[:, axis]) == set(range(int(lb[axis]), int(ub[axis]) + 1))
    again = loader(ds, fg_oversample=0.0).sampler
    np.testing.assert_array_equal(origins[:50], [again.plan(i)["origin"] for i in range(50)])
    other = loader(ds, fg_oversample=0.0, seed=1).sampler
    assert not np.array_equal(origins[:50], [other.plan(i)["origin"] for i in range(50)])
