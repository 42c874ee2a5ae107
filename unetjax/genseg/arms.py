"""The arms of the low-data protocol, each training all seeds at once (``jax.vmap``).

- ``baseline``: the segmenter alone on the real labelled images, no augmentation.
- ``baseline_aug``: the same step on images augmented on the host by the project's
  standard nnU-Net augmentation (``unetjax.data.augment.augment_patch``, default
  ``AugmentConfig``: rotation, scaling, noise, brightness, contrast, gamma, mirroring).
- ``separate``: pix2pix pre-training, then the segmenter on real + synthetic pairs with
  the generator frozen (``step`` mode ``separate``).
- ``released``: pre-training, then the reference code's effective behaviour (mode
  ``released``: alpha frozen, synthetic images quantised and detached, an extra segmenter
  step on the validation batch).
- ``genseg``: pre-training, then the true three levels (mode ``genseg``).

A state holds one entry per seed along a leading axis; ``SeedProgram.step`` is one jitted
``vmap`` of the per-seed step, so the seeds run as one compiled program (on a GPU three
seeds cost about one; on a CPU the work still adds up, minus per-step overheads).
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from unetjax.genseg.discriminator import PatchDiscriminator
from unetjax.genseg.generator import MaskToImageGenerator, generator_apply
from unetjax.genseg.mask_augment import MaskAugmentConfig
from unetjax.genseg.step import (
    GenSegConfig,
    GenSegModels,
    GenSegOptimizers,
    darts_arch_adam,
    init_genseg_state,
    make_genseg_step,
    make_plain_step,
    pix2pix_adam,
)
from unetjax.models.unet import UNet

ARMS = ("baseline", "baseline_aug", "separate", "released", "genseg")
GENERATOR_ARMS = ("separate", "released", "genseg")
USES_VAL = ("released", "genseg")  # arms that hold out an internal validation split


def build_models(cfg: ml_collections.ConfigDict, channels: int, num_classes: int):
    """Segmenter U-Net, generator and PatchGAN from ``cfg.model``."""
    m = cfg.model
    feats = tuple(m.seg_features)
    seg = UNet(
        num_classes,
        feats,
        ((1, 1),) + ((2, 2),) * (len(feats) - 1),
        ((3, 3),) * len(feats),
        convs_per_stage=m.seg_convs_per_stage,
        deep_supervision=False,
    )
    gen = MaskToImageGenerator(channels, depth=m.gen_depth, base_features=m.gen_width)
    disc = PatchDiscriminator(base_features=m.gen_width, n_layers=m.disc_layers)
    return GenSegModels(seg, gen, disc)


def build_optimizers(cfg: ml_collections.ConfigDict) -> GenSegOptimizers:
    t = cfg.train
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, t.learning_rate, t.warmup_steps, max(t.num_steps, t.warmup_steps + 1)
    )
    seg = optax.adamw(schedule, weight_decay=t.weight_decay)
    return GenSegOptimizers(
        segmenter=seg,
        generator=pix2pix_adam(t.gan_lr),
        discriminator=pix2pix_adam(t.gan_lr),
        arch=darts_arch_adam(t.arch_lr),
    )


def genseg_config(cfg: ml_collections.ConfigDict, mode: str) -> GenSegConfig:
    g = cfg.genseg
    return GenSegConfig(
        mode=mode,
        hypergradient=g.hypergradient,
        lambda_syn=g.lambda_syn,
        inner_lr=g.inner_lr,
        lambda_l1=g.lambda_l1,
        augment=MaskAugmentConfig(),
    )


@dataclasses.dataclass
class SeedProgram:
    """One arm (or phase) for all seeds: ``init(keys) -> state``, jitted vmapped ``step``."""

    init: Callable[..., Any]
    step: Callable[[Any, dict], tuple[Any, dict]]
    seg_params: Callable[[Any], Any]


def _stacked_init(models, optimizers, example, num_classes, compiler_options):
    def init(keys):
        return jax.vmap(
            lambda k: init_genseg_state(
                k, models, optimizers, example, num_classes, compiler_options=compiler_options
            )
        )(keys)

    return init


def plain_program(models, optimizers, example, num_classes, compiler_options=None):
    """``baseline`` / ``baseline_aug``: state ``(params, opt_state)`` per seed, initialised
    like the segmenter of the GenSeg state of the same key (same starting weights)."""
    tx = optimizers.segmenter
    step1 = make_plain_step(models.segmenter, tx, jit=False)
    full_init = _stacked_init(models, optimizers, example, num_classes, compiler_options)

    def init(keys):
        params = full_init(keys).seg_params
        return params, jax.vmap(tx.init)(params)

    def step(state, batch):
        params, opt, loss = step1(*state, batch)
        return (params, opt), {"seg_loss": loss}

    vstep = jax.jit(jax.vmap(step), donate_argnums=0, compiler_options=compiler_options)
    return SeedProgram(init, vstep, lambda state: state[0])


def genseg_program(models, optimizers, cfg, mode, example, num_classes, compiler_options=None):
    """A GenSeg step mode (``pretrain``, ``separate``, ``released``, ``genseg``), vmapped."""
    step1 = make_genseg_step(models, optimizers, genseg_config(cfg, mode), num_classes, jit=False)
    vstep = jax.jit(jax.vmap(step1), donate_argnums=0, compiler_options=compiler_options)
    init = _stacked_init(models, optimizers, example, num_classes, compiler_options)
    return SeedProgram(init, vstep, lambda state: state.seg_params)


def make_predict(segmenter, compiler_options=None):
    """``(stacked params, images [B, ...]) -> labels [seeds, B, ...]``."""

    def predict(params, images):
        return jnp.argmax(segmenter.apply({"params": params}, images), -1)

    return jax.jit(jax.vmap(predict, in_axes=(0, None)), compiler_options=compiler_options)


def make_synthesize(generator, compiler_options=None):
    """``(gen params, arch, one-hot masks) -> images in (-1, 1)`` (one seed, eval mode)."""

    def synth(params, arch, masks):
        return generator_apply(generator, params, arch, masks, train=False)

    return jax.jit(synth, compiler_options=compiler_options)
