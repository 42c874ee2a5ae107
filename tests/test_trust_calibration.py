"""ECE (top-label and class-wise), reliability data and temperature scaling on synthetic data."""

import numpy as np
import pytest
from scipy import special

from unetjax.trust.calibration import (
    calibration_bins,
    ece_from_bins,
    expected_calibration_error,
    fit_temperature,
    merge_bins,
    reliability_diagram,
    temperature_scale_probs,
)


def _synthetic(n=60_000, k=3, scale=2.0, seed=0):
    """True logits ``[n // 200, 200, k]`` and labels drawn from their softmax."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=scale, size=(n // 200, 200, k))
    probs = special.softmax(logits, axis=-1)
    u = rng.random(probs.shape[:-1] + (1,))
    labels = (u > np.cumsum(probs, axis=-1)).sum(-1)
    return logits, np.minimum(labels, k - 1)


def test_ece_of_calibrated_and_overconfident_predictors():
    logits, labels = _synthetic()
    calibrated = expected_calibration_error(special.softmax(logits, -1), labels)
    # sampling noise only: ~sqrt(bins / N) scale
    assert calibrated["ece"] < 0.01 and calibrated["classwise_ece"] < 0.01
    assert calibrated["per_class_ece"].shape == (3,)
    over = expected_calibration_error(special.softmax(3.0 * logits, -1), labels)
    assert over["ece"] > 0.08 and over["classwise_ece"] > 0.05


def test_binning_rules_by_hand():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.5, 0.5]])
    labels = np.array([0, 1, 1, 0])
    # top-label confidences 0.9 0.6 0.8 0.5 (tie -> class 0) all in bin [0.5, 1]:
    # mean confidence 0.7, accuracy 3/4 -> ECE 0.05
    result = expected_calibration_error(probs, labels, num_bins=2)
    assert result["ece"] == pytest.approx(0.05)
    stats = calibration_bins(probs, labels, num_bins=2)
    diagram = reliability_diagram(stats["top_label"])
    np.testing.assert_array_equal(diagram["count"], [0, 4])
    np.testing.assert_allclose(diagram["bin_edges"], [0.0, 0.5, 1.0])
    assert np.isnan(diagram["confidence"][0]) and np.isnan(diagram["accuracy"][0])
    assert diagram["confidence"][1] == pytest.approx(0.7)
    assert diagram["accuracy"][1] == pytest.approx(0.75)
    # class 1 one-vs-rest: p = .1 .4 .8 .5 with y = 0 1 1 0 -> bin 0: (.1, .4) vs (0, 1),
    # bin 1: (.8, .5) vs (1, 0); ECE = (|1 - .5| + |1 - 1.3|) / 4 = 0.2
    assert result["per_class_ece"][1] == pytest.approx(0.2)
    # a confidence of exactly 1.0 lands in the last bin
    one = calibration_bins(np.array([[1.0, 0.0]]), np.array([0]), num_bins=4)
    np.testing.assert_array_equal(one["top_label"][0], [0, 0, 0, 1])
    assert np.isnan(ece_from_bins(np.zeros((3, 4))))


def test_bins_add_up_across_cases_and_mask():
    logits, labels = _synthetic(n=20_000, seed=1)
    probs = special.softmax(1.5 * logits, -1)
    whole = calibration_bins(probs, labels)
    halves = merge_bins(
        calibration_bins(probs[:40], labels[:40]), calibration_bins(probs[40:], labels[40:])
    )
    for key in whole:
        np.testing.assert_allclose(whole[key], halves[key])
    mask = np.zeros(labels.shape, bool)
    mask[:30] = True
    masked = expected_calibration_error(probs, labels, mask=mask)
    assert masked["ece"] == pytest.approx(
        expected_calibration_error(probs[:30], labels[:30])["ece"]
    )
    assert reliability_diagram(whole["top_label"])["count"].sum() == labels.size
    with pytest.raises(ValueError, match="mask"):
        expected_calibration_error(probs, labels, mask=mask[:10])


@pytest.mark.parametrize("true_t", [2.5, 0.5])
def test_temperature_scaling_recovers_the_temperature(true_t):
    logits, labels = _synthetic(n=40_000, seed=2)
    observed = true_t * logits  # softmax(observed / true_t) is calibrated
    fitted = fit_temperature(observed, labels)
    assert fitted == pytest.approx(true_t, rel=0.05)
    # per-case lists pool their voxels
    assert fit_temperature(list(observed), list(labels)) == pytest.approx(fitted, rel=1e-3)
    before = expected_calibration_error(special.softmax(observed, -1), labels)["ece"]
    probs = temperature_scale_probs(special.softmax(observed, -1), fitted)
    after = expected_calibration_error(probs, labels)["ece"]
    assert after < 0.015 < before
