"""Synchformer visual feature extractor (MMAudio's `mmaudio/ext/synchformer`), written out.

The authors run MMAudio's `Synchformer` (`feature/synchformer/`, the same code) through
`feature/extract_synchformer.py::encode_video_with_sync`: 25 fps frames, normalized with mean
0.5 / std 0.5, cut into segments of 16 frames with step 8; each segment goes alone through the
MotionFormer (`vfeat_extractor`):

1. tubelet embedding: Conv3d, kernel = stride = (2, 16, 16) -> t = 8 frames x n = 14 x 14 patches,
   t-major; a CLS token; position = spatial table (per patch, shared by all frames) + temporal
   table (per frame, shared by all patches); CLS gets the spatial table's row 0.
2. 12 divided space-time blocks: `x += time_attn(norm3 x)`; `x += space_attn(norm1 x)`;
   `x += mlp(norm2 x)` (GELU, LayerNorm eps 1e-6). Time attention: each patch position attends
   over its 8 frames plus the CLS token; space attention: each frame's 196 patches attend over
   themselves plus the CLS token; the CLS query attends to every token.
3. drop CLS, LayerNorm; then the spatial aggregation (`spatial_attn_agg`): per frame, a learnt
   CLS token is put before the 196 patch tokens and one pre-norm `nn.TransformerEncoderLayer`
   (heads 12, FF 3072, GELU, eps 1e-6) runs; its CLS output is the frame's feature.
   Temporal aggregation is `Identity`, so each segment keeps its 8 frame features.

    segments [S, 16, 3, 224, 224] -> features [S, 8, 768]

The weight file (`synchformer_state_dict.pth`, MMAudio's release) is the state dict of the whole
Synchformer sync model (Iashin et al., AudioSet run 24-01-04T16-39-21): `vfeat_extractor.*` (238
tensors) plus `afeat_extractor.*` (AST audio branch, 212), `vproj.*`, `aproj.*` (2 each) and the
offset classifier `transformer.*` (59): 513 tensors. MMAudio's `load_state_dict`, which the
authors use, keeps only `vfeat_extractor.*` (strictly) and drops the rest, and so does
`checkpoint.read_aux`; `authors_state_dict` still writes all of them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vssflow.export.clip import MultiheadSelfAttention  # nn.MultiheadAttention's layout
from vssflow.export.errors import CheckpointError
from vssflow.export.precision import softmax
from vssflow.export.random_init import init_tensor, randn
from vssflow.runtime.contracts import SEGMENT_FRAMES, SEGMENT_STEP

HEAD_DIM = 64  # ViT-B: 768 / 12 heads
LAYER_NORM_EPS = 1e-6


@dataclass(frozen=True)
class SynchformerDims:
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072  # block MLP hidden size
    agg_mlp_dim: int = 3072  # spatial aggregation FF size (mlp_ratio * embed_dim)
    patch_size: int = 16
    tubelet: int = 2  # frames per temporal patch
    image_size: int = 224
    temporal_tokens: int = 8  # rows of temp_embed; frames per segment = temporal_tokens * tubelet
    # the rest of the file; only their shapes matter (nothing here runs at inference)
    audio_dim: int = 768
    audio_depth: int = 12
    audio_mlp_dim: int = 3072
    audio_tokens: int = 74  # AST positions: (128-16)//10+1 = 12 freq x (66-16)//10+1 = 6 time, +2
    audio_patch_size: int = 16
    sync_dim: int = 768
    sync_depth: int = 3
    sync_tokens: int = 198
    sync_classes: int = 21

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def patches(self) -> int:  # per frame
        return self.grid ** 2

    @property
    def num_frames(self) -> int:  # input frames per segment
        return self.temporal_tokens * self.tubelet

    @classmethod
    def preset(cls, size: str) -> "SynchformerDims":
        if size == "full":
            return cls()
        if size == "tiny":
            return cls(embed_dim=64, depth=2, num_heads=1, mlp_dim=256, agg_mlp_dim=256,
                       audio_dim=32, audio_depth=1, audio_mlp_dim=64,
                       sync_dim=32, sync_depth=1)
        raise ValueError(f"unknown preset {size!r} (expected 'tiny' or 'full')")

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor],
                        config: dict | None = None) -> "SynchformerDims":
        """Dimensions from shapes. `config` may give `num_heads` (flat, or MotionFormer's yaml
        form `{"VIT": {"NUM_HEADS": n}}`); default embed_dim // 64."""
        v = "vfeat_extractor."
        need = [v + k for k in ("pos_embed", "temp_embed", "patch_embed_3d.proj.weight",
                                "blocks.0.mlp.fc1.weight", "spatial_attn_agg.linear1.weight")]
        missing = [k for k in need if k not in sd]
        if missing:
            raise CheckpointError(f"Synchformer state dict lacks {', '.join(missing)}")
        dim, in_ch, tubelet, patch, patch_w = sd[v + "patch_embed_3d.proj.weight"].shape
        if in_ch != 3 or patch != patch_w:
            raise CheckpointError("Synchformer vfeat_extractor.patch_embed_3d.proj.weight has shape "
                                  f"{tuple(sd[v + 'patch_embed_3d.proj.weight'].shape)}")
        n_pos = sd[v + "pos_embed"].shape[1]
        grid = round((n_pos - 1) ** 0.5)
        if grid * grid + 1 != n_pos:
            raise CheckpointError(f"Synchformer vfeat_extractor.pos_embed has {n_pos} rows, "
                                  "not grid**2 + 1")
        depth = _count(sd, r"vfeat_extractor\.blocks\.(\d+)\.attn\.qkv\.weight")
        cfg = config or {}
        heads = int(cfg.get("num_heads", cfg.get("VIT", {}).get("NUM_HEADS", dim // HEAD_DIM)))
        if heads < 1 or dim % heads:
            raise CheckpointError(f"Synchformer embed_dim {dim} is not divisible into {heads} heads")
        found = dict(embed_dim=dim, depth=depth, num_heads=heads,
                     mlp_dim=sd[v + "blocks.0.mlp.fc1.weight"].shape[0],
                     agg_mlp_dim=sd[v + "spatial_attn_agg.linear1.weight"].shape[0],
                     patch_size=patch, tubelet=tubelet, image_size=grid * patch,
                     temporal_tokens=sd[v + "temp_embed"].shape[1])
        a = "afeat_extractor.ast."
        if a + "embeddings.position_embeddings" in sd:  # the unused parts, when the file has them
            found.update(
                audio_dim=sd[a + "embeddings.position_embeddings"].shape[2],
                audio_tokens=sd[a + "embeddings.position_embeddings"].shape[1],
                audio_patch_size=sd[a + "embeddings.patch_embeddings.projection.weight"].shape[2],
                audio_depth=_count(sd, r"afeat_extractor\.ast\.encoder\.layer\.(\d+)\."
                                       r"intermediate\.dense\.weight"),
                audio_mlp_dim=sd[a + "encoder.layer.0.intermediate.dense.weight"].shape[0])
        if "transformer.pos_emb_cfg.pos_emb" in sd:
            found.update(sync_dim=sd["transformer.pos_emb_cfg.pos_emb"].shape[2],
                         sync_tokens=sd["transformer.pos_emb_cfg.pos_emb"].shape[1],
                         sync_depth=_count(sd, r"transformer\.blocks\.(\d+)\.ln1\.weight"),
                         sync_classes=sd["transformer.off_head.weight"].shape[0])
        return cls(**{k: int(x) for k, x in found.items()})


def _count(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    ids = {int(m.group(1)) for k in sd if (m := re.fullmatch(pattern, k))}
    if not ids or ids != set(range(len(ids))):
        raise CheckpointError(f"Synchformer state dict has no contiguous keys matching {pattern}")
    return len(ids)


def _encoder_layer_shapes(p: str, d: int, ff: int) -> dict[str, tuple[int, ...]]:
    """A `BaseEncoderLayer`: CLS token + `nn.TransformerEncoderLayer` (registration order)."""
    return {p + "cls_token": (1, 1, d),
            p + "self_attn.in_proj_weight": (3 * d, d), p + "self_attn.in_proj_bias": (3 * d,),
            p + "self_attn.out_proj.weight": (d, d), p + "self_attn.out_proj.bias": (d,),
            p + "linear1.weight": (ff, d), p + "linear1.bias": (ff,),
            p + "linear2.weight": (d, ff), p + "linear2.bias": (d,),
            p + "norm1.weight": (d,), p + "norm1.bias": (d,),
            p + "norm2.weight": (d,), p + "norm2.bias": (d,)}


def _shapes(dims: SynchformerDims) -> dict[str, tuple[int, ...]]:
    d, p = dims.embed_dim, dims.patch_size
    v = "vfeat_extractor."
    s: dict[str, tuple[int, ...]] = {
        v + "cls_token": (1, 1, d), v + "pos_embed": (1, dims.patches + 1, d),
        v + "temp_embed": (1, dims.temporal_tokens, d),
        v + "patch_embed.proj.weight": (d, 3, p, p), v + "patch_embed.proj.bias": (d,),  # unused
        v + "patch_embed_3d.proj.weight": (d, 3, dims.tubelet, p, p),
        v + "patch_embed_3d.proj.bias": (d,)}
    for i in range(dims.depth):
        b = f"{v}blocks.{i}."
        s.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,)})
        for attn in ("attn", "timeattn"):
            s.update({b + attn + ".qkv.weight": (3 * d, d), b + attn + ".qkv.bias": (3 * d,),
                      b + attn + ".proj.weight": (d, d), b + attn + ".proj.bias": (d,)})
        s.update({b + "norm2.weight": (d,), b + "norm2.bias": (d,),
                  b + "mlp.fc1.weight": (dims.mlp_dim, d), b + "mlp.fc1.bias": (dims.mlp_dim,),
                  b + "mlp.fc2.weight": (d, dims.mlp_dim), b + "mlp.fc2.bias": (d,),
                  b + "norm3.weight": (d,), b + "norm3.bias": (d,)})
    s.update({v + "norm.weight": (d,), v + "norm.bias": (d,)})
    s.update(_encoder_layer_shapes(v + "spatial_attn_agg.", d, dims.agg_mlp_dim))

    # afeat_extractor: transformers' ASTModel (v4.27 names) + frequency aggregation layer
    a, ad, am = "afeat_extractor.", dims.audio_dim, dims.audio_mlp_dim
    e = a + "ast.embeddings."
    s.update({e + "cls_token": (1, 1, ad), e + "distillation_token": (1, 1, ad),
              e + "position_embeddings": (1, dims.audio_tokens, ad),
              e + "patch_embeddings.projection.weight": (ad, 1, dims.audio_patch_size,
                                                         dims.audio_patch_size),
              e + "patch_embeddings.projection.bias": (ad,)})
    for i in range(dims.audio_depth):
        b = f"{a}ast.encoder.layer.{i}."
        for n in ("query", "key", "value"):
            s.update({f"{b}attention.attention.{n}.weight": (ad, ad),
                      f"{b}attention.attention.{n}.bias": (ad,)})
        s.update({b + "attention.output.dense.weight": (ad, ad),
                  b + "attention.output.dense.bias": (ad,),
                  b + "intermediate.dense.weight": (am, ad), b + "intermediate.dense.bias": (am,),
                  b + "output.dense.weight": (ad, am), b + "output.dense.bias": (ad,),
                  b + "layernorm_before.weight": (ad,), b + "layernorm_before.bias": (ad,),
                  b + "layernorm_after.weight": (ad,), b + "layernorm_after.bias": (ad,)})
    s.update({a + "ast.layernorm.weight": (ad,), a + "ast.layernorm.bias": (ad,)})
    s.update(_encoder_layer_shapes(a + "freq_attn_agg.", ad, am))

    # bridges into the sync transformer, and the transformer (offset classifier)
    sd_, t = dims.sync_dim, "transformer."
    s.update({"vproj.weight": (sd_, d), "vproj.bias": (sd_,),
              "aproj.weight": (sd_, ad), "aproj.bias": (sd_,),
              t + "OFF_tok": (1, 1, sd_), t + "MOD_tok": (1, 1, sd_),
              t + "vis_in_lnorm.weight": (sd_,), t + "vis_in_lnorm.bias": (sd_,),
              t + "aud_in_lnorm.weight": (sd_,), t + "aud_in_lnorm.bias": (sd_,),
              t + "pos_emb_cfg.pos_emb": (1, dims.sync_tokens, sd_)})
    for i in range(dims.sync_depth):
        b = f"{t}blocks.{i}."
        s.update({b + "ln1.weight": (sd_,), b + "ln1.bias": (sd_,),
                  b + "ln2.weight": (sd_,), b + "ln2.bias": (sd_,)})
        for n in ("key", "query", "value", "proj"):
            s.update({f"{b}attn.{n}.weight": (sd_, sd_), f"{b}attn.{n}.bias": (sd_,)})
        s.update({b + "mlp.0.weight": (4 * sd_, sd_), b + "mlp.0.bias": (4 * sd_,),
                  b + "mlp.2.weight": (sd_, 4 * sd_), b + "mlp.2.bias": (sd_,)})
    s.update({t + "ln_f.weight": (sd_,), t + "ln_f.bias": (sd_,),
              t + "off_head.weight": (dims.sync_classes, sd_), t + "off_head.bias": (dims.sync_classes,)})
    return s


_EMBEDDING_LEAVES = ("cls_token", "pos_embed", "temp_embed", "distillation_token",
                     "position_embeddings", "OFF_tok", "MOD_tok", "pos_emb")


def authors_state_dict(dims: SynchformerDims, *, generator: torch.Generator | None = None,
                       device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of `synchformer_state_dict.pth` (513 for the full model), in file order."""
    out = {}
    for k, shape in _shapes(dims).items():
        if k.rsplit(".", 1)[-1] in _EMBEDDING_LEAVES:  # learnt tokens / tables: O(0.1) entries
            out[k] = randn(shape, 0.1, generator, device)
        else:
            out[k] = init_tensor(k, shape, generator, device)
    return out


class DividedAttention(nn.Module):
    """MotionFormer's `DividedAttention` along one axis ("time" or "space").

    Tokens are `[CLS, (frame f, patch n) t-major]`. The CLS query attends to all tokens; every
    other query attends to the CLS key plus the tokens sharing its patch (time) or frame (space).
    """

    def __init__(self, dim: int, heads: int, axis: str):
        super().__init__()
        assert axis in ("time", "space"), f"{axis=}"
        self.heads, self.axis = heads, axis
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, frames: int, patches: int) -> torch.Tensor:
        """x [B, 1 + frames*patches, D] -> [B, 1 + frames*patches, D]"""
        b, n, d = x.shape
        h, hd = self.heads, d // self.heads
        qkv = self.qkv(x).reshape(b, n, 3, h, hd).permute(2, 0, 3, 1, 4)  # [3, B, H, L, hd]
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]  # [B, H, L, hd]
        cls_out = softmax(q[:, :, :1] @ k.transpose(-1, -2), dim=-1) @ v  # [B, H, 1, hd]

        def groups(t: torch.Tensor) -> torch.Tensor:  # [B, H, F*N, hd] -> [B, H, G, len, hd]
            t = t.reshape(b, h, frames, patches, hd)
            return t.transpose(2, 3) if self.axis == "time" else t

        q_, k_, v_ = groups(q[:, :, 1:]), groups(k[:, :, 1:]), groups(v[:, :, 1:])
        n_groups = q_.shape[2]
        k_ = torch.cat([k[:, :, None, :1].expand(b, h, n_groups, 1, hd), k_], dim=3)
        v_ = torch.cat([v[:, :, None, :1].expand(b, h, n_groups, 1, hd), v_], dim=3)
        out = softmax(q_ @ k_.transpose(-1, -2), dim=-1) @ v_  # [B, H, G, len, hd]
        if self.axis == "time":
            out = out.transpose(2, 3)  # [B, H, F, N, hd]
        out = torch.cat([cls_out, out.reshape(b, h, frames * patches, hd)], dim=2)  # [B, H, L, hd]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class DividedSpaceTimeBlock(nn.Module):
    def __init__(self, dims: SynchformerDims):
        super().__init__()
        d = dims.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.attn = DividedAttention(d, dims.num_heads, "space")
        self.timeattn = DividedAttention(d, dims.num_heads, "time")
        self.norm2 = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(d, dims.mlp_dim)
        self.norm3 = nn.LayerNorm(d, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, frames: int, patches: int) -> torch.Tensor:
        x = x + self.timeattn(self.norm3(x), frames, patches)
        x = x + self.attn(self.norm1(x), frames, patches)
        return x + self.mlp(self.norm2(x))


class ClsAggregation(nn.Module):
    """`SpatialTransformerEncoderLayer`: CLS + tokens through a pre-norm
    `nn.TransformerEncoderLayer` (GELU, eps 1e-6), returning the CLS row.

    Only the CLS row is read, so only its query, attention row and FF are computed: the same
    numbers the full layer gives for that row.
    """

    def __init__(self, dim: int, heads: int, ff: int):
        super().__init__()
        self.heads = heads
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.self_attn = MultiheadSelfAttention(dim, heads)
        self.linear1 = nn.Linear(dim, ff)
        self.linear2 = nn.Linear(ff, dim)
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, D] -> [B, D]"""
        b, n, d = x.shape
        h, hd = self.heads, d // self.heads
        x = torch.cat([self.cls_token.expand(b, 1, d), x], dim=1)  # [B, 1+N, D]
        xn = self.norm1(x)
        w, bias = self.self_attn.in_proj_weight, self.self_attn.in_proj_bias
        q = F.linear(xn[:, :1], w[:d], bias[:d]).reshape(b, 1, h, hd).transpose(1, 2)  # [B,H,1,hd]
        kv = F.linear(xn, w[d:], bias[d:]).reshape(b, n + 1, 2, h, hd).permute(2, 0, 3, 1, 4)
        attn = softmax((q * hd ** -0.5) @ kv[0].transpose(-1, -2), dim=-1)  # [B, H, 1, 1+N]
        y = x[:, 0] + self.self_attn.out_proj((attn @ kv[1]).reshape(b, d))  # [B, D]
        return y + self.linear2(F.gelu(self.linear1(self.norm2(y))))


class PatchEmbed3D(nn.Module):
    def __init__(self, dims: SynchformerDims):
        super().__init__()
        k = (dims.tubelet, dims.patch_size, dims.patch_size)
        self.proj = nn.Conv3d(3, dims.embed_dim, kernel_size=k, stride=k)


class MotionFormer(nn.Module):
    """`vfeat_extractor`: frames of one segment -> one feature per temporal token."""

    def __init__(self, dims: SynchformerDims):
        super().__init__()
        self.dims = dims
        d = dims.embed_dim
        self.cls_token = nn.Parameter(torch.empty(1, 1, d))
        self.pos_embed = nn.Parameter(torch.empty(1, dims.patches + 1, d))
        self.temp_embed = nn.Parameter(torch.empty(1, dims.temporal_tokens, d))
        self.patch_embed_3d = PatchEmbed3D(dims)
        self.blocks = nn.ModuleList([DividedSpaceTimeBlock(dims) for _ in range(dims.depth)])
        self.norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.spatial_attn_agg = ClsAggregation(d, dims.num_heads, dims.agg_mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [S, 3, frames, H, W] -> [S, t, D]"""
        t, n, d = self.dims.temporal_tokens, self.dims.patches, self.dims.embed_dim
        x = self.patch_embed_3d.proj(x).flatten(2).transpose(1, 2)  # [S, t*n, D], t-major
        pos = (self.pos_embed[:, None, 1:] + self.temp_embed[:, :, None]).reshape(1, t * n, d)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], 1, d)
        x = torch.cat([cls, x + pos], dim=1)  # [S, 1+t*n, D]
        for blk in self.blocks:
            x = blk(x, t, n)
        x = self.norm(x[:, 1:]).reshape(-1, n, d)  # [S*t, n, D]
        return self.spatial_attn_agg(x).reshape(-1, t, d)  # [S, t, D]


class SynchformerVisual(nn.Module):
    """MMAudio's `Synchformer` as `encode_video_with_sync` uses it, one segment per batch row."""

    def __init__(self, dims: SynchformerDims):
        super().__init__()
        self.dims = dims
        self.vfeat_extractor = MotionFormer(dims)

    def forward(self, segments: torch.Tensor) -> torch.Tensor:
        """segments [S, 16, 3, 224, 224] (normalized to [-1, 1]) -> [S, 8, 768]"""
        return self.vfeat_extractor(segments.permute(0, 2, 1, 3, 4))  # [S, 3, 16, H, W] in


def segment(frames: torch.Tensor, size: int = SEGMENT_FRAMES, step: int = SEGMENT_STEP) -> torch.Tensor:
    """[T, 3, H, W] -> [S, size, 3, H, W], S = (T - size) // step + 1 (`encode_video_with_sync`)."""
    n = (frames.shape[0] - size) // step + 1
    return torch.stack([frames[i * step:i * step + size] for i in range(n)])


def load_synchformer(sd: Mapping[str, torch.Tensor], config: dict | None = None) -> SynchformerVisual:
    """Build and load from `synchformer_state_dict.pth`'s dict (only `vfeat_extractor.*` is read)."""
    from vssflow.export.checkpoint import load_weights
    return load_weights(SynchformerVisual(SynchformerDims.from_state_dict(sd, config)), sd,
                        "Synchformer state dict")


__all__ = ["SEGMENT_FRAMES", "SEGMENT_STEP", "SynchformerDims", "SynchformerVisual",
           "authors_state_dict", "load_synchformer", "segment"]
