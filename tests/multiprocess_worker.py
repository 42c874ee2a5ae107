"""One process of a 2-process CPU run (see test_multiprocess.py); not a test module.

python tests/multiprocess_worker.py CONFIG_FILE WORKDIR PROCESS_ID PORT OUT_NPZ
"""

import importlib.util
import os
import sys

config_file, workdir, process_id, port, out = sys.argv[1:]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from unetjax.training.loop import train_and_evaluate  # noqa: E402

spec = importlib.util.spec_from_file_location("worker_config", config_file)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config()
config.mesh.coordinator = f"127.0.0.1:{port}"
config.mesh.num_processes = 2
config.mesh.process_id = int(process_id)
summary = train_and_evaluate(config, workdir)
assert jax.process_count() == 2 and jax.device_count() == 4
leaves = jax.tree.leaves(summary["state"].params)
np.savez(out, *[np.asarray(x) for x in leaves], val_dice=summary["best_val_dice"])
