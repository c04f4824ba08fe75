from .configuration_dino import DinoSegmentationConfig
from .modeling_dino import DinoForUnsupervisedSegmentation, DinoPreTrainedModel

__all__ = ["DinoForUnsupervisedSegmentation", "DinoPreTrainedModel", "DinoSegmentationConfig"]
