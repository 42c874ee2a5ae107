"""Dice+CE loss on cases with known answers."""

import jax.numpy as jnp
import numpy as np
import pytest

from unetjax.losses import (
    deep_supervision_weights,
    dice_ce_loss,
    downsample_labels,
    segmentation_loss,
    soft_dice,
)

BIG = 30.0  # logits this far apart give softmax probabilities of 1 - 1e-13


def _logits_for(labels, k):
    return jnp.asarray(np.eye(k)[labels] * BIG, jnp.float32)


def test_perfect_prediction_has_zero_loss():
    labels = np.zeros((2, 8, 8), int)
    labels[:, 2:5, 2:6] = 1
    labels[1, 6:, 6:] = 2
    loss = dice_ce_loss(_logits_for(labels, 3), jnp.asarray(labels))
    assert float(loss) == pytest.approx(0.0, abs=1e-5)


def test_soft_dice_of_half_overlap_and_background_excluded():
    target = np.zeros((1, 4, 4), int)
    target[0, :2] = 1  # 8 pixels of class 1
    pred = np.zeros((1, 4, 4), int)
    pred[0, 1:3] = 1  # 4 of them overlap the target
    onehot = jnp.asarray(np.eye(2)[target], jnp.float32)
    dice = soft_dice(_logits_for(pred, 2), onehot)
    # hard probabilities: tp=4, fp=4, fn=4 -> 8/16; background (also 0.5) is not averaged in
    assert float(dice) == pytest.approx(0.5, abs=1e-5)
    pred[0, 2:] = 1  # 4 more false positives: class-1 Dice 8/20, background's is not counted
    dice_bg_changed = soft_dice(_logits_for(pred, 2), onehot)
    assert float(dice_bg_changed) == pytest.approx(2 * 4 / (8 + 12), abs=1e-5)


def test_batch_dice_pools_samples():
    target = np.zeros((2, 4, 4), int)
    target[0, :2] = 1  # sample 0 has foreground; sample 1 is empty
    pred = target.copy()
    pred[1, 0, 0] = 1  # one false positive in the empty sample
    onehot = jnp.asarray(np.eye(2)[target], jnp.float32)
    per_sample = float(soft_dice(_logits_for(pred, 2), onehot))
    pooled = float(soft_dice(_logits_for(pred, 2), onehot, batch_dice=True))
    assert per_sample == pytest.approx(0.5, abs=1e-4)  # (1 + ~0) / 2
    assert pooled == pytest.approx(16 / 17, abs=1e-4)


def test_cross_entropy_of_uniform_logits_is_log_k():
    labels = jnp.zeros((1, 4, 4), jnp.int32)
    loss = dice_ce_loss(jnp.zeros((1, 4, 4, 3)), labels)
    # classes 1-2 are absent: tp = fn = 0, fp = 16/3 -> Dice = smooth / (fp + smooth) ~ 0
    assert float(loss) == pytest.approx(np.log(3) + 1, abs=1e-4)


def test_deep_supervision_weights_and_targets():
    np.testing.assert_allclose(deep_supervision_weights(3), np.array([4, 2, 1]) / 7)
    labels = jnp.arange(64).reshape(1, 8, 8)
    np.testing.assert_array_equal(downsample_labels(labels, (4, 2)), labels[:, ::2, ::4])
    full = np.zeros((1, 8, 8), int)
    full[0, :4, :4] = 1
    outputs = (_logits_for(full, 2), _logits_for(full[:, ::2, ::2], 2))
    assert float(segmentation_loss(outputs, jnp.asarray(full))) == pytest.approx(0, abs=1e-5)
    wrong = (outputs[0], _logits_for(1 - full[:, ::2, ::2], 2))
    expected = deep_supervision_weights(2)[1] * float(
        dice_ce_loss(wrong[1], jnp.asarray(full[:, ::2, ::2]))
    )
    assert float(segmentation_loss(wrong, jnp.asarray(full))) == pytest.approx(expected, rel=1e-5)
