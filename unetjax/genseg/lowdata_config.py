"""Every key of the low-data runner (``unetjax.genseg.lowdata``) with its default."""

import ml_collections


def lowdata_defaults() -> ml_collections.ConfigDict:
    """Every key of the low-data runner with its default (configs override)."""
    c = ml_collections.ConfigDict()
    c.name = "lowdata"
    c.data = ml_collections.ConfigDict()
    c.data.path = "data/nuclei"
    c.data.size = 64  # items are size x size
    c.data.tile = 0  # 0 = centred square crop of the whole image; > 0 = tiles of this size
    c.data.label_map = ml_collections.config_dict.placeholder(dict)
    c.data.num_classes = 2
    c.data.num_test = 40  # test sources (images / volumes)
    c.data.split_seed = 0
    c.data.domain_column = ""  # index.tsv column naming the domain; "" = no OOD split
    c.data.in_domain = ""
    c.data.slice_axis = 0  # npz volumes only
    c.data.slices_per_volume = 1
    c.data.max_sources = 0

    c.protocol = ml_collections.ConfigDict()
    c.protocol.arms = ("baseline", "baseline_aug", "separate", "released", "genseg")
    c.protocol.budgets = (8, 16, 32)
    c.protocol.seeds = (0, 1, 2)
    c.protocol.val_fraction = 0.25  # of N, held out by released / genseg

    c.model = ml_collections.ConfigDict()
    c.model.seg_features = (8, 16, 32, 64)
    c.model.seg_convs_per_stage = 2
    c.model.gen_depth = 4
    c.model.gen_width = 8
    c.model.disc_layers = 2

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 2  # the reference's batch
    c.train.num_steps = 150
    c.train.pretrain_steps = 100
    c.train.learning_rate = 2e-3
    c.train.warmup_steps = 20
    c.train.weight_decay = 1e-4
    c.train.gan_lr = 2e-4
    c.train.arch_lr = 3e-3
    c.train.log_every = 25
    c.train.grid_every = 50
    c.train.eval_batch = 64
    c.train.fast_compile = False  # TEST_COMPILER_OPTIONS: fast compiles, slower steps

    c.genseg = ml_collections.ConfigDict()
    c.genseg.hypergradient = "exact"
    c.genseg.lambda_syn = 1.0
    c.genseg.inner_lr = 0.01
    c.genseg.lambda_l1 = 100.0
    return c
