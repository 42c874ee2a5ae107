"""Test set-up: 8 fake CPU devices before JAX initialises, shared data paths."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def nuclei_dir() -> pathlib.Path:
    """The bundled default dataset (2D, RGB, binary)."""
    return REPO / "data" / "nuclei"


@pytest.fixture(scope="session")
def hippocampus_dir() -> pathlib.Path:
    """MSD hippocampus (3D npz) from ../shared; skipped where it is absent."""
    path = SHARED_DATA / "msd_hippocampus"
    if not path.exists():
        pytest.skip("../shared/data/msd_hippocampus not present")
    return path
