from ...clustering import minibatch_kmeans_update
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
