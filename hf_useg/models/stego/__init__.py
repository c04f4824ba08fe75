from .configuration_stego import StegoConfig
from .loss_stego import StegoCorrelationLoss, StegoLossOutput
from .modeling_stego import (
    StegoForUnsupervisedSegmentation,
    StegoPreTrainedModel,
    StegoSegmentationHead,
    StegoSegmenterOutput,
)

__all__ = [
    "StegoConfig",
    "StegoCorrelationLoss",
    "StegoForUnsupervisedSegmentation",
    "StegoLossOutput",
    "StegoPreTrainedModel",
    "StegoSegmentationHead",
    "StegoSegmenterOutput",
]
