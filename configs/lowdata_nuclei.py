"""GenSeg low-data protocol on the bundled DSB 2018 nuclei (fluorescence in-domain,
brightfield out-of-domain), sized for a shared 2-core CPU.

Command (resumable): ``nice -n 5 python -m unetjax.genseg.lowdata
--config configs/lowdata_nuclei.py --out runs/lowdata_nuclei``. Protocol, hardware,
runtime and the resulting table: docs/GENSEG_RESULTS.md.

Data: each image's centred square crop resized to 64^2 (3 channels); 40 fluorescence
images form the fixed test split, the 27 colour brightfield images the out-of-domain
split, the other 98 fluorescence images the labelled pool.
"""

from unetjax.genseg.lowdata_config import lowdata_defaults


def get_config():
    c = lowdata_defaults()
    c.name = "nuclei"
    c.data.path = "data/nuclei"
    c.data.domain_column = "kind"
    c.data.in_domain = "gray"
    return c
