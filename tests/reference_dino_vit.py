"""An independent DINO-v1 Vision Transformer in plain torch: the test oracle for `hf_useg.backbones` and the
DINO/STEGO checkpoint converters.

Written from METHODS.md section 0.1 (not from transformers), with the parameter names of DINO's / timm's
`VisionTransformer` so that its `state_dict()` looks exactly like the backbone part of a DINO or STEGO
checkpoint: ``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.i.{norm1, attn.qkv, attn.proj,
norm2, mlp.fc1, mlp.fc2}.*``, ``norm.*``.

* pre-norm blocks, ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``, LayerNorm eps 1e-6, exact (erf) GELU;
* one fused ``qkv`` projection whose output rows are ``[q; k; v]``, each split into heads;
* position embeddings for a square grid of ``g x g`` patches; for another input grid ``h x w`` the patch
  part is resized bicubically (``align_corners=False``) with ``scale_factor=((h + 0.1) / g, (w + 0.1) / g)``
  (so the output size is ``floor(scale * g)``), and used unchanged when ``(h, w) == (g, g)``;
* features = the output of the last block after the final LayerNorm.

Example:

```python
>>> vit = ReferenceDinoViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
>>> vit.patch_features(torch.randn(1, 3, 48, 40)).shape
torch.Size([1, 32, 6, 5])
```
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, h*w, D], row-major over the grid


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, N, head_dim]
        attn = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(out), attn


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, attn = self.attn(self.norm1(x))
        x = x + y
        x = x + self.mlp(self.norm2(x))
        return x, attn


class ReferenceDinoViT(nn.Module):
    """DINO v1 ViT (see the module docstring). ``img_size`` fixes the stored position-embedding grid."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid + 1, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, eps) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=eps)

    @torch.no_grad()
    def randomize(self, seed: int = 0, pos_std: float = 1.0) -> ReferenceDinoViT:
        """Random weights with non-trivial norms/biases and strongly varying position embeddings (so that an
        interpolation mistake is visible in the features)."""
        generator = torch.Generator().manual_seed(seed)
        for name, param in self.named_parameters():
            if name == "pos_embed":
                param.copy_(torch.randn(param.shape, generator=generator) * pos_std)
            elif name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            else:
                fan_in = param[0].numel() if param.dim() > 1 else param.shape[0]
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(max(fan_in, 1)))
        return self

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings for an input of ``height x width`` pixels: ``[1, 1 + h*w, D]``."""
        h, w = height // self.patch_size, width // self.patch_size
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        dim = self.pos_embed.shape[-1]
        cls_pos = self.pos_embed[:, :1]
        grid = self.pos_embed[:, 1:].reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(
            grid,
            scale_factor=((h + 0.1) / self.grid, (w + 0.1) / self.grid),
            mode="bicubic",
            align_corners=False,
        )
        assert grid.shape[-2:] == (h, w), grid.shape
        return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, h * w, dim)], dim=1)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        return tokens + self.interpolate_pos_encoding(x.shape[2], x.shape[3])

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All tokens after the final LayerNorm ``[B, 1 + h*w, D]`` and the last block's attention
        ``[B, heads, 1 + h*w, 1 + h*w]``."""
        tokens = self.prepare_tokens(x)
        attn = None
        for block in self.blocks:
            tokens, attn = block(tokens)
        return self.norm(tokens), attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_attention(x)[0]

    def patch_features(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens of the last layer after the final norm as a map ``[B, D, H/p, W/p]``."""
        tokens = self(x)[:, 1:]
        h, w = x.shape[2] // self.patch_size, x.shape[3] // self.patch_size
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)

    def cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Last-layer attention of the CLS query to every key (CLS key first): ``[B, heads, 1 + h*w]``."""
        return self.forward_with_attention(x)[1][:, :, 0, :]
