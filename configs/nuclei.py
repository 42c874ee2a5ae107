"""Default config: 2D nuclei (DSB 2018, bundled CC0 subset), binary segmentation.

Command: ``python train.py`` (same as ``--config configs/nuclei.py --workdir runs/default``).
Measured (README results table): 2-core CPU, idle, 5 min 6 s wall from a fresh clone and
cache (ingestion, 600 steps on 2 host devices, test evaluation); test split (41 images)
foreground Dice 0.912 +- 0.052.
"""

from unetjax.config import small_2d_config


def get_config():
    return small_2d_config("data/nuclei")
