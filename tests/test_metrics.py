"""Segmentation metrics on analytic shapes with hand-derived answers."""

import math

import numpy as np
import pytest
from scipy import ndimage

from unetjax.metrics import case_metrics, confusion_counts, summarize, surface_distances

NAN_KEYS = ("dice", "iou", "precision", "recall", "hd95", "assd")


def _square(shape, r0, r1, c0, c1, label=1):
    a = np.zeros(shape, dtype=np.int64)
    a[r0:r1, c0:c1] = label
    return a


def test_overlap_two_squares():
    # pred 6x6 = 36 px, target 6x8 = 48 px, overlap rows 4:8 x cols 4:8 = 16 px.
    pred = _square((20, 20), 2, 8, 2, 8)
    target = _square((20, 20), 4, 10, 4, 12)
    m = case_metrics(pred, target, 2)[1]
    tp, fp, fn = 16, 20, 32
    assert (m["tp"], m["fp"], m["fn"]) == (tp, fp, fn)
    assert (m["pred_voxels"], m["target_voxels"]) == (36, 48)
    assert m["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))  # 32/84
    assert m["iou"] == pytest.approx(tp / (tp + fp + fn))  # 16/68
    assert m["precision"] == pytest.approx(16 / 36)
    assert m["recall"] == pytest.approx(16 / 48)


def test_shift_hd95_and_assd():
    # 10x10 square shifted by k=3 rows. Pred surface (36 px): top row 10 px at 3; each side
    # (8 px between corners) 2,1,0,...; bottom row min(3, j, 9-j) -> sum 18. Total 54/36 = 1.5,
    # symmetric in the other direction -> ASSD 1.5. 14/36 points at the max 3 -> HD95 = 3.
    k = 3
    pred = _square((24, 24), 5, 15, 5, 15)
    target = _square((24, 24), 5 + k, 15 + k, 5, 15)
    d_pt, d_tp = surface_distances(pred, target, 1.0)
    assert len(d_pt) == len(d_tp) == 36
    assert d_pt.sum() == pytest.approx(54) and d_tp.sum() == pytest.approx(54)
    m = case_metrics(pred, target, 2)[1]
    assert m["hd95"] == pytest.approx(k)
    assert m["assd"] == pytest.approx(1.5)


@pytest.mark.parametrize("axis", [0, 1])
def test_shift_anisotropic_spacing(axis):
    k, spacing = 2, (2.5, 0.7)
    pred = _square((24, 24), 5, 15, 5, 15)
    target = np.roll(pred, k, axis=axis)
    m = case_metrics(pred, target, 2, spacing=spacing)[1]
    assert m["hd95"] == pytest.approx(k * spacing[axis])
    # a scalar spacing scales everything
    assert case_metrics(pred, target, 2, spacing=2.0)[1]["hd95"] == pytest.approx(2 * k)


def test_hd95_is_max_of_directed_percentiles_and_assd_pools_both_directions():
    # target: a 1-px line of 21 voxels (all surface); pred: its first voxel.
    # pred->gt = {0}; gt->pred = {0, 1, ..., 20} * 0.5 (spacing 0.5 along the line).
    target = np.zeros((5, 30), dtype=np.int64)
    target[2, 0:21] = 1
    pred = np.zeros_like(target)
    pred[2, 0] = 1
    m = case_metrics(pred, target, 2, spacing=(1.0, 0.5))[1]
    gt_to_pred = 0.5 * np.arange(21)
    # MONAI: max(p95(pred->gt), p95(gt->pred)) = p95(0..20) * 0.5 = 19 * 0.5
    assert m["hd95"] == pytest.approx(9.5)
    # not the 95th percentile of the union (which would be 18.95 * 0.5), nor the maximum (10)
    assert np.percentile(np.r_[0.0, gt_to_pred], 95) != pytest.approx(9.5)
    # symmetric ASSD: mean over the 22 pooled distances, not the mean of the directed means
    assert m["assd"] == pytest.approx(gt_to_pred.sum() / 22)
    assert m["assd"] != pytest.approx(0.5 * (0 + gt_to_pred.mean()))


def test_hd95_ignores_a_far_outlier():
    # square shifted by 3, plus one isolated gt voxel far away: max distance is huge, the 95th
    # percentile is not.
    pred = _square((40, 40), 5, 15, 5, 15)
    target = _square((40, 40), 8, 18, 5, 15)
    target[35, 35] = 1
    d_pt, d_tp = surface_distances(pred, target)
    assert max(d_pt.max(), d_tp.max()) > 20
    assert case_metrics(pred, target, 2)[1]["hd95"] == pytest.approx(3)


def test_concentric_balls_3d():
    n, c = 28, 13.5
    zz, yy, xx = np.mgrid[:n, :n, :n]
    rad = np.sqrt((zz - c) ** 2 + (yy - c) ** 2 + (xx - c) ** 2)
    r1, r2 = 6, 9
    pred = (rad <= r1).astype(np.int64)
    target = (rad <= r2).astype(np.int64)
    m = case_metrics(pred, target, 2)[1]
    assert m["dice"] == pytest.approx(2 * r1**3 / (r1**3 + r2**3), rel=0.03)
    assert m["precision"] == 1.0 and m["recall"] < 1.0
    assert m["hd95"] == pytest.approx(r2 - r1, abs=0.5)
    # doubling the spacing doubles all distances
    m2 = case_metrics(pred, target, 2, spacing=(2.0, 2.0, 2.0))[1]
    assert m2["hd95"] == pytest.approx(2 * m["hd95"])
    assert m2["assd"] == pytest.approx(2 * m["assd"])


def test_empty_vs_empty_is_nan():
    z = np.zeros((8, 8), dtype=np.int64)
    m = case_metrics(z, z, 2)[1]
    for key in NAN_KEYS:
        assert math.isnan(m[key]), key
    assert (m["tp"], m["fp"], m["fn"], m["pred_voxels"], m["target_voxels"]) == (0, 0, 0, 0, 0)


def test_empty_prediction_nonempty_target():
    target = _square((8, 8), 2, 5, 2, 5)
    pred = np.zeros_like(target)
    m = case_metrics(pred, target, 2)[1]
    assert m["dice"] == 0.0 and m["iou"] == 0.0
    assert math.isnan(m["precision"])
    assert m["recall"] == 0.0
    assert math.isnan(m["hd95"]) and math.isnan(m["assd"])
    # and the mirror case: empty ground truth -> recall NaN, precision 0
    m = case_metrics(target, pred, 2)[1]
    assert m["dice"] == 0.0 and m["precision"] == 0.0 and math.isnan(m["recall"])
    assert math.isnan(m["hd95"])
    d_pt, d_tp = surface_distances(pred, target)
    assert d_pt.size == 0 and d_tp.size == 0


def test_summarize_excludes_nan():
    rows = [
        {1: {"dice": 0.5, "hd95": 2.0}, 2: {"dice": float("nan"), "hd95": float("nan")}},
        {
            1: {"dice": float("nan"), "hd95": float("nan")},
            2: {"dice": float("nan"), "hd95": float("nan")},
        },
        {1: {"dice": 1.0, "hd95": 4.0}, 2: {"dice": float("nan"), "hd95": float("nan")}},
    ]
    s = summarize(rows)
    assert s[1]["dice"] == {"mean": 0.75, "std": 0.25, "n": 2}
    assert s[1]["hd95"]["mean"] == 3.0 and s[1]["hd95"]["n"] == 2
    assert math.isnan(s[2]["dice"]["mean"]) and math.isnan(s[2]["dice"]["std"])
    assert s[2]["dice"]["n"] == 0
    # per case: nanmean over classes -> 0.5, NaN, 1.0 -> mean 0.75 over 2 cases
    assert s["mean"]["dice"]["mean"] == pytest.approx(0.75) and s["mean"]["dice"]["n"] == 2
    assert math.isnan(s["mean"]["iou"]["mean"])  # metric absent everywhere


def test_summarize_mean_over_classes():
    rows = [{1: {"dice": 0.2}, 2: {"dice": 0.6}}, {1: {"dice": 0.4}, 2: {"dice": float("nan")}}]
    s = summarize(rows)
    # case means: 0.4 and 0.4 (NaN class excluded)
    assert s["mean"]["dice"]["mean"] == pytest.approx(0.4)
    assert s["mean"]["dice"]["std"] == pytest.approx(0.0)
    assert s["mean"]["dice"]["n"] == 2


def test_multiclass_background_excluded():
    target = np.zeros((10, 10), dtype=np.int64)
    target[0:4, 0:4] = 1  # 16 px
    target[6:10, 6:10] = 2  # 16 px
    pred = np.zeros_like(target)
    pred[0:4, 0:2] = 1  # 8 px, all inside target 1
    pred[6:10, 4:10] = 2  # 24 px, 16 inside target 2, 8 on background
    counts = confusion_counts(pred, target, 3)
    assert counts.dtype == np.int64 and counts.shape == (3, 3)
    np.testing.assert_array_equal(counts, [[60, 8, 8], [8, 0, 8], [16, 8, 0]])
    m = case_metrics(pred, target, 3)
    assert sorted(m) == [1, 2]
    assert m[1]["dice"] == pytest.approx(16 / 24) and m[1]["precision"] == 1.0
    assert m[2]["dice"] == pytest.approx(32 / 40) and m[2]["recall"] == 1.0
    assert sorted(case_metrics(pred, target, 3, classes=[0, 2])) == [0, 2]
    with pytest.raises(ValueError):
        confusion_counts(pred, target, 2)  # label 2 out of range


def _reference_distances(pred, target, spacing):
    """Whole-array computation: zero-pad by 1, full-connectivity erosion, EDT."""
    p, t = np.pad(pred.astype(bool), 1), np.pad(target.astype(bool), 1)
    st = ndimage.generate_binary_structure(p.ndim, p.ndim)
    sp = p ^ ndimage.binary_erosion(p, st)
    s_t = t ^ ndimage.binary_erosion(t, st)
    return (
        ndimage.distance_transform_edt(~s_t, sampling=spacing)[sp],
        ndimage.distance_transform_edt(~sp, sampling=spacing)[s_t],
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_bbox_crop_matches_full_array(seed):
    rng = np.random.default_rng(seed)
    shape, spacing = (14, 30, 22), (1.5, 0.8, 1.1)
    blobs = ndimage.gaussian_filter(rng.random(shape), 1.5)
    pred = blobs > np.quantile(blobs, 0.85)
    target = np.roll(pred, 2, axis=1) | (blobs > np.quantile(blobs, 0.9))
    target[:, :3] = False  # pred and target differ near the border
    pred[0, 5:9, 5:9] = True  # an object touching the image edge
    got = surface_distances(pred, target, spacing)
    ref = _reference_distances(pred, target, spacing)
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(np.sort(g), np.sort(r))
    # and a small object in the middle of a large volume (the crop is a tiny box)
    big_p = np.zeros((40, 60, 50), dtype=bool)
    big_t = np.zeros_like(big_p)
    big_p[20:24, 30:35, 25:27] = True
    big_t[21:25, 29:33, 25:28] = True
    got = surface_distances(big_p, big_t, spacing)
    ref = _reference_distances(big_p, big_t, spacing)
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(np.sort(g), np.sort(r))


def test_image_border_voxels_are_surface():
    full = np.ones((8, 8), dtype=np.int64)
    d_pt, d_tp = surface_distances(full, full)
    assert len(d_pt) == len(d_tp) == 4 * 7  # the image's outer ring
    m = case_metrics(full, full, 2)[1]
    assert m["dice"] == 1.0 and m["hd95"] == 0.0 and m["assd"] == 0.0


def test_surface_uses_full_connectivity():
    # diamond |i|+|j| <= 2 (13 px): full-connectivity erosion keeps only the centre -> 12
    # surface px; cross-shaped (face) erosion would keep 5 -> 8 surface px.
    ii, jj = np.mgrid[-4:5, -4:5]
    diamond = (np.abs(ii) + np.abs(jj) <= 2).astype(np.int64)
    d_pt, _ = surface_distances(diamond, diamond)
    assert len(d_pt) == 12
    assert len(surface_distances(diamond, diamond, connectivity=1)[0]) == 8
