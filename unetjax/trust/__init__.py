"""Trustworthiness tools: corruptions (robustness), calibration, uncertainty, attribution.

* :mod:`~unetjax.trust.corruptions`: seeded image corruptions at severities 0..5 (numpy).
* :mod:`~unetjax.trust.calibration`: ECE, reliability data, temperature scaling (numpy/scipy).
* :mod:`~unetjax.trust.uncertainty`: TTA / MC-dropout entropy, mutual information, variance,
  sliding-window blending and per-case scores (JAX).
* :mod:`~unetjax.trust.attribution`: integrated gradients and Grad-CAM (JAX).
"""

from unetjax.trust.attribution import (
    integrated_gradients,
    make_baseline,
    make_grad_cam_fn,
    make_integrated_gradients_fn,
)
from unetjax.trust.calibration import (
    apply_temperature,
    calibration_bins,
    ece_from_bins,
    expected_calibration_error,
    fit_temperature,
    merge_bins,
    reliability_diagram,
    temperature_scale_probs,
)
from unetjax.trust.corruptions import CORRUPTIONS, SEVERITY_PARAMS, corrupt, psnr
from unetjax.trust.uncertainty import (
    case_uncertainty,
    make_uncertainty_fn,
    sliding_window_uncertainty,
    summarize_samples,
)

__all__ = [
    "CORRUPTIONS",
    "SEVERITY_PARAMS",
    "apply_temperature",
    "calibration_bins",
    "case_uncertainty",
    "corrupt",
    "ece_from_bins",
    "expected_calibration_error",
    "fit_temperature",
    "integrated_gradients",
    "make_baseline",
    "make_grad_cam_fn",
    "make_integrated_gradients_fn",
    "make_uncertainty_fn",
    "merge_bins",
    "psnr",
    "reliability_diagram",
    "sliding_window_uncertainty",
    "summarize_samples",
    "temperature_scale_probs",
]
