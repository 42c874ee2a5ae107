"""A trained workdir, restored for inference: its experiment, best parameters and the
dataset whose cases are predicted (the training data, or another folder)."""

from __future__ import annotations

import dataclasses
import os
import pathlib


@dataclasses.dataclass
class Trained:
    """A workdir's experiment, best parameters and the dataset whose cases are analysed."""

    workdir: pathlib.Path
    exp: object
    params: object
    step: int
    dataset: object

    @property
    def ndim(self) -> int:
        return self.dataset.manifest.ndim


def load_trained(workdir: str | os.PathLike, data_dir: str | None = None) -> Trained:
    """Restore the best checkpoint of ``workdir`` (optionally for another dataset folder,
    which must have the training data's dimensionality and channel count)."""
    from unetjax.checkpointing import Checkpointer, abstract_like
    from unetjax.experiment import build_experiment, load_config, open_config_dataset
    from unetjax.training.state import init_train_state, make_optimizer

    workdir = pathlib.Path(workdir)
    config = load_config(workdir)
    exp = build_experiment(config, workdir)
    dataset = exp.dataset
    if data_dir is not None:
        dataset = open_config_dataset(config.data, data_dir)
        m = dataset.manifest
        if m.ndim != exp.dataset.manifest.ndim or m.channels != exp.in_channels:
            raise ValueError(
                f"{data_dir}: {m.ndim}D with {m.channels} channels, but the model was trained "
                f"on {exp.dataset.manifest.ndim}D data with {exp.in_channels} channels"
            )
    checkpointer = Checkpointer(workdir)
    abstract = abstract_like(init_train_state(exp, make_optimizer(config.train)))
    state, step = checkpointer.restore_best(abstract)
    checkpointer.close()
    return Trained(workdir, exp, state.params, step, dataset)


def case_ids_for(t: Trained, split: str, data_dir: str | None) -> tuple[list[str], str]:
    """The cases to predict and the output folder's name: every case of ``data_dir``, or
    the ``split`` (test, val, train or all) of the training data."""
    if data_dir is not None:
        return list(t.dataset.manifest.case_ids), pathlib.Path(data_dir).name
    if split == "all":
        return list(t.dataset.manifest.case_ids), "all"
    if split in t.exp.split:
        return list(t.exp.split[split]), split
    raise ValueError(f"split must be test, val, train or all; got {split!r}")


def mesh_predictor(t: Trained, mirror_tta: bool | None = None):
    """The sliding-window tile predictor of ``t`` sharded over the config's mesh, the
    parameters replicated on it, and whether mirror TTA is on (``None``: the config's)."""
    import jax

    from unetjax.sharding import make_mesh, replicated
    from unetjax.training.step import make_predict_fn

    config = t.exp.config
    tta = config.eval.mirror_tta if mirror_tta is None else mirror_tta
    mesh = make_mesh(config.mesh, batch_size=config.eval.batch_size)
    predict = make_predict_fn(t.exp.model, tuple(range(t.ndim)) if tta else (), mesh=mesh)
    return predict, jax.device_put(t.params, replicated(mesh)), tta
