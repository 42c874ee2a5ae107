"""The jitted train step and the model's inference function."""

import functools
import logging
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from unetjax.inference.sliding_window import mirror_average
from unetjax.losses import segmentation_loss
from unetjax.training.state import TrainState

log = logging.getLogger("unetjax")

# XLA:CPU runs convolutions through YNNPACK by default. A 3D train step (its convs are
# depth-folded 2D convs, ``layers.conv3d_depth_folded``) is ~8% faster with Eigen's
# convolutions instead: YNNPACK's weight gradients of the narrow full-resolution layers are
# slow. 2D steps and inference (forward only) are faster with YNNPACK's, so they keep it.
# This list keeps YNNPACK for reductions and dots (``benchmarks/train_step_xla_options.py``).
CPU_3D_TRAIN_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def train_step_compiler_options(ndim: int) -> dict:
    """XLA compile options for the train step of an ``ndim``-D U-Net on this backend."""
    if ndim == 3 and jax.default_backend() == "cpu":
        return dict(CPU_3D_TRAIN_OPTIONS)
    return {}


def compile_train_step(lowered, ndim: int):
    """Compile a lowered ``ndim``-D train step with :func:`train_step_compiler_options`;
    an XLA that lacks an option compiles with its defaults."""
    options = train_step_compiler_options(ndim)
    if options:
        try:
            return lowered.compile(compiler_options=options)
        except jax.errors.JaxRuntimeError as e:
            log.warning("XLA options %s not taken (%s); compiling with defaults", options, e)
    return lowered.compile()


def make_train_step(
    model,
    tx: optax.GradientTransformation,
    *,
    batch_dice: bool,
    seed: int = 0,
    state_sharding=None,
    batch_sharding=None,
) -> Callable:
    """``(state, batch) -> (state, metrics)``, jitted with the state donated.

    With shardings (``unetjax.sharding``) the step is compiled for the mesh: the batch
    sharded as given, the state as given, metrics replicated. Without, plain ``jax.jit``.

    The step's PRNG key (decoder dropout) is ``fold_in(key(seed), step)``, so a resumed
    run draws the same masks. A non-finite loss or gradient leaves parameters and
    optimizer state unchanged and counts in ``state.nonfinite_steps``; the host stops
    training when it sees it.
    """

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.key(seed), state.step)

        def loss_fn(params):
            outputs = model.apply(
                {"params": params}, batch["image"], train=True, rngs={"dropout": key}
            )
            return segmentation_loss(outputs, batch["label"], batch_dice=batch_dice)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new_state = state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "nonfinite_steps": new_state.nonfinite_steps,
        }
        return new_state, metrics

    if state_sharding is None:
        return jax.jit(step, donate_argnums=0)
    batch_shardings = {"image": batch_sharding, "label": batch_sharding}
    metrics_sharding = NamedSharding(batch_sharding.mesh, P())
    return jax.jit(
        step,
        in_shardings=(state_sharding, batch_shardings),
        out_shardings=(state_sharding, metrics_sharding),
        donate_argnums=0,
    )


def make_predict_fn(model, mirror_axes: Sequence[int] = (), mesh=None) -> Callable:
    """Jitted ``(params, tiles [B, *patch, C]) -> logits [B, *patch, K]`` (host numpy in).

    Uses the full-resolution head; with ``mirror_axes``, logits are averaged over all
    mirrorings (nnU-Net v2 TTA). Parameters are an argument, so new parameters (e.g. at
    each validation) reuse the compiled program. With a ``mesh``, tiles are sharded over
    its ``data`` axis where the batch divides evenly, and the logits come back replicated
    (every process holds them).
    """

    def apply(params, tiles):
        out = model.apply({"params": params}, tiles)
        out = out[0] if isinstance(out, tuple) else out
        return out

    def predict(params, tiles):
        return mirror_average(functools.partial(apply, params), tiles, mirror_axes)

    if mesh is None:
        return jax.jit(predict)
    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(predict, out_shardings=replicated)

    def sharded_predict(params, tiles):
        divisible = tiles.shape[0] % mesh.shape["data"] == 0
        tiles = jax.device_put(tiles, NamedSharding(mesh, P("data")) if divisible else replicated)
        return jitted(params, tiles)

    return sharded_predict
