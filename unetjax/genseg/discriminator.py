"""PatchGAN discriminator on concat(mask one-hot, image) and the pix2pix losses.

pix2pix's ``NLayerDiscriminator`` (``n_layers=3``: the 70x70 PatchGAN), any number of
spatial dims, channel-last:

```
conv4 s2 p1 (base) -> lrelu 0.2
(n_layers - 1) x [conv4 s2 p1 (base * min(2^i, 8)) -> norm -> lrelu 0.2]
conv4 s1 p1 (base * min(2^n_layers, 8)) -> norm -> lrelu 0.2
conv4 s1 p1 (1)                          -> patch logits [B, *patches, 1]
```

Spatial sizes shrink to ``n / 2**n_layers - 2``: a 16^2 input needs ``n_layers <= 2``.
Norm: affine instance norm (pix2pix ``--norm instance``); init normal(0, 0.02).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from unetjax.genseg import ops
from unetjax.genseg.generator import InstanceNorm

GAN_MODES = ("vanilla", "lsgan")


class PatchDiscriminator(nn.Module):
    base_features: int = 64
    n_layers: int = 3
    conv_impl: str = "auto"  # ops.conv_nd: auto, native, folded (3D), im2col

    @nn.compact
    def __call__(self, masks: jnp.ndarray, images: jnp.ndarray) -> jnp.ndarray:
        x = jnp.concatenate([masks.astype(images.dtype), images], axis=-1)
        nd = x.ndim - 2
        init = nn.initializers.normal(0.02)

        def conv(x, features, stride, bias, name):
            kernel = self.param(f"{name}_kernel", init, (*(4,) * nd, x.shape[-1], features))
            y = ops.conv_nd(
                x, kernel.astype(x.dtype), (stride,) * nd, [(1, 1)] * nd, impl=self.conv_impl
            )
            if bias:
                y = y + self.param(f"{name}_bias", nn.initializers.zeros, (features,))
            return y

        x = nn.leaky_relu(conv(x, self.base_features, 2, True, "conv_0"), 0.2)
        for i in range(1, self.n_layers):
            f = self.base_features * min(2**i, 8)
            x = conv(x, f, 2, False, f"conv_{i}")
            x = nn.leaky_relu(InstanceNorm(name=f"norm_{i}")(x), 0.2)
        f = self.base_features * min(2**self.n_layers, 8)
        x = conv(x, f, 1, False, f"conv_{self.n_layers}")
        x = nn.leaky_relu(InstanceNorm(name=f"norm_{self.n_layers}")(x), 0.2)
        if any(s < 2 for s in x.shape[1:-1]):  # the last conv maps s -> s - 1
            raise ValueError(
                f"PatchGAN with n_layers={self.n_layers} leaves spatial {x.shape[1:-1]} before "
                "its last conv; use fewer layers or a larger input"
            )
        return conv(x, 1, 1, True, "head")


def gan_loss(logits: jnp.ndarray, target_is_real: bool, mode: str = "vanilla") -> jnp.ndarray:
    """pix2pix ``GANLoss``: BCE-with-logits (``vanilla``) or least squares (``lsgan``)."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    target = jnp.ones_like(logits) if target_is_real else jnp.zeros_like(logits)
    if mode == "vanilla":
        return optax.sigmoid_binary_cross_entropy(logits, target).mean()
    if mode == "lsgan":
        return jnp.square(logits - target).mean()
    raise ValueError(f"gan_mode must be one of {GAN_MODES}; got {mode!r}")


def discriminator_loss(real_logits, fake_logits, mode: str = "vanilla") -> jnp.ndarray:
    """pix2pix: ``0.5 * (GAN(D(m, real), 1) + GAN(D(m, fake), 0))``."""
    return 0.5 * (gan_loss(real_logits, True, mode) + gan_loss(fake_logits, False, mode))


def generator_loss(fake_logits, fake, target, *, mode="vanilla", lambda_l1=100.0, weight_gan=1.0):
    """pix2pix: ``weight_gan * GAN(D(m, fake), 1) + lambda_l1 * |fake - target|_1``.

    Returns ``(total, {"g_adv": ..., "g_l1": ...})`` (unweighted parts).
    """
    adv = gan_loss(fake_logits, True, mode)
    l1 = jnp.abs(fake - target).mean()
    return weight_gan * adv + lambda_l1 * l1, {"g_adv": adv, "g_l1": l1}


def pix2pix_losses(
    discriminator,
    disc_params,
    masks,
    real,
    fake,
    *,
    mode: str = "vanilla",
    lambda_l1: float = 100.0,
    weight_gan: float = 1.0,
):
    """Both pix2pix losses for one (masks, real, fake) batch with discriminator params.

    ``d_loss`` sees ``stop_gradient(fake)`` (its gradient is for D only); ``g_loss``
    depends on ``fake`` (differentiate it w.r.t. the generator) and on ``disc_params``
    only through D's output (take its gradient w.r.t. the generator, not D). Images in the
    generator's range (-1, 1). Returns a dict: ``g_loss, d_loss, g_adv, g_l1``.
    """
    d = lambda imgs: discriminator.apply({"params": disc_params}, masks, imgs)  # noqa: E731
    d_loss = discriminator_loss(d(real), d(jax.lax.stop_gradient(fake)), mode)
    g_loss, parts = generator_loss(
        d(fake), fake, real, mode=mode, lambda_l1=lambda_l1, weight_gan=weight_gan
    )
    return {"g_loss": g_loss, "d_loss": d_loss, **parts}
