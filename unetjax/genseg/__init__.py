"""GenSeg (Zhang et al., Nat. Commun. 2025) in pure functional JAX: a mask-to-image
generator with a learnable architecture, trained end to end with the segmenter through
three levels (pix2pix weights, segmenter weights, architecture by hypergradient).
See ``/work/shared/GENSEG.md`` and the module docstrings.
"""

from unetjax.genseg.discriminator import (
    PatchDiscriminator,
    discriminator_loss,
    gan_loss,
    generator_loss,
    pix2pix_losses,
)
from unetjax.genseg.generator import (
    MaskToImageGenerator,
    generator_apply,
    init_generator,
    split_variables,
)
from unetjax.genseg.hypergrad import (
    GenSegProblem,
    darts_hypergradient,
    exact_hypergradient,
    from_generator_range,
    hypergradient,
    quantize_uint8,
    to_generator_range,
    train_loss,
    unrolled_val_loss,
    val_loss,
)
from unetjax.genseg.mask_augment import MaskAugmentConfig, augment_mask, augment_masks
from unetjax.genseg.step import (
    COUNTERS,
    MODES,
    TEST_COMPILER_OPTIONS,
    GenSegConfig,
    GenSegModels,
    GenSegOptimizers,
    GenSegState,
    darts_arch_adam,
    init_genseg_state,
    make_genseg_step,
    make_plain_step,
    pix2pix_adam,
)

__all__ = [
    "COUNTERS",
    "MODES",
    "TEST_COMPILER_OPTIONS",
    "GenSegConfig",
    "GenSegModels",
    "GenSegOptimizers",
    "GenSegProblem",
    "GenSegState",
    "MaskAugmentConfig",
    "MaskToImageGenerator",
    "PatchDiscriminator",
    "augment_mask",
    "augment_masks",
    "darts_arch_adam",
    "darts_hypergradient",
    "discriminator_loss",
    "exact_hypergradient",
    "from_generator_range",
    "gan_loss",
    "generator_apply",
    "generator_loss",
    "hypergradient",
    "init_generator",
    "init_genseg_state",
    "make_genseg_step",
    "make_plain_step",
    "pix2pix_adam",
    "pix2pix_losses",
    "quantize_uint8",
    "split_variables",
    "to_generator_range",
    "train_loss",
    "unrolled_val_loss",
    "val_loss",
]
