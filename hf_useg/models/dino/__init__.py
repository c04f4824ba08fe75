from ...registry import MethodSpec
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

# the method(s) of this folder, read by hf_useg.registry
METHODS = (
    MethodSpec(
        name="dino_kmeans",
        display_name="DINO-feature k-means",
        paper="Caron et al., ICCV 2021, arXiv:2104.14294",
        description="Zero-training baseline: cosine k-means over the patch features of a frozen DINO backbone.",
        config_class=f"{__name__}.configuration_dino:DinoSegmentationConfig",
        model_class=f"{__name__}.modeling_dino:DinoForUnsupervisedSegmentation",
        recipe_class=f"{__name__}.training_dino:DinoKMeansRecipe",
    ),
    MethodSpec(
        name="dino_pretrain",
        display_name="DINO self-distillation pretraining",
        paper="Caron et al., ICCV 2021, arXiv:2104.14294",
        description="Self-distillation pretraining of a ViT backbone on unlabelled images (multi-crop, EMA teacher).",
        config_class=f"{__name__}.configuration_dino_pretraining:DinoPretrainingConfig",
        model_class=f"{__name__}.modeling_dino_pretraining:DinoForSelfSupervisedPretraining",
        recipe_class=f"{__name__}.training_dino_pretraining:DinoPretrainingRecipe",
        pipeline_task=None,
    ),
)
