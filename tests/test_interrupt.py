"""Killing train.py mid-run leaves only complete checkpoints (the step it stopped at
included), and a rerun resumes from them."""

import pathlib
import signal
import subprocess
import sys
import time

import pytest

from unetjax.experiment import load_config
from unetjax.training.loop import train_and_evaluate

REPO = pathlib.Path(__file__).resolve().parents[1]

TINY_CONFIG = """
from unetjax.config import default_config

def get_config():
    c = default_config()
    c.data.path = {data!r}
    c.data.store_dir = {store!r}
    c.data.patch_size = (32, 32)
    c.data.num_threads = 1
    c.mesh.data = 1  # one of the 8 fake test devices
    c.model.base_features = 4
    c.model.max_features = 8
    c.model.num_stages = 3
    c.train.batch_size = 2
    c.train.num_steps = 100000
    c.train.checkpoint_every = 2
    c.train.eval_every = 100000
    return c
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_kill_then_resume(nuclei_dir, tmp_path, sig):
    config_file = tmp_path / "tiny.py"
    config_file.write_text(TINY_CONFIG.format(data=str(nuclei_dir), store=str(tmp_path / "s")))
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), f"--config={config_file}", f"--workdir={workdir}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    latest = workdir / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not (latest.exists() and any(p.name.isdigit() for p in latest.iterdir())):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    assert proc.returncode != 0  # interrupted, not finished
    steps = sorted(int(p.name) for p in latest.iterdir() if p.name.isdigit())
    # periodic checkpoints, plus the step the signal stopped at (saved on the way out)
    assert steps and all(s % 2 == 0 for s in steps[:-1])
    assert not [p for p in latest.iterdir() if "tmp" in p.name]  # no half-written checkpoint
    config = load_config(workdir)
    config.train.num_steps = steps[-1] + 2
    summary = train_and_evaluate(config, workdir)
    assert summary["start_step"] == steps[-1]
    assert int(summary["state"].step) == steps[-1] + 2
