"""CutMix-DETReg (METHODS 5): DETReg's detector pretraining with pseudo-boxes from CutMix pastes, random boxes or
Selective Search, on `transformers`' Deformable DETR."""

from ...registry import MethodSpec
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

# the methods of this folder, read by hf_useg.registry
METHODS = (
    MethodSpec(
        name="cutmix_detreg",
        display_name="CutMix-DETReg",
        paper="the thesis' method, on DETReg (Bar et al., CVPR 2022, arXiv:2106.04550)",
        description=(
            "Detector pretraining on unlabelled images: a Deformable DETR learns to find pseudo-boxes (CutMix pastes, "
            "random boxes or Selective Search) and to predict a frozen encoder's embedding of their content."
        ),
        config_class=f"{__name__}.configuration_detreg:CutMixDetregConfig",
        model_class=f"{__name__}.modeling_detreg:CutMixDetregForPretraining",
        recipe_class=f"{__name__}.training_detreg:CutMixDetregRecipe",
        pipeline_task=None,
    ),
    MethodSpec(
        name="detection_finetune",
        display_name="Deformable DETR fine-tuning",
        paper="Zhu et al., ICLR 2021, arXiv:2010.04159",
        description="Supervised fine-tuning of a (CutMix-DETReg-pretrained) Deformable DETR on labelled boxes.",
        config_class="transformers:DeformableDetrConfig",
        model_class="transformers:DeformableDetrForObjectDetection",
        recipe_class=f"{__name__}.training_finetuning:DetectionFinetuningRecipe",
        pipeline_task="object-detection",
    ),
)
