"""The train step: decoder dropout is trained with a key derived from (seed, step); its
compile options per backend and dimensionality keep the maths."""

import re

import jax
import numpy as np
import optax
import pytest

from unetjax.models import UNet
from unetjax.training.state import create_train_state
from unetjax.training.step import (
    CPU_3D_TRAIN_OPTIONS,
    compile_train_step,
    make_train_step,
    train_step_compiler_options,
)


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


def _ynn_convolutions(hlo: str) -> int:
    """How many fused computations in ``hlo`` run a convolution inside a YNNPACK fusion."""
    fused = set(re.findall(r"calls=%([\w.\-]+), backend_config=\{[^\n]*__ynn_fusion", hlo))
    bodies = re.findall(r"^%([\w.\-]+) .*?\{\n(.*?)^\}", hlo, re.M | re.S)
    return sum(" convolution(" in body for name, body in bodies if name in fused)


@pytest.mark.parametrize("ndim", [2, 3])
def test_compiled_train_step_options_keep_the_maths(ndim):
    """On CPU the 3D step compiles with Eigen's convolutions (``CPU_3D_TRAIN_OPTIONS``), the
    2D step with XLA's defaults; either way one step gives the default program's numbers."""
    spatial = (8, 8, 8) if ndim == 3 else (16, 16)
    model = UNet(3, (4, 8), [(1,) * ndim, (2,) * ndim], [(3,) * ndim] * 2)
    tx = optax.adam(1e-2)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(2, *spatial, 1)).astype(np.float32),
        "label": rng.integers(0, 3, (2, *spatial)).astype(np.int32),
    }
    state = create_train_state(model, tx, jax.random.key(0), batch["image"][:1])
    step = make_train_step(model, tx, batch_dice=False)
    lowered = step.lower(state, batch)
    default = lowered.compile()
    chosen = compile_train_step(lowered, ndim)
    expect_options = ndim == 3 and jax.default_backend() == "cpu"
    assert train_step_compiler_options(ndim) == (CPU_3D_TRAIN_OPTIONS if expect_options else {})
    if expect_options and _ynn_convolutions(default.as_text()):  # this XLA uses YNNPACK
        assert _ynn_convolutions(chosen.as_text()) == 0
    copy = jax.tree.map(np.array, state)  # the steps donate their state
    new_default, metrics_default = default(state, batch)
    new_chosen, metrics_chosen = chosen(jax.tree.map(jax.numpy.asarray, copy), batch)
    np.testing.assert_allclose(metrics_chosen["loss"], metrics_default["loss"], rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves(new_chosen.params), jax.tree.leaves(new_default.params), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
