"""The full set of configuration keys with their defaults; configs in ``configs/`` override.

Every key that training, evaluation or the data pipeline reads is declared here, so a
misspelt override (``--config.train.lr_rate=1``) is an error, never silently ignored.
"""

import ml_collections
from ml_collections import config_dict


def default_config() -> ml_collections.ConfigDict:
    """Defaults shared by all configs (nnU-Net's recipe where it has one)."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.path = "data/nuclei"  # dataset folder (images/+masks/, or volumes/)
    c.data.store_dir = ""  # "" = $UNETJAX_CACHE or ~/.cache/unetjax/stores/...
    c.data.num_classes = 0  # 0 = infer from the masks (max label + 1)
    c.data.label_map = config_dict.placeholder(dict)  # e.g. {0: 1, 1: 0} to swap polarity
    c.data.spacing_2d = config_dict.placeholder(tuple)  # physical pixel size for 2D metrics
    c.data.split_file = ""  # JSON with train/val/test case ids; "" = seeded split
    c.data.split_seed = 0
    c.data.val_fraction = 0.1
    c.data.test_fraction = 0.25
    c.data.num_train = 0  # 0 = all training cases; N = first N of the seeded order
    c.data.normalization = "zscore"  # zscore | ct | none
    c.data.patch_size = config_dict.placeholder(tuple)  # None = from the fingerprint
    c.data.max_patch_voxels = 128 * 128
    c.data.fg_oversample = 0.33
    c.data.num_threads = 2
    c.data.prefetch = 2
    # all patch reads of a batch in flight at once (tensorstore futures); same batches.
    # Pays for large volumes on slow storage (docs/VOLUMES.md)
    c.data.concurrent_reads = False
    c.data.augment = ml_collections.ConfigDict({"enabled": True})

    c.model = ml_collections.ConfigDict()
    c.model.base_features = 32
    c.model.max_features = 512
    c.model.num_stages = 6  # an upper bound; the planner stops at 4-voxel feature maps
    c.model.strides = config_dict.placeholder(tuple)  # None = planned from patch/spacing
    c.model.kernel_sizes = config_dict.placeholder(tuple)
    c.model.convs_per_stage = 2
    c.model.downsample = "conv"  # conv | maxpool
    c.model.deep_supervision = True
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
    c.model.dropout_rate = 0.0  # decoder dropout (MC-dropout uncertainty needs > 0)
    c.model.remat = False  # rematerialise conv blocks: less memory for large 3D patches

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 8
    c.train.num_steps = 1000
    c.train.optimizer = "sgd_nesterov"  # sgd_nesterov (nnU-Net) | adamw
    c.train.learning_rate = 1e-2
    c.train.momentum = 0.99
    c.train.weight_decay = 3e-5
    c.train.schedule = "poly"  # poly (nnU-Net, exponent 0.9) | cosine | constant
    c.train.warmup_steps = 0
    c.train.grad_clip = 12.0  # global-norm clip; 0 = off
    c.train.batch_dice = False
    c.train.log_every = 10
    c.train.eval_every = 250  # validation Dice (sliding window on the val split)
    c.train.checkpoint_every = 250
    c.train.keep_checkpoints = 2

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # devices on the data axis; -1 = all devices not used by `space`
    c.mesh.space = 1  # spatial partitioning of 3D patches (first spatial axis)
    c.mesh.fsdp_pattern = ""  # regex on parameter paths to shard over `data` (FSDP)
    c.mesh.distributed = False  # jax.distributed.initialize() with cluster auto-detection
    c.mesh.coordinator = ""  # "host:port": explicit multi-process set-up (or env vars)
    c.mesh.num_processes = 0
    c.mesh.process_id = -1

    c.eval = ml_collections.ConfigDict()
    c.eval.step = 0.5  # sliding-window step as a fraction of the patch
    c.eval.batch_size = 8
    c.eval.mirror_tta = False
    c.eval.max_val_cases = 0  # cap on validation cases during training; 0 = all
    c.lock()  # new keys are errors; configs may only change declared ones
    return c


def small_2d_config(data_path: str) -> ml_collections.ConfigDict:
    """The 2D recipe of the bundled configs (nuclei, isbi2012): 128^2 patches, a 5-stage
    16..256 U-Net, AdamW + cosine for 600 steps; a few minutes per run on a laptop CPU."""
    c = default_config()
    c.data.path = data_path
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
