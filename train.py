"""Train a U-Net, then evaluate it on the test split.

    python train.py                                   # default: nuclei -> runs/default
    python train.py --config configs/hippocampus.py --workdir runs/hippocampus
    python train.py --config.data.path=/my/dataset    # any images/+masks/ or volumes/ folder

Rerunning a command on an existing workdir resumes it.
"""

import logging
import pathlib
import sys

from unetjax.host_devices import configure_host_devices

configure_host_devices()  # before JAX starts: data parallelism over the CPU's cores

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from unetjax.evaluation import evaluate_workdir, format_summary
from unetjax.training.loop import train_and_evaluate

HERE = pathlib.Path(__file__).resolve().parent
flags.DEFINE_string("workdir", "runs/default", "Where checkpoints, logs and results go.")
flags.DEFINE_bool("eval", True, "Evaluate the best checkpoint on the test split afterwards.")


def parse_flags(argv):
    """absl parsing, with a one-line error for a bad config override (no traceback).

    ml_collections applies ``--config.*`` overrides while the flag is defined, so the
    config flag is defined here rather than at import.
    """
    try:
        config_flags.DEFINE_config_file(
            "config", str(HERE / "configs" / "nuclei.py"), "Config file.", lock_config=True
        )
        rest = flags.FLAGS(argv)
        _ = flags.FLAGS.config.data  # a missing or broken config file fails here
        return rest
    except (AttributeError, KeyError, OSError, TypeError, ValueError, flags.Error) as e:
        sys.exit(
            f"train.py: bad flag or config override: {e}\n"
            "(every config key and its default is in unetjax/config.py)"
        )


def main(argv):
    del argv
    logging.getLogger("unetjax").setLevel(logging.INFO)
    config = flags.FLAGS.config
    workdir = flags.FLAGS.workdir
    try:
        summary = train_and_evaluate(config, workdir)
    except KeyboardInterrupt as e:
        sys.exit(f"train.py: interrupted ({e}); rerun the same command to resume from {workdir}")
    print("training done:", {k: v for k, v in summary.items() if k != "state"})
    if flags.FLAGS.eval and jax.process_count() > 1:
        print("multi-process run: evaluate with a single process: python eval.py --workdir ...")
    elif flags.FLAGS.eval:
        result = evaluate_workdir(workdir, "test")
        print(
            f"test split ({result['num_scored']} cases, checkpoint step "
            f"{result['checkpoint_step']}), written to {result['out_dir']}:"
        )
        print(format_summary(result["summary"]))


if __name__ == "__main__":
    logging.basicConfig(stream=sys.stdout, format="%(asctime)s %(message)s")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    app.run(main, flags_parser=parse_flags)
