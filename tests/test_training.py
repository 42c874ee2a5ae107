"""End-to-end training on real data: smoke run, exact resume, NaN stop, eval outputs."""

import csv
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from unetjax.config import default_config
from unetjax.data.augment import AugmentConfig
from unetjax.data.pipeline import make_train_loader
from unetjax.evaluation import evaluate_workdir
from unetjax.experiment import build_experiment
from unetjax.training.loop import NonFiniteLossError, train_and_evaluate
from unetjax.training.state import init_train_state, make_optimizer
from unetjax.training.step import make_train_step

NUM_CASES = 12


@pytest.fixture(scope="module")
def small_nuclei(nuclei_dir, tmp_path_factory) -> pathlib.Path:
    """The first 12 bundled nuclei pairs (mixed sizes, RGB) in their own folder."""
    root = tmp_path_factory.mktemp("nuclei_small")
    for sub in ("images", "masks"):
        (root / sub).mkdir()
        for path in sorted((nuclei_dir / sub).glob("*.png"))[:NUM_CASES]:
            shutil.copy(path, root / sub / path.name)
    return root


@pytest.fixture()
def tiny_config(small_nuclei, tmp_path_factory):
    c = default_config()
    c.data.path = str(small_nuclei)
    c.data.store_dir = str(tmp_path_factory.getbasetemp() / "nuclei_small_store")
    c.data.patch_size = (32, 32)
    c.data.num_threads = 1
    c.mesh.data = 1  # one of the 8 fake test devices
    c.data.test_fraction = 0.25
    c.data.val_fraction = 0.2
    c.model.base_features = 4
    c.model.max_features = 8
    c.model.num_stages = 3
    c.train.batch_size = 2
    c.train.num_steps = 4
    c.train.optimizer = "adamw"
    c.train.learning_rate = 1e-3
    c.train.schedule = "cosine"
    c.train.log_every = 1
    c.train.eval_every = 2
    c.train.checkpoint_every = 2
    c.eval.batch_size = 4
    return c


def _params(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


def test_resume_is_exact(tiny_config, tmp_path):
    straight = train_and_evaluate(tiny_config, tmp_path / "straight")
    first = train_and_evaluate(tiny_config, tmp_path / "resumed", stop_at=2)
    assert first["state"].step == 2
    resumed = train_and_evaluate(tiny_config, tmp_path / "resumed")
    assert resumed["start_step"] == 2
    assert int(resumed["state"].step) == int(straight["state"].step) == 4
    for a, b in zip(_params(straight["state"]), _params(resumed["state"]), strict=True):
        np.testing.assert_array_equal(a, b)

    # the same losses were logged for steps 3-4 in both runs
    def losses(workdir):
        rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r and r["step"] > 2}

    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")


def test_eval_outputs(tiny_config, tmp_path, small_nuclei):
    workdir = tmp_path / "run"
    train_and_evaluate(tiny_config, workdir)
    result = evaluate_workdir(workdir, "test")
    out = pathlib.Path(result["out_dir"])
    split = json.loads((workdir / "split.json").read_text())
    test_ids = split["test"]
    assert result["num_scored"] == len(test_ids) > 0
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["case"] for r in rows) == sorted(test_ids)  # one row per case and class
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_cases"] == len(test_ids)
    assert 0.0 <= summary["metrics"]["1"]["dice"]["mean"] <= 1.0
    for case_id in test_ids:
        pred = np.asarray(Image.open(out / "predictions" / f"{case_id}.png"))
        source = Image.open(small_nuclei / "images" / f"{case_id}.png")
        assert pred.shape == source.size[::-1]
        assert set(np.unique(pred)) <= {0, 1}
        assert (out / "overlays" / f"{case_id}.png").exists()
    # a folder of images alone just gets predictions
    images_only = tmp_path / "unlabelled"
    shutil.copytree(small_nuclei / "images", images_only / "images")
    result = evaluate_workdir(workdir, data_dir=str(images_only))
    assert result["num_scored"] == 0 and result["num_cases"] == NUM_CASES
    assert len(list((pathlib.Path(result["out_dir"]) / "predictions").glob("*.png"))) == NUM_CASES


def test_nonfinite_loss_stops_and_keeps_checkpoint(tiny_config, tmp_path):
    workdir = tmp_path / "nan"
    train_and_evaluate(tiny_config, workdir, stop_at=2)
    saved = sorted(p.name for p in (workdir / "checkpoints" / "latest").iterdir())
    tiny_config.train.learning_rate = 1e30  # parameters blow up -> the next loss is NaN
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        train_and_evaluate(tiny_config, workdir)
    after = sorted(p.name for p in (workdir / "checkpoints" / "latest").iterdir())
    assert saved == after == ["2"]


def test_step_compiles_once(tiny_config, tmp_path):
    exp = build_experiment(tiny_config, tmp_path)
    tx = make_optimizer(tiny_config.train)
    state = init_train_state(exp, tx)
    step = make_train_step(exp.model, tx, batch_dice=False)
    loader = make_train_loader(
        exp.dataset,
        exp.split["train"],
        patch_size=exp.patch_size,
        batch_size=2,
        seed=0,
        augment=AugmentConfig(),
        num_threads=1,
    )
    for _ in range(3):
        state, metrics = step(state, next(loader))
    loader.close()
    assert np.isfinite(float(metrics["loss"]))
    assert step._cache_size() == 1


def test_unknown_config_key_is_an_error(tiny_config):
    with pytest.raises(AttributeError, match="lr_rate"):
        tiny_config.train.lr_rate = 1.0
    repo = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(repo / "train.py"), "--config.train.lr_rate=1", "--workdir=/dev/null"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "lr_rate" in proc.stderr
