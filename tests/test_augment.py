"""Host-side augmentation: config, spatial alignment, each intensity transform."""

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from unetjax.data.augment import (
    AugmentConfig,
    augment_intensity,
    augment_patch,
    mirror,
    required_box,
    resample_patch,
    sample_spatial_matrix,
)

OFF = {
    "p_rotation": 0.0,
    "p_scale": 0.0,
    "p_mirror": 0.0,
    "p_noise": 0.0,
    "p_brightness": 0.0,
    "p_contrast": 0.0,
    "p_gamma": 0.0,
    "p_gamma_inverted": 0.0,
}


def only(**kw) -> AugmentConfig:
    """A config with every transform off except the given ones."""
    return AugmentConfig(**{**OFF, **kw})


def _blobs(shape, seed=0, classes=2):
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=shape), sigma=3)
    label = np.zeros(shape, np.uint8)
    for k in range(1, classes):
        label[noise > np.quantile(noise, 1 - k / (classes + 1))] = k
    return label


def _image_from(label, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    base = label.astype(np.float32)[..., None] * np.array([1.0, 2.0, 3.0][:channels], np.float32)
    return base + rng.normal(0, 0.2, base.shape).astype(np.float32)


# ------------------------------------------------------------------------------ config


def test_config_defaults_are_nnunet():
    cfg = AugmentConfig()
    assert cfg.enabled and cfg.p_rotation == 0.2 and cfg.p_scale == 0.2
    assert cfg.scale_range == (0.7, 1.4) and cfg.p_mirror == 0.5
    assert cfg.p_noise == 0.1 and cfg.noise_variance == (0.0, 0.1)
    assert cfg.p_gamma == 0.3 and cfg.p_gamma_inverted == 0.1 and cfg.gamma_range == (0.7, 1.5)


def test_config_from_dict_and_configdict():
    import ml_collections

    cfg = AugmentConfig.from_config({"p_rotation": 0.5, "scale_range": [0.8, 1.2]})
    assert cfg.p_rotation == 0.5 and cfg.scale_range == (0.8, 1.2)
    cd = ml_collections.ConfigDict({"enabled": False, "mirror_axes": [0, 1]})
    cfg2 = AugmentConfig.from_config(cd)
    assert not cfg2.enabled and cfg2.mirror_axes == (0, 1)
    assert AugmentConfig.from_config(None) == AugmentConfig()
    assert AugmentConfig.from_config(cfg) is cfg
    assert AugmentConfig.from_config(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="p_rotaton"):
        AugmentConfig.from_config({"p_rotaton": 0.1})
    with pytest.raises(ValueError):
        AugmentConfig(p_noise=1.5)
    with pytest.raises(ValueError):
        AugmentConfig(scale_range=(1.4, 0.7))


def test_disabled_is_identity():
    label = _blobs((24, 20))
    image = _image_from(label)
    out_img, out_lbl = augment_patch(
        image, label, np.random.default_rng(0), AugmentConfig.disabled()
    )
    np.testing.assert_array_equal(out_img, image)
    np.testing.assert_array_equal(out_lbl, label)


# ----------------------------------------------------------------------------- spatial


@pytest.mark.parametrize("shape", [(48, 40), (24, 28, 20)])
def test_spatial_keeps_image_and_label_aligned(shape):
    """Image == label; after rotation+scaling the thresholded image matches the label."""
    label = _blobs(shape, seed=1, classes=2)
    image = label.astype(np.float32)[..., None]
    cfg = only(p_rotation=1.0, p_scale=1.0)
    for seed in range(4):
        rng = np.random.default_rng(seed)
        out_img, out_lbl = augment_patch(image, label, rng, cfg)
        assert out_img.shape == image.shape and out_lbl.shape == label.shape
        assert out_img.dtype == np.float32
        agree = ((out_img[..., 0] > 0.5) == (out_lbl > 0)).mean()
        assert agree > 0.97, agree
        # the transform really moved things
        assert (out_lbl != label).mean() > 0.02


def test_spatial_matrix_is_rotation_times_scale():
    cfg = only(p_rotation=1.0, p_scale=1.0)
    for ndim in (2, 3):
        m = sample_spatial_matrix(np.random.default_rng(3), cfg, ndim)
        s = np.abs(np.linalg.det(m)) ** (1 / ndim)
        assert 0.7 <= s <= 1.4
        np.testing.assert_allclose(m @ m.T / s**2, np.eye(ndim), atol=1e-9)
    assert sample_spatial_matrix(np.random.default_rng(3), only(), 2) is None


def test_resample_from_larger_region_matches_global_transform():
    """Reading just the required box gives the same result as resampling the whole image."""
    label = _blobs((60, 70), seed=2)
    image = _image_from(label, channels=2)
    origin, patch = np.array([20, 25]), (16, 20)
    m = sample_spatial_matrix(np.random.default_rng(5), only(p_rotation=1.0, p_scale=1.0), 2)
    lo, hi = required_box(origin, patch, m)
    assert (lo >= 0).all() and (hi <= np.array(label.shape)).all()
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    a_img, a_lbl = resample_patch(image[box], label[box], lo, origin, patch, m)
    b_img, b_lbl = resample_patch(image, label, np.zeros(2), origin, patch, m)
    np.testing.assert_allclose(a_img, b_img, atol=1e-5)
    np.testing.assert_array_equal(a_lbl, b_lbl)
    # identity matrix == plain crop
    c_img, c_lbl = resample_patch(image, label, np.zeros(2), origin, patch, np.eye(2))
    crop = tuple(slice(o, o + p) for o, p in zip(origin, patch, strict=True))
    np.testing.assert_allclose(c_img, image[crop], atol=1e-5)
    np.testing.assert_array_equal(c_lbl, label[crop])


def test_mirror_flips_image_and_label_together():
    label = _blobs((10, 12, 8))
    image = _image_from(label, channels=1)
    out_img, out_lbl = mirror(image, label, np.random.default_rng(0), only(p_mirror=1.0))
    np.testing.assert_array_equal(out_img, image[::-1, ::-1, ::-1])
    np.testing.assert_array_equal(out_lbl, label[::-1, ::-1, ::-1])
    cfg = dataclasses.replace(only(p_mirror=1.0), mirror_axes=(1,))
    out_img, out_lbl = mirror(image, label, np.random.default_rng(0), cfg)
    np.testing.assert_array_equal(out_lbl, label[:, ::-1])
    np.testing.assert_array_equal(out_img, image[:, ::-1])


# --------------------------------------------------------------------------- intensity


def _run_intensity(cfg, seed=0, shape=(32, 32), channels=3):
    label = _blobs(shape, seed=seed)
    image = _image_from(label, channels=channels, seed=seed)
    out_img, out_lbl = augment_patch(image, label, np.random.default_rng(seed), cfg)
    np.testing.assert_array_equal(out_lbl, label)  # intensity never touches the label
    assert out_img.dtype == np.float32 and out_img.shape == image.shape
    return image, out_img


def test_noise():
    image, out = _run_intensity(only(p_noise=1.0, noise_variance=(0.05, 0.1)))
    diff = out - image
    assert 0.2 < diff.std() < 0.33  # sqrt(0.05)..sqrt(0.1)
    assert abs(diff.mean()) < 0.02


def test_brightness_multiplies_each_channel():
    image, out = _run_intensity(only(p_brightness=1.0))
    ratio = out / image
    for c in range(3):
        r = ratio[..., c]
        assert np.allclose(r, r.flat[0], rtol=1e-5)
        assert 0.75 <= r.flat[0] <= 1.25 and r.flat[0] != 1.0


def test_contrast_preserves_mean_and_range():
    image, out = _run_intensity(only(p_contrast=1.0), seed=3)
    assert not np.allclose(out, image)
    for c in range(3):
        x, y = image[..., c], out[..., c]
        assert y.min() >= x.min() - 1e-5 and y.max() <= x.max() + 1e-5
        # mean moves only by the clipping, which is small
        assert abs(y.mean() - x.mean()) < 0.05 * x.std()


@pytest.mark.parametrize("key", ["p_gamma", "p_gamma_inverted"])
def test_gamma_retains_stats(key):
    image, out = _run_intensity(only(**{key: 1.0}), seed=4)
    assert not np.allclose(out, image, atol=1e-3)
    np.testing.assert_allclose(out.mean(axis=(0, 1)), image.mean(axis=(0, 1)), atol=1e-4)
    np.testing.assert_allclose(out.std(axis=(0, 1)), image.std(axis=(0, 1)), rtol=1e-3)


def test_inverted_gamma_differs_from_gamma():
    label = _blobs((32, 32))
    image = _image_from(label)
    # same draws (same seed, same gamma) but inverted vs not: different results
    a = augment_intensity(image, np.random.default_rng(7), only(p_gamma=1.0))
    b = augment_intensity(image, np.random.default_rng(7), only(p_gamma_inverted=1.0))
    assert not np.allclose(a, b, atol=1e-3)


def test_intensity_probabilities_are_respected():
    """p=0.15 brightness fires in about 15% of patches."""
    cfg = only(p_brightness=0.15)
    image = np.ones((4, 4, 1), np.float32)
    fired = sum(
        not np.array_equal(augment_intensity(image, np.random.default_rng(s), cfg), image)
        for s in range(2000)
    )
    assert 0.12 < fired / 2000 < 0.18


def test_augment_is_deterministic_per_generator_seed():
    label = _blobs((20, 24, 16))
    image = _image_from(label, channels=1)
    cfg = AugmentConfig(p_rotation=1.0, p_scale=1.0, p_noise=1.0, p_gamma=1.0)
    a = augment_patch(image, label, np.random.default_rng(11), cfg)
    b = augment_patch(image, label, np.random.default_rng(11), cfg)
    c = augment_patch(image, label, np.random.default_rng(12), cfg)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
