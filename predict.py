"""Predict 3D volumes (of any size) with a trained workdir: streaming Gaussian sliding window.

python predict.py --workdir runs/hippocampus --input scan.nii.gz --output preds/scan.zarr --nifti
python predict.py --workdir runs/hippocampus --input /data/big.zarr --output preds/big.zarr
python predict.py --workdir runs/hippocampus --input ~/.cache/unetjax/stores/x --case 001 ...

Inputs: NIfTI / npy / npz / TIFF stack (ingested slab by slab first), a unetjax store, or an
existing zarr/N5 array or tensorstore spec/URL used in place. The output is a zarr v3 store
(``labels``, optionally ``probabilities``, ``volume.json`` with the geometry); an interrupted
run resumes where it stopped. See docs/VOLUMES.md.
"""

import json
import logging
import sys

from unetjax.host_devices import configure_host_devices

configure_host_devices()  # before JAX starts: tiles sharded over the CPU's cores

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from unetjax.volumes.predict import predict_workdir  # noqa: E402

flags.DEFINE_string("workdir", None, "A training workdir (its best checkpoint is used).")
flags.DEFINE_string("input", None, "Volume file, unetjax store, zarr/N5 directory, spec or URL.")
flags.DEFINE_string("output", None, "Output store directory (zarr v3).")
flags.DEFINE_multi_string("case", None, "Case ids of a unetjax store input (default: all).")
flags.DEFINE_bool("probabilities", False, "Also write float32 class probabilities.")
flags.DEFINE_bool("nifti", False, "Also export the labels as <output>.nii.gz.")
flags.DEFINE_bool("tta", None, "Mirror test-time augmentation (default: config.eval.mirror_tta).")
flags.DEFINE_string("ingest_dir", None, "Where a volume file is ingested (default <output>.input).")
flags.mark_flags_as_required(["workdir", "input", "output"])


def main(argv):
    del argv
    f = flags.FLAGS
    rows = predict_workdir(
        f.workdir, f.input, f.output, case_ids=f.case, probabilities=f.probabilities,
        nifti=f.nifti, mirror_tta=f.tta, ingest_dir=f.ingest_dir,
    )  # fmt: skip
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    logging.basicConfig(stream=sys.stdout, format="%(asctime)s %(message)s")
    absl_logging.set_verbosity(absl_logging.WARNING)
    app.run(main)
