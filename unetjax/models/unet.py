"""One U-Net for 2D and 3D with nnU-Net's defaults (dynamic-network-architectures' PlainConvUNet).

Encoder stage i: ``convs_per_stage`` x [conv -> InstanceNorm -> LeakyReLU(0.01)], the
first conv strided by ``strides[i]`` (or a max-pool with window == stride before it when
``downsample == "maxpool"``); features ``min(base * 2**i, max)``. Decoder stage j (from
the bottom): kernel == stride transposed conv (as matmul + depth-to-space), concatenate
the skip, ``convs_per_stage`` conv blocks; a 1x1 head at every decoder stage when deep
supervision is on (highest resolution first), else only at the top.

Dropout (off by default): with ``dropout_rate > 0`` an element-wise ``nn.Dropout`` follows
each decoder stage's conv blocks (before its head and the next upsampling). It is active only
when the model is called with ``train=True`` (training or MC-dropout sampling), which then
needs ``rngs={"dropout": key}``. It has no parameters; with ``dropout_rate == 0`` (or
``train=False``) parameters and outputs are exactly those of the model without it.

Input-size rule: every spatial size must be divisible by the product of the strides along
its axis (``total_stride``); ``UNet`` raises a ValueError naming the axis otherwise.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from unetjax.models.layers import Conv, ConvNormAct, UpsampleMatmul, max_pool


def stage_features(num_stages: int, base: int, maximum: int) -> tuple[int, ...]:
    """nnU-Net's feature rule: ``min(base * 2**i, maximum)`` per stage."""
    return tuple(min(base * 2**i, maximum) for i in range(num_stages))


def total_stride(strides: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """Product of the per-stage strides along each axis: inputs must divide by it."""
    return tuple(int(v) for v in np.prod(np.asarray(strides), axis=0))


def check_input_size(spatial: Sequence[int], strides: Sequence[Sequence[int]]) -> None:
    """Raise ValueError unless every spatial size divides by the total stride of its axis."""
    divisor = total_stride(strides)
    if len(spatial) != len(divisor):
        raise ValueError(f"input has {len(spatial)} spatial dims, strides have {len(divisor)}")
    for axis, (size, d) in enumerate(zip(spatial, divisor, strict=True)):
        if size % d:
            raise ValueError(
                f"spatial size {size} on axis {axis} is not divisible by the U-Net's total "
                f"stride {d} (strides {[list(s) for s in strides]}); use a multiple of {d}"
            )


class UNet(nn.Module):
    """nnU-Net-style U-Net; input ``[B, *spatial, C]``, output logits ``[B, *spatial, K]``.

    With ``deep_supervision`` the output is a tuple of logits, full resolution first, then
    one per lower decoder stage (each at that stage's resolution). ``train=True`` turns on
    the decoder dropout (only when ``dropout_rate > 0``; needs a ``"dropout"`` rng).
    """

    num_classes: int
    features: Sequence[int]
    strides: Sequence[Sequence[int]]
    kernel_sizes: Sequence[Sequence[int]]
    convs_per_stage: int = 2
    downsample: str = "conv"  # "conv" (strided conv, nnU-Net) or "maxpool"
    deep_supervision: bool = False
    dtype: jnp.dtype = jnp.float32
    conv_impl: str = "auto"  # see layers.Conv: folded 3D convs on CPU, native elsewhere
    dropout_rate: float = 0.0  # decoder dropout; only active with train=True
    remat: bool = False  # recompute each conv block in the backward pass (saves memory)

    def setup_check(self, x: jnp.ndarray) -> None:
        n = len(self.features)
        if not (len(self.strides) == len(self.kernel_sizes) == n):
            raise ValueError(
                f"features ({n}), strides ({len(self.strides)}) and kernel_sizes "
                f"({len(self.kernel_sizes)}) need one entry per stage"
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.downsample not in ("conv", "maxpool"):
            raise ValueError(f"downsample must be 'conv' or 'maxpool', got {self.downsample!r}")
        check_input_size(x.shape[1:-1], self.strides)

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False):
        self.setup_check(x)
        x = x.astype(self.dtype)
        block = nn.remat(ConvNormAct) if self.remat else ConvNormAct  # same parameter tree
        skips = []
        for i, (feat, stride, kernel) in enumerate(
            zip(self.features, self.strides, self.kernel_sizes, strict=True)
        ):
            first_stride = stride
            if self.downsample == "maxpool" and any(s > 1 for s in stride):
                x = max_pool(x, stride)
                first_stride = (1,) * len(stride)
            for j in range(self.convs_per_stage):
                x = block(
                    feat,
                    kernel,
                    first_stride if j == 0 else (1,) * len(stride),
                    dtype=self.dtype,
                    conv_impl=self.conv_impl,
                    name=f"encoder_{i}_conv_{j}",
                )(x)
            skips.append(x)

        outputs = []
        x = skips.pop()
        num_decoder = len(self.features) - 1
        for d in range(num_decoder):
            level = num_decoder - 1 - d  # encoder stage whose skip we join
            x = UpsampleMatmul(
                self.features[level],
                self.strides[level + 1],
                dtype=self.dtype,
                name=f"decoder_{level}_up",
            )(x)
            x = jnp.concatenate([x, skips.pop()], axis=-1)
            for j in range(self.convs_per_stage):
                x = block(
                    self.features[level],
                    self.kernel_sizes[level],
                    (1,) * len(self.strides[level]),
                    dtype=self.dtype,
                    conv_impl=self.conv_impl,
                    name=f"decoder_{level}_conv_{j}",
                )(x)
            if self.dropout_rate > 0:
                x = nn.Dropout(self.dropout_rate, name=f"decoder_{level}_dropout")(
                    x, deterministic=not train
                )
            if self.deep_supervision or level == 0:
                ndim = x.ndim - 2
                head = Conv(
                    self.num_classes,
                    (1,) * ndim,
                    (1,) * ndim,
                    dtype=self.dtype,
                    impl=self.conv_impl,
                    name=f"head_{level}",
                )(x)
                outputs.append(head.astype(jnp.float32))
        outputs = outputs[::-1]  # full resolution first
        return tuple(outputs) if self.deep_supervision else outputs[0]


def unet_param_count(
    in_channels: int,
    num_classes: int,
    features: Sequence[int],
    kernel_sizes: Sequence[Sequence[int]],
    strides: Sequence[Sequence[int]],
    convs_per_stage: int = 2,
    deep_supervision: bool = False,
) -> int:
    """Closed-form parameter count of ``UNet`` (used by tests and the PyTorch twin)."""

    def conv(cin: int, cout: int, kernel: Sequence[int]) -> int:
        return int(np.prod(kernel)) * cin * cout  # no bias: instance norm follows

    norm = 2  # scale + bias per channel
    total = 0
    cin = in_channels
    for feat, kernel in zip(features, kernel_sizes, strict=True):
        for _ in range(convs_per_stage):
            total += conv(cin, feat, kernel) + norm * feat
            cin = feat
    for level in range(len(features) - 2, -1, -1):
        feat, factor = features[level], int(np.prod(strides[level + 1]))
        total += features[level + 1] * factor * feat + feat  # upsample kernel + bias
        cin = 2 * feat
        for _ in range(convs_per_stage):
            total += conv(cin, feat, kernel_sizes[level]) + norm * feat
            cin = feat
        ndim = len(kernel_sizes[level])
        if deep_supervision or level == 0:
            total += conv(feat, num_classes, (1,) * ndim) + num_classes  # head has a bias
    return total
