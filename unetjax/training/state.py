"""The train state pytree and the optimizer presets."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax


class TrainState(flax.struct.PyTreeNode):
    """Everything a train step changes. The PRNG key is derived: ``fold_in(seed, step)``."""

    step: jnp.ndarray
    params: Any
    opt_state: Any
    nonfinite_steps: jnp.ndarray  # updates skipped for a NaN/Inf loss or gradient


def learning_rate_schedule(cfg) -> optax.Schedule:
    """poly (nnU-Net: ``lr * (1 - t/T)^0.9``), cosine or constant, with linear warm-up."""
    total, warm, lr = cfg.num_steps, cfg.warmup_steps, cfg.learning_rate
    if cfg.schedule == "poly":
        main = optax.polynomial_schedule(lr, 0.0, 0.9, max(total - warm, 1))
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, max(total - warm, 1))
    elif cfg.schedule == "constant":
        main = optax.constant_schedule(lr)
    else:
        raise ValueError(f"train.schedule must be poly, cosine or constant; got {cfg.schedule!r}")
    if warm <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])


def make_optimizer(cfg) -> optax.GradientTransformation:
    """``sgd_nesterov`` (nnU-Net: momentum 0.99, weight decay 3e-5) or ``adamw``."""
    schedule = learning_rate_schedule(cfg)
    if cfg.optimizer == "sgd_nesterov":
        core = optax.chain(
            optax.add_decayed_weights(cfg.weight_decay),
            optax.sgd(schedule, momentum=cfg.momentum, nesterov=True),
        )
    elif cfg.optimizer == "adamw":
        core = optax.adamw(schedule, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"train.optimizer must be sgd_nesterov or adamw; got {cfg.optimizer!r}")
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), core)
    return core


def create_train_state(model, tx, rng: jax.Array, example: jnp.ndarray) -> TrainState:
    """Initialise parameters (float32) and optimizer state."""
    params = model.init(rng, example)["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        nonfinite_steps=jnp.zeros((), jnp.int32),
    )


def init_train_state(exp, tx: optax.GradientTransformation) -> TrainState:
    """A fresh train state for an ``Experiment``'s model, seeded by ``config.seed``."""
    example = np.zeros((1, *exp.patch_size, exp.in_channels), np.float32)
    return create_train_state(exp.model, tx, jax.random.key(exp.config.seed), example)
