"""Streaming sliding window (unetjax.volumes.streaming) vs the in-memory reference; resume;
NIfTI export. Tiny shapes, a jitted analytic 'model' (no network)."""

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
from unetjax.volumes.streaming import PROGRESS, predict_volume

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
    fn = make_fn(patch)
    ref = sliding_window_predict(vol, fn, patch, K, step=step, batch_size=3, mirror_axes=mirror)
    res = predict_volume(
        ts.array(vol), fn, patch, K, tmp_path / "out", step=step, batch_size=3,
        mirror_axes=mirror, outputs=("probabilities", "labels"), progress=False,
    )  # fmt: skip
    assert res.complete and res.voxels_written == np.prod(shape)
    probs = read(tmp_path / "out" / "probabilities")
    np.testing.assert_allclose(probs, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(read(tmp_path / "out" / "labels"), ref.argmax(-1))


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
