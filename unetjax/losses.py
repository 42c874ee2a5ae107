"""nnU-Net's training loss: cross-entropy + soft Dice (1:1), with deep supervision.

Soft Dice per class c over the spatial axes (and the batch axis with ``batch_dice``):
``(2 * tp + smooth) / (2 * tp + fp + fn + smooth)`` on softmax probabilities, smooth 1e-5,
background excluded, averaged over classes (and samples). The loss is
``CE + (1 - Dice)``: nnU-Net adds ``-Dice``; the constant 1 keeps the value >= 0 and
changes no gradient.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def cross_entropy(logits: jnp.ndarray, onehot: jnp.ndarray) -> jnp.ndarray:
    """Mean pixel-wise softmax cross-entropy (one-hot form: compiles fast on XLA CPU)."""
    return -(onehot * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)).sum(-1).mean()


def soft_dice(
    logits: jnp.ndarray, onehot: jnp.ndarray, *, batch_dice: bool = False, smooth: float = 1e-5
) -> jnp.ndarray:
    """Mean soft Dice over foreground classes (background, class 0, excluded)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1:]
    target = onehot[..., 1:]
    axes = tuple(range(0 if batch_dice else 1, logits.ndim - 1))
    tp = (probs * target).sum(axes)
    fp = (probs * (1 - target)).sum(axes)
    fn = ((1 - probs) * target).sum(axes)
    dice = (2 * tp + smooth) / jnp.clip(2 * tp + fp + fn + smooth, 1e-8)
    return dice.mean()


def dice_ce_loss(logits: jnp.ndarray, labels: jnp.ndarray, *, batch_dice: bool = False):
    """CE + (1 - soft Dice) for logits ``[B, *S, K]`` and integer labels ``[B, *S]``."""
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    return cross_entropy(logits, onehot) + 1.0 - soft_dice(logits, onehot, batch_dice=batch_dice)


def deep_supervision_weights(num_outputs: int) -> np.ndarray:
    """nnU-Net's weights: 1/2^i for output i (full resolution first), normalised to sum 1."""
    w = np.array([1 / 2**i for i in range(num_outputs)], np.float32)
    return w / w.sum()


def downsample_labels(labels: jnp.ndarray, shape: Sequence[int]) -> jnp.ndarray:
    """Nearest-neighbour label downsampling by integer factors (strided slicing)."""
    factors = [s // t for s, t in zip(labels.shape[1:], shape, strict=True)]
    return labels[(slice(None), *(slice(None, None, f) for f in factors))]


def segmentation_loss(outputs, labels: jnp.ndarray, *, batch_dice: bool = False) -> jnp.ndarray:
    """Dice+CE on one logits array, or the weighted sum over deep-supervision outputs."""
    if not isinstance(outputs, tuple | list):
        return dice_ce_loss(outputs, labels, batch_dice=batch_dice)
    weights = deep_supervision_weights(len(outputs))
    total = 0.0
    for w, logits in zip(weights, outputs, strict=True):
        target = downsample_labels(labels, logits.shape[1:-1])
        total = total + w * dice_ce_loss(logits, target, batch_dice=batch_dice)
    return total
