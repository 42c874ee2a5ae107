"""pix2pix-style mask-to-image U-Net generator with a learnable (DARTS) architecture.

Input: one-hot masks ``[B, *spatial, K]`` (2D or 3D, channel-last); output images
``[B, *spatial, out_channels]`` in (-1, 1) (tanh). ``depth`` levels, each one stride-2
down-sampling cell and one stride-2 up-sampling cell, features
``min(base * 2**i, max_features)`` (pix2pix's U-Net-256 is depth 8, base 64, max 512):

```
e_0 = down_0(mask)
e_i = norm(down_i(lrelu_0.2(e_{i-1})))       0 < i < depth-1
e_n = down_n(lrelu_0.2(e_{n-1}))             innermost, no norm (n = depth-1)
h   = e_n
u_i = [dropout](norm(up_i(relu(h)))); h = concat(e_{i-1}, u_i)      i = n .. 1
out = tanh(up_0(relu(h)))
```

Every up cell (and, with ``search_down``, every down cell) is a softmax(alpha)-weighted
mixture of the candidate ops of ``ops.CANDIDATES`` (kernel/padding 4/1, 6/2, 8/3, stride 2,
all exactly halving / doubling); cells that are not searched use pix2pix's 4/1 op.
alpha lives in the variable collection ``"arch"``: ``alpha_up`` ``[depth, 3]`` (row i =
up cell i, 0 = outermost) and, with ``search_down``, ``alpha_down`` ``[depth, 3]``;
initialised ``1e-3 * normal`` (near uniform mixing).

Norm: affine instance norm (pix2pix's ``--norm instance``; stateless, so the model has
no batch statistics to thread through the functional step). Convs followed by a norm
have no bias. Weight init normal(0, 0.02) as pix2pix. Dropout 0.5 (``dropout=True``) on
the ``dropout_levels`` up cells just above the innermost one (pix2pix: 3), needs a
``"dropout"`` rng when ``train=True``.

Apply: ``gen.apply({"params": W, "arch": arch}, masks, train=..., rngs={"dropout": k})``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from unetjax.genseg import ops

ARCH = "arch"


def _alpha_init(rng_fn, shape):
    return lambda: 1e-3 * jax.random.normal(rng_fn(), shape, jnp.float32)


class MixedCell(nn.Module):
    """Stride-2 cell: ``sum_c softmax(alpha)_c * op_c(x)`` over ``candidates``."""

    features: int
    direction: str  # "up" or "down"
    candidates: tuple[tuple[int, int], ...] = ops.CANDIDATES
    use_bias: bool = False
    impl: str = "fused"
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray, weights: jnp.ndarray | None) -> jnp.ndarray:
        nd = x.ndim - 2
        init = nn.initializers.normal(0.02)
        kernels = [
            self.param(f"kernel_{k}", init, (*(k,) * nd, x.shape[-1], self.features))
            for k, _ in self.candidates
        ]
        if weights is None:
            weights = jnp.ones((1,), x.dtype)
        y = ops.mixed_op(
            x, kernels, weights, self.candidates, self.direction, self.impl, self.conv_impl
        )
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,))
        return y


class InstanceNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        return ops.instance_norm(x, scale, bias)


class MaskToImageGenerator(nn.Module):
    """See the module docstring. ``masks`` spatial sizes must divide by ``2**depth``."""

    out_channels: int
    depth: int = 8
    base_features: int = 64
    max_features: int | None = None  # default 8 * base (pix2pix)
    search_up: bool = True
    search_down: bool = False
    dropout: bool = False
    dropout_rate: float = 0.5
    dropout_levels: int = 3
    impl: str = "fused"  # "fused" (one conv per cell) or "reference" (one conv per candidate)
    conv_impl: str = "auto"  # ops.conv_nd: auto, native, folded (3D), im2col

    def features(self) -> tuple[int, ...]:
        top = self.max_features or 8 * self.base_features
        return tuple(min(self.base_features * 2**i, top) for i in range(self.depth))

    @nn.compact
    def __call__(self, masks: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        depth = self.depth
        if depth < 2:
            raise ValueError(f"generator depth must be >= 2, got {depth}")
        for axis, size in enumerate(masks.shape[1:-1]):
            if size % 2**depth:
                raise ValueError(
                    f"spatial size {size} on axis {axis} is not divisible by 2**depth = "
                    f"{2**depth} (generator depth {depth})"
                )
        feats = self.features()
        n_cand = len(ops.CANDIDATES)
        alpha_up = alpha_down = None
        if self.search_up:
            alpha_up = self.variable(
                ARCH, "alpha_up", _alpha_init(lambda: self.make_rng("params"), (depth, n_cand))
            ).value
        if self.search_down:
            alpha_down = self.variable(
                ARCH, "alpha_down", _alpha_init(lambda: self.make_rng("params"), (depth, n_cand))
            ).value

        def cell(direction, level, features, use_bias, alpha):
            searched = alpha is not None
            return MixedCell(
                features,
                direction,
                ops.CANDIDATES if searched else ops.DEFAULT_OP,
                use_bias=use_bias,
                impl=self.impl,
                conv_impl=self.conv_impl,
                name=f"{direction}_{level}",
            ), (jax.nn.softmax(alpha[level]) if searched else None)

        x = masks
        skips = []
        for i in range(depth):
            innermost = i == depth - 1
            if i > 0:
                x = nn.leaky_relu(x, 0.2)
            has_norm = 0 < i < depth - 1
            mod, w = cell("down", i, feats[i], not has_norm, alpha_down)
            x = mod(x, w.astype(x.dtype) if w is not None else None)
            if has_norm:
                x = InstanceNorm(name=f"down_{i}_norm")(x)
            if not innermost:
                skips.append(x)

        first_dropout = max(1, depth - 1 - self.dropout_levels)
        for i in range(depth - 1, 0, -1):
            x = nn.relu(x)
            mod, w = cell("up", i, feats[i - 1], False, alpha_up)
            x = mod(x, w.astype(x.dtype) if w is not None else None)
            x = InstanceNorm(name=f"up_{i}_norm")(x)
            if self.dropout and first_dropout <= i <= depth - 2:
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
            x = jnp.concatenate([skips.pop(), x], axis=-1)
        x = nn.relu(x)
        mod, w = cell("up", 0, self.out_channels, True, alpha_up)
        x = mod(x, w.astype(x.dtype) if w is not None else None)
        return jnp.tanh(x)


def split_variables(variables) -> tuple[dict, dict]:
    """``model.init(...)`` output -> (weights W, arch variables {"alpha_up": ...})."""
    return variables["params"], dict(variables.get(ARCH, {}))


def generator_apply(generator, params, arch, masks, *, train=False, key=None):
    """Apply with weights ``params`` and architecture ``arch`` (dict of alpha arrays)."""
    variables = {"params": params}
    if arch:
        variables[ARCH] = arch
    rngs = {"dropout": key} if (train and generator.dropout and key is not None) else None
    with ops.fast_rng():
        return generator.apply(variables, masks, train=train, rngs=rngs)


def init_generator(generator, key, masks, compiler_options=None):
    """``generator.init`` jitted, with fast-compiling random ops (``ops.fast_rng``): on XLA
    CPU an eager or default-RNG init compiles for tens of seconds. Returns the variables
    ``{"params": W, "arch": {...}}``."""

    def init(key, masks):
        with ops.fast_rng():
            return generator.init({"params": key}, masks)

    return jax.jit(init, compiler_options=compiler_options)(key, masks)
