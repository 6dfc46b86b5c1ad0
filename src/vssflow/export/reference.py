"""The reference pipeline: VSSFlow inference exactly as the authors compute it, in PyTorch.

Conditions in, waveform out, nothing folded or cached: the oracle every faster path is
compared with (their `infer.py` and `WrappedModel`). Its sampling goes through the same solver
functions as the runtime (`vssflow.runtime.solvers`), fed with the full 1952-channel state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vssflow.runtime import solvers

from .conditions import ConditionProjector
from .transformer import FlowTransformer


def clip_to_latent_rate(clip: torch.Tensor, length: int) -> torch.Tensor:
    """CLIP features `[B, 100, D]` -> `[B, length, D]`, nearest (as the authors)."""
    return F.interpolate(clip.transpose(1, 2), size=length, mode="nearest").transpose(1, 2)


def synch_to_latent_rate(synch: torch.Tensor, length: int) -> torch.Tensor:
    """Synchformer features `[B, S, 8, D]` or `[B, S*8, D]` -> `[B, length, D]`, nearest-exact."""
    synch = synch.reshape(synch.shape[0], -1, synch.shape[-1])
    return F.interpolate(synch.transpose(1, 2), size=length, mode="nearest-exact").transpose(1, 2)


class GuidedVelocity:
    """The authors' `WrappedModel`: two passes, `v = v_u + w (v_c - v_u)`, condition channels at 0.

    The unconditional pass sees the condition channels of the state zeroed and a zero context.
    As in their code, a guidance scale below 1 returns the unconditional velocity as it is.
    """

    def __init__(self, flow: FlowTransformer, context: torch.Tensor, n_condition_channels: int,
                 cfg: float = 3.0):
        self.flow, self.context, self.n_cond, self.cfg = flow, context, n_condition_channels, cfg
        self.nfe = 0

    @torch.no_grad()
    def __call__(self, t: float, x: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        tt = torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
        x_uncond = x.clone()
        x_uncond[:, -self.n_cond:] = 0
        v_uncond = self.flow(x_uncond, tt, torch.zeros_like(self.context))
        if self.cfg < 1.0:
            return v_uncond
        v_cond = self.flow(x, tt, self.context)
        v = v_uncond + self.cfg * (v_cond - v_uncond)
        v[:, -self.n_cond:] = 0
        return v


class ReferencePipeline(nn.Module):
    """Conditions -> flow ODE -> latent; `decoder` (VAE + vocoder) turns latents into audio."""

    def __init__(self, flow: FlowTransformer, conditions: ConditionProjector, decoder: nn.Module | None = None):
        super().__init__()
        self.flow, self.conditions, self.decoder = flow, conditions, decoder

    @property
    def audio_channels(self) -> int:
        return self.flow.dims.in_channels - self.conditions.dims.channel_dim

    @torch.no_grad()
    def encode_conditions(self, clip: torch.Tensor, synch: torch.Tensor, phone_ids: torch.Tensor,
                          speaker: torch.Tensor, length: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
        """clip `[B,100,Dc]`, synch `[B,240,Ds]` (or `[B,30,8,Ds]`), phone_ids `[B,length]`,
        speaker `[B,256]` -> context `[B,1+length,D]`, channels `[B,Ck,length]`."""
        return self.conditions(clip_to_latent_rate(clip, length), synch_to_latent_rate(synch, length),
                               phone_ids, speaker)

    @torch.no_grad()
    def sample(self, context: torch.Tensor, channels: torch.Tensor, noise: torch.Tensor, *,
               solver: str = "dopri5", steps: int | None = None, cfg: float = 3.0,
               callback=None) -> tuple[torch.Tensor, int]:
        """noise `[B, audio_channels, T]` -> (final audio latent `[B, audio_channels, T]`, NFE)."""
        velocity = GuidedVelocity(self.flow, context, channels.shape[1], cfg)
        x0 = torch.cat([noise, channels], dim=1)                           # the authors' full state
        x1 = solvers.solve(solver, velocity, x0, steps, callback=callback)
        return x1[:, : self.audio_channels], velocity.nfe

    @torch.no_grad()
    def generate(self, clip, synch, phone_ids, speaker, noise, *, solver: str = "dopri5",
                 steps: int | None = None, cfg: float = 3.0) -> dict[str, torch.Tensor]:
        context, channels = self.encode_conditions(clip, synch, phone_ids, speaker, noise.shape[-1])
        latent, nfe = self.sample(context, channels, noise, solver=solver, steps=steps, cfg=cfg)
        out = {"context": context, "channels": channels, "latent": latent, "nfe": torch.tensor(nfe)}
        if self.decoder is not None:
            out["audio"] = self.decoder(latent)
        return out
