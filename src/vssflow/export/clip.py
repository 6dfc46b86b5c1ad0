"""CLIP ViT-B/16 visual tower (OpenAI layout): frames -> the CLS token of the last block.

The authors freeze OpenAI's ViT-B/16 as `image_encoder` (`model/clip/clip_module.py`, `CLIPViT`)
and at inference (`infer.py` -> `feature/extract_clip.py::encode_image`) keep only `x[:, 0]` of
the last residual block: no `ln_post`, no `proj`. Those two tensors are in the checkpoint
(`image_encoder.visual.ln_post.*`, `.proj`) and in `authors_state_dict`, not in the module.

    frames [N, 3, 224, 224] (CLIP-normalized) -> [N, 768]
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vssflow.export.errors import CheckpointError
from vssflow.export.precision import softmax
from vssflow.export.random_init import init_tensor, randn

HEAD_DIM = 64  # OpenAI CLIP: heads = width // 64
LAYER_NORM_EPS = 1e-5
CHECKPOINT_PREFIX = "image_encoder.visual."  # where the tower sits in the authors' .ckpt


@dataclass(frozen=True)
class ClipDims:
    width: int = 768
    layers: int = 12
    heads: int = 12
    patch_size: int = 16
    image_size: int = 224
    output_dim: int = 512  # columns of `proj` (unused at inference, kept for the key set)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid ** 2 + 1  # patches + CLS

    @classmethod
    def preset(cls, size: str) -> "ClipDims":
        if size == "full":
            return cls()
        if size == "tiny":
            return cls(width=64, layers=2, heads=1, patch_size=16, image_size=224, output_dim=32)
        raise ValueError(f"unknown preset {size!r} (expected 'tiny' or 'full')")

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], config: dict | None = None) -> "ClipDims":
        """Dimensions from tensor shapes; `config` may set `heads` (default width // 64)."""
        need = ["conv1.weight", "positional_embedding", "proj"]
        missing = [k for k in need if k not in sd]
        if missing:
            raise CheckpointError(f"CLIP visual state dict lacks {', '.join(missing)}")
        width, in_ch, patch, patch_w = sd["conv1.weight"].shape
        if in_ch != 3 or patch != patch_w:
            raise CheckpointError(f"CLIP conv1.weight has shape {tuple(sd['conv1.weight'].shape)}, "
                                  "expected [width, 3, p, p]")
        layer_ids = {int(m.group(1)) for k in sd
                     if (m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_weight", k))}
        if not layer_ids or layer_ids != set(range(len(layer_ids))):
            raise CheckpointError("CLIP visual state dict has no contiguous "
                                  "transformer.resblocks.N.attn.in_proj_weight keys")
        n_pos = sd["positional_embedding"].shape[0]
        grid = math.isqrt(n_pos - 1)
        if grid * grid + 1 != n_pos:
            raise CheckpointError(f"CLIP positional_embedding has {n_pos} rows, not grid**2 + 1")
        heads = int((config or {}).get("heads", width // HEAD_DIM))
        if heads < 1 or width % heads:
            raise CheckpointError(f"CLIP width {width} is not divisible into {heads} heads")
        return cls(width=int(width), layers=len(layer_ids), heads=heads, patch_size=int(patch),
                   image_size=int(grid * patch), output_dim=int(sd["proj"].shape[1]))


def authors_state_dict(dims: ClipDims, *, generator: torch.Generator | None = None,
                       device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of `image_encoder.visual.*` in the authors' checkpoint (prefix removed)."""
    w = dims.width
    shapes: dict[str, tuple[int, ...]] = {
        "class_embedding": (w,),
        "positional_embedding": (dims.num_tokens, w),
        "proj": (w, dims.output_dim),
        "conv1.weight": (w, 3, dims.patch_size, dims.patch_size),
        "ln_pre.weight": (w,), "ln_pre.bias": (w,),
    }
    for i in range(dims.layers):
        p = f"transformer.resblocks.{i}."
        shapes.update({
            p + "attn.in_proj_weight": (3 * w, w), p + "attn.in_proj_bias": (3 * w,),
            p + "attn.out_proj.weight": (w, w), p + "attn.out_proj.bias": (w,),
            p + "ln_1.weight": (w,), p + "ln_1.bias": (w,),
            p + "mlp.c_fc.weight": (4 * w, w), p + "mlp.c_fc.bias": (4 * w,),
            p + "mlp.c_proj.weight": (w, 4 * w), p + "mlp.c_proj.bias": (w,),
            p + "ln_2.weight": (w,), p + "ln_2.bias": (w,),
        })
    shapes.update({"ln_post.weight": (w,), "ln_post.bias": (w,)})
    sd = {k: init_tensor(k, s, generator, device) for k, s in shapes.items()}
    for k in ("class_embedding", "positional_embedding", "proj"):  # OpenAI's scale: width**-0.5
        sd[k] = randn(shapes[k], w ** -0.5, generator, device)
    return sd


class MultiheadSelfAttention(nn.Module):
    """`nn.MultiheadAttention(embed_dim, heads)` self-attention, written out for export.

    Same parameter names (`in_proj_weight`, `in_proj_bias`, `out_proj.*`) and math:
    softmax(q k^T / sqrt(head_dim)) v, no mask, no dropout; batch first.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L, D] -> [B, L, D]"""
        b, n, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, L, 3D]
        qkv = qkv.reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, H, L, hd]
        attn = softmax((q * (d // self.heads) ** -0.5) @ k.transpose(-1, -2), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, d)  # [B, L, D]
        return self.out_proj(out)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = MultiheadSelfAttention(dim, heads)
        self.ln_1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = nn.Sequential()  # OpenAI's names: c_fc, gelu, c_proj
        self.mlp.add_module("c_fc", nn.Linear(dim, 4 * dim))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * dim, dim))
        self.ln_2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ClipVisual(nn.Module):
    """OpenAI `VisionTransformer` up to the last residual block; returns its CLS token."""

    def __init__(self, dims: ClipDims):
        super().__init__()
        self.dims = dims
        w = dims.width
        self.conv1 = nn.Conv2d(3, w, kernel_size=dims.patch_size, stride=dims.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(w))
        self.positional_embedding = nn.Parameter(torch.empty(dims.num_tokens, w))
        self.ln_pre = nn.LayerNorm(w, eps=LAYER_NORM_EPS)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(
            *[ResidualAttentionBlock(w, dims.heads) for _ in range(dims.layers)])

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [N, 3, H, W] (H = W = image_size) -> CLS features [N, width]"""
        x = self.conv1(frames)  # [N, W, g, g]
        x = x.flatten(2).transpose(1, 2)  # [N, g*g, W]
        cls = self.class_embedding.expand(x.shape[0], 1, -1)  # [N, 1, W]
        x = torch.cat([cls, x], dim=1) + self.positional_embedding  # [N, 1+g*g, W]
        x = self.transformer.resblocks(self.ln_pre(x))
        return x[:, 0]  # [N, W]


def load_clip(sd: Mapping[str, torch.Tensor], config: dict | None = None) -> ClipVisual:
    """Build and load the tower from `image_encoder.visual.*` tensors (prefix removed)."""
    from vssflow.export.checkpoint import load_weights
    return load_weights(ClipVisual(ClipDims.from_state_dict(sd, config)), sd, "CLIP visual state dict")


__all__ = ["CHECKPOINT_PREFIX", "ClipDims", "ClipVisual", "MultiheadSelfAttention",
           "authors_state_dict", "load_clip"]
