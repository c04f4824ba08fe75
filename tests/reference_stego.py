"""An independent re-implementation of STEGO's inference in plain torch, on the *original* checkpoint keys: the
test oracle for `hf_useg.convert.stego`.

Written from METHODS.md 0.7, 1.1, 1.3 and 1.5, not from hf_useg's model code:

* features: DINO ViT (``tests/reference_dino_vit.py``, loaded from ``net.model.*`` in DINO/timm naming),
  patch tokens of the last block after the final norm, ``[B, C, h, w]``;
* code = ``cluster1(f) + cluster2(f)`` with ``cluster1`` = 1x1 conv C->D (``net.cluster1.0``) and ``cluster2`` =
  1x1 conv C->C, ReLU, 1x1 conv C->D (``net.cluster2.0``, ``net.cluster2.2``); 1x1 convs written as einsums;
* evaluation: code averaged with the code of the flipped image flipped back, bilinear upsampling
  (``align_corners=False``), linear probe ``log_softmax(W c + b)``, cluster probe
  ``log_softmax(2 * <c/|c|, mu/|mu|>)`` over ``cluster_probe.clusters``;
* dense CRF with ``pydensecrf`` called directly: image rebuilt from the normalised tensor as STEGO does
  (``x * std + mean``, ``* 255``, truncation to uint8), channels reversed to BGR, unary
  ``-log(clip(softmax(upsampled logits), 1e-5))`` (``pydensecrf.utils.unary_from_softmax``), Gaussian kernel
  sxy 1 / compat 3, bilateral sxy 67 / srgb 3 / compat 4, 10 mean-field iterations, marginals Q ``[K, H, W]``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from reference_dino_vit import ReferenceDinoViT

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bchw,oc->bohw", x, weight[:, :, 0, 0]) + bias[None, :, None, None]


class ReferenceStego:
    """STEGO's inference from a Lightning ``state_dict`` (keys ``net.model.*``, ``net.cluster1.0.*``,
    ``net.cluster2.{0,2}.*``, ``cluster_probe.clusters``, ``linear_probe.*``)."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self.sd = {key: value.float() for key, value in state_dict.items()}
        backbone = {key[len("net.model.") :]: value for key, value in self.sd.items() if key.startswith("net.model.")}
        embed_dim = backbone["cls_token"].shape[-1]
        patch = backbone["patch_embed.proj.weight"].shape[-1]
        grid = int(round((backbone["pos_embed"].shape[1] - 1) ** 0.5))
        depth = len({key.split(".")[1] for key in backbone if key.startswith("blocks.")})
        mlp_ratio = backbone["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
        self.vit = ReferenceDinoViT(
            img_size=grid * patch,
            patch_size=patch,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=embed_dim // 64,
            mlp_ratio=mlp_ratio,
        )
        self.vit.load_state_dict(backbone, strict=True)
        self.vit.eval()
        self.patch_size = patch

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.patch_features(x)

    @torch.no_grad()
    def code(self, x: torch.Tensor) -> torch.Tensor:
        sd = self.sd
        f = self.features(x)
        code = _conv1x1(f, sd["net.cluster1.0.weight"], sd["net.cluster1.0.bias"])
        if "net.cluster2.0.weight" in sd:
            hidden = torch.relu(_conv1x1(f, sd["net.cluster2.0.weight"], sd["net.cluster2.0.bias"]))
            code = code + _conv1x1(hidden, sd["net.cluster2.2.weight"], sd["net.cluster2.2.bias"])
        return code

    @torch.no_grad()
    def log_probs(self, x: torch.Tensor, output_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(cluster log-probs, linear log-probs) ``[B, K, H, W]``: flip TTA -> upsample -> probes."""
        code = (self.code(x) + torch.flip(self.code(torch.flip(x, dims=[3])), dims=[3])) / 2
        code = F.interpolate(code, size=output_size, mode="bilinear", align_corners=False)
        linear = torch.log_softmax(_conv1x1(code, self.sd["linear_probe.weight"], self.sd["linear_probe.bias"]), 1)
        clusters = self.sd["cluster_probe.clusters"]
        code_n = code / code.norm(dim=1, keepdim=True).clamp_min(1e-12)
        clusters_n = clusters / clusters.norm(dim=1, keepdim=True).clamp_min(1e-12)
        inner = torch.einsum("bchw,kc->bkhw", code_n, clusters_n)
        return torch.log_softmax(2 * inner, dim=1), linear


def stego_uint8_image(pixel_values: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` normalised -> ``[H, W, 3]`` uint8 RGB: un-normalise, x255, truncate (STEGO's CRF input)."""
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    scaled = (pixel_values.float() * std + mean) * 255
    return scaled.to(torch.uint8).permute(1, 2, 0).numpy()


def reference_crf(pixel_values: torch.Tensor, logits: torch.Tensor) -> np.ndarray:
    """STEGO's dense CRF for one image: ``pixel_values`` ``[3, H, W]`` normalised, ``logits`` ``[K, h, w]``."""
    from pydensecrf import densecrf
    from pydensecrf.utils import unary_from_softmax

    image = np.ascontiguousarray(stego_uint8_image(pixel_values)[:, :, ::-1])  # BGR
    height, width = image.shape[:2]
    upsampled = F.interpolate(logits[None].float(), size=(height, width), mode="bilinear", align_corners=False)[0]
    probs = torch.softmax(upsampled, dim=0).numpy()
    unary = np.ascontiguousarray(unary_from_softmax(probs))
    crf = densecrf.DenseCRF2D(width, height, probs.shape[0])
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=1, compat=3)
    crf.addPairwiseBilateral(sxy=67, srgb=3, rgbim=image, compat=4)
    return np.array(crf.inference(10)).reshape(probs.shape[0], height, width)
