"""U-Net models (2D and 3D from one class)."""

from unetjax.models.unet import (
    UNet,
    check_input_size,
    stage_features,
    total_stride,
    unet_param_count,
)

__all__ = ["UNet", "check_input_size", "stage_features", "total_stride", "unet_param_count"]
