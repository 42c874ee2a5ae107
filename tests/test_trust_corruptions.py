"""Seeded corruptions: severity 0 identity, determinism, growing effect, affine equivariance."""

import numpy as np
import pytest
from scipy import ndimage

from unetjax.trust.corruptions import CORRUPTIONS, SEVERITY_PARAMS, corrupt, psnr

RANDOM = {"gaussian_noise", "rician_noise", "bias_field", "motion_ghosting"}


def _smooth(shape, seed):
    """A z-scored smooth random field plus bright disks (structure for blur/ghosting)."""
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.normal(size=shape), (2.0,) * (len(shape) - 1) + (0,))
    grid = np.meshgrid(*[np.arange(n) for n in shape[:-1]], indexing="ij")
    for _ in range(4):
        centre = [rng.uniform(0, n) for n in shape[:-1]]
        r2 = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
        x = x + 3.0 * (r2 < (min(shape[:-1]) / 6) ** 2)[..., None]
    return ((x - x.mean()) / x.std()).astype(np.float32)


IMAGES = {"2d": _smooth((40, 48, 2), 0), "3d": _smooth((12, 16, 14, 1), 1)}
CASES = [(n, d) for n in CORRUPTIONS for d in IMAGES if not (n == "jpeg" and d == "3d")]


def test_registry_and_table_agree():
    assert set(CORRUPTIONS) == set(SEVERITY_PARAMS)
    assert all(len(v) == 5 for v in SEVERITY_PARAMS.values())


@pytest.mark.parametrize("name,dim", CASES)
def test_identity_determinism_and_growing_effect(name, dim):
    image = IMAGES[dim]
    zero = corrupt(image, name, 0, seed=3)
    assert zero is not image and zero.dtype == image.dtype
    np.testing.assert_array_equal(zero, image)

    a, b = corrupt(image, name, 3, seed=7), corrupt(image, name, 3, seed=7)
    assert a.shape == image.shape and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    other = corrupt(image, name, 3, seed=8)
    assert (not np.array_equal(a, other)) == (name in RANDOM)

    # Monotone-ish: PSNR never rises by more than 0.5 dB per step and drops >= 3 dB overall.
    scores = [psnr(image, corrupt(image, name, s, seed=7)) for s in range(6)]
    assert scores[0] == np.inf
    assert all(b < a + 0.5 for a, b in zip(scores[1:-1], scores[2:], strict=True))
    assert scores[5] < scores[1] - 3.0, scores


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_affine_equivariance(name):
    image = IMAGES["2d"]
    ref = 2.0 * corrupt(image, name, 4, seed=1) + 0.5
    out = corrupt(2.0 * image + 0.5, name, 4, seed=1)
    scale = float(ref.max() - ref.min())
    if name == "jpeg":  # equal up to rare uint8 rounding flips
        assert np.abs(out - ref).mean() < 1e-3 * scale
    else:
        np.testing.assert_allclose(out, ref, atol=1e-4 * scale)


def test_input_validation_and_dtypes():
    image = IMAGES["2d"]
    with pytest.raises(ValueError, match="2D only"):
        corrupt(IMAGES["3d"], "jpeg", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(image, "gaussian_noise", 6)
    with pytest.raises(ValueError, match="severity"):
        corrupt(image, "gaussian_noise", 1.5)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(image, "snow", 1)
    with pytest.raises(ValueError, match="spatial"):
        corrupt(image[..., 0], "contrast", 1)
    as_uint8 = (np.arange(64 * 64).reshape(64, 64, 1) % 251).astype(np.uint8)
    out = corrupt(as_uint8, "gaussian_blur", 2)
    assert out.dtype == np.float32 and out.shape == as_uint8.shape
    assert corrupt(image.astype(np.float64), "contrast", 2).dtype == np.float64
