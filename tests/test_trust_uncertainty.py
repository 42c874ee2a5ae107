"""UNet decoder dropout, TTA / MC-dropout uncertainty maps, blending, and a trained model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import random_params
from PIL import Image
from scipy import ndimage

from unetjax.inference.sliding_window import sliding_window_predict
from unetjax.models import UNet
from unetjax.trust.corruptions import corrupt
from unetjax.trust.uncertainty import (
    _warp,
    case_uncertainty,
    make_uncertainty_fn,
    sliding_window_uncertainty,
)

ARGS = (2, (4, 8), [(1, 1), (2, 2)], [(3, 3)] * 2)
MODEL = UNet(*ARGS)
DROPOUT_MODEL = UNet(*ARGS, dropout_rate=0.3)
TILES = np.random.default_rng(0).normal(size=(2, 16, 16, 1)).astype(np.float32)



@pytest.fixture(scope="module")
def params():
    return random_params(MODEL, TILES)


@pytest.fixture(scope="module")
def apply():
    return jax.jit(lambda p, x: MODEL.apply({"params": p}, x))


def test_dropout_rate_zero_leaves_params_and_outputs_unchanged(params, apply):
    key = jax.random.key(0)
    ref_tree = jax.eval_shape(MODEL.init, key, TILES)
    for rate in (0.0, 0.3):  # same collections, names, shapes and dtypes
        assert jax.eval_shape(UNet(*ARGS, dropout_rate=rate).init, key, TILES) == ref_tree
    # bit-identical outputs (jit vs jit: eager and jitted XLA programs may round differently)
    zero = UNet(*ARGS, dropout_rate=0.0)
    ref = np.asarray(apply(params, TILES))
    for model, train in ((zero, True), (DROPOUT_MODEL, False)):
        out = jax.jit(lambda p, m=model, t=train: m.apply({"params": p}, TILES, train=t))(params)
        np.testing.assert_array_equal(np.asarray(out), ref)
    with pytest.raises(Exception, match="dropout"):  # train=True needs a "dropout" rng
        DROPOUT_MODEL.apply({"params": params}, TILES, train=True)
    with pytest.raises(ValueError, match="dropout_rate"):
        UNet(*ARGS, dropout_rate=1.0).init(jax.random.key(0), TILES)


def test_identity_tta_gives_zero_variance_and_mutual_information(params, apply):
    fn = make_uncertainty_fn(MODEL, "tta", 3, mirror_axes=())  # three identical samples
    out = fn(params, TILES, jax.random.key(1))
    probs = jax.nn.softmax(apply(params, TILES), axis=-1)
    np.testing.assert_allclose(np.asarray(out["probs"]), np.asarray(probs), atol=1e-6)
    assert float(out["mutual_info"].max()) < 1e-6
    assert float(out["variance"].max()) < 1e-10
    np.testing.assert_allclose(out["entropy"], out["expected_entropy"], atol=1e-6)
    assert out["entropy"].shape == (2, 16, 16) and out["variance"].shape == (2, 16, 16, 2)


def test_mirror_tta_averages_the_flipped_predictions(params, apply):
    out = make_uncertainty_fn(MODEL, "tta")(params, TILES, jax.random.key(1))
    samples = []
    for axes in [(), (1,), (2,), (1, 2)]:
        logits = np.flip(np.asarray(apply(params, np.flip(TILES, axes))), axes)
        samples.append(jax.nn.softmax(logits, axis=-1))
    np.testing.assert_allclose(out["probs"], np.mean(samples, axis=0), atol=1e-5)
    np.testing.assert_allclose(out["variance"], np.var(samples, axis=0), atol=1e-5)
    assert float(out["mutual_info"].mean()) > 1e-4  # an untrained net is not flip-invariant


def test_mc_dropout(params):
    zero = make_uncertainty_fn(UNet(*ARGS, dropout_rate=0.0), "mc_dropout", 4)
    out = zero(params, TILES, jax.random.key(2))
    assert float(out["mutual_info"].max()) < 1e-6 and float(out["variance"].max()) < 1e-10

    fn = make_uncertainty_fn(DROPOUT_MODEL, "mc_dropout", 4)
    a, b = fn(params, TILES, jax.random.key(2)), fn(params, TILES, jax.random.key(2))
    c = fn(params, TILES, jax.random.key(3))
    np.testing.assert_array_equal(a["mutual_info"], b["mutual_info"])
    assert not np.array_equal(a["mutual_info"], c["mutual_info"])
    assert float(a["mutual_info"].mean()) > 1e-3 and float(a["variance"].max()) > 1e-3
    assert float(a["mutual_info"].min()) >= 0.0
    np.testing.assert_allclose(a["probs"].sum(-1), 1.0, atol=1e-5)


def test_affine_warp_and_affine_tta(params):
    x = jnp.asarray(ndimage.gaussian_filter(TILES, (0, 2, 2, 0)))
    warp = jax.jit(_warp)
    np.testing.assert_array_equal(np.asarray(warp(x, jnp.eye(2))), np.asarray(x))
    matrix = jnp.array([[1.05, 0.05], [-0.04, 0.97]])
    back = warp(warp(x, matrix), jnp.linalg.inv(matrix))
    inner = (slice(None), slice(4, 12), slice(4, 12))
    np.testing.assert_allclose(np.asarray(back)[inner], np.asarray(x)[inner], atol=0.05)

    fn = make_uncertainty_fn(MODEL, "tta", 3, mirror_axes=(), affine=0.1)
    a, b = fn(params, TILES, jax.random.key(6)), fn(params, TILES, jax.random.key(6))
    np.testing.assert_array_equal(a["entropy"], b["entropy"])
    assert a["probs"].shape == (2, 16, 16, 2) and float(a["mutual_info"].mean()) > 1e-4


def test_sliding_window_blending(params, apply):
    fn = make_uncertainty_fn(MODEL, "tta", 1, mirror_axes=())
    key = jax.random.key(4)
    one = sliding_window_uncertainty(TILES[0], fn, params, key, (16, 16), 2, batch_size=2)
    tile = fn(params, TILES, jax.random.fold_in(key, 0))
    for name in one:  # a single window: the blend returns the tile's maps
        np.testing.assert_allclose(one[name], np.asarray(tile[name])[0], atol=1e-5)

    image = np.random.default_rng(5).normal(size=(20, 30, 1)).astype(np.float32)
    maps = sliding_window_uncertainty(image, fn, params, key, (16, 16), 2, batch_size=2)
    ref = sliding_window_predict(image, lambda t: apply(params, t), (16, 16), 2, batch_size=2)
    np.testing.assert_allclose(maps["probs"], ref, atol=1e-5)  # same blending as predictions
    assert maps["entropy"].shape == (20, 30) and maps["variance"].shape == (20, 30, 2)
    assert maps["mutual_info"].min() >= 0 and maps["entropy"].max() <= np.log(2) + 1e-6

    scores = case_uncertainty(maps)
    fg = maps["probs"].argmax(-1) != 0
    assert scores["foreground_voxels"] == int(fg.sum())
    assert scores["mean_entropy"] == pytest.approx(float(maps["entropy"].mean()), rel=1e-5)
    empty = case_uncertainty(
        {**maps, "probs": np.stack([np.ones((20, 30)), np.zeros((20, 30))], -1)}
    )
    assert np.isnan(empty["foreground_entropy"]) and empty["score"] == empty["mean_entropy"]


def _nuclei(nuclei_dir, count=16):
    """First ``count`` bundled images: top-left 128x128, 2x2-averaged to 64x64, grey, z-scored."""
    images, labels = [], []
    for i in range(count):
        image = np.asarray(Image.open(nuclei_dir / "images" / f"{i:03d}.png").convert("L"))
        mask = np.asarray(Image.open(nuclei_dir / "masks" / f"{i:03d}.png"))
        image = image[:128, :128].astype(np.float32).reshape(64, 2, 64, 2).mean((1, 3))
        mask = mask[:128, :128].astype(np.float32).reshape(64, 2, 64, 2).mean((1, 3)) > 0.5
        images.append(((image - image.mean()) / max(image.std(), 1e-6))[..., None])
        labels.append(mask.astype(np.int32))
    return np.stack(images), np.stack(labels)


def test_entropy_rises_on_corrupted_inputs_of_a_trained_model(nuclei_dir):
    images, labels = _nuclei(nuclei_dir)
    model = UNet(2, (8, 16), [(1, 1), (2, 2)], [(3, 3)] * 2)
    params = random_params(model, images[:1])
    tx = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    rng = np.random.default_rng(0)
    for _ in range(150):
        idx = rng.choice(len(images), 4, replace=False)
        params, opt_state = step(params, opt_state, images[idx], labels[idx])

    fn = make_uncertainty_fn(model, "tta")  # 4 mirrorings
    key = jax.random.key(0)
    clean = fn(params, images, key)
    assert float((clean["probs"].argmax(-1) == labels).mean()) > 0.9  # it did learn
    clean_entropy = float(clean["entropy"].mean())
    for name in ("gaussian_blur", "motion_ghosting", "low_resolution"):
        corrupted = np.stack([corrupt(x, name, 5, seed=i) for i, x in enumerate(images)])
        entropy = float(fn(params, corrupted, key)["entropy"].mean())
        assert entropy > 1.1 * clean_entropy, (name, entropy, clean_entropy)
