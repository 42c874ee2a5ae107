"""Default config: 2D nuclei (DSB 2018, bundled CC0 subset), binary segmentation.

Command: ``python train.py`` (same as ``--config configs/nuclei.py --workdir runs/default``).
Measured (README results table): 2-core CPU, 8 min wall from a fresh cache on an idle
machine (ingestion, 600 steps, test evaluation); test split (41 images) foreground Dice
0.914 +- 0.049 (21 min wall while other jobs shared the cores).
"""

from unetjax.config import small_2d_config


def get_config():
    return small_2d_config("data/nuclei")
