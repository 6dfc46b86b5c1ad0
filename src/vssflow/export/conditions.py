"""Condition projections and the phoneme embedding, as the authors' `cond_proj`, `ref_proj`, ...

Keys sit at the top of the authors' checkpoint: `cond_proj.*`, `ref_proj.*`, `synch_proj.*`,
`lip_proj.*`, `phone_embedding.weight`. Each projection is `Linear -> SiLU -> Linear`, no bias.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

from .errors import CheckpointError
from .random_init import init_tensor

PROJECTIONS = ("cond_proj", "ref_proj", "synch_proj", "lip_proj")


@dataclasses.dataclass(frozen=True)
class ConditionDims:
    """Widths of the condition features and of their projections (input -> hidden -> output)."""

    clip_in: int = 768        # CLIP feature width
    cond_hidden: int = 1536
    cond_out: int = 768       # = cross-attention width
    speaker_in: int = 256     # RawNet3 embedding
    ref_hidden: int = 1536
    synch_in: int = 768       # Synchformer feature width
    synch_hidden: int = 1536
    synch_out: int = 768
    lip_in: int = 1024        # lip features: zeros at inference
    lip_hidden: int = 2048
    lip_out: int = 1024
    phone_vocab: int = 200
    phone_dim: int = 32

    @property
    def channel_dim(self) -> int:
        """Channels of the constant condition `k` appended to the latent: lip, phone, synch."""
        return self.lip_out + self.phone_dim + self.synch_out

    @classmethod
    def preset(cls, size: str) -> ConditionDims:
        if size in ("full", "small"):
            return cls()
        if size == "tiny":
            return cls(clip_in=64, cond_hidden=128, cond_out=64, speaker_in=32, ref_hidden=128,
                       synch_in=64, synch_hidden=32, synch_out=16,
                       lip_in=1024, lip_hidden=32, lip_out=16, phone_dim=8)
        raise ValueError(f"unknown size {size!r}: expected tiny, small or full")

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], config: Mapping | None = None) -> ConditionDims:
        def shape(key: str) -> tuple[int, ...]:
            if key not in sd:
                raise CheckpointError(f"conditions: missing tensor {key}")
            return tuple(sd[key].shape)

        (ch, ci), (co, _) = shape("cond_proj.0.weight"), shape("cond_proj.2.weight")
        (rh, ri), (ro, _) = shape("ref_proj.0.weight"), shape("ref_proj.2.weight")
        (sh, si), (so, _) = shape("synch_proj.0.weight"), shape("synch_proj.2.weight")
        (lh, li), (lo, _) = shape("lip_proj.0.weight"), shape("lip_proj.2.weight")
        pv, pd = shape("phone_embedding.weight")
        if ro != co:
            raise CheckpointError(f"conditions: ref_proj outputs {ro} but cond_proj outputs {co}; "
                                  "both feed the same cross-attention context")
        return cls(clip_in=ci, cond_hidden=ch, cond_out=co, speaker_in=ri, ref_hidden=rh,
                   synch_in=si, synch_hidden=sh, synch_out=so, lip_in=li, lip_hidden=lh,
                   lip_out=lo, phone_vocab=pv, phone_dim=pd)

    def projection_shapes(self) -> dict[str, tuple[int, int, int]]:
        return {"cond_proj": (self.clip_in, self.cond_hidden, self.cond_out),
                "ref_proj": (self.speaker_in, self.ref_hidden, self.cond_out),
                "synch_proj": (self.synch_in, self.synch_hidden, self.synch_out),
                "lip_proj": (self.lip_in, self.lip_hidden, self.lip_out)}


def authors_state_dict(dims: ConditionDims, *, generator: torch.Generator | None = None,
                       device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    sd = {}
    for name, (i, h, o) in dims.projection_shapes().items():
        sd[f"{name}.0.weight"] = init_tensor(f"{name}.0.weight", (h, i), generator, device)
        sd[f"{name}.2.weight"] = init_tensor(f"{name}.2.weight", (o, h), generator, device)
    # nn.Embedding's own init is N(0, 1).
    sd["phone_embedding.weight"] = init_tensor("phone_embedding.weight", (dims.phone_vocab, dims.phone_dim),
                                               generator, device) * (dims.phone_dim ** 0.5)
    return sd


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h, bias=False), nn.SiLU(), nn.Linear(h, o, bias=False))


class ConditionProjector(nn.Module):
    """Projects the encoders' features into the two conditions of the flow transformer.

    context c `[B, 1+T, cond_out]`: speaker token then CLIP frames (cross-attention);
    channels k `[B, lip_out + phone_dim + synch_out, T]` (appended to the latent).
    """

    def __init__(self, dims: ConditionDims):
        super().__init__()
        self.dims = dims
        for name, shape in dims.projection_shapes().items():
            setattr(self, name, _mlp(*shape))
        self.phone_embedding = nn.Embedding(dims.phone_vocab, dims.phone_dim)

    def forward(self, clip: torch.Tensor, synch: torch.Tensor, phone_ids: torch.Tensor,
                speaker: torch.Tensor, lip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """clip `[B,T,clip_in]`, synch `[B,T,synch_in]`, phone_ids `[B,T]` int, speaker `[B,speaker_in]`."""
        b, t, _ = clip.shape
        if lip is None:
            lip = clip.new_zeros(b, t, self.dims.lip_in)
        context = torch.cat([self.ref_proj(speaker[:, None]), self.cond_proj(clip)], dim=1)  # [B,1+T,D]
        channels = torch.cat([self.lip_proj(lip), self.phone_embedding(phone_ids.long()),
                              self.synch_proj(synch)], dim=-1).transpose(1, 2)              # [B,Ck,T]
        return context, channels
