"""3D MSD Task04 hippocampus (MRI, classes 1 = anterior, 2 = posterior), GenSeg's split.

Command: ``python train.py --config configs/hippocampus.py --workdir runs/hippocampus``
(data from ``../shared/data/msd_hippocampus``; elsewhere pass ``--config.data.path``).
Test split = the published 52 validation volumes (000-051). Measured (README results
table): 2-core CPU, 668 s of training (800 steps, 2 host devices) with the cores shared;
test Dice anterior 0.864, posterior 0.856, mean 0.860.
"""

from unetjax.config import default_config


def get_config():
    c = default_config()
    c.data.path = "../shared/data/msd_hippocampus"
    c.data.split_file = "configs/splits/hippocampus.json"
    c.data.patch_size = (32, 48, 32)
    c.model.base_features = 8
    c.model.max_features = 64
    c.model.num_stages = 4
    c.model.deep_supervision = True
    c.train.batch_size = 4
    c.train.optimizer = "adamw"
    c.train.learning_rate = 3e-3
    c.train.weight_decay = 1e-4
    c.train.schedule = "cosine"
    c.train.warmup_steps = 50
    c.train.num_steps = 800
    c.train.eval_every = 200
    c.train.checkpoint_every = 200
    c.eval.batch_size = 8
    return c
