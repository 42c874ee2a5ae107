"""Out-of-domain nuclei: train on fluorescence only, test on held-out fluorescence and on
brightfield/H&E images (``configs/splits/nuclei_fluorescence_ood.json``), with decoder
dropout so that MC-dropout uncertainty is available.

Command: ``python train.py --config configs/nuclei_fluorescence_ood.py --workdir runs/nuclei_ood``
then ``python eval.py --workdir runs/nuclei_ood --groups configs/splits/nuclei_fluorescence_ood.json
--robustness --calibration --uncertainty --uncertainty_mode mc_dropout`` (docs/TRUST.md).
"""

from unetjax.config import small_2d_config


def get_config():
    c = small_2d_config("data/nuclei")  # configs/nuclei.py, plus the split file and dropout
    c.data.split_file = "configs/splits/nuclei_fluorescence_ood.json"
    c.model.dropout_rate = 0.1
    return c
