"""predict.py's library path on real MRI volumes: a store case, a NIfTI file and an in-place zarr
array give the in-memory sliding-window prediction; geometry survives the NIfTI export."""

import pathlib
import shutil

import jax
import nibabel as nib
import numpy as np
import pytest

from unetjax.checkpointing import Checkpointer, abstract_like
from unetjax.config import default_config
from unetjax.evaluation import predict_case
from unetjax.experiment import build_experiment, load_config
from unetjax.training.loop import train_and_evaluate
from unetjax.training.state import init_train_state, make_optimizer
from unetjax.training.step import make_predict_fn
from unetjax.volumes.arrays import open_array
from unetjax.volumes.predict import predict_workdir


@pytest.fixture(scope="module")
def workdir(hippocampus_dir, tmp_path_factory) -> pathlib.Path:
    base = tmp_path_factory.mktemp("hippo_predict")
    root = base / "src"
    (root / "volumes").mkdir(parents=True)
    for path in sorted((hippocampus_dir / "volumes").glob("*.npz"))[:4]:
        shutil.copy(path, root / "volumes" / path.name)
    c = default_config()
    c.data.path = str(root)
    c.data.store_dir = str(base / "store")
    c.data.patch_size = (16, 16, 16)
    c.data.num_threads = 1
    c.data.val_fraction = 0.25
    c.data.test_fraction = 0.25
    c.mesh.data = 1
    c.model.base_features = 4
    c.model.max_features = 8
    c.model.num_stages = 3
    c.train.batch_size = 2
    c.train.num_steps = 1
    c.train.eval_every = 100
    c.eval.batch_size = 4
    workdir = base / "run"
    train_and_evaluate(c, workdir)
    return workdir


def test_predict_store_nifti_and_in_place_array(workdir, tmp_path):
    config = load_config(workdir)
    exp = build_experiment(config, workdir)
    state, _ = Checkpointer(workdir).restore_best(
        abstract_like(init_train_state(exp, make_optimizer(config.train)))
    )
    case_id = exp.split["test"][0]
    predict = make_predict_fn(exp.model)
    reference = predict_case(exp, predict, jax.device_get(state.params), case_id)

    store = exp.dataset.store_dir
    [row] = predict_workdir(
        workdir, str(store), tmp_path / "a", case_ids=[case_id], probabilities=True, nifti=True,
        progress=False,
    )  # fmt: skip
    probs = np.asarray(open_array(tmp_path / "a" / "probabilities").read().result())
    np.testing.assert_allclose(probs, reference, rtol=1e-5, atol=1e-5)
    labels = np.asarray(open_array(tmp_path / "a" / "labels").read().result())
    exported = nib.load(row["nifti"])
    np.testing.assert_array_equal(np.asarray(exported.dataobj), labels)
    np.testing.assert_allclose(exported.affine, exp.dataset.manifest.case(case_id).affine)

    # an unlabelled NIfTI volume: ingested slab by slab, then predicted
    image = exp.dataset.read_image(case_id)[..., 0]
    affine = np.asarray(exp.dataset.manifest.case(case_id).affine)
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "scan.nii.gz")
    predict_workdir(workdir, str(tmp_path / "scan.nii.gz"), tmp_path / "b", progress=False)
    np.testing.assert_array_equal(
        np.asarray(open_array(tmp_path / "b" / "labels").read().result()), labels
    )
    # an existing zarr array used in place (z-score statistics from one streaming pass)
    in_place = store / "cases" / case_id / "image"
    predict_workdir(workdir, str(in_place), tmp_path / "c", probabilities=True, progress=False)
    probs_c = np.asarray(open_array(tmp_path / "c" / "probabilities").read().result())
    np.testing.assert_allclose(probs_c, reference, rtol=1e-4, atol=1e-4)
