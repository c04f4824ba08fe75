"""CutMix-DETReg (METHODS 5): DETReg's detector pretraining with pseudo-boxes from CutMix pastes, random boxes or
Selective Search, on `transformers`' Deformable DETR."""

from .configuration_detreg import BOX_SOURCES, DETREG_DETECTOR_KWARGS, CutMixDetregConfig
from .loss_detreg import DetregLoss, DetregLossOutput
from .modeling_detreg import (
    CutMixDetregForPretraining,
    CutMixDetregPreTrainedModel,
    CutMixDetregPretrainingOutput,
    init_deformable_detr_heads,
)

__all__ = [
    "BOX_SOURCES",
    "DETREG_DETECTOR_KWARGS",
    "CutMixDetregConfig",
    "CutMixDetregForPretraining",
    "CutMixDetregPreTrainedModel",
    "CutMixDetregPretrainingOutput",
    "DetregLoss",
    "DetregLossOutput",
    "init_deformable_detr_heads",
]
