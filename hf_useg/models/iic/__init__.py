from .configuration_iic import IicConfig
from .loss_iic import IIC_EPS, iic_segmentation_loss
from .modeling_iic import (
    IicForUnsupervisedSegmentation,
    IicHead,
    IicPreTrainedModel,
    IicSegmenterOutput,
    IicVggTrunk,
    iic_trunk_input,
    sobel_channels,
)
from .training_iic import IicViews, color_jitter, evaluate_iic_heads, head_for_step, make_iic_views

__all__ = [
    "IIC_EPS",
    "IicConfig",
    "IicForUnsupervisedSegmentation",
    "IicHead",
    "IicPreTrainedModel",
    "IicSegmenterOutput",
    "IicVggTrunk",
    "IicViews",
    "color_jitter",
    "evaluate_iic_heads",
    "head_for_step",
    "iic_segmentation_loss",
    "iic_trunk_input",
    "make_iic_views",
    "sobel_channels",
]
