from ...clustering import minibatch_kmeans_update
from ...registry import MethodSpec
from .configuration_picie import PicieConfig
from .loss_picie import (
    PicieLossOutput,
    PicieOverclusteringLossOutput,
    overclustering_loss_weights,
    picie_cluster_weights,
    picie_loss,
    picie_loss_with_overclustering,
)
from .modeling_picie import (
    PicieFeaturePyramid,
    PicieForUnsupervisedSegmentation,
    PiciePreTrainedModel,
    PicieSegmenterOutput,
)

__all__ = [
    "PicieConfig",
    "PicieFeaturePyramid",
    "PicieForUnsupervisedSegmentation",
    "PicieLossOutput",
    "PicieOverclusteringLossOutput",
    "PiciePreTrainedModel",
    "PicieSegmenterOutput",
    "minibatch_kmeans_update",
    "overclustering_loss_weights",
    "picie_cluster_weights",
    "picie_loss",
    "picie_loss_with_overclustering",
]

# the method(s) of this folder, read by hf_useg.registry
METHODS = (
    MethodSpec(
        name="picie",
        display_name="PiCIE",
        paper="Cho et al., CVPR 2021, arXiv:2103.17070",
        description="Clustering with photometric invariance and geometric equivariance.",
        config_class=f"{__name__}.configuration_picie:PicieConfig",
        model_class=f"{__name__}.modeling_picie:PicieForUnsupervisedSegmentation",
        recipe_class=f"{__name__}.training_picie:PicieRecipe",
    ),
)
