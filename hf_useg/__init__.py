"""hf_useg: unsupervised semantic segmentation (IIC, PiCIE, DINO, STEGO, CutMix-DETReg) as Hugging Face
`transformers` models.

Importing the package registers every method with `AutoConfig`, `AutoModel`,
`AutoModelForSemanticSegmentation` (what the ``image-segmentation`` pipeline loads) and `AutoImageProcessor`.

Example:

```python
>>> import hf_useg
>>> from transformers import pipeline
>>> segmenter = pipeline("image-segmentation", model="path/to/stego-model")   # doctest: +SKIP
```
"""

from __future__ import annotations

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForSemanticSegmentation
from transformers.models.auto.modeling_auto import MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES

from .clustering import ClusterProbe
from .image_processing import UnsupervisedSegmentationImageProcessor
from .modeling_utils import (
    UnsupervisedSegmentationPrediction,
    UnsupervisedSegmentationPreTrainedModel,
    UnsupervisedSegmenterOutput,
)
from .models.dino import (
    DinoForSelfSupervisedPretraining,
    DinoForUnsupervisedSegmentation,
    DinoPretrainingConfig,
    DinoSegmentationConfig,
)
from .models.iic import IicConfig, IicForUnsupervisedSegmentation
from .models.picie import PicieConfig, PicieForUnsupervisedSegmentation
from .models.stego import StegoConfig, StegoForUnsupervisedSegmentation

__version__ = "0.1.0"


def _register_auto_classes() -> None:
    """Register every method of `hf_useg.registry` with the Auto classes (segmentation models also with
    `AutoModelForSemanticSegmentation` and `AutoImageProcessor`, what the ``image-segmentation`` pipeline loads)."""
    from .registry import methods

    for spec in methods().values():
        config_class, model_class = spec.load_config_class(), spec.load_model_class()
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)
        if spec.pipeline_task != "image-segmentation":
            continue
        AutoModelForSemanticSegmentation.register(config_class, model_class, exist_ok=True)
        AutoImageProcessor.register(
            config_class, slow_image_processor_class=UnsupervisedSegmentationImageProcessor, exist_ok=True
        )
        # The image-segmentation pipeline checks the model class against this static name table, which
        # `register` does not update; without the entry it logs "... is not supported" (and works anyway).
        MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES.setdefault(config_class.model_type, model_class.__name__)


_register_auto_classes()

__all__ = [
    "ClusterProbe",
    "DinoForSelfSupervisedPretraining",
    "DinoForUnsupervisedSegmentation",
    "DinoPretrainingConfig",
    "DinoSegmentationConfig",
    "IicConfig",
    "IicForUnsupervisedSegmentation",
    "PicieConfig",
    "PicieForUnsupervisedSegmentation",
    "StegoConfig",
    "StegoForUnsupervisedSegmentation",
    "UnsupervisedSegmentationImageProcessor",
    "UnsupervisedSegmentationPrediction",
    "UnsupervisedSegmentationPreTrainedModel",
    "UnsupervisedSegmenterOutput",
]
