"""A PyTorch twin of ``unetjax.models.UNet`` (same layers, order and parameter count).

Channels-first (``[B, C, *spatial]``), for benchmarking JAX against PyTorch eager on the
same network and the same loss:

* stage: ``convs_per_stage`` x [conv (no bias, ``k // 2`` padding) -> InstanceNorm
  (affine, eps 1e-5, batch-free statistics) -> LeakyReLU(0.01)]; the first conv of a stage
  strided (or a max-pool with window == stride before it with ``downsample="maxpool"``);
* decoder: ``ConvTranspose`` with kernel == stride (+ bias), concatenate [up, skip], conv
  blocks; 1x1 heads with bias (every decoder stage with deep supervision, full resolution
  first);
* loss: CE + (1 - soft Dice) per output, deep-supervision weights ``1/2^i`` normalised,
  labels downsampled by strided slicing (``unetjax.losses``).

:func:`load_flax_params` copies a Flax ``UNet``'s parameters into the twin, including the
matmul upsampling kernel ``[C_in, prod(f) * C_out]`` (channel index ``(offset..., c)``
row-major, see ``unetjax.models.layers.UpsampleMatmul``) -> ``ConvTranspose`` weight
``[C_in, C_out, *f]``. PyTorch's transposed conv scatters ``x[i] * W[..., a]`` to output
position ``i * f + a`` (no flip, unlike ``to_conv_transpose_kernel`` for
``jax.lax.conv_transpose``, which correlates the dilated input and so needs one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unetjax.models import unet_param_count

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_NORM = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}


class ConvNormAct(nn.Module):
    """conv (no bias) -> InstanceNorm(affine, eps 1e-5) -> LeakyReLU(0.01)."""

    def __init__(self, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int]):
        super().__init__()
        nd = len(kernel)
        self.conv = _CONV[nd](
            cin,
            cout,
            tuple(kernel),
            stride=tuple(stride),
            padding=tuple(k // 2 for k in kernel),
            bias=False,
        )
        self.norm = _NORM[nd](cout, eps=1e-5, affine=True, track_running_stats=False)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class TorchUNet(nn.Module):
    """The PyTorch twin of ``unetjax.models.UNet``; input ``[B, C, *S]``, logits ``[B, K, *S]``.

    Submodules are named after the Flax modules (``encoder_{i}_conv_{j}``,
    ``decoder_{level}_up``, ``decoder_{level}_conv_{j}``, ``head_{level}``).
    With ``deep_supervision`` the forward returns a tuple (full resolution first) unless
    called with ``full_res_only=True`` (inference: the lower heads are skipped, as
    nnU-Net switches deep supervision off to predict).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        features: Sequence[int],
        strides: Sequence[Sequence[int]],
        kernel_sizes: Sequence[Sequence[int]],
        convs_per_stage: int = 2,
        downsample: str = "conv",
        deep_supervision: bool = False,
    ):
        super().__init__()
        if downsample not in ("conv", "maxpool"):
            raise ValueError(f"downsample must be 'conv' or 'maxpool', got {downsample!r}")
        self.features = tuple(int(f) for f in features)
        self.strides = [tuple(int(s) for s in st) for st in strides]
        self.kernel_sizes = [tuple(int(k) for k in ks) for ks in kernel_sizes]
        self.convs_per_stage = convs_per_stage
        self.downsample = downsample
        self.deep_supervision = deep_supervision
        self.config = dict(
            in_channels=in_channels,
            num_classes=num_classes,
            features=self.features,
            strides=self.strides,
            kernel_sizes=self.kernel_sizes,
            convs_per_stage=convs_per_stage,
            deep_supervision=deep_supervision,
        )
        nd = len(self.strides[0])
        self.blocks = nn.ModuleDict()
        cin = in_channels
        for i, (feat, stride, kernel) in enumerate(
            zip(self.features, self.strides, self.kernel_sizes, strict=True)
        ):
            first = stride
            if downsample == "maxpool" and any(s > 1 for s in stride):
                self.blocks[f"encoder_{i}_pool"] = _POOL[nd](stride, stride)
                first = (1,) * nd
            for j in range(convs_per_stage):
                st = first if j == 0 else (1,) * nd
                self.blocks[f"encoder_{i}_conv_{j}"] = ConvNormAct(cin, feat, kernel, st)
                cin = feat
        for level in range(len(self.features) - 2, -1, -1):
            feat, factors = self.features[level], self.strides[level + 1]
            self.blocks[f"decoder_{level}_up"] = _CONV_T[nd](
                self.features[level + 1], feat, factors, stride=factors, bias=True
            )
            cin = 2 * feat
            for j in range(convs_per_stage):
                self.blocks[f"decoder_{level}_conv_{j}"] = ConvNormAct(
                    cin, feat, self.kernel_sizes[level], (1,) * nd
                )
                cin = feat
            if deep_supervision or level == 0:
                self.blocks[f"head_{level}"] = _CONV[nd](feat, num_classes, 1, bias=True)

    def forward(self, x: torch.Tensor, full_res_only: bool = False):
        b = self.blocks
        skips = []
        for i in range(len(self.features)):
            if f"encoder_{i}_pool" in b:
                x = b[f"encoder_{i}_pool"](x)
            for j in range(self.convs_per_stage):
                x = b[f"encoder_{i}_conv_{j}"](x)
            skips.append(x)
        x = skips.pop()
        outputs = []
        for level in range(len(self.features) - 2, -1, -1):
            x = b[f"decoder_{level}_up"](x)
            x = torch.cat([x, skips.pop()], dim=1)
            for j in range(self.convs_per_stage):
                x = b[f"decoder_{level}_conv_{j}"](x)
            if level == 0 or (self.deep_supervision and not full_res_only):
                outputs.append(b[f"head_{level}"](x))
        outputs = outputs[::-1]
        if self.deep_supervision and not full_res_only:
            return tuple(outputs)
        return outputs[0]


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def expected_param_count(model: TorchUNet) -> int:
    """``unet_param_count`` for the twin's configuration (the Flax model's closed form)."""
    c = model.config
    return unet_param_count(
        c["in_channels"],
        c["num_classes"],
        c["features"],
        c["kernel_sizes"],
        c["strides"],
        convs_per_stage=c["convs_per_stage"],
        deep_supervision=c["deep_supervision"],
    )


def build_twin(
    in_channels: int,
    num_classes: int,
    features,
    strides,
    kernel_sizes,
    convs_per_stage: int = 2,
    downsample: str = "conv",
    deep_supervision: bool = False,
) -> TorchUNet:
    """A ``TorchUNet``; asserts its parameter count equals ``unet_param_count``."""
    model = TorchUNet(
        in_channels,
        num_classes,
        features,
        strides,
        kernel_sizes,
        convs_per_stage=convs_per_stage,
        downsample=downsample,
        deep_supervision=deep_supervision,
    )
    got, want = param_count(model), expected_param_count(model)
    if got != want:
        raise AssertionError(f"TorchUNet has {got} parameters, unet_param_count says {want}")
    return model


def twin_of(flax_model, in_channels: int) -> TorchUNet:
    """The twin of a Flax ``UNet`` (its fields) for ``in_channels`` input channels."""
    return build_twin(
        in_channels,
        flax_model.num_classes,
        flax_model.features,
        flax_model.strides,
        flax_model.kernel_sizes,
        convs_per_stage=flax_model.convs_per_stage,
        downsample=flax_model.downsample,
        deep_supervision=flax_model.deep_supervision,
    )


def _conv_weight(kernel: np.ndarray) -> np.ndarray:
    """Flax ``[*k, C_in, C_out]`` -> PyTorch ``[C_out, C_in, *k]``."""
    nd = kernel.ndim - 2
    return np.transpose(kernel, (nd + 1, nd, *range(nd)))


def upsample_weight(kernel: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """``UpsampleMatmul`` kernel ``[C_in, prod(f) * C_out]`` -> ConvTranspose ``[C_in, C_out, *f]``.

    The matmul's output channel ``(a_1, ..., a_d, o)`` (row-major) is output offset ``a``
    within the ``f`` block and channel ``o``; ConvTranspose with kernel == stride writes
    ``sum_c x[c, i] W[c, o, a]`` at position ``i * f + a``: the same, with no flip.
    """
    c_in = kernel.shape[0]
    k = np.asarray(kernel).reshape(c_in, *factors, -1)
    return np.ascontiguousarray(np.moveaxis(k, -1, 1))


def flax_to_torch_state(params: Mapping, model: TorchUNet) -> dict[str, torch.Tensor]:
    """The twin's ``state_dict`` holding a Flax ``UNet``'s parameters (converted layouts)."""
    p = {k: v for k, v in params.items()}
    state: dict[str, np.ndarray] = {}
    for name in model.blocks:
        if name.endswith("_pool"):
            continue
        src = p.pop(name)
        if "_conv_" in name:
            state[f"blocks.{name}.conv.weight"] = _conv_weight(np.asarray(src["conv"]["kernel"]))
            state[f"blocks.{name}.norm.weight"] = np.asarray(src["norm_scale"])
            state[f"blocks.{name}.norm.bias"] = np.asarray(src["norm_bias"])
        elif name.endswith("_up"):
            level = int(name.split("_")[1])
            factors = model.strides[level + 1]
            state[f"blocks.{name}.weight"] = upsample_weight(
                np.asarray(src["kernel"]["kernel"]), factors
            )
            state[f"blocks.{name}.bias"] = np.asarray(src["bias"])
        elif name.startswith("head_"):
            state[f"blocks.{name}.weight"] = _conv_weight(np.asarray(src["kernel"]))
            state[f"blocks.{name}.bias"] = np.asarray(src["bias"])
        else:  # pragma: no cover - every block kind is handled above
            raise KeyError(name)
    if p:
        raise KeyError(f"Flax parameters without a PyTorch counterpart: {sorted(p)}")
    return {k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()}


def load_flax_params(model: TorchUNet, params: Mapping) -> TorchUNet:
    """Copy a Flax ``UNet``'s parameters (``variables["params"]``) into ``model`` in place.

    Asserts the Flax tree has exactly the twin's parameter count and that every tensor
    (name and shape) is matched (``load_state_dict(strict=True)``).
    """
    flax_count = sum(int(np.prod(np.shape(v))) for v in _leaves(params))
    if flax_count != param_count(model):
        raise AssertionError(
            f"Flax parameters: {flax_count}, TorchUNet parameters: {param_count(model)}"
        )
    model.load_state_dict(flax_to_torch_state(params, model), strict=True)
    return model


def _leaves(tree):
    if isinstance(tree, Mapping):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


# ----------------------------------------------------------------------------- loss


def dice_ce_loss(logits: torch.Tensor, labels: torch.Tensor, batch_dice: bool = False):
    """CE + (1 - soft Dice), logits ``[B, K, *S]``, integer labels ``[B, *S]`` (as unetjax)."""
    num_classes = logits.shape[1]
    logits = logits.float()
    ce = F.cross_entropy(logits, labels)
    probs = torch.softmax(logits, dim=1)[:, 1:]
    onehot = F.one_hot(labels, num_classes).movedim(-1, 1)[:, 1:].to(probs.dtype)
    axes = tuple(range(2, logits.ndim))
    if batch_dice:
        axes = (0, *axes)
    tp = (probs * onehot).sum(axes)
    fp = (probs * (1 - onehot)).sum(axes)
    fn = ((1 - probs) * onehot).sum(axes)
    smooth = 1e-5
    dice = (2 * tp + smooth) / torch.clamp(2 * tp + fp + fn + smooth, min=1e-8)
    return ce + 1.0 - dice.mean()


def deep_supervision_weights(n: int) -> np.ndarray:
    w = np.array([1 / 2**i for i in range(n)], np.float32)
    return w / w.sum()


def segmentation_loss(outputs, labels: torch.Tensor, batch_dice: bool = False) -> torch.Tensor:
    """Dice+CE on one output, or the weighted sum over deep-supervision outputs."""
    if not isinstance(outputs, tuple | list):
        return dice_ce_loss(outputs, labels, batch_dice)
    total = 0.0
    for w, logits in zip(deep_supervision_weights(len(outputs)), outputs, strict=True):
        factors = [s // t for s, t in zip(labels.shape[1:], logits.shape[2:], strict=True)]
        target = labels[(slice(None), *(slice(None, None, f) for f in factors))]
        total = total + float(w) * dice_ce_loss(logits, target, batch_dice)
    return total


# ----------------------------------------------------------------------------- training


def make_optimizer(model: nn.Module, train_cfg) -> tuple[torch.optim.Optimizer, float]:
    """AdamW / SGD-Nesterov with ``unetjax``'s hyper-parameters (constant learning rate).

    Returns ``(optimizer, grad_clip)``. The learning-rate schedule is left out: it costs
    nothing measurable and changes no FLOPs.
    """
    params = list(model.parameters())
    if train_cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(
            params, lr=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay, eps=1e-8
        )
    elif train_cfg.optimizer == "sgd_nesterov":
        opt = torch.optim.SGD(
            params,
            lr=train_cfg.learning_rate,
            momentum=train_cfg.momentum,
            nesterov=True,
            weight_decay=train_cfg.weight_decay,
        )
    else:
        raise ValueError(f"unknown optimizer {train_cfg.optimizer!r}")
    return opt, float(train_cfg.grad_clip)


def make_train_step(model: nn.Module, opt: torch.optim.Optimizer, grad_clip: float = 0.0,
                    batch_dice: bool = False):
    """``(image [B, C, *S], labels [B, *S]) -> loss`` (float): forward, loss, backward,
    optional global-norm clip, optimizer step (as ``unetjax.training.step``)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step(image: torch.Tensor, labels: torch.Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        loss = segmentation_loss(model(image), labels, batch_dice)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        return float(loss.detach())

    return step


# ----------------------------------------------------------------------------- inference


def sliding_window_predict_torch(
    image: np.ndarray,
    model: TorchUNet,
    patch_size: Sequence[int],
    num_classes: int,
    *,
    step: float = 0.5,
    batch_size: int = 4,
) -> np.ndarray:
    """PyTorch counterpart of ``unetjax.inference.sliding_window_predict`` (no mirroring).

    Same windows (``window_starts``), same Gaussian (``gaussian_importance_map``), same
    centred zero padding, same fixed batch of ``batch_size`` tiles (the last batch
    zero-filled); blending on the CPU in float32 (channels-first accumulator). Input
    ``[*spatial, C]`` (channel-last, as ours), output ``[*spatial, K]`` probabilities.
    """
    import itertools

    from unetjax.inference.sliding_window import gaussian_importance_map, window_starts

    patch_size = tuple(int(p) for p in patch_size)
    nd = len(patch_size)
    spatial = image.shape[:nd]
    pads = [
        (max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2)
        for s, p in zip(spatial, patch_size, strict=True)
    ]
    if any(a or b for a, b in pads):
        image = np.pad(image, [*pads, (0, 0)])
    padded = image.shape[:nd]
    img = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0), np.float32))
    starts = window_starts(padded, patch_size, step)
    windows = [
        tuple(slice(s, s + p) for s, p in zip(corner, patch_size, strict=True))
        for corner in itertools.product(*starts)
    ]
    gaussian = torch.from_numpy(gaussian_importance_map(patch_size))
    acc = torch.zeros((num_classes, *padded))
    weight = torch.zeros(padded)
    with torch.inference_mode():
        for b in range(0, len(windows), batch_size):
            batch_windows = windows[b : b + batch_size]
            tiles = torch.zeros((batch_size, img.shape[0], *patch_size))
            for i, sl in enumerate(batch_windows):
                tiles[i] = img[(slice(None), *sl)]
            probs = torch.softmax(model(tiles, full_res_only=True).float(), dim=1) * gaussian
            for tile, sl in zip(probs, batch_windows, strict=False):
                acc[(slice(None), *sl)] += tile
                weight[sl] += gaussian
    out = (acc / weight).movedim(0, -1).numpy()
    crop = tuple(slice(a, a + s) for (a, _), s in zip(pads, spatial, strict=True))
    return np.ascontiguousarray(out[crop])
