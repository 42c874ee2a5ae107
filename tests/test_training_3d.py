"""3D end to end on real MRI volumes: train briefly, evaluate, NIfTI outputs keep geometry."""

import json
import pathlib
import shutil

import nibabel as nib
import numpy as np
import pytest

from unetjax.config import default_config
from unetjax.evaluation import evaluate_workdir
from unetjax.training.loop import train_and_evaluate


@pytest.fixture(scope="module")
def small_hippocampus(hippocampus_dir, tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("hippo_small")
    (root / "volumes").mkdir()
    for path in sorted((hippocampus_dir / "volumes").glob("*.npz"))[:6]:
        shutil.copy(path, root / "volumes" / path.name)
    return root


def test_train_and_eval_3d(small_hippocampus, tmp_path):
    c = default_config()
    c.data.path = str(small_hippocampus)
    c.data.store_dir = str(tmp_path / "store")
    c.data.patch_size = (16, 16, 16)
    c.data.num_threads = 1
    c.mesh.data = 1  # one of the 8 fake test devices
    c.data.val_fraction = 0.2
    c.data.test_fraction = 0.2
    c.model.base_features = 4
    c.model.max_features = 8
    c.model.num_stages = 3
    c.train.batch_size = 2
    c.train.num_steps = 2
    c.train.eval_every = 2
    c.eval.batch_size = 4
    workdir = tmp_path / "run"
    summary = train_and_evaluate(c, workdir)
    assert int(summary["state"].step) == 2
    result = evaluate_workdir(workdir, "test")
    test_ids = json.loads((workdir / "split.json").read_text())["test"]
    assert result["num_scored"] == len(test_ids) > 0
    for case_id in test_ids:
        source = np.load(small_hippocampus / "volumes" / f"{case_id}.npz")
        pred = nib.load(pathlib.Path(result["out_dir"]) / "predictions" / f"{case_id}.nii.gz")
        assert pred.shape == source["image"].shape
        np.testing.assert_allclose(pred.affine, source["affine"])
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}
    summary = json.loads((pathlib.Path(result["out_dir"]) / "summary.json").read_text())
    assert set(summary["metrics"]) == {"1", "2", "mean"}
