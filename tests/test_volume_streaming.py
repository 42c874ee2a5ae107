"""Streaming sliding window (unetjax.volumes.streaming) vs the in-memory reference; in-plane
blocks; resume; NIfTI export. Tiny shapes, a jitted analytic 'model' (no network)."""

import json

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
import tensorstore as ts

from unetjax.inference.sliding_window import sliding_window_predict
from unetjax.volumes.arrays import Geometry, open_array
from unetjax.volumes.export import export_nifti, open_prediction
from unetjax.volumes.streaming import (
    DEFAULT_MAX_ACCUMULATOR_BYTES,
    PROGRESS,
    RegionPlan,
    predict_volume,
    region_plan,
)

K = 3


def make_fn(patch):
    """Logits that depend on the voxel, its position in the tile and the whole tile's mean
    (so window placement, Gaussian weights and padding all matter); not flip-symmetric."""
    rng = np.random.default_rng(1)
    ramp = jnp.asarray(rng.normal(size=(*patch, K)).astype(np.float32))
    w = jnp.asarray([1.0, -2.0, 0.5])

    @jax.jit
    def fn(tiles):
        mean = tiles.mean(axis=tuple(range(1, tiles.ndim)), keepdims=True)
        return tiles[..., :1] * w + ramp + 3.0 * mean

    return fn


def read(path):
    return np.asarray(open_array(path).read().result())


def stream_and_compare(out, vol, patch, step, mirror, **kwargs):
    """Stream ``vol`` into ``out`` and check it against the in-memory sliding window."""
    fn = make_fn(patch)
    ref = sliding_window_predict(vol, fn, patch, K, step=step, batch_size=3, mirror_axes=mirror)
    res = predict_volume(
        ts.array(vol), fn, patch, K, out, step=step, batch_size=3, mirror_axes=mirror,
        outputs=("probabilities", "labels"), progress=False, **kwargs,
    )  # fmt: skip
    assert res.complete and res.voxels_written == np.prod(vol.shape[:-1])
    np.testing.assert_allclose(read(out / "probabilities"), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(read(out / "labels"), ref.argmax(-1))
    return res


@pytest.mark.parametrize(
    "shape,patch,step,mirror",
    [
        ((23, 17, 11), (8, 6, 4), 0.5, ()),  # odd, not divisible by patch or step
        ((9, 5, 14), (6, 8, 4), 0.5, (0, 2)),  # axis 1 shorter than the patch; mirror TTA
        ((13, 11), (4, 6), 0.3, ()),  # 2D, another step
    ],
)
def test_streaming_equals_in_memory(tmp_path, shape, patch, step, mirror):
    vol = np.random.default_rng(0).normal(size=(*shape, 2)).astype(np.float32)
    stream_and_compare(tmp_path / "out", vol, patch, step, mirror)


@pytest.mark.parametrize(
    "shape,patch,step,mirror,budget",
    [
        ((23, 17, 11), (8, 6, 4), 0.5, (), 1),  # as many blocks as the patch allows: 2 x 2
        ((23, 17, 11), (8, 6, 4), 0.5, (), 4 * K * 8 * 12 * 11),  # 2 x 1, uneven
        ((9, 5, 14), (6, 8, 4), 0.5, (0, 2), 1),  # axis 1 padded (one block); mirror TTA
        ((13, 19), (4, 6), 0.3, (), 1),  # 2D: 3 blocks
    ],
)
def test_streaming_in_plane_blocks_equal_in_memory(tmp_path, shape, patch, step, mirror, budget):
    vol = np.random.default_rng(5).normal(size=(*shape, 2)).astype(np.float32)
    res = stream_and_compare(
        tmp_path / "out", vol, patch, step, mirror, max_accumulator_bytes=budget
    )
    plan = region_plan(shape, patch, step, K, budget)
    assert len(plan.blocks) > 1 and res.regions_total == len(plan.blocks) * len(plan.regions)
    assert res.accumulator_bytes == 4 * K * patch[0] * np.prod(plan.block_shape)


def test_accumulator_bounded_by_block_not_plane(tmp_path):
    """The accumulator (and the windows per block) stay under the budget on any plane."""
    patch, budget = (4, 4, 4), 4 * K * 4 * 10 * 10
    for plane in ((20, 20), (44, 37), (9, 90)):
        vol = np.random.default_rng(6).normal(size=(6, *plane)).astype(np.float32)
        res = predict_volume(
            ts.array(vol), make_fn(patch), patch, K, tmp_path / f"o{plane[1]}",
            max_accumulator_bytes=budget, progress=False,
        )  # fmt: skip
        assert res.complete and budget / 4 < res.accumulator_bytes <= budget
    # the library default on big planes (patch 64, 3 classes): blocks of at most 256 MiB
    for n in (1024, 2048, 4096):
        plan = region_plan((64, n, n), (64, 64, 64), 0.5, K, DEFAULT_MAX_ACCUMULATOR_BYTES)
        assert 64 * np.prod(plan.block_shape) * K * 4 <= 256 * 2**20
        assert max(len(plan.corners(b)) for b in plan.blocks) <= 21**2  # whatever the plane
    plan = region_plan((64, 512, 512), (64, 64, 64), 0.5, K, DEFAULT_MAX_ACCUMULATOR_BYTES)
    assert len(plan.blocks) == 1


def test_normalisation_then_padding_as_in_memory(tmp_path):
    """A raw volume shorter than the patch, normalised per tile, equals the in-memory window
    over the normalised volume (padding is in normalised space)."""
    shape, patch = (5, 12, 9), (8, 4, 4)
    raw = np.random.default_rng(4).normal(10.0, 3.0, size=(*shape, 1)).astype(np.float32)
    norm = lambda x: (x - 10.0) / 3.0  # noqa: E731
    fn = make_fn(patch)
    ref = sliding_window_predict(norm(raw), fn, patch, K, batch_size=2)
    predict_volume(
        ts.array(raw), fn, patch, K, tmp_path / "o", batch_size=2, normalize=norm,
        outputs=("probabilities",), progress=False,
    )  # fmt: skip
    np.testing.assert_allclose(read(tmp_path / "o" / "probabilities"), ref, rtol=1e-5, atol=1e-6)


def test_resume_after_interruption_gives_same_output(tmp_path):
    shape, patch = (40, 9, 7), (8, 6, 4)
    vol = np.random.default_rng(2).normal(size=shape).astype(np.float32)  # no channel axis
    fn = make_fn(patch)
    kw = dict(batch_size=2, outputs=("probabilities",), progress=False, identity="m1")
    full = predict_volume(ts.array(vol), fn, patch, K, tmp_path / "full", **kw)
    out = tmp_path / "resumed"
    first = predict_volume(ts.array(vol), fn, patch, K, out, stop_after_regions=3, **kw)
    assert not first.complete and first.regions_done == 3
    assert not out.exists()  # a partial store never looks complete
    partial = tmp_path / ".resumed.partial"
    assert json.loads((partial / PROGRESS).read_text())["regions_done"] == 3
    second = predict_volume(ts.array(vol), fn, patch, K, out, stop_after_regions=2, **kw)
    assert second.regions_skipped == 3 and second.regions_done == 5
    rest = predict_volume(ts.array(vol), fn, patch, K, out, **kw)
    assert rest.complete and rest.regions_skipped == 5
    assert rest.voxels_written + second.voxels_written + first.voxels_written == vol.size
    # only windows overlapping unfinished rows are recomputed
    assert rest.tiles_computed < full.tiles_computed
    np.testing.assert_array_equal(
        read(out / "probabilities"), read(tmp_path / "full" / "probabilities")
    )
    # other settings (here: another model identity) start over instead of mixing outputs
    predict_volume(ts.array(vol), fn, patch, K, out, stop_after_regions=1, **kw)
    kw["identity"] = "m2"
    again = predict_volume(ts.array(vol), fn, patch, K, out, **kw)
    assert again.regions_skipped == 0 and again.complete


def test_resume_with_in_plane_blocks_gives_same_output(tmp_path):
    shape, patch = (30, 21, 17), (8, 6, 4)
    vol = np.random.default_rng(7).normal(size=shape).astype(np.float32)
    fn = make_fn(patch)
    kw = dict(batch_size=2, outputs=("probabilities",), progress=False, max_accumulator_bytes=1)
    full = predict_volume(ts.array(vol), fn, patch, K, tmp_path / "full", **kw)
    n_rows = len(RegionPlan(shape, patch, 0.5).regions)
    assert full.regions_total == 3 * 4 * n_rows  # 3 x 4 in-plane blocks
    out = tmp_path / "resumed"
    first = predict_volume(ts.array(vol), fn, patch, K, out, stop_after_regions=n_rows + 2, **kw)
    assert not first.complete and first.regions_done == n_rows + 2  # inside the second block
    second = predict_volume(ts.array(vol), fn, patch, K, out, stop_after_regions=n_rows, **kw)
    assert second.regions_skipped == n_rows + 2 and second.regions_done == 2 * n_rows + 2
    rest = predict_volume(ts.array(vol), fn, patch, K, out, **kw)
    assert rest.complete and rest.regions_skipped == 2 * n_rows + 2
    assert rest.voxels_written + second.voxels_written + first.voxels_written == vol.size
    assert rest.tiles_computed < full.tiles_computed
    assert (
        first.tiles_computed + second.tiles_computed + rest.tiles_computed < 2 * full.tiles_computed
    )
    np.testing.assert_array_equal(
        read(out / "probabilities"), read(tmp_path / "full" / "probabilities")
    )
    # another block layout starts over
    predict_volume(ts.array(vol), fn, patch, K, out, stop_after_regions=1, **kw)
    kw["max_accumulator_bytes"] = 2**30
    again = predict_volume(ts.array(vol), fn, patch, K, out, **kw)
    assert again.regions_skipped == 0 and again.complete and again.regions_total == n_rows


def test_nifti_export_keeps_geometry(tmp_path):
    shape, patch = (11, 9, 7), (4, 4, 4)
    vol = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    affine = np.array([[0, 0, 2.0, 5], [0, 1.5, 0, -3], [0.7, 0, 0, 1], [0, 0, 0, 1]])
    geom = Geometry((0.7, 1.5, 2.0), tuple(map(tuple, affine)))
    predict_volume(
        ts.array(vol), make_fn(patch), patch, K, tmp_path / "p", geometry=geom,
        outputs=("labels", "probabilities"), progress=False,
    )  # fmt: skip
    labels, g, _ = open_prediction(tmp_path / "p")
    assert g == geom
    path = export_nifti(tmp_path / "p", tmp_path / "labels.nii.gz", slab=3)
    img = nib.load(str(path))
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(labels.read().result()))
    np.testing.assert_allclose(img.affine, affine)
    probs = export_nifti(tmp_path / "p", tmp_path / "probs.nii", name="probabilities")
    np.testing.assert_allclose(
        np.asarray(nib.load(str(probs)).dataobj)[:, :, :, 0, :], read(tmp_path / "p/probabilities")
    )
