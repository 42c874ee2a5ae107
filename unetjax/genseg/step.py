"""The GenSeg iteration as one jitted function on an explicit state pytree.

One iteration (``mode="genseg"``), each level stepping exactly once:

1. **Level 1, generator weights.** pix2pix on the real (mask, image) pairs of the train
   batch, images min-max scaled to [-1, 1]: the generator's output is computed once
   (``jax.vjp``); D steps on ``0.5 * (GAN(D(m, real), 1) + GAN(D(m, fake), 0))``, then G
   steps on ``GAN(D'(m, fake), 1) + lambda_L1 * |fake - real|`` with the updated D' (the
   pix2pix order). alpha is fixed here.
2. **Level 2, segmenter weights.** Fresh augmentations of the batch's masks
   (``mask_augment``), synthesised by the updated G; S steps (its own optimizer) on
   ``L_train = L_seg(real) + lambda * L_seg(synthetic)``.
3. **Level 3, architecture.** ``alpha`` steps (its own optimizer, DARTS's Adam 3e-4) on
   the hypergradient ``dL_val(S - eta grad_S L_train(S, alpha)) / dalpha``, unrolled
   from the S of level 2 (so ``S1`` is level 2's update when S uses SGD with ``eta``).
   The exact hypergradient yields ``grad_S L_train`` on its way; level 2 uses it.

Modes:

- ``genseg``: levels 1, 2, 3.
- ``released``: the reference code's effective behaviour: levels 1 and 2 with alpha
  frozen and the synthetic images quantised to uint8 levels and detached
  (``stop_gradient``), then one extra S step on the validation batch (its own optimizer
  state, ``optimizers.segmenter_val``). (The reference's doubled lower-level steps are
  not reproduced.)
- ``separate``: G (and D, alpha) frozen, level 2 only (synthetic images detached).
- ``pretrain``: pix2pix pre-training, level 1 only.

``batch = {"train": {"image", "label"}, "val": {"image", "label"}}`` (``val`` is needed
by ``genseg`` and ``released``); images ``[B, *spatial, C]`` in the segmenter's input
space (see ``hypergrad`` for the scaling contract), labels ``[B, *spatial]`` int.

Randomness: ``fold_in(state.key, state.iteration)``, so a state pytree holds everything;
``jax.vmap`` over a stacked state (``init_genseg_state`` vmapped over keys) trains
several seeds in one program. An iteration with a non-finite loss or gradient changes
nothing but ``iteration`` and ``nonfinite_steps``.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from unetjax.genseg import hypergrad as hg
from unetjax.genseg.discriminator import discriminator_loss, generator_loss
from unetjax.genseg.generator import generator_apply, split_variables
from unetjax.genseg.mask_augment import MaskAugmentConfig, augment_masks
from unetjax.genseg.ops import fast_rng
from unetjax.losses import segmentation_loss

MODES = ("genseg", "released", "separate", "pretrain")
# fast XLA CPU compiles, slower code (tests, smoke runs): see make_genseg_step
TEST_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
COUNTERS = ("discriminator", "generator", "segmenter", "arch", "segmenter_val")
LEVELS = {  # mode -> (level 1, level 2, level 3, extra S step on val)
    "genseg": (True, True, True, False),
    "released": (True, True, False, True),
    "separate": (False, True, False, False),
    "pretrain": (True, False, False, False),
}


@dataclasses.dataclass(frozen=True)
class GenSegConfig:
    mode: str = "genseg"
    hypergradient: str = "exact"  # or "darts"
    exact_method: str = "jvp"  # "fwd_rev", "unroll": same number (hypergrad.exact_hypergradient)
    lambda_syn: float = 1.0
    inner_lr: float = 0.01  # eta of the unrolled SGD step
    darts_eps: float = 0.01
    image_scaling: str = "zscore"  # or "identity" (see hypergrad)
    gan_mode: str = "vanilla"  # or "lsgan"
    lambda_l1: float = 100.0
    weight_gan: float = 1.0
    batch_dice: bool = False
    augment: MaskAugmentConfig = MaskAugmentConfig()
    synth_train: bool = True  # generator dropout on while synthesising (if it has dropout)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {self.mode!r}")
        if self.hypergradient not in hg.HYPERGRADIENTS:
            raise ValueError(f"hypergradient must be one of {tuple(hg.HYPERGRADIENTS)}")


class GenSegModels(NamedTuple):
    segmenter: Any  # e.g. unetjax.models.UNet
    generator: Any  # MaskToImageGenerator
    discriminator: Any  # PatchDiscriminator


def pix2pix_adam(lr: float = 2e-4) -> optax.GradientTransformation:
    """pix2pix's optimizer for G and D: Adam(lr, betas 0.5, 0.999)."""
    return optax.adam(lr, b1=0.5, b2=0.999)


def darts_arch_adam(lr: float = 3e-4, weight_decay: float = 1e-3) -> optax.GradientTransformation:
    """DARTS' architecture optimizer: Adam(3e-4, betas 0.5, 0.999), L2 1e-3 on alpha."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(lr, b1=0.5, b2=0.999))


class GenSegOptimizers(NamedTuple):
    segmenter: optax.GradientTransformation
    generator: optax.GradientTransformation = pix2pix_adam()
    discriminator: optax.GradientTransformation = pix2pix_adam()
    arch: optax.GradientTransformation = darts_arch_adam()
    segmenter_val: optax.GradientTransformation | None = None  # released; default: segmenter


class GenSegState(flax.struct.PyTreeNode):
    key: jax.Array
    iteration: jnp.ndarray
    seg_params: Any
    seg_opt: Any
    seg_val_opt: Any
    gen_params: Any
    gen_opt: Any
    disc_params: Any
    disc_opt: Any
    arch: Any  # {"alpha_up": [depth, 3], ("alpha_down": ...)}
    arch_opt: Any
    counts: dict  # optimizer steps per level, see COUNTERS
    nonfinite_steps: jnp.ndarray


def _val_tx(optimizers: GenSegOptimizers):
    return optimizers.segmenter_val or optimizers.segmenter


def init_genseg_state(
    key: jax.Array,
    models: GenSegModels,
    optimizers: GenSegOptimizers,
    example_image: jnp.ndarray,
    num_classes: int,
    *,
    seg_params=None,
    gen_variables=None,
    compiler_options: dict | None = None,
) -> GenSegState:
    """Fresh state (or from given segmenter params / generator variables, e.g. after
    pix2pix pre-training: ``{"params": W, "arch": arch}``). ``example_image``:
    ``[B, *spatial, C]`` (only its shape and dtype are used). vmap it over keys for a
    stacked multi-seed state. ``compiler_options``: as ``make_genseg_step``."""
    options = tuple(sorted((compiler_options or {}).items()))
    return _init_jit(options)(
        key, models, optimizers, example_image, num_classes, seg_params, gen_variables
    )


def _init_traced(key, models, optimizers, example_image, num_classes, seg_params, gen_variables):
    with fast_rng():  # ~10x faster init compiles on CPU (see ops.fast_rng)
        return _init_state(
            key, models, optimizers, example_image, num_classes, seg_params, gen_variables
        )


@functools.lru_cache
def _init_jit(options: tuple):
    """Jitted init (Flax init op by op compiles every small op separately: ~5x slower on
    CPU); jax caches it on (models, optimizers, num_classes, shapes): Flax modules hash by
    value, optax transformations by identity."""
    return jax.jit(_init_traced, static_argnums=(1, 2, 4), compiler_options=dict(options) or None)


def _init_state(key, models, optimizers, example_image, num_classes, seg_params, gen_variables):
    k_seg, k_gen, k_disc, k_run = jax.random.split(key, 4)
    example_image = jnp.zeros(example_image.shape, example_image.dtype)
    masks = jnp.zeros((*example_image.shape[:-1], num_classes), example_image.dtype)
    # given trees are copied: jit would hand the same buffers back, and the step donates
    if seg_params is None:
        seg_params = models.segmenter.init(k_seg, example_image)["params"]
    else:
        seg_params = jax.tree.map(jnp.copy, seg_params)
    if gen_variables is None:
        gen_variables = models.generator.init({"params": k_gen}, masks)
    else:
        gen_variables = jax.tree.map(jnp.copy, gen_variables)
    gen_params, arch = split_variables(gen_variables)
    disc_params = models.discriminator.init(k_disc, masks, example_image)["params"]

    def zero():  # distinct buffers: the jitted step donates the state
        return jnp.zeros((), jnp.int32)

    return GenSegState(
        key=k_run,
        iteration=zero(),
        seg_params=seg_params,
        seg_opt=optimizers.segmenter.init(seg_params),
        seg_val_opt=_val_tx(optimizers).init(seg_params),
        gen_params=gen_params,
        gen_opt=optimizers.generator.init(gen_params),
        disc_params=disc_params,
        disc_opt=optimizers.discriminator.init(disc_params),
        arch=arch,
        arch_opt=optimizers.arch.init(arch),
        counts={name: zero() for name in COUNTERS},
        nonfinite_steps=zero(),
    )


def make_problem(models: GenSegModels, cfg: GenSegConfig, num_classes: int, mode=None):
    mode = mode or cfg.mode
    return hg.GenSegProblem(
        segmenter=models.segmenter,
        generator=models.generator,
        num_classes=num_classes,
        lambda_syn=cfg.lambda_syn,
        inner_lr=cfg.inner_lr,
        image_scaling=cfg.image_scaling,
        batch_dice=cfg.batch_dice,
        detach_synthetic=mode in ("released", "separate"),
        quantize_synthetic=mode == "released",
        synth_train=cfg.synth_train,
    )


def _apply(tx, grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def make_genseg_step(
    models: GenSegModels,
    optimizers: GenSegOptimizers,
    cfg: GenSegConfig,
    num_classes: int,
    *,
    jit: bool = True,
    compiler_options: dict | None = None,
) -> Callable:
    """``(state, batch) -> (state, metrics)``; jitted (state donated) unless ``jit=False``
    (e.g. to ``jax.jit(jax.vmap(step))`` over seeds). ``compiler_options`` go to
    ``jax.jit``. XLA CPU compiles of this step are slow (tiny 2D genseg step on the shared
    2-core machine: ~35 s; the bench's 64^2 one: ~70 s);
    ``TEST_COMPILER_OPTIONS`` (optimisation level 0, legacy fusion emitters) cut that to
    ~5 s for ~3x slower code: for tests and smoke runs."""
    level1, level2, level3, val_step = LEVELS[cfg.mode]
    problem = make_problem(models, cfg, num_classes)
    gen, disc = models.generator, models.discriminator

    def step(state: GenSegState, batch: dict):
        with fast_rng():
            return _step(state, batch)

    def _step(state: GenSegState, batch: dict):
        key = jax.random.fold_in(state.key, state.iteration)
        k_gan, k_aug, k_syn = jax.random.split(key, 3)
        real = batch["train"]
        masks = jax.nn.one_hot(real["label"], num_classes, dtype=real["image"].dtype)
        new = {}
        counts = dict(state.counts)
        metrics = {}
        checks = []

        gen_params = state.gen_params
        if level1:
            target = hg.to_generator_range(real["image"])
            fake, gen_vjp = jax.vjp(
                lambda w: generator_apply(gen, w, state.arch, masks, train=True, key=k_gan),
                gen_params,
            )

            def d_loss_fn(d_params):  # real and fake in one pass (per-sample norms: exact)
                both = jnp.concatenate([target, jax.lax.stop_gradient(fake)])
                logits = disc.apply({"params": d_params}, jnp.concatenate([masks, masks]), both)
                n = target.shape[0]
                return discriminator_loss(logits[:n], logits[n:], cfg.gan_mode)

            d_loss, d_grads = jax.value_and_grad(d_loss_fn)(state.disc_params)
            disc_params, disc_opt = _apply(
                optimizers.discriminator, d_grads, state.disc_opt, state.disc_params
            )

            def g_loss_fn(f):
                logits = disc.apply({"params": disc_params}, masks, f)
                return generator_loss(
                    logits,
                    f,
                    target,
                    mode=cfg.gan_mode,
                    lambda_l1=cfg.lambda_l1,
                    weight_gan=cfg.weight_gan,
                )

            (g_loss, g_parts), g_fake = jax.value_and_grad(g_loss_fn, has_aux=True)(fake)
            (g_grads,) = gen_vjp(g_fake)
            gen_params, gen_opt = _apply(optimizers.generator, g_grads, state.gen_opt, gen_params)
            new.update(disc_params=disc_params, disc_opt=disc_opt, gen_params=gen_params)
            new.update(gen_opt=gen_opt)
            counts["discriminator"] = counts["discriminator"] + 1
            counts["generator"] = counts["generator"] + 1
            metrics.update(d_loss=d_loss, g_loss=g_loss, **g_parts)
            checks += [d_loss, g_loss, optax.tree.norm(d_grads), optax.tree.norm(g_grads)]

        seg_params = state.seg_params
        if level2:
            syn_masks = augment_masks(k_aug, masks, cfg.augment)
            args = (problem, seg_params, state.arch, gen_params, real, syn_masks, k_syn)
            if level3:
                extra = (
                    {"eps_scale": cfg.darts_eps}
                    if cfg.hypergradient == "darts"
                    else {"method": cfg.exact_method}
                )
                h = hg.hypergradient(cfg.hypergradient, *args, batch["val"], **extra)
                seg_grad, lt, parts = h.seg_grad, h.train_loss, h.parts
                arch, arch_opt = _apply(optimizers.arch, h.arch_grad, state.arch_opt, state.arch)
                new.update(arch=arch, arch_opt=arch_opt)
                counts["arch"] = counts["arch"] + 1
                hg_norm = optax.tree.norm(h.arch_grad)
                metrics.update(val_loss_unrolled=h.val_loss, hypergrad_norm=hg_norm)
                checks += [h.val_loss, hg_norm]
            else:
                (lt, parts), seg_grad = jax.value_and_grad(hg.train_loss, argnums=1, has_aux=True)(
                    *args
                )
            seg_params, seg_opt = _apply(optimizers.segmenter, seg_grad, state.seg_opt, seg_params)
            new.update(seg_params=seg_params, seg_opt=seg_opt)
            counts["segmenter"] = counts["segmenter"] + 1
            seg_norm = optax.tree.norm(seg_grad)
            metrics.update(seg_loss=lt, seg_grad_norm=seg_norm, **parts)
            checks += [lt, seg_norm]

        if val_step:
            v_loss, v_grad = jax.value_and_grad(hg.val_loss, argnums=1)(
                problem, seg_params, batch["val"]
            )
            seg_params, seg_val_opt = _apply(
                _val_tx(optimizers), v_grad, state.seg_val_opt, seg_params
            )
            new.update(seg_params=seg_params, seg_val_opt=seg_val_opt)
            counts["segmenter_val"] = counts["segmenter_val"] + 1
            metrics.update(val_step_loss=v_loss)
            checks += [v_loss, optax.tree.norm(v_grad)]

        finite = jnp.all(jnp.isfinite(jnp.stack([jnp.asarray(c, jnp.float32) for c in checks])))
        updated = state.replace(**new, counts=counts)
        blank = jnp.zeros((), jnp.int32)  # keys are not jnp.where-able; the key never changes
        kept = jax.tree.map(
            lambda a, b: jnp.where(finite, a, b),
            updated.replace(key=blank),
            state.replace(key=blank),
        )
        out = kept.replace(
            key=state.key,
            iteration=state.iteration + 1,
            nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
        )
        metrics["finite"] = finite
        return out, metrics

    if not jit:
        return step
    return jax.jit(step, donate_argnums=0, compiler_options=compiler_options)


def make_plain_step(segmenter, tx, *, batch_dice=False, jit=True, compiler_options=None):
    """A plain segmenter step on ``batch["train"]`` (for cost comparisons and baselines)."""

    def step(params, opt_state, batch):
        real = batch["train"]

        def loss_fn(p):
            out = segmenter.apply({"params": p}, real["image"])
            return segmentation_loss(out, real["label"], batch_dice=batch_dice)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        params, opt_state = _apply(tx, grads, opt_state, params)
        return params, opt_state, loss

    if not jit:
        return step
    return jax.jit(step, donate_argnums=(0, 1), compiler_options=compiler_options)
