"""Seeded image corruptions at severities 0..5 for robustness evaluation (numpy, host side).

Every corruption maps a float image ``[*spatial, C]`` (2D: ``[H, W, C]``, 3D: ``[D, H, W, C]``)
in its *normalised* intensity space to an image of the same shape and dtype (float32 for
non-float input). Rules shared by all of them:

* Severity ``0`` returns an exact copy of the input; severities ``1..5`` use the table below.
* Randomness comes only from the ``rng`` argument (:func:`corrupt` builds it from ``seed``):
  same image, name, severity and seed -> identical output. The random draws do not depend on
  the severity (the severity only scales them), so for one seed severities are nested and
  the effect grows with the severity.
* Intensity-dependent amounts are relative to per-channel statistics of the input image:
  ``std_c`` (standard deviation over the spatial axes; ``1`` for a constant channel),
  ``mean_c``, ``min_c``, ``max_c``. Hence ``corrupt(a * x + b) == a * corrupt(x) + b`` for
  ``a > 0`` (up to rounding; JPEG up to its quantisation).
* "Magnitude" corruptions (Rician noise, bias field) act on ``x - min_c`` (a non-negative
  magnitude image) and add ``min_c`` back, since normalised intensities can be negative.
* Spatial operations treat voxels as isotropic and act on all spatial axes alike; each
  channel is processed independently, except that the bias field and the motion of the
  ghosting corruption are shared by all channels.

==================  ===========================  ============================================
name                severity 1, 2, 3, 4, 5       rule
==================  ===========================  ============================================
gaussian_noise      s = .04 .08 .15 .25 .40      ``x + s * std_c * n``, ``n ~ N(0, 1)``
rician_noise        s = .04 .08 .15 .25 .40      ``min_c + sqrt((m + s*std_c*n1)**2 +
                                                 (s*std_c*n2)**2)``, ``m = x - min_c``,
                                                 ``n1, n2 ~ N(0, 1)``
gaussian_blur       sigma = 0.5 1 1.5 2 3        Gaussian filter, ``sigma`` voxels on every
                                                 spatial axis (``reflect`` border, truncate 4)
contrast            s = .85 .70 .55 .40 .25      ``mean_c + s * (x - mean_c)``
gamma               s = 1.25 1.5 1.8 2.2 2.7     ``lo + (hi - lo) * u**s`` with
                                                 ``u = (x - lo) / (hi - lo)``,
                                                 ``lo, hi = min_c, max_c`` (constant: as is)
bias_field          s = .10 .20 .30 .45 .60      ``min_c + (x - min_c) * exp(s * g / max|g|)``,
                                                 ``g = sum_k u_k P_k``: all monomials ``P_k``
                                                 of total degree 1..3 in coordinates scaled
                                                 to [-1, 1], ``u_k ~ U(-1, 1)``; so the field
                                                 lies in ``[exp(-s), exp(s)]``
motion_ghosting     (f, d) = (.05, 2) (.10, 3)   k-space (FFT over the spatial axes): the
                    (.15, 4) (.25, 6) (.35, 8)   lines ``round(f * n)`` (at least 1) of a
                                                 random phase-encode axis (random subset) are
                                                 replaced by those of a copy shifted by ``d``
                                                 voxels in a random direction (Fourier shift);
                                                 output: real part of the inverse FFT
low_resolution      s = 1.5 2 3 4 6              Gaussian blur sigma ``(s - 1) / 2``
                                                 (anti-alias), linear resampling to
                                                 ``max(1, round(n / s))`` voxels per axis and
                                                 back (half-voxel-centred grids, edges
                                                 clamped)
jpeg (2D only)      quality = 75 50 30 15 7      per channel: ``round(255 * u)`` (``u`` as for
                                                 gamma) encoded as a grayscale JPEG by PIL at
                                                 ``quality``, decoded, mapped back with the
                                                 same ``lo, hi``; raises ValueError for 3D
==================  ===========================  ============================================
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = [
    "CORRUPTIONS",
    "MAX_SEVERITY",
    "SEVERITY_PARAMS",
    "corrupt",
    "psnr",
]

MAX_SEVERITY = 5

#: Severity 1..5 parameters of each corruption (index ``severity - 1``); see the module table.
SEVERITY_PARAMS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.08, 0.15, 0.25, 0.40),
    "rician_noise": (0.04, 0.08, 0.15, 0.25, 0.40),
    "gaussian_blur": (0.5, 1.0, 1.5, 2.0, 3.0),
    "contrast": (0.85, 0.70, 0.55, 0.40, 0.25),
    "gamma": (1.25, 1.5, 1.8, 2.2, 2.7),
    "bias_field": (0.10, 0.20, 0.30, 0.45, 0.60),
    "motion_ghosting": ((0.05, 2.0), (0.10, 3.0), (0.15, 4.0), (0.25, 6.0), (0.35, 8.0)),
    "low_resolution": (1.5, 2.0, 3.0, 4.0, 6.0),
    "jpeg": (75, 50, 30, 15, 7),
}

CorruptionFn = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


# ----------------------------------------------------------------------------- helpers


def _check(image: np.ndarray, severity: int) -> tuple[np.ndarray, np.dtype]:
    image = np.asarray(image)
    if image.ndim not in (3, 4):
        raise ValueError(
            f"image must be [*spatial, C] with 2 or 3 spatial axes, got shape {image.shape}"
        )
    if isinstance(severity, bool) or int(severity) != severity:
        raise ValueError(f"severity must be an integer in 0..{MAX_SEVERITY}, got {severity!r}")
    if not 0 <= severity <= MAX_SEVERITY:
        raise ValueError(f"severity must be in 0..{MAX_SEVERITY}, got {severity}")
    dtype = image.dtype if np.issubdtype(image.dtype, np.floating) else np.dtype(np.float32)
    return image, dtype


def _spatial_axes(x: np.ndarray) -> tuple[int, ...]:
    return tuple(range(x.ndim - 1))


def _channel_std(x: np.ndarray) -> np.ndarray:
    std = x.std(axis=_spatial_axes(x))
    return np.where(std > 1e-8, std, 1.0)


def _channel_min_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    axes = _spatial_axes(x)
    return x.min(axis=axes), x.max(axis=axes)


def _param(name: str, severity: int):
    return SEVERITY_PARAMS[name][severity - 1]


def _corruption(name: str):
    """Wrap ``fn(x_float64, param, rng)``: validation, severity 0 identity, dtype handling."""

    def register(fn):
        def corruption(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
            image, dtype = _check(image, severity)
            if severity == 0:
                return image.astype(dtype, copy=True)
            out = fn(image.astype(np.float64), _param(name, int(severity)), rng)
            return out.astype(dtype)

        corruption.__name__ = name
        corruption.__doc__ = fn.__doc__
        return corruption

    return register


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(x, sigma=(sigma,) * (x.ndim - 1) + (0,), mode="reflect")


def _resize_axis(x: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Linear resampling of one axis to ``size`` (half-voxel-centred grids, edge-clamped)."""
    n = x.shape[axis]
    if n == size:
        return x
    coords = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    lo = np.floor(coords).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    shape = [1] * x.ndim
    shape[axis] = size
    w = (coords - lo).reshape(shape)
    return np.take(x, lo, axis=axis) * (1 - w) + np.take(x, hi, axis=axis) * w


# ----------------------------------------------------------------------------- corruptions


@_corruption("gaussian_noise")
def gaussian_noise(x, s, rng):
    """Additive Gaussian noise with standard deviation ``s * std_c``."""
    return x + s * _channel_std(x) * rng.standard_normal(x.shape)


@_corruption("rician_noise")
def rician_noise(x, s, rng):
    """Rician noise on the magnitude ``x - min_c`` (two Gaussian channels, ``s * std_c``)."""
    lo, _ = _channel_min_max(x)
    sigma = s * _channel_std(x)
    n1, n2 = rng.standard_normal(x.shape), rng.standard_normal(x.shape)
    return np.sqrt((x - lo + sigma * n1) ** 2 + (sigma * n2) ** 2) + lo


@_corruption("gaussian_blur")
def gaussian_blur(x, s, rng):
    """Gaussian filter with sigma ``s`` voxels on every spatial axis."""
    del rng
    return _blur(x, s)


@_corruption("contrast")
def contrast(x, s, rng):
    """Contrast scaled by ``s`` about the channel mean."""
    del rng
    mean = x.mean(axis=_spatial_axes(x))
    return mean + s * (x - mean)


@_corruption("gamma")
def gamma(x, s, rng):
    """Gamma ``s`` on the per-channel min-max scaled image (constant channels unchanged)."""
    del rng
    lo, hi = _channel_min_max(x)
    span = np.where(hi > lo, hi - lo, 1.0)
    u = np.clip((x - lo) / span, 0.0, 1.0)
    return lo + span * u**s


def _monomials(shape: tuple[int, ...], degree: int = 3) -> list[np.ndarray]:
    """All monomials of total degree 1..degree in coordinates scaled to [-1, 1] (fixed order)."""
    coords = [np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1) for n in shape]
    grids = np.meshgrid(*coords, indexing="ij")
    terms = []
    for powers in itertools.product(range(degree + 1), repeat=len(shape)):
        if 1 <= sum(powers) <= degree:
            term = np.ones(shape)
            for g, p in zip(grids, powers, strict=True):
                term = term * g**p
            terms.append(term)
    return terms


@_corruption("bias_field")
def bias_field(x, s, rng):
    """Smooth field ``exp(s * g / max|g|)``, ``g`` a random cubic, times ``x - min_c``."""
    terms = _monomials(x.shape[:-1])
    coefs = rng.uniform(-1.0, 1.0, len(terms))
    g = sum(c * t for c, t in zip(coefs, terms, strict=True))
    log_field = s * g / max(float(np.abs(g).max()), 1e-12)
    lo, _ = _channel_min_max(x)
    return lo + (x - lo) * np.exp(log_field)[..., None]


@_corruption("motion_ghosting")
def motion_ghosting(x, s, rng):
    """k-space lines along a random phase-encode axis taken from a shifted copy (ghosts)."""
    fraction, distance = s
    spatial = x.shape[:-1]
    axes = _spatial_axes(x)
    pe_axis = int(rng.integers(len(spatial)))
    order = rng.permutation(spatial[pe_axis])
    direction = rng.standard_normal(len(spatial))
    direction /= max(np.linalg.norm(direction), 1e-12)
    lines = order[: max(1, round(fraction * spatial[pe_axis]))]

    k = np.fft.fftn(x, axes=axes)
    phase = np.zeros(spatial)
    for a, n in enumerate(spatial):
        shape = [1] * len(spatial)
        shape[a] = n
        phase = phase + (distance * direction[a]) * np.fft.fftfreq(n).reshape(shape)
    shifted = k * np.exp(-2j * np.pi * phase)[..., None]
    index = [slice(None)] * x.ndim
    index[pe_axis] = lines
    k[tuple(index)] = shifted[tuple(index)]
    return np.fft.ifftn(k, axes=axes).real


@_corruption("low_resolution")
def low_resolution(x, s, rng):
    """Anti-aliased linear down-sampling by ``s`` per spatial axis, then linear up-sampling."""
    del rng
    y = _blur(x, (s - 1) / 2)
    spatial = x.shape[:-1]
    for axis, n in enumerate(spatial):
        y = _resize_axis(y, axis, max(1, round(n / s)))
    for axis, n in enumerate(spatial):
        y = _resize_axis(y, axis, n)
    return y


@_corruption("jpeg")
def jpeg(x, quality, rng):
    """Per-channel grayscale JPEG at ``quality`` of the min-max scaled uint8 image (2D only)."""
    del rng
    if x.ndim != 3:
        raise ValueError(f"jpeg is 2D only ([H, W, C]); got shape {x.shape}")
    lo, hi = _channel_min_max(x)
    out = np.empty_like(x)
    for c in range(x.shape[-1]):
        if hi[c] <= lo[c]:
            out[..., c] = x[..., c]
            continue
        u8 = np.round(255.0 * (x[..., c] - lo[c]) / (hi[c] - lo[c])).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(u8, mode="L").save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        decoded = np.asarray(Image.open(buf).convert("L"), np.float64)
        out[..., c] = lo[c] + decoded / 255.0 * (hi[c] - lo[c])
    return out


#: ``name -> fn(image [*spatial, C], severity 0..5, rng: np.random.Generator) -> image``.
CORRUPTIONS: dict[str, CorruptionFn] = {
    "gaussian_noise": gaussian_noise,
    "rician_noise": rician_noise,
    "gaussian_blur": gaussian_blur,
    "contrast": contrast,
    "gamma": gamma,
    "bias_field": bias_field,
    "motion_ghosting": motion_ghosting,
    "low_resolution": low_resolution,
    "jpeg": jpeg,
}


def corrupt(image: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """``CORRUPTIONS[name](image, severity, np.random.default_rng(seed))``.

    Deterministic in ``(image, name, severity, seed)``; severity 0 returns a copy.
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {sorted(CORRUPTIONS)}")
    return CORRUPTIONS[name](image, severity, np.random.default_rng(seed))


def psnr(clean: np.ndarray, corrupted: np.ndarray) -> float:
    """PSNR in dB with the data range ``max - min`` of ``clean``; ``inf`` when identical."""
    clean = np.asarray(clean, np.float64)
    corrupted = np.asarray(corrupted, np.float64)
    mse = float(np.mean((clean - corrupted) ** 2))
    if mse == 0.0:
        return float("inf")
    data_range = float(clean.max() - clean.min()) or 1.0
    return 10.0 * np.log10(data_range**2 / mse)
