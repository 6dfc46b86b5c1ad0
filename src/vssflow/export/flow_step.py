"""The folded, cached flow transformer the exporter traces: exact algebra on the authors' model.

Exact algebra on the authors' model, no approximation:
* The state is `x = [z; k]` with `k` constant, so `proj_in (I + W_pre) x` splits into `A_z z`
  (each step) and `A_k k` (once per window, a per-token bias).
* The context `c` is fixed per window: the cross-attention keys/values of every block are
  computed once by `ConditionStage`.
* The unconditional pass has `c = 0` and every projection is bias-free, so its cross-attention
  output is exactly zero: it is skipped.
* Only the 128 audio rows of `(I + W_post) proj_out` are needed: one `[128, width]` matrix.
* Both CFG passes run as one batch, the guidance mix inside the graph.
"""

from __future__ import annotations

import torch
from torch import nn

from .conditions import ConditionProjector
from .precision import like
from .reference import clip_to_latent_rate, synch_to_latent_rate
from .transformer import FlowTransformer, rope_tables


def fold_input(flow: FlowTransformer, audio_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`proj_in (I + W_pre)` split into its audio `[width, 128]` and condition `[width, Ck]` columns."""
    w_pre = flow.preprocess_conv.weight[:, :, 0]                                   # [C, C]
    m = flow.proj_in.weight @ (torch.eye(w_pre.shape[0], dtype=w_pre.dtype) + w_pre)  # [width, C]
    return m[:, :audio_channels].contiguous(), m[:, audio_channels:].contiguous()


def fold_output(flow: FlowTransformer, audio_channels: int) -> torch.Tensor:
    """The audio rows of `(I + W_post) proj_out`: `[128, width]`."""
    w_post = flow.postprocess_conv.weight[:, :, 0]
    m = (torch.eye(w_post.shape[0], dtype=w_post.dtype) + w_post) @ flow.proj_out.weight
    return m[:audio_channels].contiguous()


class ConditionStage(nn.Module):
    """Once per window: conditions -> (per-token input bias, cross-attention K/V of all blocks).

    clip `[1, T, Dc]`, synch `[1, T, Ds]` (already at the latent rate), phone_ids `[1, T]`,
    speaker `[1, Dspk]` -> cond_bias `[1, T, width]`, keys/values `[L, 1, Hkv, 1+T, Dh]`, and the
    condition channels `k` `[1, Ck, T]` themselves (dopri5's error norm counts them).
    """

    def __init__(self, flow: FlowTransformer, conditions: ConditionProjector):
        super().__init__()
        self.conditions = conditions
        self.blocks = flow.transformer_blocks
        audio = flow.dims.in_channels - conditions.dims.channel_dim
        _, a_k = fold_input(flow, audio)
        self.register_buffer("a_k", a_k.detach().clone())

    def forward(self, clip, synch, phone_ids, speaker):
        context, channels = self.conditions(clip, synch, phone_ids, speaker)
        cond_bias = channels.transpose(1, 2) @ self.a_k.T                              # [1, T, width]
        keys, values = zip(*(blk.attn2.kv_heads(context) for blk in self.blocks))   # [1, Hkv, 1+T, Dh] each
        return cond_bias, torch.stack(keys), torch.stack(values), channels


class FlowStep(nn.Module):
    """One guided velocity evaluation, both CFG passes batched.

    z `[B, 128, T]`, t `[1]`, cond_bias `[B, T, width]`, keys/values `[L, B, Hkv, 1+T, Dh]`,
    cfg `[1]` -> guided velocity of the audio channels `[B, 128, T]`.

    `forward` is the exported graph: `window_kv` (once per window), `time_token` (once per time:
    the same for every window) and `guided` (every step). The torch backend calls the three
    itself, so a step does only the step's work (`runtime/backends.py`, `TorchBackend.velocity`).
    """

    def __init__(self, flow: FlowTransformer, audio_channels: int):
        super().__init__()
        self.flow = flow
        a_z, _ = fold_input(flow, audio_channels)
        self.register_buffer("a_z", a_z.detach().clone())
        self.register_buffer("p_out", fold_output(flow, audio_channels).detach().clone())

    def forward(self, z, t, cond_bias, keys, values, cfg):
        keys, values = self.window_kv(keys, values)
        return self.guided(z, self.time_token(t, 2 * z.shape[0]), cond_bias, keys, values, cfg)

    def window_kv(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Once per window: each block's cross-attention keys/values `[L, B, Hkv, 1+T, Dh]` in the
        compute dtype (half in a half module), repeated to the query heads: L of `[B, H, 1+T, Dh]`."""
        pairs = [blk.attn2.repeat_kv(like(k, self.a_z), like(v, self.a_z))
                 for blk, k, v in zip(self.flow.transformer_blocks, keys, values)]
        return [k for k, _ in pairs], [v for _, v in pairs]

    def time_token(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        """The time token of `t` `[1]` for `rows` rows (both CFG passes): `[rows, 1, width]`, in
        `t`'s dtype (FP32: the residual stream's). Depends on `t` only: the same in every window."""
        return like(self.flow.time_token(t.expand(rows)), t)

    def guided(self, z, token, cond_bias, keys, values, cfg):
        """The step: z `[B, 128, T]`, `token` of `time_token`, `cond_bias`, keys/values of
        `window_kv`, cfg `[1]` -> guided velocity `[B, 128, T]`."""
        b = z.shape[0]
        n_tokens = z.shape[-1] + 1
        cos, sin = rope_tables(n_tokens, self.flow.dims.rotary_dim, z.device)
        # In a half module: the product in half, the residual stream from here on in FP32 (z's dtype).
        hz = like(like(z, self.a_z).transpose(1, 2) @ self.a_z.T, z)                    # [B, T, width]
        h = torch.cat([hz + cond_bias, hz], dim=0)                                     # cond | uncond
        h = torch.cat([like(token, h), h], dim=1)                                      # [2B, 1+T, width]
        for blk, k, v in zip(self.flow.transformer_blocks, keys, values):
            h = blk.cached(h, k, v, cos, sin, conditioned=b)                           # uncond rows: c = 0
        v_all = like(like(h[:, 1:], self.p_out) @ self.p_out.T, z).transpose(1, 2)       # [2B, 128, T]
        # the guidance mix in FP32 (`like` casts only in a half module: the FP32 graph gets no extra node)
        v_cond, v_uncond = v_all[:b], v_all[b:]
        return v_uncond + cfg * (v_cond - v_uncond)


def latent_rate_features(clip: torch.Tensor, synch: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder features at the latent rate, as `ConditionStage` takes them."""
    return clip_to_latent_rate(clip, length), synch_to_latent_rate(synch, length)
