"""Out-of-domain nuclei: train on fluorescence only, test on held-out fluorescence and on
brightfield/H&E images (``configs/splits/nuclei_fluorescence_ood.json``), with decoder
dropout so that MC-dropout uncertainty is available.

Command: ``python train.py --config configs/nuclei_fluorescence_ood.py --workdir runs/nuclei_ood``
then ``python eval.py --workdir runs/nuclei_ood --groups configs/splits/nuclei_fluorescence_ood.json
--robustness --calibration --uncertainty --uncertainty_mode mc_dropout`` (docs/TRUST.md).
"""

from unetjax.config import default_config


def get_config():
    c = default_config()  # configs/nuclei.py, plus the split file and dropout
    c.data.path = "data/nuclei"
    c.data.patch_size = (128, 128)
    c.model.base_features = 16
    c.model.max_features = 256
    c.model.num_stages = 5
    c.train.optimizer = "adamw"
    c.train.learning_rate = 2e-3
    c.train.weight_decay = 1e-4
    c.train.schedule = "cosine"
    c.train.warmup_steps = 50
    c.train.num_steps = 600
    c.train.eval_every = 200
    c.train.checkpoint_every = 200
    c.data.split_file = "configs/splits/nuclei_fluorescence_ood.json"
    c.model.dropout_rate = 0.1
    return c
