"""GenSeg low-data protocol on ISBI 2012 EM membranes (class 1 = membrane), sized for a
shared 2-core CPU.

Command (resumable): ``nice -n 5 python -m unetjax.genseg.lowdata
--config configs/lowdata_isbi2012.py --out runs/lowdata_isbi2012``. Protocol, hardware,
runtime and the resulting table: docs/GENSEG_RESULTS.md.

Data (../shared/data/isbi2012_em): every 512^2 slice cut into 64 native-resolution 64^2
tiles; 6 seeded slices (384 tiles) form the fixed test split, the tiles of the other 24
slices the labelled pool, so a labelled "image" here is one 64^2 tile. No out-of-domain
split (one stack).
"""

from unetjax.genseg.lowdata_config import lowdata_defaults


def get_config():
    c = lowdata_defaults()
    c.name = "isbi2012"
    c.data.path = "../shared/data/isbi2012_em"
    c.data.label_map = {0: 1, 1: 0}
    c.data.tile = 64
    c.data.num_test = 6
    return c
