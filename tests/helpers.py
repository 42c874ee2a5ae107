"""Helpers shared by several test modules."""

import jax
import jax.numpy as jnp
import numpy as np


def random_params(model, x, seed=0):
    """He-normal kernels, unit norm scales, zero biases: like ``model.init`` without paying
    for compiling its initialisers (seconds per model on a busy CPU)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if "kernel" in name:
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(scale=np.sqrt(2 / fan_in), size=leaf.shape), leaf.dtype)
        return jnp.ones(leaf.shape, leaf.dtype) if "scale" in name else jnp.zeros_like(leaf)

    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    return jax.tree_util.tree_map_with_path(fill, shapes)
