"""Default config: 2D nuclei (DSB 2018, bundled CC0 subset), binary segmentation.

Command: ``python train.py`` (same as ``--config configs/nuclei.py --workdir runs/default``).
Measured (README results table): 2-core CPU, 8 min wall from a fresh cache on an idle
machine (ingestion, 600 steps, test evaluation); test split (41 images) foreground Dice
0.914 +- 0.049 (21 min wall while other jobs shared the cores).
"""

from unetjax.config import default_config


def get_config():
    c = default_config()
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
    return c
