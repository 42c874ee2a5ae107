"""The sharded step on 8 fake CPU devices gives the single-device result.

Tolerances: parameters and losses agree to rtol 2e-5 / atol 2e-6 after 5 steps; the
only difference is the order of the cross-device gradient reduction (float32). After a
restore onto another device count, 3 more AdamW steps agree to atol 1e-4 = 0.1 x the
learning rate: Adam divides by the gradient's running RMS, so for parameters whose
gradient is near zero the reduction-order noise moves them by a fraction of the lr.
"""

import pathlib
import shutil

import jax
import numpy as np
import pytest

from unetjax.checkpointing import Checkpointer, abstract_like
from unetjax.config import default_config
from unetjax.data.augment import AugmentConfig
from unetjax.data.pipeline import make_train_loader
from unetjax.experiment import build_experiment
from unetjax.sharding import batch_sharding, global_batch, make_mesh, state_shardings
from unetjax.training.loop import sharded_setup
from unetjax.training.state import make_optimizer

RTOL, ATOL = 2e-5, 2e-6


def _copy_cases(src: pathlib.Path, dst: pathlib.Path, subdirs, n: int) -> pathlib.Path:
    for sub in subdirs:
        (dst / sub).mkdir(parents=True)
        for path in sorted((src / sub).iterdir())[:n]:
            shutil.copy(path, dst / sub / path.name)
    return dst


def _config(data_path, store, patch, batch):
    c = default_config()
    c.data.path = str(data_path)
    c.data.store_dir = str(store)
    c.data.patch_size = patch
    c.data.num_threads = 1
    c.model.base_features = 4
    c.model.max_features = 8
    c.model.num_stages = 3
    c.train.batch_size = batch
    c.train.optimizer = "adamw"
    c.train.learning_rate = 1e-3
    c.train.schedule = "constant"
    return c


@pytest.fixture(scope="module")
def nuclei_exp(nuclei_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("shard2d")
    data = _copy_cases(nuclei_dir, root / "data", ("images", "masks"), 10)
    return build_experiment(_config(data, root / "store", (32, 32), 8), root / "work")


@pytest.fixture(scope="module")
def hippo_exp(hippocampus_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("shard3d")
    data = _copy_cases(hippocampus_dir, root / "data", ("volumes",), 6)
    return build_experiment(_config(data, root / "store", (16, 16, 16), 4), root / "work")


def _batches(exp, n):
    loader = make_train_loader(
        exp.dataset,
        exp.split["train"],
        patch_size=exp.patch_size,
        batch_size=exp.config.train.batch_size,
        seed=0,
        augment=AugmentConfig(),
        num_threads=1,
    )
    batches = [next(loader) for _ in range(n)]
    loader.close()
    return batches


_STEPS = {}  # compiled steps per (experiment, mesh, FSDP rule): compile each once


def _run(exp, mesh, batches, state=None):
    tx = make_optimizer(exp.config.train)
    fresh, step = sharded_setup(exp, tx, mesh)
    key = (
        id(exp),
        tuple(d.id for d in mesh.devices.flat),
        tuple(mesh.shape.items()),
        exp.config.mesh.fsdp_pattern,
    )
    step = _STEPS.setdefault(key, step)
    state = fresh if state is None else state
    sharding = batch_sharding(mesh, len(exp.patch_size))
    losses = []
    for batch in batches:
        state, metrics = step(state, global_batch(batch, sharding))
        losses.append(float(metrics["loss"]))
    return state, losses, step


def _assert_same(state_a, state_b, rtol=RTOL, atol=ATOL):
    a = jax.tree.leaves(jax.device_get(state_a.params))
    b = jax.tree.leaves(jax.device_get(state_b.params))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def _mesh(data, space=1, devices=None):
    cfg = default_config().mesh
    cfg.data, cfg.space = data, space
    return make_mesh(cfg, devices)


def test_one_vs_eight_devices(nuclei_exp):
    batches = _batches(nuclei_exp, 5)
    single, losses1, _ = _run(nuclei_exp, _mesh(1, devices=jax.devices()[:1]), batches)
    multi, losses8, step = _run(nuclei_exp, _mesh(8), batches)
    np.testing.assert_allclose(losses1, losses8, rtol=RTOL)
    _assert_same(single, multi)
    assert step._cache_size() == 1  # compiled once, no recompilation after step 1
    kernel = jax.tree.leaves(multi.params)[0]
    assert len(kernel.sharding.device_set) == 8


def test_fsdp_rule_shards_matching_leaves(nuclei_exp):
    mesh = _mesh(8)
    tx = make_optimizer(nuclei_exp.config.train)
    abstract = jax.eval_shape(lambda: sharded_setup(nuclei_exp, tx, _mesh(1))[0])
    shardings = state_shardings(abstract, mesh, r"decoder_0_conv_0/conv/kernel")
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    sharded = [jax.tree_util.keystr(p) for p, s in flat if s.spec != jax.sharding.PartitionSpec()]
    # the parameter and its two AdamW moments
    assert len(sharded) == 3 and all("decoder_0_conv_0" in p for p in sharded)
    batches = _batches(nuclei_exp, 3)
    nuclei_exp.config.mesh.fsdp_pattern = r"decoder_0_conv_0/conv/kernel"
    try:
        fsdp, _, _ = _run(nuclei_exp, mesh, batches)
    finally:
        nuclei_exp.config.mesh.fsdp_pattern = ""
    single, _, _ = _run(nuclei_exp, _mesh(1, devices=jax.devices()[:1]), batches)
    _assert_same(single, fsdp)


def test_data_and_space_mesh_3d(hippo_exp):
    batches = _batches(hippo_exp, 5)
    single, losses1, _ = _run(hippo_exp, _mesh(1, devices=jax.devices()[:1]), batches)
    multi, losses8, _ = _run(hippo_exp, _mesh(4, 2), batches)
    np.testing.assert_allclose(losses1, losses8, rtol=RTOL)
    _assert_same(single, multi)


def test_checkpoint_restores_on_fewer_devices(nuclei_exp, tmp_path):
    batches = _batches(nuclei_exp, 6)
    straight, _, _ = _run(nuclei_exp, _mesh(8), batches)
    saved, _, _ = _run(nuclei_exp, _mesh(8), batches[:3])
    checkpointer = Checkpointer(tmp_path / "ckpt")
    checkpointer.save(3, saved, {"step": 3}, force=True)
    checkpointer.wait()
    for n in (2, 1):
        mesh = _mesh(n, devices=jax.devices()[:n])
        target, _ = sharded_setup(nuclei_exp, make_optimizer(nuclei_exp.config.train), mesh)
        restored, data_state = checkpointer.restore_latest(abstract_like(target))
        assert data_state == {"step": 3} and int(restored.step) == 3
        leaf = jax.tree.leaves(restored.params)[0]
        assert leaf.sharding.device_set == set(mesh.devices.flat)
        resumed, _, _ = _run(nuclei_exp, mesh, batches[3:], state=restored)
        _assert_same(straight, resumed, rtol=0, atol=1e-4)
    checkpointer.close()
