from .configuration_dino import DinoSegmentationConfig
from .configuration_dino_pretraining import DinoPretrainingConfig
from .modeling_dino import (
    DinoAttentionPrediction,
    DinoForUnsupervisedSegmentation,
    DinoPreTrainedModel,
    attention_mass_mask,
)
from .modeling_dino_pretraining import (
    DinoForSelfSupervisedPretraining,
    DinoHead,
    DinoLoss,
    DinoPretrainingOutput,
    DinoPretrainingPreTrainedModel,
)

__all__ = [
    "DinoAttentionPrediction",
    "DinoForSelfSupervisedPretraining",
    "DinoForUnsupervisedSegmentation",
    "DinoHead",
    "DinoLoss",
    "DinoPreTrainedModel",
    "DinoPretrainingConfig",
    "DinoPretrainingOutput",
    "DinoPretrainingPreTrainedModel",
    "DinoSegmentationConfig",
    "attention_mass_mask",
]
