"""The jitted train step and the model's inference function."""

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from unetjax.inference.sliding_window import mirror_average
from unetjax.losses import segmentation_loss
from unetjax.training.state import TrainState


def make_train_step(model, tx: optax.GradientTransformation, *, batch_dice: bool) -> Callable:
    """``(state, batch) -> (state, metrics)``, jitted with the state donated.

    A non-finite loss or gradient leaves parameters and optimizer state unchanged and
    counts in ``state.nonfinite_steps``; the host stops training when it sees it.
    """

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        def loss_fn(params):
            outputs = model.apply({"params": params}, batch["image"])
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

    return jax.jit(step, donate_argnums=0)


def make_predict_fn(model, mirror_axes: Sequence[int] = ()) -> Callable:
    """Jitted ``(params, tiles [B, *patch, C]) -> logits [B, *patch, K]``.

    Uses the full-resolution head; with ``mirror_axes``, logits are averaged over all
    mirrorings (nnU-Net v2 TTA). Parameters are an argument, so new parameters (e.g. at
    each validation) reuse the compiled program.
    """

    def apply(params, tiles):
        out = model.apply({"params": params}, tiles)
        return out[0] if isinstance(out, tuple) else out

    @jax.jit
    def predict(params, tiles):
        return mirror_average(functools.partial(apply, params), tiles, mirror_axes)

    return predict
