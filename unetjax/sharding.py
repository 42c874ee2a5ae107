"""The device mesh and every sharding, declared once from ``config.mesh``.

Axes: ``data`` (batch, data parallelism) and ``space`` (a 3D patch's first spatial axis,
spatial partitioning; XLA inserts the halo exchanges of the convolutions). Parameters and
optimizer state are replicated, except leaves whose path matches ``mesh.fsdp_pattern``
(a regex), which are sharded over ``data`` on their last axis that divides evenly (FSDP
style; XLA all-gathers them where they are used). The mesh uses ``Auto`` axis types and
``jax.jit`` with explicit ``NamedSharding`` in/out shardings: the modern form of pjit.
"""

import os
import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, SPACE = "data", "space"


def maybe_initialize_distributed(mesh_cfg) -> None:
    """``jax.distributed.initialize`` for multi-process runs (config or environment).

    With ``mesh.coordinator`` set, ``mesh.num_processes`` / ``mesh.process_id`` (or the
    ``UNETJAX_NUM_PROCESSES`` / ``UNETJAX_PROCESS_ID`` variables) name this process; with
    ``mesh.distributed=True`` and no coordinator, JAX detects the cluster (SLURM, TPU VM,
    Open MPI). Otherwise this is a single-process run and nothing happens.
    """
    if jax.distributed.is_initialized():
        return
    coordinator = mesh_cfg.coordinator or os.environ.get("UNETJAX_COORDINATOR", "")
    if coordinator:
        num = mesh_cfg.num_processes or int(os.environ["UNETJAX_NUM_PROCESSES"])
        pid = mesh_cfg.process_id
        if pid < 0:
            pid = int(os.environ["UNETJAX_PROCESS_ID"])
        # CPU devices need a collectives backend across processes (GPU/TPU ignore this)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes=num, process_id=pid)
    elif mesh_cfg.distributed:
        jax.distributed.initialize()


def make_mesh(mesh_cfg, devices=None, batch_size: int | None = None) -> Mesh:
    """A ``(data, space)`` mesh; ``data = -1`` takes all devices not used by ``space``.

    With ``batch_size`` (one process), ``data = -1`` takes the most devices that split the
    batch evenly, e.g. 1 of 2 host CPU devices for a batch of 3.
    """
    devices = list(jax.devices() if devices is None else devices)
    space = int(mesh_cfg.space)
    data = int(mesh_cfg.data)
    if data == -1:
        data = len(devices) // space
        if batch_size and jax.process_count() == 1:
            data = max(d for d in range(1, max(data, 1) + 1) if batch_size % d == 0)
    if data < 1 or space < 1 or data * space > len(devices):
        raise ValueError(
            f"mesh data={mesh_cfg.data} x space={space} does not fit {len(devices)} devices"
        )
    if jax.process_count() > 1 and data * space != len(devices):
        raise ValueError(f"multi-process runs need a mesh over all {len(devices)} devices")
    return jax.make_mesh(
        (data, space),
        (DATA, SPACE),
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=devices[: data * space],
    )


def batch_spec(ndim_spatial: int, mesh: Mesh) -> P:
    """Batch over ``data``; a 3D batch's first spatial axis over ``space`` when it is > 1."""
    if mesh.shape[SPACE] > 1:
        if ndim_spatial != 3:
            raise ValueError("spatial partitioning (mesh.space > 1) is for 3D data only")
        return P(DATA, SPACE)
    return P(DATA)


def batch_sharding(mesh: Mesh, ndim_spatial: int) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(ndim_spatial, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_shardings(abstract_state, mesh: Mesh, fsdp_pattern: str = ""):
    """NamedShardings for a train-state pytree: replicated, or FSDP by path regex."""
    regex = re.compile(fsdp_pattern) if fsdp_pattern else None
    n = mesh.shape[DATA]

    def spec(path, leaf):
        shape = getattr(leaf, "shape", ())
        if regex is None or n == 1 or not regex.search(_path_str(path)):
            return replicated(mesh)
        for axis in range(len(shape) - 1, -1, -1):
            if shape[axis] % n == 0:
                parts = [None] * len(shape)
                parts[axis] = DATA
                return NamedSharding(mesh, P(*parts))
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(spec, abstract_state)


def global_batch(batch: dict, sharding: NamedSharding) -> dict:
    """Assemble the global batch from each process's local part (one process: a device_put)."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """Elements this process loads per step; the global batch must divide evenly."""
    data, procs = mesh.shape[DATA], jax.process_count()
    if global_batch_size % data or global_batch_size % procs:
        raise ValueError(
            f"train.batch_size {global_batch_size} must be divisible by the mesh's data axis "
            f"({data}) and the number of processes ({procs})"
        )
    return global_batch_size // procs
