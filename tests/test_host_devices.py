"""CPU data parallelism defaults: host device count and a batch-aware ``data`` axis."""

import os
import subprocess
import sys

import jax
import pytest

from unetjax import host_devices
from unetjax.config import default_config
from unetjax.sharding import make_mesh


def _mesh_cfg(data=-1, space=1):
    cfg = default_config().mesh
    cfg.data, cfg.space = data, space
    return cfg


@pytest.mark.parametrize(("batch", "expected"), [(8, 8), (6, 6), (12, 6), (3, 3), (7, 7), (9, 3)])
def test_data_axis_takes_most_devices_that_split_the_batch(batch, expected):
    assert len(jax.devices()) == 8  # conftest
    assert make_mesh(_mesh_cfg(), batch_size=batch).shape["data"] == expected


def test_data_axis_with_space_and_without_batch():
    assert make_mesh(_mesh_cfg(space=2), batch_size=6).shape == {"data": 3, "space": 2}
    assert make_mesh(_mesh_cfg()).shape["data"] == 8
    assert make_mesh(_mesh_cfg(data=2), batch_size=3).shape["data"] == 2  # explicit: kept


def test_default_count(monkeypatch):
    monkeypatch.delenv(host_devices.ENV_VAR, raising=False)
    cpus = len(os.sched_getaffinity(0))
    assert host_devices.default_host_devices() == min(2, cpus)
    monkeypatch.setenv(host_devices.ENV_VAR, "3")
    assert host_devices.default_host_devices() == 3
    monkeypatch.setenv(host_devices.ENV_VAR, "zero")
    with pytest.raises(ValueError, match=host_devices.ENV_VAR):
        host_devices.default_host_devices()


def test_configure_before_jax_import_in_a_fresh_process():
    code = (
        "from unetjax.host_devices import configure_host_devices as c\n"
        "n = c()\nimport jax\nprint(n, len(jax.devices('cpu')))"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env[host_devices.ENV_VAR] = "3"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["3", "3"], out.stderr
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=5"  # the user's choice wins
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["None", "5"], out.stderr


def test_configure_is_a_no_op_once_jax_is_imported(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert host_devices.configure_host_devices() is None
    assert "XLA_FLAGS" not in os.environ
