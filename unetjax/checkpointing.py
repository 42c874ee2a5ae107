"""Checkpoints through orbax: the latest N, and the best by validation Dice.

Each checkpoint holds the train state and the data iterator state (JSON). Orbax writes
to a temporary directory and renames it when complete, so an interrupted save never
leaves a checkpoint that looks finished; restore goes into an abstract target, so arrays
come back with the target's shardings.
"""

import pathlib

import jax
import orbax.checkpoint as ocp


def _barriers(name: str) -> ocp.options.MultiprocessingOptions:
    """Orbax names its multi-process barriers by step (``async_write_complete.<step>``):
    without a prefix per manager, ``latest`` and ``best`` saving the same step wait on the
    same barrier, and one of them fails ("already ongoing") or hangs."""
    return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)


class Checkpointer:
    """``workdir/checkpoints/latest`` (max ``keep``) and ``workdir/checkpoints/best`` (1)."""

    def __init__(self, workdir: str | pathlib.Path, keep: int = 2):
        root = pathlib.Path(workdir).resolve() / "checkpoints"
        self.latest = ocp.CheckpointManager(
            root / "latest",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, multiprocessing_options=_barriers("latest")
            ),
        )
        self.best = ocp.CheckpointManager(
            root / "best",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1,
                best_fn=lambda m: m["val_dice"],
                best_mode="max",
                create=True,
                multiprocessing_options=_barriers("best"),
            ),
        )

    def save(self, step: int, state, data_state: dict, force: bool = False) -> None:
        """Save the full state (asynchronously) as the latest checkpoint."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
        )
        self.latest.save(step, args=args, force=force)

    def save_best(self, step: int, state, val_dice: float) -> None:
        """Keep this state if its validation Dice beats the best so far."""
        if step in self.best.all_steps():
            return
        args = ocp.args.Composite(state=ocp.args.StandardSave(state))
        self.best.save(step, args=args, metrics={"val_dice": float(val_dice)}, force=True)

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def restore_latest(self, abstract_state) -> tuple:
        """(state, data_state) of the latest checkpoint, into ``abstract_state``'s shardings."""
        step = self.latest.latest_step()
        restored = self.latest.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["data"]

    def restore_best(self, abstract_state):
        """The best-by-validation state; the latest one where no validation has run yet."""
        manager = self.best if self.best.latest_step() is not None else self.latest
        step = manager.best_step() if manager is self.best else manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {manager.directory}")
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        return restored["state"], step

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: a restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
