"""One process of a 2-process checkpointing run (see test_multiprocess.py); not a test module.

python tests/checkpoint_worker.py PROCESS_ID PORT WORKDIR

Saves steps 1..8 to ``latest`` and ``best`` without waiting in between, then restores both.
"""

import os
import sys

process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from unetjax.checkpointing import Checkpointer, abstract_like  # noqa: E402

jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
mesh = Mesh(np.array(jax.devices()), ("data",))
sharding = NamedSharding(mesh, PartitionSpec("data"))
state = {"w": jax.device_put(jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64), sharding)}
checkpointer = Checkpointer(workdir)
for step in range(1, 9):
    state = {"w": state["w"] + 1}
    checkpointer.save(step, state, {"step": step})
    checkpointer.save_best(step, state, val_dice=step / 10)
checkpointer.wait()
latest, data = checkpointer.restore_latest(abstract_like(state))
best, best_step = checkpointer.restore_best(abstract_like(state))
want = np.arange(64 * 64, dtype=np.float32).reshape(64, 64) + 8
for restored in (latest["w"], best["w"]):
    for shard in restored.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])
assert data == {"step": 8}, data
checkpointer.close()
print(f"process {process_id}: latest {checkpointer.latest_step()}, best {best_step}, restored ok")
