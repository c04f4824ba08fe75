# Copyright 2025 The hf_useg authors. Licensed under the Apache License, Version 2.0.
"""Unsupervised semantic segmentation metric for `evaluate`: a thin shell over `hf_useg.evaluation`."""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

from hf_useg.evaluation import UnsupervisedSegmentationMetric

_CITATION = """\
@inproceedings{ji2019invariant,
  title={Invariant Information Clustering for Unsupervised Image Classification and Segmentation},
  author={Ji, Xu and Henriques, Jo{\\~a}o F. and Vedaldi, Andrea},
  booktitle={ICCV},
  year={2019}
}
@inproceedings{hamilton2022unsupervised,
  title={Unsupervised Semantic Segmentation by Distilling Feature Correspondences},
  author={Hamilton, Mark and Zhang, Zhoutong and Hariharan, Bharath and Snavely, Noah and
          Freeman, William T.},
  booktitle={ICLR},
  year={2022}
}
"""

_DESCRIPTION = """\
Scores unsupervised semantic segmentation: predicted cluster ids are matched to ground-truth classes on the
confusion matrix of the whole evaluation set (Hungarian one-to-one matching, majority many-to-one matching,
or the identity for a linear probe), then pixel accuracy and mean IoU are computed. Pixels whose reference
lies outside [0, num_classes) (e.g. -1 or 255) are ignored. Clusters left without a class (more clusters than
classes under Hungarian matching) count as errors: their pixels stay in the accuracy's denominator and are
false negatives of their true class.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`List[ndarray]`): 2-D maps of predicted cluster ids in [0, num_clusters). Maps may differ in
        size from each other; each must match its reference.
    references (`List[ndarray]`): 2-D maps of ground-truth class ids; values outside [0, num_classes) are
        ignored.
    num_classes (`int`): number of ground-truth classes.
    num_clusters (`int`, *optional*): number of predicted clusters (defaults to `num_classes`).
    matching (`str`, *optional*, defaults to `"hungarian"`): `"hungarian"`, `"majority"` or `"none"`.
    assignment (`List[int]`, *optional*): a cluster -> class map (-1 = none) fitted on another split (IID+
        mode); by default the matching is fitted on these predictions.

Returns:
    `accuracy` (`float`): matched pixel accuracy in [0, 1].
    `mean_iou` (`float`): mean IoU over the classes where it is defined, in [0, 1].
    `per_class_iou` (`ndarray` [num_classes]): IoU per class, NaN for classes absent from both the references
        and the mapped predictions.
    `per_class_accuracy` (`ndarray` [num_classes]): matched recall per class, NaN for absent classes.
    `assignment` (`ndarray` [num_clusters]): class of each cluster, -1 for none.
    `confusion_matrix` (`ndarray` [num_clusters, num_classes]): pixel counts, rows = predicted cluster.
    `num_pixels` (`int`): valid pixels scored; `num_ignored_pixels` (`int`): pixels skipped.

Examples:

    >>> import numpy as np
    >>> metric = evaluate.load("hf_useg/metrics/unsupervised_segmentation")  # doctest: +SKIP
    >>> predictions = [np.array([[1, 1], [0, 0]]), np.array([[0, 1, 1]])]
    >>> references = [np.array([[0, 0], [1, 255]]), np.array([[1, 0, 1]])]
    >>> results = metric.compute(  # doctest: +SKIP
    ...     predictions=predictions, references=references, num_classes=2
    ... )
    >>> round(results["accuracy"], 3), results["assignment"].tolist()  # doctest: +SKIP
    (0.833, [1, 0])
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class UnsupervisedSegmentation(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    # int64 rather than uint16 (evaluate's mean_iou): references may hold -1 as the void id.
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                }
            ),
            reference_urls=["https://github.com/mhamilton723/STEGO", "https://github.com/xu-ji/IIC"],
        )

    def _compute(
        self,
        predictions,
        references,
        num_classes: int,
        num_clusters: int | None = None,
        matching: str = "hungarian",
        assignment=None,
    ) -> dict:
        metric = UnsupervisedSegmentationMetric(num_classes, num_clusters=num_clusters, matching=matching)
        for index, (prediction, reference) in enumerate(zip(predictions, references)):
            try:
                # Arrow hands the maps back as nested lists; one numpy conversion per map.
                prediction = np.asarray(prediction, dtype=np.int64)
                reference = np.asarray(reference, dtype=np.int64)
                metric.update(prediction, reference)
            except ValueError as error:
                raise ValueError(f"map {index}: {error}") from error
        return metric.compute(assignment=assignment)
