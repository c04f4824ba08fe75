"""Model cards and Hub uploads (`huggingface_hub`)."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

__all__ = ["generate_model_card", "METHOD_INFO"]

METHOD_INFO = {
    "stego": (
        "STEGO",
        "Hamilton et al., ICLR 2022, arXiv:2203.08414",
        "A segmentation head trained on frozen self-supervised ViT features by distilling their feature "
        "correspondences (no labels); segments are found by clustering the learned code.",
    ),
    "dino_segmentation": (
        "DINO-feature k-means",
        "Caron et al., ICCV 2021, arXiv:2104.14294",
        "Zero-training baseline: cosine k-means over the patch features of a frozen DINO backbone.",
    ),
    "picie": (
        "PiCIE",
        "Cho et al., CVPR 2021, arXiv:2103.17070",
        "Clustering with photometric invariance and geometric equivariance.",
    ),
    "iic": ("IIC", "Ji et al., ICCV 2019, arXiv:1807.06653", "Invariant information clustering."),
}


def _percent(value: Any) -> str:
    try:
        return f"{100 * float(value):.1f}"
    except (TypeError, ValueError):
        return "-"


def generate_model_card(
    model,
    *,
    summary: dict[str, Any] | None = None,
    results: dict[str, dict[str, Any]] | None = None,
    class_names: Sequence[str] | None = None,
    repo_id: str | None = None,
    dataset_id: str | None = None,
    license: str = "apache-2.0",
) -> ModelCard:
    """A `huggingface_hub.ModelCard` for a trained, fitted or converted model, with its evaluation results.

    Args:
        summary: the training summary (``method``, ``backbone``, ``dataset``, ``steps``, ``eval_protocol``,
            ``per_class_table``), as written by `hf_useg.trainer.train`.
        results: ``{"cluster": metric dict, "linear": ...}`` from `hf_useg.inference.evaluate_segmenter`; they
            become ``model-index`` eval results (accuracy and mIoU in percent) and the card's table.
        repo_id: where the model will live (used in the usage snippet).

    Example:

    ```python
    >>> card = generate_model_card(model, summary=summary, results=results)   # doctest: +SKIP
    >>> card.save("out/README.md")                                            # doctest: +SKIP
    ```
    """
    summary = dict(summary or {})
    config = model.config
    method_name, reference, description = METHOD_INFO.get(
        config.model_type, (config.model_type, "", "Unsupervised semantic segmentation model.")
    )
    dataset = str(summary.get("dataset", dataset_id or "unknown data"))
    model_name = repo_id.split("/")[-1] if repo_id else f"{config.model_type}-segmentation"
    protocol = summary.get("eval_protocol") or {}
    eval_results = []
    rows = []
    for probe in ("cluster", "linear", "cluster_crf", "linear_crf"):
        if not results or probe not in results:
            continue
        values = results[probe]
        rows.append(
            f"| {probe.replace('_', ' + ')} | {_percent(values['accuracy'])} | {_percent(values['mean_iou'])} |"
        )
        for metric, key in (("accuracy", "accuracy"), ("mean_iou", "mean_iou")):
            eval_results.append(
                EvalResult(
                    task_type="image-segmentation",
                    task_name="Unsupervised semantic segmentation",
                    dataset_type=dataset_id or dataset.split(" ")[0],
                    dataset_name=dataset,
                    dataset_split=protocol.get("split"),
                    metric_type=metric,
                    metric_name=f"{probe} probe {metric.replace('_', ' ')} (%)",
                    metric_value=round(100 * float(values[key]), 2),
                )
            )
    base_model = summary.get("backbone") or getattr(config, "backbone_name", None)
    card_data = ModelCardData(
        library_name="hf_useg",
        pipeline_tag="image-segmentation",
        license=license,
        tags=["unsupervised-semantic-segmentation", "image-segmentation", config.model_type, "hf_useg"],
        base_model=base_model if base_model and "/" in base_model and " " not in base_model else None,
        datasets=[dataset_id] if dataset_id else None,
        metrics=["accuracy", "mean_iou"] if eval_results else None,
        model_name=model_name,
        eval_results=eval_results or None,
    )
    protocol_text = ", ".join(f"{key}: {value}" for key, value in protocol.items()) or "see hf_useg.inference"
    template = resources.files("hf_useg").joinpath("resources/model_card_template.md").read_text()
    return ModelCard.from_template(
        card_data,
        template_str=template,
        model_title=f"{method_name} — {model_name}",
        method_name=method_name,
        method_reference=reference,
        method_summary=description,
        backbone=base_model or "unknown",
        dataset=dataset,
        steps=summary.get("steps"),
        eval_table="\n".join(rows),
        protocol=protocol_text,
        per_class_table=summary.get("per_class_table"),
        repo_id=repo_id or "path/to/this/model",
        model_class=type(model).__name__,
    )
