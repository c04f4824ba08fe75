"""Score a `transformers` object detector (a fine-tuned Deformable DETR) on a detection dataset in the `datasets`
object-detection layout (``image``, ``objects: {bbox [x, y, w, h], category}``), with both evaluators the field
uses: COCO AP (pycocotools) and DETReg's VOC07 11-point AP averaged over IoU 0.50:0.95.

Example:

```python
>>> from hf_useg.data import load_detection_dataset
>>> from hf_useg.detection_inference import evaluate_detector
>>> test = load_detection_dataset("../shared/data/raccoon", "test")                     # doctest: +SKIP
>>> evaluate_detector(model, test, detection_image_processor(512))["voc07"]["ap50"]      # doctest: +SKIP
```
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .inference import process_share

__all__ = [
    "EVALUATORS",
    "coco_annotations",
    "detection_image_processor",
    "evaluate_detector",
    "pad_images",
    "predict_detections",
]

# what each evaluator is, for summaries and model cards
EVALUATORS = {
    "coco": "COCO bbox AP (pycocotools: AP over IoU 0.50:0.95, maxDets 100, all areas)",
    "voc07": "VOC07 11-point AP averaged over IoU 0.50:0.95 (DETReg's evaluator; classic devkit rules)",
}


def detection_image_processor(resolution: int):
    """Deformable DETR's processor with the shorter side at ``resolution`` (DETR: 800, the longer side capped at
    ``resolution * 1333 / 800``), ImageNet normalisation."""
    from transformers import DeformableDetrImageProcessor

    if resolution < 32:
        raise ValueError(f"the detection resolution must be at least 32 pixels, got {resolution}")
    return DeformableDetrImageProcessor(
        size={"shortest_edge": resolution, "longest_edge": round(resolution * 1333 / 800)}
    )


def coco_annotations(example: dict[str, Any], image_id: int) -> dict[str, Any]:
    """One dataset example's ``objects`` as the COCO-style annotation dict DETR processors take."""
    objects = example.get("objects") or {"bbox": [], "category": []}
    annotations = []
    for box, category in zip(objects["bbox"], objects["category"]):
        x, y, w, h = (float(v) for v in box)
        annotations.append({"bbox": [x, y, w, h], "category_id": int(category), "area": w * h, "iscrowd": 0})
    return {"image_id": image_id, "annotations": annotations}


def _rgb(image) -> np.ndarray:
    if hasattr(image, "convert"):
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an RGB image, got an array of shape {array.shape}")
    return array


class _DetectionImages(torch.utils.data.Dataset):
    """Evaluation items: the processed image, its original size and its references (xyxy pixels)."""

    def __init__(self, dataset, processor):
        self.dataset, self.processor = dataset, processor

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.dataset[index]
        image = _rgb(example["image"])
        encoded = self.processor(images=image, return_tensors="pt")
        objects = example.get("objects") or {"bbox": [], "category": []}
        boxes = np.asarray(objects["bbox"], dtype=np.float64).reshape(-1, 4).copy()
        boxes[:, 2:] += boxes[:, :2]
        reference = {"boxes": boxes, "labels": np.asarray(objects["category"], dtype=np.int64)}
        if "difficult" in objects:
            reference["difficult"] = np.asarray(objects["difficult"], dtype=bool)
        return {
            "pixel_values": encoded["pixel_values"][0],
            "size": image.shape[:2],
            "reference": reference,
            "index": index,
        }


def pad_images(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``[3, h, w]`` images of different sizes as DETR does: zero-padded at the bottom and right to the largest
    height and width, with the pixel mask (1 on image pixels, 0 on padding). Boxes stay normalised to each image's
    own (unpadded) size: Deformable DETR's reference points are relative to the valid region the mask gives.

    Example:

    ```python
    >>> import torch
    >>> pixel_values, pixel_mask = pad_images([torch.ones(3, 2, 3), torch.ones(3, 4, 1)])
    >>> pixel_values.shape, pixel_mask.sum(dim=(1, 2)).tolist()
    (torch.Size([2, 3, 4, 3]), [6, 4])
    ```
    """
    if not images:
        raise ValueError("pad_images needs at least one image")
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    pixel_values = images[0].new_zeros(len(images), images[0].shape[0], height, width)
    pixel_mask = torch.zeros(len(images), height, width, dtype=torch.long)
    for row, image in enumerate(images):
        _, h, w = image.shape
        pixel_values[row, :, :h, :w] = image
        pixel_mask[row, :h, :w] = 1
    return pixel_values, pixel_mask


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    pixel_values, pixel_mask = pad_images([item["pixel_values"] for item in items])
    return {
        "pixel_values": pixel_values,
        "pixel_mask": pixel_mask,
        "sizes": [item["size"] for item in items],
        "references": [item["reference"] for item in items],
        "indices": [item["index"] for item in items],
    }


@torch.no_grad()
def predict_detections(model, processor, pixel_values, pixel_mask, sizes, top_k: int = 100) -> list[dict]:
    """``[{"boxes" xyxy pixels of the original image, "scores", "labels"}]``: the top ``top_k`` (query, class)
    pairs by sigmoid score (Deformable DETR's post-processing, no threshold).

    Other `AutoModelForObjectDetection` models work too: a processor whose post-processing has no ``top_k`` (DETR's
    one class per query) is cut to the ``top_k`` best scores here, and a model without a ``pixel_mask`` input
    (YOLOS) gets the padded images alone (exact with batches of one image)."""
    if "pixel_mask" in inspect.signature(model.forward).parameters:
        outputs = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    else:
        outputs = model(pixel_values=pixel_values)
    post_process = processor.post_process_object_detection
    with_top_k = "top_k" in inspect.signature(post_process).parameters
    results = post_process(
        outputs,
        threshold=0.0,
        target_sizes=[tuple(size) for size in sizes],
        **({"top_k": top_k} if with_top_k else {}),
    )
    if not with_top_k:
        results = [
            {key: value[result["scores"].argsort(descending=True)[:top_k]] for key, value in result.items()}
            for result in results
        ]
    return [{key: value.float().cpu().numpy() for key, value in result.items()} for result in results]


@torch.no_grad()
def evaluate_detector(
    model,
    dataset,
    processor,
    *,
    batch_size: int = 4,
    max_images: int | None = None,
    num_workers: int = 0,
    accelerator=None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """COCO and VOC07 AP of ``model`` on ``dataset`` (its first ``max_images``), as fractions.

    Returns ``{"coco": {"ap", "ap50", "ap75"}, "voc07": {...}, "images": n}``. With an ``accelerator`` the images
    are split over processes and the predictions gathered (every image counted once).
    """
    from .evaluation import coco_detection_ap, voc07_detection_ap

    if max_images is not None:
        dataset = dataset.select(range(min(max_images, len(dataset))))
    if len(dataset) == 0:
        raise ValueError("no evaluation images: the dataset is empty")
    loader = DataLoader(
        process_share(_DetectionImages(dataset, processor), accelerator),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    if accelerator is not None:
        device = accelerator.device
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    collected: list[tuple[int, dict, dict]] = []
    for batch in tqdm(loader, desc="evaluate", disable=not progress):
        predictions = predict_detections(
            model, processor, batch["pixel_values"].to(device), batch["pixel_mask"].to(device), batch["sizes"]
        )
        collected.extend(zip(batch["indices"], predictions, batch["references"]))
    model.train(was_training)
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        collected = gather_object(collected)
    collected.sort(key=lambda item: item[0])
    predictions = [prediction for _, prediction, _ in collected]
    references = [reference for _, _, reference in collected]
    return {
        "coco": coco_detection_ap(predictions, references),
        "voc07": voc07_detection_ap(predictions, references),
        "images": len(collected),
    }
