"""Level 3 of GenSeg: the hypergradient of the validation loss w.r.t. the generator's
architecture alpha, through one unrolled segmenter step.

```
L_train(S, a) = L_seg(S; real) + lambda * L_seg(S; (x_syn(a), aug(m)))
x_syn(a)      = scale(G_{W,a}(aug(m)))                 (differentiable: no stop_gradient,
                                                        no quantisation)
S1(a)         = S - eta * grad_S L_train(S, a)         (plain SGD, as DARTS)
hypergradient = d L_val(S1(a)) / d a
```

``W`` (after this iteration's level 1), the augmented masks ``aug(m)`` and the dropout
key are fixed inputs: sampled once per iteration outside the differentiated function.

- ``exact_hypergradient``: exact, second order. ``method="unroll"``: ``jax.grad``
  through the unrolled step, literally. ``method="jvp"`` (default): the same number as
  ``-eta * d/da <v, grad_S L_train(S, a)>``, ``v = grad_S L_val(S1)``, with the inner
  product a forward-mode derivative (reverse over forward): ~20x cheaper on XLA CPU.
- ``darts_hypergradient``: DARTS' central finite difference of the mixed second
  derivative, ``-eta * [grad_a L_train(S + e v, a) - grad_a L_train(S - e v, a)] / (2 e)``
  with ``v = grad_S L_val(S1)``, ``e = 0.01 / ||v||`` (unreliable in float32, see there).
- First-order DARTS (``eta = 0``) is not offered: alpha does not enter ``L_val``
  directly, so the direct term ``dL_val/da`` is identically zero and a first-order
  variant would never move alpha.

All of them return ``grad_S L_train(S, a)`` (computed on the way) for level 2 to reuse;
"jvp" and "darts" share one generator forward pass (a VJP) between level 2 and level 3.

Image scaling (``image_scaling``): the generator works in (-1, 1) (tanh); its pix2pix
targets are the real images min-max scaled per image and channel
(``to_generator_range``). For the segmenter:

- ``"zscore"`` (default): synthetic images are z-scored per image and channel
  (differentiable; ``from_generator_range``). Real images arrive z-scored per case by the
  data pipeline (``unetjax.data.normalize``, scheme ``zscore``), and z-scoring is
  invariant to the affine min-max map, so a perfect generator gives exactly the real
  image's normalisation (2D: one image == one case; 3D patches: approximately).
- ``"identity"``: synthetic images are used as they are, in (-1, 1); the runner must
  then feed real images min-max scaled to [-1, 1] too (``to_generator_range``).
"""

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from unetjax.genseg.generator import generator_apply
from unetjax.losses import segmentation_loss

SCALINGS = ("zscore", "identity")
EXACT_METHODS = ("jvp", "fwd_rev", "unroll")


# ----------------------------------------------------------------------------- images


def _spatial_axes(x):
    return tuple(range(1, x.ndim - 1))


def to_generator_range(images: jnp.ndarray) -> jnp.ndarray:
    """Per image and channel min-max to [-1, 1] (constant channels -> 0)."""
    axes = _spatial_axes(images)
    lo = images.min(axes, keepdims=True)
    hi = images.max(axes, keepdims=True)
    span = hi - lo
    return jnp.where(span > 0, 2 * (images - lo) / jnp.where(span > 0, span, 1) - 1, 0.0)


def from_generator_range(images: jnp.ndarray, scaling: str = "zscore", eps: float = 1e-6):
    """Generator output (-1, 1) -> the segmenter's input space (differentiable)."""
    if scaling == "identity":
        return images
    if scaling != "zscore":
        raise ValueError(f"image_scaling must be one of {SCALINGS}; got {scaling!r}")
    axes = _spatial_axes(images)
    mean = images.mean(axes, keepdims=True)
    var = jnp.square(images - mean).mean(axes, keepdims=True)
    return (images - mean) * jax.lax.rsqrt(var + eps)


def quantize_uint8(images: jnp.ndarray) -> jnp.ndarray:
    """The reference's ``tensor2im``: (-1, 1) -> 256 uint8 levels -> back (no gradient)."""
    q = jnp.round((jnp.clip(images, -1, 1) + 1) * 127.5)
    return jax.lax.stop_gradient(q / 127.5 - 1)


# ----------------------------------------------------------------------------- problem


@dataclasses.dataclass(frozen=True)
class GenSegProblem:
    """The models and constants of the level-2/3 losses.

    ``seg_loss_fn(outputs, labels) -> scalar`` defaults to ``segmentation_loss`` (Dice+CE,
    with ``batch_dice``). ``detach_synthetic`` / ``quantize_synthetic`` reproduce the
    reference code (``released``) or freeze G (``separate``); both must be off for a
    meaningful hypergradient. ``synth_train`` runs the generator with dropout active
    (pix2pix's noise source) when it has dropout.
    """

    segmenter: Any
    generator: Any
    num_classes: int
    lambda_syn: float = 1.0
    inner_lr: float = 0.01
    image_scaling: str = "zscore"
    batch_dice: bool = False
    detach_synthetic: bool = False
    quantize_synthetic: bool = False
    synth_train: bool = True
    seg_loss_fn: Callable | None = None

    def seg_loss(self, seg_params, images, labels):
        return self.loss_of(self.segmenter.apply({"params": seg_params}, images), labels)

    def loss_of(self, outputs, labels):
        if self.seg_loss_fn is not None:
            return self.seg_loss_fn(outputs, labels)
        return segmentation_loss(outputs, labels, batch_dice=self.batch_dice)

    def synthesize(self, gen_params, arch, masks, key=None):
        """Segmenter-ready synthetic images from one-hot masks."""
        g = generator_apply(
            self.generator, gen_params, arch, masks, train=self.synth_train, key=key
        )
        if self.quantize_synthetic:
            g = quantize_uint8(g)
        if self.detach_synthetic:
            g = jax.lax.stop_gradient(g)
        return from_generator_range(g, self.image_scaling)


def train_loss(problem: GenSegProblem, seg_params, arch, gen_params, real, syn_masks, key=None):
    """``L_train(S, alpha)``; returns ``(loss, {"seg_real": .., "seg_syn": ..})``."""
    images = problem.synthesize(gen_params, arch, syn_masks, key)
    return _train_loss_from_images(problem, seg_params, real, images, syn_masks)


def _train_loss_from_images(problem, seg_params, real, images, syn_masks):
    """Real and synthetic losses from ONE segmenter pass over the concatenated batch (the
    U-Net normalises per sample, so this is exactly two passes; faster on CPU)."""
    syn_labels = jnp.argmax(syn_masks, axis=-1)
    n = real["image"].shape[0]
    outputs = problem.segmenter.apply(
        {"params": seg_params}, jnp.concatenate([real["image"], images.astype(real["image"].dtype)])
    )
    real_loss = problem.loss_of(_batch_slice(outputs, 0, n), real["label"])
    syn_loss = problem.loss_of(_batch_slice(outputs, n, None), syn_labels)
    return real_loss + problem.lambda_syn * syn_loss, {"seg_real": real_loss, "seg_syn": syn_loss}


def _batch_slice(outputs, lo, hi):
    if isinstance(outputs, tuple | list):
        return type(outputs)(o[lo:hi] for o in outputs)
    return outputs[lo:hi]


def val_loss(problem: GenSegProblem, seg_params, val):
    return problem.seg_loss(seg_params, val["image"], val["label"])


def sgd_unroll(seg_params, seg_grad, eta):
    return jax.tree.map(lambda s, g: s - eta * g, seg_params, seg_grad)


class Hypergradient(NamedTuple):
    arch_grad: Any  # dL_val(S1(alpha))/dalpha, same tree as arch
    seg_grad: Any  # grad_S L_train(S, alpha): level 2's gradient
    train_loss: jnp.ndarray  # L_train(S, alpha)
    val_loss: jnp.ndarray  # L_val(S1)
    parts: dict


def _first_order(problem, seg_params, arch, gen_params, real, syn_masks, key, val):
    """Shared part: synthetic images with their VJP to alpha, level 2's gradient ``g``,
    ``S1 = S - eta g`` and ``v = grad_S L_val(S1)``."""
    images, synth_vjp = jax.vjp(lambda a: problem.synthesize(gen_params, a, syn_masks, key), arch)
    (lt, parts), g = jax.value_and_grad(_train_loss_from_images, argnums=1, has_aux=True)(
        problem, seg_params, real, images, syn_masks
    )
    s1 = sgd_unroll(seg_params, g, problem.inner_lr)
    lv, v = jax.value_and_grad(val_loss, argnums=1)(problem, s1, val)
    return images, synth_vjp, g, lt, parts, lv, v


def exact_hypergradient(
    problem: GenSegProblem,
    seg_params,
    arch,
    gen_params,
    real,
    syn_masks,
    key,
    val,
    method: str = "jvp",
) -> Hypergradient:
    """Exact ``dL_val(S1(alpha))/dalpha``.

    ``method="unroll"``: ``jax.grad`` of ``L_val(S - eta grad_S L_train(S, alpha))``, the
    literal definition (reverse over reverse). ``method="jvp"`` (default): the same
    number by the chain rule, ``-eta * d/dalpha <v, grad_S L_train(S, alpha)>`` with
    ``v = grad_S L_val(S1)`` held fixed, the inner product taken as a forward-mode
    directional derivative of the synthetic loss along ``v`` (reverse over forward) and
    pulled back through G with one VJP. ``method="fwd_rev"``: the same mixed derivative
    taken forward over reverse (``jvp`` of the input gradient along ``v``: no weight
    gradients at all). Both identical to "unroll" up to rounding, and far cheaper on XLA
    CPU: reverse-over-reverse through a conv produces convolutions whose "kernel" is an
    activation-sized gradient, a pathologically slow case there (measured on a small 2D
    U-Net at 64^2: 1.08 s vs 0.05 s for the second-order part; plain step 0.03 s).
    """
    if method == "unroll":

        def outer(a):
            (lt, parts), g = jax.value_and_grad(train_loss, argnums=1, has_aux=True)(
                problem, seg_params, a, gen_params, real, syn_masks, key
            )
            s1 = sgd_unroll(seg_params, g, problem.inner_lr)
            return val_loss(problem, s1, val), (g, lt, parts)

        (lv, (g, lt, parts)), hg = jax.value_and_grad(outer, has_aux=True)(arch)
        return Hypergradient(hg, g, lt, lv, parts)
    if method not in EXACT_METHODS:
        raise ValueError(
            f"exact hypergradient method must be one of {EXACT_METHODS}; got {method!r}"
        )
    images, synth_vjp, g, lt, parts, lv, v = _first_order(
        problem, seg_params, arch, gen_params, real, syn_masks, key, val
    )
    labels = jnp.argmax(syn_masks, axis=-1)

    if method == "jvp":  # reverse over forward: grad_x <v, grad_S L_syn(S; x)>

        def directional(x):
            return jax.jvp(lambda s: problem.seg_loss(s, x, labels), (seg_params,), (v,))[1]

        cot = jax.grad(directional)(images)
    else:  # "fwd_rev", forward over reverse: d/dS [grad_x L_syn(S; x)] . v (same number)

        def grad_images(s):
            return jax.grad(lambda x: problem.seg_loss(s, x, labels))(images)

        cot = jax.jvp(grad_images, (seg_params,), (v,))[1]
    (hg,) = synth_vjp(-problem.inner_lr * problem.lambda_syn * cot)
    return Hypergradient(hg, g, lt, lv, parts)


def darts_hypergradient(
    problem: GenSegProblem,
    seg_params,
    arch,
    gen_params,
    real,
    syn_masks,
    key,
    val,
    eps_scale: float = 0.01,
) -> Hypergradient:
    """DARTS' finite-difference estimate (second-order DARTS, eq. 8 of Liu et al. 2019).

    ``-eta * [grad_a L_train(S + e v, a) - grad_a L_train(S - e v, a)] / (2 e)``; only the
    synthetic term depends on alpha, and alpha enters only through the synthetic images,
    so this is computed as the images' gradients at ``S +- e v`` pulled back through G
    with one VJP (the same number, by linearity of the VJP).

    Float32 warning: on the repository's U-Net in float32 the difference is dominated by
    rounding at ``e = 0.01 / |v|`` (measured, 2D 32^2: relative error ~10, cosine ~0 vs
    the exact value; ``eps_scale=1``: error ~0.4, cosine ~0.95). It matches the exact
    hypergradient in float64 (tests). Prefer ``exact_hypergradient``: no dearer here.
    """
    images, synth_vjp, g, lt, parts, lv, v = _first_order(
        problem, seg_params, arch, gen_params, real, syn_masks, key, val
    )
    labels = jnp.argmax(syn_masks, axis=-1)
    eps = eps_scale / jnp.maximum(optax.tree.norm(v), 1e-12)

    def grad_images(s):
        return jax.grad(lambda x: problem.seg_loss(s, x, labels))(images)

    gp = grad_images(jax.tree.map(lambda s, d: s + eps * d, seg_params, v))
    gm = grad_images(jax.tree.map(lambda s, d: s - eps * d, seg_params, v))
    (hg,) = synth_vjp(-problem.inner_lr * problem.lambda_syn * (gp - gm) / (2 * eps))
    return Hypergradient(hg, g, lt, lv, parts)


HYPERGRADIENTS = {"exact": exact_hypergradient, "darts": darts_hypergradient}


def hypergradient(name: str, *args, **kwargs) -> Hypergradient:
    """Dispatch by name: ``"exact"`` or ``"darts"``."""
    if name == "first_order":
        raise ValueError(
            "first-order hypergradient is identically zero here (alpha does not enter L_val "
            "directly); use 'exact' or 'darts'"
        )
    if name not in HYPERGRADIENTS:
        raise ValueError(f"hypergradient must be one of {tuple(HYPERGRADIENTS)}; got {name!r}")
    return HYPERGRADIENTS[name](*args, **kwargs)


def unrolled_val_loss(problem, seg_params, arch, gen_params, real, syn_masks, key, val):
    """``L_val(S1(alpha))`` as a plain function of everything (for numerical checks)."""
    g = jax.grad(lambda s: train_loss(problem, s, arch, gen_params, real, syn_masks, key)[0])(
        seg_params
    )
    return val_loss(problem, sgd_unroll(seg_params, g, problem.inner_lr), val)
