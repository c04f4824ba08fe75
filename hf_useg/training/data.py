"""The data and the backbone of a training run: dataset splits with their class names, the backbone named by
``--backbone`` (a Hub id or folder, a randomly initialised one from `RANDOM_BACKBONES`, or none), and a
segmentation recipe's model built on it. These are the segmentation defaults of `Recipe.load_data`,
`Recipe.create_model` and `Recipe.processors`."""

from __future__ import annotations

from typing import Any

__all__ = [
    "RANDOM_BACKBONES",
    "SCRATCH_BACKBONES",
    "build_model",
    "load_backbone",
    "load_splits",
    "protocol_processor",
]

# `backbone:` values meaning "no HF backbone": the method trains its own trunk from scratch (IIC's VGG net)
SCRATCH_BACKBONES = ("none", "scratch")


def _vit(hidden_size: int, layers: int, heads: int, patch_size: int, image_size: int) -> dict[str, Any]:
    return dict(
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=(2 if hidden_size < 128 else 4) * hidden_size,
        patch_size=patch_size,
        image_size=image_size,
        layer_norm_eps=1e-6,  # DINO's (METHODS 0.1)
    )


RANDOM_BACKBONES: dict[str, dict[str, Any]] = {
    # name -> config kwargs (ViTConfig unless "model_type" says otherwise); randomly initialised, for offline
    # demos, tests and baselines (named as such in outputs)
    "random-resnet-18": dict(
        model_type="resnet",
        layer_type="basic",
        depths=[2, 2, 2, 2],
        hidden_sizes=[64, 128, 256, 512],
        embedding_size=64,
        out_features=["stage3"],
    ),
    # a narrow ResNet-10 for detectors trained on a CPU (the raccoon experiment of CutMix-DETReg)
    "random-resnet-mini": dict(
        model_type="resnet",
        layer_type="basic",
        depths=[1, 1, 1, 1],
        hidden_sizes=[32, 64, 128, 256],
        embedding_size=32,
        out_features=["stage2", "stage3", "stage4"],
    ),
    "random-vit-tiny": _vit(64, layers=2, heads=4, patch_size=8, image_size=64),
    "random-vit-micro": _vit(32, layers=1, heads=2, patch_size=8, image_size=32),
    # the shape of training/configs/dino_pretrain_camvid.yaml's backbone (random-init baseline of that experiment)
    "random-vit-dino-tiny-16": _vit(192, layers=6, heads=3, patch_size=16, image_size=96),
    "random-vit-small-8": _vit(384, layers=12, heads=6, patch_size=8, image_size=224),
    # DINO ViT-S/16, e.g. the student of training/configs/dino_pretrain_vits16.yaml (pretraining from scratch)
    "random-vit-small-16": _vit(384, layers=12, heads=6, patch_size=16, image_size=224),
}


def load_backbone(name: str):
    """``(backbone config or None, state dict or None, human-readable description)`` of ``--backbone name``."""
    from transformers import AutoConfig, ViTConfig

    from ..backbones import FeatureBackbone

    if name in SCRATCH_BACKBONES:
        return None, None, "none (trunk trained from scratch)"
    if name in RANDOM_BACKBONES:
        kwargs = dict(RANDOM_BACKBONES[name])
        model_type = kwargs.pop("model_type", "vit")
        config = ViTConfig(**kwargs) if model_type == "vit" else AutoConfig.for_model(model_type, **kwargs)
        kind = {"vit": "ViT", "resnet": "ResNet"}.get(model_type, model_type)
        return config, None, f"{name} (randomly initialised {kind})"
    try:
        pretrained = FeatureBackbone.from_pretrained(name)
    except Exception as error:  # offline Hub ids, missing folders: say what failed
        raise ValueError(f"could not load the backbone {name!r}: {error}") from error
    return pretrained.model.config, pretrained.model.state_dict(), name


def load_splits(args, label_free: bool = False):
    """``(train, val or None, num_classes, class_names)`` of ``args.dataset`` (generated scenes for ``synthetic``).
    ``label_free`` methods accept a dataset that names no classes (0 classes)."""
    from ..data import load_segmentation_dataset, make_synthetic_scenes, segmentation_metadata

    if args.dataset == "synthetic":
        num_classes = args.synthetic_num_classes
        train = make_synthetic_scenes(
            args.synthetic_num_images, args.synthetic_image_size, num_classes, seed=args.seed
        )
        val = make_synthetic_scenes(
            max(8, args.synthetic_num_images // 4), args.synthetic_image_size, num_classes, seed=args.seed + 1
        )
        class_names = args.class_names or [f"synthetic-class-{i}" for i in range(num_classes)]
        return train, val, num_classes, class_names
    kwargs = dict(num_classes=args.num_classes, image_column=args.image_column, label_column=args.label_column)
    train = load_segmentation_dataset(args.dataset, args.train_split, **kwargs)
    val = load_segmentation_dataset(args.dataset, args.val_split, **kwargs) if args.val_split else None
    metadata = segmentation_metadata(train)
    num_classes = args.num_classes or metadata.get("num_classes")
    class_names = args.class_names or (list(metadata["class_names"]) if metadata.get("class_names") else None)
    if num_classes is None:
        if class_names is None:
            if label_free:  # e.g. DINO pretraining on a plain folder of images
                return train, val, 0, []
            raise ValueError("num_classes is required for this dataset (it does not name its classes)")
        num_classes = len(class_names)
    if class_names is None or len(class_names) < num_classes:
        class_names = [f"class_{i}" for i in range(num_classes)]
    return train, val, num_classes, list(class_names)[:num_classes]


def build_model(args, recipe, num_classes: int):
    """``(model, backbone description)``: ``recipe.build_model`` on ``args.backbone``, with the backbone's pretrained
    weights loaded when it has them."""
    import torch

    backbone_config, backbone_weights, description = load_backbone(args.backbone)
    torch.manual_seed(args.seed)
    model = recipe.build_model(backbone_config, num_classes)
    if backbone_config is None and getattr(model.config, "backbone_config", None) is not None:
        raise ValueError(
            f"backbone {args.backbone!r} means no HF backbone, but method {args.method!r} needs one; it is only for "
            "methods with a trunk trained from scratch (iic)"
        )
    model.config.backbone_name = description
    if backbone_weights is not None:
        model.backbone.model.load_state_dict(backbone_weights)
    return model, description


def protocol_processor(resolution: int | None, patch_size: int):
    """The evaluation-protocol processor (METHODS 0.2) at ``resolution`` (None: no processor)."""
    from ..image_processing import protocol_image_processor

    if resolution is None:
        return None
    if resolution % patch_size:
        raise ValueError(f"resolution {resolution} is not a multiple of the backbone patch size {patch_size}")
    return protocol_image_processor(resolution)
