"""The train step: decoder dropout is trained with a key derived from (seed, step)."""

import jax
import numpy as np
import optax

from unetjax.models import UNet
from unetjax.training.state import create_train_state
from unetjax.training.step import make_train_step


def _params_after(seed: int, dropout_rate: float) -> list[np.ndarray]:
    model = UNet(2, (4, 8), [(1, 1), (2, 2)], [(3, 3)] * 2, dropout_rate=dropout_rate)
    tx = optax.sgd(0.1)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(2, 16, 16, 1)).astype(np.float32),
        "label": rng.integers(0, 2, (2, 16, 16)).astype(np.int32),
    }
    state = create_train_state(model, tx, jax.random.key(0), batch["image"][:1])
    step = make_train_step(model, tx, batch_dice=False, seed=seed)
    for _ in range(2):
        state, _ = step(state, batch)
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def test_dropout_masks_follow_the_seed():
    same = zip(_params_after(0, 0.5), _params_after(0, 0.5), strict=True)
    assert all(np.array_equal(a, b) for a, b in same)
    other = zip(_params_after(0, 0.5), _params_after(1, 0.5), strict=True)
    assert not all(np.array_equal(a, b) for a, b in other)
    # without dropout the seed changes nothing
    plain = zip(_params_after(0, 0.0), _params_after(1, 0.0), strict=True)
    assert all(np.array_equal(a, b) for a, b in plain)
