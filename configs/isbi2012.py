"""2D ISBI 2012 EM membranes (30 slices of 512x512), membranes as the foreground class.

The source masks are 1 = cell interior, 0 = membrane; ``label_map`` swaps them so class 1
is the membrane, as in the U-Net paper. Command:
``python train.py --config configs/isbi2012.py --workdir runs/isbi2012``
(data from ``../shared/data/isbi2012_em``). Held-out slices: seeded 20% test split.
Measured (README results table): 2-core CPU, idle, 4 min 41 s wall (238 s of training, 600
steps on 2 host devices); membrane Dice 0.822 +- 0.012 on the 6 held-out slices.
"""

from unetjax.config import small_2d_config


def get_config():
    c = small_2d_config("../shared/data/isbi2012_em")
    c.data.label_map = {0: 1, 1: 0}
    c.data.test_fraction = 0.2
    c.data.val_fraction = 0.1
    return c
