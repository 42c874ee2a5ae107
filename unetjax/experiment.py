"""What training and evaluation share: the dataset, the split, the patch and the model."""

import dataclasses
import json
import pathlib

import jax.numpy as jnp
import ml_collections

from unetjax.data.normalize import foreground_intensity_stats, normalize
from unetjax.data.pipeline import check_patch_size, default_patch_size
from unetjax.data.splits import resolve_split
from unetjax.data.store import Dataset, open_dataset
from unetjax.models import UNet, check_input_size
from unetjax.planning import resolve_model_config

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def resolve_data_path(path: str) -> pathlib.Path:
    """A path as given, else relative to the repository (bundled data, split files)."""
    candidate = pathlib.Path(path).expanduser()
    if not candidate.exists() and not candidate.is_absolute() and (REPO_ROOT / path).exists():
        return REPO_ROOT / path
    return candidate


def open_config_dataset(data_cfg, path: str | None = None) -> Dataset:
    """Open (ingesting on first use) the dataset at ``path`` or ``data_cfg.path``."""
    return open_dataset(
        resolve_data_path(path or data_cfg.path),
        data_cfg.store_dir or None,
        num_classes=data_cfg.num_classes or None,
        label_map=dict(data_cfg.label_map) if data_cfg.label_map else None,
        spacing_2d=tuple(data_cfg.spacing_2d) if data_cfg.spacing_2d else None,
    )


@dataclasses.dataclass
class Experiment:
    """A config resolved against its data: everything needed to build the step or predict."""

    config: ml_collections.ConfigDict
    dataset: Dataset
    split: dict
    patch_size: tuple[int, ...]
    model: UNet
    model_kwargs: dict
    ct_stats: dict | None

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def in_channels(self) -> int:
        return self.dataset.manifest.channels

    def normalize(self, image, case_id: str, dataset: Dataset | None = None):
        """Normalise a raw image of ``case_id`` the way training does."""
        info = (dataset or self.dataset).manifest.case(case_id)
        return normalize(image, info, self.config.data.normalization, ct_stats=self.ct_stats)

    def plan(self) -> dict:
        """The resolved plan (written to ``workdir/plan.json``)."""
        m = self.dataset.manifest
        return {
            "ndim": m.ndim,
            "channels": m.channels,
            "num_classes": self.num_classes,
            "patch_size": list(self.patch_size),
            "median_shape": list(m.median_shape),
            "median_spacing": list(m.median_spacing),
            "model": {
                k: (list(v) if isinstance(v, tuple) else v) for k, v in self.model_kwargs.items()
            },
            "ct_stats": self.ct_stats,
            "split_sizes": {k: len(v) for k, v in self.split.items()},
        }


def build_experiment(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> Experiment:
    """Open the data, resolve the split, the patch size and the model; validate all of it."""
    data_cfg = config.data
    dataset = open_config_dataset(data_cfg)
    manifest = dataset.manifest
    split = resolve_split(
        workdir,
        manifest.case_ids,
        {
            "split_file": str(resolve_data_path(data_cfg.split_file))
            if data_cfg.split_file
            else "",
            "seed": data_cfg.split_seed,
            "val_fraction": data_cfg.val_fraction,
            "test_fraction": data_cfg.test_fraction,
            "num_train": data_cfg.num_train,
        },
    )
    if data_cfg.patch_size:
        patch = tuple(int(p) for p in data_cfg.patch_size)
    else:
        patch = tuple(default_patch_size(manifest, data_cfg.max_patch_voxels, divisor=16))
    if len(patch) != manifest.ndim:
        raise ValueError(
            f"data.patch_size {patch} has {len(patch)} axes; the data has {manifest.ndim}"
        )
    check_patch_size(manifest, patch, split["train"])
    model_kwargs = resolve_model_config(config.model, patch, manifest.median_spacing)
    check_input_size(patch, model_kwargs["strides"])
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(config.model.dtype)
    if dtype is None:
        raise ValueError(f"model.dtype must be float32 or bfloat16, got {config.model.dtype!r}")
    model = UNet(num_classes=manifest.num_classes, dtype=dtype, **model_kwargs)
    ct_stats = None
    if data_cfg.normalization == "ct":
        ct_stats = foreground_intensity_stats(dataset, split["train"])
    return Experiment(config, dataset, split, patch, model, model_kwargs, ct_stats)


def save_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """Write ``workdir/config.json`` (read back by eval.py)."""
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def load_config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
    """The config a workdir was trained with (``workdir/config.json``)."""
    path = workdir / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a unetjax training workdir?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))
