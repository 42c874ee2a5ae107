"""Evaluate a trained workdir's best checkpoint with Gaussian sliding-window inference.

python eval.py --workdir runs/default                 # test split
python eval.py --workdir runs/default --split val --tta
python eval.py --workdir runs/default --data /other/folder   # predict (and score) a folder
"""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging

from unetjax.evaluation import evaluate_workdir, format_summary

flags.DEFINE_string("workdir", "runs/default", "A training workdir.")
flags.DEFINE_enum("split", "test", ["test", "val", "train", "all"], "Cases to evaluate.")
flags.DEFINE_string("data", None, "Another dataset folder: predict all its cases.")
flags.DEFINE_bool("tta", None, "Mirror test-time augmentation (default: config.eval.mirror_tta).")


def main(argv):
    del argv
    f = flags.FLAGS
    result = evaluate_workdir(f.workdir, f.split, f.data, f.tta)
    print(
        f"{result['num_cases']} cases predicted, {result['num_scored']} scored "
        f"(checkpoint step {result['checkpoint_step']}) -> {result['out_dir']}"
    )
    if result["summary"]:
        print(format_summary(result["summary"]))


if __name__ == "__main__":
    logging.basicConfig(stream=sys.stdout, format="%(asctime)s %(message)s")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
    app.run(main)
