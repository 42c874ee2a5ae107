"""Two processes on localhost (jax.distributed, gloo CPU collectives), 2 devices each.

Each process loads only its half of every global batch; the parameters after 3 steps are
identical across the processes and equal (rtol 2e-5, atol 2e-6: reduction order only)
to a single-process run on 4 devices. And two processes checkpoint the same steps to
``latest`` and ``best`` concurrently without their barriers colliding.
"""

import os
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np

from unetjax.training.loop import train_and_evaluate

REPO = pathlib.Path(__file__).resolve().parents[1]

CONFIG = """
from unetjax.config import default_config

def get_config():
    c = default_config()
    c.data.path = {data!r}
    c.data.store_dir = {store!r}
    c.data.patch_size = (32, 32)
    c.data.num_threads = 1
    c.data.val_fraction = 0.2
    c.eval.max_val_cases = 2
    c.eval.batch_size = 4
    c.model.base_features = 4
    c.model.max_features = 8
    c.model.num_stages = 3
    c.train.batch_size = 4
    c.train.num_steps = 3
    c.train.eval_every = 3
    c.train.schedule = "constant"
    c.train.optimizer = "adamw"
    c.train.learning_rate = 1e-3
    return c
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_workers(script: str, args, timeout: float) -> list[str]:
    """Run ``tests/<script> *args(process_id, port)`` as processes 0 and 1; their outputs.

    On a timeout both are killed and the test fails with their logs, not a bare hang."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "tests" / script), *args(i, port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0][-3000:] for p in procs]
        raise AssertionError(
            f"workers did not finish in {timeout} s:\n" + "\n----\n".join(logs)
        ) from None
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return outputs


def test_two_processes_match_one(nuclei_dir, tmp_path):
    data = tmp_path / "data"
    for sub in ("images", "masks"):
        (data / sub).mkdir(parents=True)
        for path in sorted((nuclei_dir / sub).glob("*.png"))[:10]:
            shutil.copy(path, data / sub / path.name)
    config_file = tmp_path / "config.py"
    config_file.write_text(CONFIG.format(data=str(data), store=str(tmp_path / "store")))

    namespace = {}
    exec(config_file.read_text(), namespace)  # the same config, in this process
    reference = train_and_evaluate(
        namespace["get_config"](), tmp_path / "single", devices=jax.devices()[:4]
    )
    expected = [np.asarray(x) for x in jax.tree.leaves(reference["state"].params)]

    workdir = tmp_path / "multi"
    run_two_workers(
        "multiprocess_worker.py",
        lambda i, port: [
            str(config_file),
            str(workdir),
            str(i),
            str(port),
            str(tmp_path / f"params{i}.npz"),
        ],
        timeout=300,
    )
    results = [np.load(tmp_path / f"params{i}.npz") for i in range(2)]
    for i, want in enumerate(expected):
        np.testing.assert_array_equal(results[0][f"arr_{i}"], results[1][f"arr_{i}"])
        np.testing.assert_allclose(results[0][f"arr_{i}"], want, rtol=2e-5, atol=2e-6)
    assert float(results[0]["val_dice"]) == float(results[1]["val_dice"])
    assert (workdir / "checkpoints" / "latest" / "3").exists()


def test_two_processes_save_latest_and_best_at_the_same_steps(tmp_path):
    """Both checkpoint managers save every step, asynchronously, from two processes.

    Orbax names its barriers by step: without a prefix per manager, ``latest`` and ``best``
    collided ("Barrier _async_write_complete.3 is already ongoing") and the run hung."""
    outputs = run_two_workers(
        "checkpoint_worker.py", lambda i, port: [str(i), str(port), str(tmp_path)], timeout=120
    )
    for i, out in enumerate(outputs):
        assert f"process {i}: latest 8, best 8, restored ok" in out, out[-3000:]
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "latest").iterdir()) == ["7", "8"]
