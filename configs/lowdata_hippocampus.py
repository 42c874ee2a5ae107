"""GenSeg low-data protocol on MSD hippocampus as 2D slices (3 classes: background,
anterior, posterior), one low budget, sized for a shared 2-core CPU.

Command (resumable): ``nice -n 5 python -m unetjax.genseg.lowdata
--config configs/lowdata_hippocampus.py --out runs/lowdata_hippocampus``. Protocol and
result: docs/GENSEG_RESULTS.md.

Data (../shared/data/msd_hippocampus): from each volume the one slice along axis 0 with
the most hippocampus voxels, its centred square crop resized to 32^2; 40 seeded volumes
form the fixed test split, the other 220 the labelled pool (one slice per volume).
"""

from unetjax.genseg.lowdata_config import lowdata_defaults


def get_config():
    c = lowdata_defaults()
    c.name = "hippocampus"
    c.data.path = "../shared/data/msd_hippocampus"
    c.data.size = 32
    c.data.num_classes = 3
    c.data.num_test = 40
    c.data.slice_axis = 0
    c.data.slices_per_volume = 1
    c.protocol.budgets = (16,)
    return c
