"""Architecture planning from the patch size and spacing (a compact nnU-Net planner).

Fills the model fields a config leaves empty: per-stage strides and kernel sizes. An axis
is halved at a stage while its feature map stays >= ``min_size`` voxels and its spacing is
not more than twice the finest spacing (anisotropic data is first pooled in-plane only, as
nnU-Net does); its kernel is 1 while its spacing is still that coarse, else 3.
"""

from collections.abc import Sequence

from unetjax.models import stage_features


def plan_strides_and_kernels(
    patch_size: Sequence[int],
    spacing: Sequence[float],
    num_stages: int,
    min_size: int = 4,
) -> tuple[list[list[int]], list[list[int]]]:
    """Per-stage strides (stage 0 is all ones) and kernel sizes, at most ``num_stages``."""
    size = list(patch_size)
    current = [float(s) for s in spacing]
    strides = [[1] * len(size)]
    kernels = [[3 if c <= 2 * min(current) else 1 for c in current]]
    for _ in range(num_stages - 1):
        finest = min(current)
        stride = [
            2 if s // 2 >= min_size and s % 2 == 0 and c <= 2 * finest else 1
            for s, c in zip(size, current, strict=True)
        ]
        if not any(v > 1 for v in stride):
            break
        size = [s // v for s, v in zip(size, stride, strict=True)]
        current = [c * v for c, v in zip(current, stride, strict=True)]
        strides.append(stride)
        kernels.append([3 if c <= 2 * min(current) else 1 for c in current])
    return strides, kernels


def resolve_model_config(model_cfg, patch_size: Sequence[int], spacing: Sequence[float]) -> dict:
    """The UNet keyword arguments: explicit config values, planned values for the rest."""
    strides = [list(s) for s in model_cfg.strides] if model_cfg.strides else None
    kernels = [list(k) for k in model_cfg.kernel_sizes] if model_cfg.kernel_sizes else None
    if strides is None or kernels is None:
        planned_strides, planned_kernels = plan_strides_and_kernels(
            patch_size, spacing, model_cfg.num_stages
        )
        strides = strides or planned_strides
        kernels = kernels or planned_kernels[: len(strides)]
    if len(kernels) != len(strides):
        raise ValueError(
            f"model.kernel_sizes has {len(kernels)} stages but model.strides has {len(strides)}"
        )
    return dict(
        features=stage_features(len(strides), model_cfg.base_features, model_cfg.max_features),
        strides=strides,
        kernel_sizes=kernels,
        convs_per_stage=model_cfg.convs_per_stage,
        downsample=model_cfg.downsample,
        deep_supervision=model_cfg.deep_supervision,
        dropout_rate=model_cfg.dropout_rate,
        remat=model_cfg.remat,
    )
