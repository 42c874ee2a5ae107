"""nnU-Net-style host-side data augmentation for one patch (2D or 3D), numpy/scipy only.

Arrays are channel-last: image ``[*spatial, C]`` float32 (already normalised), label
``[*spatial]`` integer. Every random decision is drawn from the ``np.random.Generator``
passed in, so a patch's augmentation is a pure function of that generator's seed.

Transforms, in nnU-Net's order, each applied with its own probability:

1. spatial (rotation ``p_rotation`` and scaling ``p_scale``, combined into ONE affine
   resample about the patch centre): image with linear interpolation (``image_order``),
   label with nearest neighbour (order 0), both through ``scipy.ndimage.affine_transform``
   with the same matrix/offset so they stay aligned. The source is treated as extended
   with zeros (``mode="grid-constant"``; 0 is the normalised mean, label 0). The patch
   pipeline reads the larger source region this needs (:func:`required_box`) from the
   store so rotated/zoomed-out patches contain real image content, not padding.
   2D: one angle in ``rotation_2d`` (degrees, default ±180). 3D: one angle per plane
   (about each axis) in ``rotation_3d`` (default ±30 each). Scale: one isotropic factor in
   ``scale_range``; > 1 samples a larger region (zoom out), as in nnU-Net.
2. Gaussian noise (``p_noise``; variance ~ U(noise_variance), shared across channels).
3. multiplicative brightness (``p_brightness``; factor per channel ~ U(brightness_range)).
4. contrast (``p_contrast``; per channel: scale about the mean by U(contrast_range), then
   clip to the channel's pre-transform range).
5. inverted gamma (``p_gamma_inverted``) then gamma (``p_gamma``): per channel, rescale
   to [0, 1], raise to gamma (nnU-Net's sampling: half the time < 1), map back, then
   restore the channel's mean and std ("retain stats"); inverted = the same on ``-x``.
6. mirroring: each axis in ``mirror_axes`` (default all spatial axes) with ``p_mirror``.

Not included (nnU-Net uses them at low probability): Gaussian blur, simulated low
resolution, the "dummy 2D" augmentation for anisotropic 3D data.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np
from scipy import ndimage

_RANGE_FIELDS = (
    "rotation_2d",
    "rotation_3d",
    "scale_range",
    "noise_variance",
    "brightness_range",
    "contrast_range",
    "gamma_range",
)
_PROB_FIELDS = (
    "p_rotation",
    "p_scale",
    "p_mirror",
    "p_noise",
    "p_brightness",
    "p_contrast",
    "p_gamma",
    "p_gamma_inverted",
)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """All augmentation probabilities and ranges (nnU-Net defaults). Angles in degrees."""

    enabled: bool = True
    # spatial
    p_rotation: float = 0.2
    rotation_2d: tuple[float, float] = (-180.0, 180.0)
    rotation_3d: tuple[float, float] = (-30.0, 30.0)
    p_scale: float = 0.2
    scale_range: tuple[float, float] = (0.7, 1.4)
    image_order: int = 1
    # mirroring
    p_mirror: float = 0.5
    mirror_axes: tuple[int, ...] | None = None  # spatial axes; None = all
    # intensity
    p_noise: float = 0.1
    noise_variance: tuple[float, float] = (0.0, 0.1)
    p_brightness: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    p_gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    p_gamma_inverted: float = 0.1

    def __post_init__(self):
        for name in _PROB_FIELDS:
            p = getattr(self, name)
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"AugmentConfig.{name} must be in [0, 1], got {p}")
        for name in _RANGE_FIELDS:
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 2 or value[0] > value[1]:
                raise ValueError(f"AugmentConfig.{name} must be (low, high), got {value}")
            object.__setattr__(self, name, value)
        if self.scale_range[0] <= 0:
            raise ValueError(f"AugmentConfig.scale_range must be positive: {self.scale_range}")
        if self.noise_variance[0] < 0:
            raise ValueError(f"AugmentConfig.noise_variance must be >= 0: {self.noise_variance}")
        if self.gamma_range[0] <= 0:
            raise ValueError(f"AugmentConfig.gamma_range must be positive: {self.gamma_range}")
        if self.image_order not in (0, 1, 2, 3):
            raise ValueError(f"AugmentConfig.image_order must be 0..3, got {self.image_order}")
        if self.mirror_axes is not None:
            object.__setattr__(self, "mirror_axes", tuple(int(a) for a in self.mirror_axes))

    @classmethod
    def disabled(cls) -> AugmentConfig:
        return cls(enabled=False)

    @classmethod
    def from_config(cls, cfg=None) -> AugmentConfig:
        """From a dict / ``ml_collections.ConfigDict`` / AugmentConfig / None (defaults).

        Unknown keys raise ``ValueError`` (catches typos in experiment configs).
        """
        if cfg is None:
            return cls()
        if isinstance(cfg, cls):
            return cfg
        if hasattr(cfg, "to_dict"):
            cfg = cfg.to_dict()
        if not isinstance(cfg, Mapping):
            raise TypeError(f"AugmentConfig.from_config: expected a mapping, got {type(cfg)}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise ValueError(f"unknown augmentation options {unknown}; known: {sorted(names)}")
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items()}
        return cls(**kwargs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- spatial


def _rotation_2d(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def _rotation_3d(angles) -> np.ndarray:
    """Rotation by one angle in each plane: about axis 0, then 1, then 2."""
    out = np.eye(3)
    for axis, angle in enumerate(angles):
        a, b = [i for i in range(3) if i != axis]
        r = np.eye(3)
        c, s = math.cos(angle), math.sin(angle)
        r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
        out = r @ out
    return out


def sample_spatial_matrix(rng: np.random.Generator, cfg: AugmentConfig, ndim: int):
    """The ``ndim x ndim`` matrix mapping output offsets (from the patch centre) to source
    offsets, or ``None`` when neither rotation nor scaling fires (identity: plain crop)."""
    if ndim not in (2, 3):
        raise ValueError(f"spatial augmentation supports 2D and 3D, got ndim={ndim}")
    if not cfg.enabled:
        return None
    do_rot = rng.random() < cfg.p_rotation
    do_scale = rng.random() < cfg.p_scale
    if not (do_rot or do_scale):
        return None
    matrix = np.eye(ndim)
    if do_rot:
        if ndim == 2:
            matrix = _rotation_2d(math.radians(rng.uniform(*cfg.rotation_2d)))
        else:
            matrix = _rotation_3d(np.radians(rng.uniform(*cfg.rotation_3d, size=3)))
    if do_scale:
        matrix = matrix * rng.uniform(*cfg.scale_range)
    return matrix


def _centre(origin, patch_size) -> np.ndarray:
    return np.asarray(origin, np.float64) + (np.asarray(patch_size, np.float64) - 1.0) / 2.0


def required_box(origin, patch_size, matrix) -> tuple[np.ndarray, np.ndarray]:
    """Integer source box ``[lo, hi)`` (unclipped) that a patch at ``origin`` needs.

    For ``matrix=None`` it is the patch itself; otherwise it covers every sample position
    of the transformed patch plus one voxel for linear interpolation.
    """
    origin = np.asarray(origin, np.int64)
    patch = np.asarray(patch_size, np.int64)
    if matrix is None:
        return origin, origin + patch
    half = (patch - 1) / 2.0
    corners = np.array(np.meshgrid(*[(-h, h) for h in half], indexing="ij")).reshape(len(patch), -1)
    src = _centre(origin, patch)[:, None] + matrix @ corners
    lo = np.floor(src.min(axis=1) - 1e-6).astype(np.int64)
    hi = np.floor(src.max(axis=1) + 1e-6).astype(np.int64) + 2
    return lo, hi


def resample_patch(image, label, region_lo, origin, patch_size, matrix, *, image_order=1):
    """Sample the transformed patch out of a source region.

    ``image`` ``[*r, C]`` / ``label`` ``[*r]`` (label may be None) hold the source box
    starting at ``region_lo`` (source coordinates); the patch has its un-transformed
    position at ``origin``. The region is zero-extended, so a region holding the whole
    (zero-padded) case and one holding only :func:`required_box` give the same patch.
    """
    patch = tuple(int(p) for p in patch_size)
    matrix = np.asarray(matrix, np.float64)
    # source = matrix @ (out - out_centre) + centre - region_lo  ==  matrix @ out + offset
    out_centre = (np.asarray(patch, np.float64) - 1.0) / 2.0
    offset = _centre(origin, patch) - np.asarray(region_lo, np.float64) - matrix @ out_centre
    channels = image.shape[-1]
    out = np.empty((*patch, channels), np.float32)
    for c in range(channels):
        out[..., c] = ndimage.affine_transform(
            np.ascontiguousarray(image[..., c], dtype=np.float32),
            matrix,
            offset,
            output_shape=patch,
            output=np.float32,
            order=image_order,
            mode="grid-constant",
            cval=0.0,
            prefilter=image_order > 1,
        )
    out_label = None
    if label is not None:
        out_label = ndimage.affine_transform(
            np.ascontiguousarray(label),
            matrix,
            offset,
            output_shape=patch,
            order=0,
            mode="grid-constant",
            cval=0,
        )
    return out, out_label


# ---------------------------------------------------------------------------- intensity


def _sample_gamma(rng, low, high) -> float:
    # nnU-Net: with a range straddling 1, half the draws are < 1 and half > 1.
    if low < 1 and rng.random() < 0.5:
        return float(rng.uniform(low, 1.0))
    return float(rng.uniform(max(low, 1.0), high))


def _gamma_channel(x: np.ndarray, gamma: float, invert: bool) -> np.ndarray:
    if invert:
        x = -x
    mean, std = x.mean(), x.std()
    lo = x.min()
    span = x.max() - lo + 1e-7
    y = np.power((x - lo) / span, gamma) * span + lo
    y = (y - y.mean()) / (y.std() + 1e-8) * std + mean
    return -y if invert else y


def augment_intensity(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig):
    """Noise, brightness, contrast, inverted gamma, gamma (each with its probability)."""
    if not cfg.enabled:
        return image
    image = np.array(image, dtype=np.float32, copy=True)
    channels = image.shape[-1]
    if rng.random() < cfg.p_noise:
        variance = rng.uniform(*cfg.noise_variance)
        image += rng.normal(0.0, math.sqrt(variance), image.shape).astype(np.float32)
    if rng.random() < cfg.p_brightness:
        image *= rng.uniform(*cfg.brightness_range, size=channels).astype(np.float32)
    if rng.random() < cfg.p_contrast:
        factors = rng.uniform(*cfg.contrast_range, size=channels)
        for c in range(channels):
            x = image[..., c]
            mean, lo, hi = x.mean(), x.min(), x.max()
            image[..., c] = np.clip((x - mean) * factors[c] + mean, lo, hi)
    for p, invert in ((cfg.p_gamma_inverted, True), (cfg.p_gamma, False)):
        if rng.random() < p:
            for c in range(channels):
                gamma = _sample_gamma(rng, *cfg.gamma_range)
                image[..., c] = _gamma_channel(image[..., c], gamma, invert)
    return image


def mirror(image, label, rng: np.random.Generator, cfg: AugmentConfig):
    """Flip each axis of ``cfg.mirror_axes`` (default: all spatial) with ``p_mirror``."""
    if not cfg.enabled:
        return image, label
    ndim = image.ndim - 1
    axes = range(ndim) if cfg.mirror_axes is None else cfg.mirror_axes
    flip = tuple(a for a in axes if rng.random() < cfg.p_mirror)
    for a in flip:
        if not 0 <= a < ndim:
            raise ValueError(f"mirror axis {a} out of range for {ndim}D data")
    if flip:
        image = np.flip(image, flip)
        if label is not None:
            label = np.flip(label, flip)
    return image, label


def augment_patch(image, label, rng: np.random.Generator, cfg: AugmentConfig):
    """All transforms on an in-memory patch (spatial about its centre, zeros outside).

    The training pipeline does the same, drawing from the generator in the same order,
    but resamples from a larger region read from the store.
    """
    if not cfg.enabled:
        return image, label
    patch = image.shape[:-1]
    matrix = sample_spatial_matrix(rng, cfg, len(patch))
    if matrix is not None:
        image, label = resample_patch(
            image,
            label,
            np.zeros(len(patch)),
            np.zeros(len(patch)),
            patch,
            matrix,
            image_order=cfg.image_order,
        )
    image = augment_intensity(image, rng, cfg)
    return mirror(image, label, rng, cfg)
