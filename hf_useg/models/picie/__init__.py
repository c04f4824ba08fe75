from ...clustering import minibatch_kmeans_update
from .loss_picie import (
    PicieLossOutput,
    PicieOverclusteringLossOutput,
    overclustering_loss_weights,
    picie_cluster_weights,
    picie_loss,
    picie_loss_with_overclustering,
)

__all__ = [
    "PicieLossOutput",
    "PicieOverclusteringLossOutput",
    "minibatch_kmeans_update",
    "overclustering_loss_weights",
    "picie_cluster_weights",
    "picie_loss",
    "picie_loss_with_overclustering",
]
