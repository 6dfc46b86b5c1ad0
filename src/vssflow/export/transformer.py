"""The flow transformer: VSSFlow's Stable-Audio-style DiT, exactly as the authors run it.

State-dict keys are those of the authors' `StableAudioDiTModel` (prefix
`vaflow.` in their checkpoint, not in the keys here). This module is the unfolded reference;
`flow_step.py` holds the folded, cached form the exporter traces.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError
from .precision import attention, like
from .random_init import init_tensor

ROPE_THETA = 10000.0


@dataclasses.dataclass(frozen=True)
class FlowDims:
    """Dimensions of the flow transformer; all but `head_dim` are read off tensor shapes."""

    in_channels: int = 1952       # audio latent channels + condition channels
    width: int = 1536             # num_heads * head_dim
    num_layers: int = 10
    head_dim: int = 64
    num_kv_heads: int = 12        # cross-attention key/value heads (GQA)
    cross_dim: int = 768          # width of the cross-attention context c
    time_proj_dim: int = 256      # 2 * len(time_proj.weight)
    ff_inner: int = 6144          # SwiGLU inner width

    @property
    def num_heads(self) -> int:
        return self.width // self.head_dim

    @property
    def rotary_dim(self) -> int:
        return self.head_dim // 2

    @classmethod
    def preset(cls, size: str) -> FlowDims:
        if size == "full":
            return cls()
        if size == "small":
            # Real condition widths (cross-attention context 768, 1824 condition channels).
            return cls(width=512, num_layers=4, num_kv_heads=4, cross_dim=768, ff_inner=2048,
                       in_channels=128 + 1824)
        if size == "tiny":
            return cls(in_channels=128 + 16 + 8 + 16, width=128, num_layers=2, num_kv_heads=1,
                       cross_dim=64, ff_inner=256)
        raise ValueError(f"unknown size {size!r}: expected tiny, small or full")

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], config: Mapping | None = None) -> FlowDims:
        config = config or {}
        try:
            head_dim = int(config.get("attention_head_dim", 64))
            in_channels, width = sd["proj_in.weight"].shape[1], sd["proj_in.weight"].shape[0]
            num_layers = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
            kv_out, cross_dim = sd["transformer_blocks.0.attn2.to_k.weight"].shape
            ff_inner = sd["transformer_blocks.0.ff.net.2.weight"].shape[1]
            time_proj_dim = 2 * sd["time_proj.weight"].shape[0]
        except KeyError as e:
            raise CheckpointError(f"flow transformer: missing tensor vaflow.{e.args[0]}") from None
        if width % head_dim or kv_out % head_dim:
            raise CheckpointError(
                f"flow transformer: width {width} / kv width {kv_out} not divisible by head_dim "
                f"{head_dim}; pass the authors' transformer config.json via --assets")
        return cls(in_channels=in_channels, width=width, num_layers=num_layers, head_dim=head_dim,
                   num_kv_heads=kv_out // head_dim, cross_dim=cross_dim,
                   time_proj_dim=time_proj_dim, ff_inner=ff_inner)


def authors_state_dict(dims: FlowDims, *, generator: torch.Generator | None = None,
                       device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor under `vaflow.` in the authors' checkpoint, random of realistic scale."""
    d, c, kv = dims.width, dims.in_channels, dims.num_kv_heads * dims.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "time_proj.weight": (dims.time_proj_dim // 2,),
        "timestep_proj.0.weight": (d, dims.time_proj_dim), "timestep_proj.0.bias": (d,),
        "timestep_proj.2.weight": (d, d), "timestep_proj.2.bias": (d,),
        "preprocess_conv.weight": (c, c, 1),
        "proj_in.weight": (d, c),
    }
    for i in range(dims.num_layers):
        p = f"transformer_blocks.{i}."
        for n in ("norm1", "norm2", "norm3"):
            shapes[p + n + ".weight"] = (d,)
            shapes[p + n + ".bias"] = (d,)
        for w in ("to_q", "to_k", "to_v", "to_out.0"):
            shapes[f"{p}attn1.{w}.weight"] = (d, d)
        shapes[p + "attn2.to_q.weight"] = (d, d)
        shapes[p + "attn2.to_k.weight"] = (kv, dims.cross_dim)
        shapes[p + "attn2.to_v.weight"] = (kv, dims.cross_dim)
        shapes[p + "attn2.to_out.0.weight"] = (d, d)
        shapes[p + "ff.net.0.proj.weight"] = (2 * dims.ff_inner, d)
        shapes[p + "ff.net.0.proj.bias"] = (2 * dims.ff_inner,)
        shapes[p + "ff.net.2.weight"] = (d, dims.ff_inner)
        shapes[p + "ff.net.2.bias"] = (d,)
    shapes["proj_out.weight"] = (c, d)
    shapes["postprocess_conv.weight"] = (c, c, 1)
    sd = {k: init_tensor(k, s, generator, device) for k, s in shapes.items()}
    if str(device) != "meta":
        # Gaussian Fourier frequencies: Stable Audio draws them N(0, 1) (scale 1.0).
        sd["time_proj.weight"] = torch.randn(shapes["time_proj.weight"], generator=generator)
    return sd


def rope_tables(n_positions: int, rotary_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin `[n_positions, rotary_dim]` in fp32, halves repeated (non-interleaved RoPE).

    Eager calls share one cached pair per (n_positions, rotary_dim, device): read-only, never
    modify them. Traced or compiled calls compute the tables in the graph (the exported T axis
    is dynamic).
    """
    if _in_graph():
        return _rope_tables(n_positions, rotary_dim, device)
    return _cached_rope_tables(int(n_positions), int(rotary_dim), torch.device(device or "cpu"))


def _rope_tables(n_positions: int, rotary_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim
    inv_freq = 1.0 / (ROPE_THETA ** exponent)                         # [rotary_dim/2]
    pos = torch.arange(n_positions, dtype=torch.float32, device=device)
    freqs = torch.outer(pos, inv_freq)                                # [N, rotary_dim/2]
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)


@functools.lru_cache(maxsize=16)
def _cached_rope_tables(n_positions: int, rotary_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Ordinary tensors even when first asked for under inference_mode, so that later autograd
    # use may save them for backward.
    with torch.inference_mode(False), torch.no_grad():
        return _rope_tables(n_positions, rotary_dim, device)


def _in_graph() -> bool:
    """True while tracing (TorchScript/ONNX export) or compiling: the RoPE tables are computed in
    the graph (no Python cache; Inductor folds them) and the in-place Triton RoPE kernel is off
    (Inductor fuses the rotation itself). Attention is not written out under compile: that is
    `precision.exporting()`, tracing only."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `rotary_dim` channels of each head: x `[B, H, N, Dh]`, in fp32."""
    r = cos.shape[-1]
    dtype = x.dtype
    x = x.float()
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1).to(dtype)


def apply_rope_auto(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope`, or on eager CUDA the in-place kernel (`vssflow.kernels.rope`): then `x`
    itself is rotated and returned, so pass a tensor nothing else reads (a fresh projection)."""
    kernels = _rope_kernels(x)
    return apply_rope(x, cos, sin) if kernels is None else kernels.apply_rope_(x, cos, sin)


def _rope_kernels(x: torch.Tensor):
    """`vssflow.kernels.rope` where its in-place kernel should rotate `x`, else None.

    Only for CUDA tensors outside autograd, tracing, ONNX export and compilation, when Triton
    imports and `VSSFLOW_KERNELS` allows (`kernels/dispatch.py`). Imported here, lazily: the
    export package works without Triton.
    """
    if not x.is_cuda or x.requires_grad or _in_graph():
        return None
    try:
        from vssflow.kernels import dispatch, rope
    except ImportError:
        return None
    return rope if dispatch.use_kernel(x.device) else None


def time_embedding_features(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Gaussian Fourier features `[cos(2πtW), sin(2πtW)]`: t `[B]`, freqs `[F]` -> `[B, 2F]`."""
    proj = 2 * math.pi * t[:, None].to(freqs.dtype) * freqs[None, :]
    return torch.cat([proj.cos(), proj.sin()], dim=-1)


class Attention(nn.Module):
    """Bias-free multi-head attention with optional GQA; q/k/v/out named as diffusers does."""

    def __init__(self, width: int, kv_in: int, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.to_q = nn.Linear(width, num_heads * head_dim, bias=False)
        self.to_k = nn.Linear(kv_in, num_kv_heads * head_dim, bias=False)
        self.to_v = nn.Linear(kv_in, num_kv_heads * head_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(num_heads * head_dim, width, bias=False)])

    def heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, n_heads, self.head_dim).transpose(1, 2)    # [B, H, N, Dh]

    def kv_heads(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value heads of `context`: `[B, Hkv, M, Dh]` each (what a K/V cache holds)."""
        return self.heads(self.to_k(context), self.num_kv_heads), self.heads(self.to_v(context), self.num_kv_heads)

    def repeat_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """GQA: each key/value head repeated to its query heads, `[B, Hkv, M, Dh]` -> `[B, H, M, Dh]`."""
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        return k, v

    def kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value heads of `context`, repeated to the query heads: `[B, H, M, Dh]` each."""
        return self.repeat_kv(*self.kv_heads(context))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, n, dh = q.shape
        o = attention(q, k, v)                                         # scale 1/sqrt(Dh)
        return self.to_out[0](o.transpose(1, 2).reshape(b, n, h * dh))


class SelfAttention(Attention):
    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q = self.heads(self.to_q(x), self.num_heads)
        kernels = _rope_kernels(q)
        if kernels is None:                      # the reference: the exported graph, op for op
            q = apply_rope(q, cos, sin)
            k, v = self.kv(x)
            return self.attend(q, apply_rope(k, cos, sin), v)
        k, v = self.kv(x)
        kernels.apply_rope_pair_(q, k, cos, sin)                       # in place, one launch
        return self.attend(q, k, v)


class CrossAttention(Attention):
    """The authors' change to Stable Audio: RoPE rotates the queries only."""

    def forward(self, x: torch.Tensor, context: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        return self.cached(x, *self.kv(context), cos, sin)

    def cached(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> torch.Tensor:
        """With the context's keys/values given, repeated to the query heads `[B, H, M, Dh]`
        (`kv_heads` then `repeat_kv`: once per window)."""
        q = apply_rope_auto(self.heads(self.to_q(x), self.num_heads), cos, sin)
        return self.attend(q, k, v)


class SwiGLU(nn.Module):
    def __init__(self, width: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(width, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.silu(gate)


class FeedForward(nn.Module):
    def __init__(self, width: int, inner: int):
        super().__init__()
        # net.1 is a Dropout in diffusers: no weights, an index kept so keys match.
        self.net = nn.ModuleList([SwiGLU(width, inner), nn.Identity(), nn.Linear(inner, width)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class Block(nn.Module):
    def __init__(self, dims: FlowDims):
        super().__init__()
        d = dims.width
        self.norm1 = nn.LayerNorm(d, eps=1e-5)
        self.attn1 = SelfAttention(d, d, dims.num_heads, dims.num_heads, dims.head_dim)
        self.norm2 = nn.LayerNorm(d, eps=1e-5)
        self.attn2 = CrossAttention(d, dims.cross_dim, dims.num_heads, dims.num_kv_heads, dims.head_dim)
        self.norm3 = nn.LayerNorm(d, eps=1e-5)
        self.ff = FeedForward(d, dims.ff_inner)

    def forward(self, h: torch.Tensor, context: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        h = h + like(self.attn1(self.norm1(h), cos, sin), h)       # the residual stream keeps its dtype
        h = h + like(self.attn2(self.norm2(h), context, cos, sin), h)
        return h + like(self.ff(self.norm3(h)), h)

    def cached(self, h: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               conditioned: int) -> torch.Tensor:
        """The block with the cross-attention's keys/values given, repeated to the query heads
        (`[B, H, M, Dh]`), for the first `conditioned` rows of `h`; the other rows have a zero
        context, and every projection being bias-free their cross-attention is exactly zero:
        skipped. In a half module `h` is the FP32 residual stream (`flow_step.FlowStep`): each
        branch computes in half and is added in FP32."""
        h = h + like(self.attn1(self.norm1(h), cos, sin), h)
        cross = self.attn2.cached(self.norm2(h[:conditioned]), k, v, cos, sin)
        h = h + like(torch.cat([cross, torch.zeros_like(cross)], dim=0), h)
        return h + like(self.ff(self.norm3(h)), h)


class FlowTransformer(nn.Module):
    """v = model(x, t, c): x `[B, C_in, T]`, t `[B]`, c `[B, M, cross_dim]` -> `[B, C_in, T]`."""

    def __init__(self, dims: FlowDims):
        super().__init__()
        self.dims = dims
        d, c = dims.width, dims.in_channels
        self.time_proj = _FourierFrequencies(dims.time_proj_dim // 2)
        self.timestep_proj = nn.Sequential(nn.Linear(dims.time_proj_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.preprocess_conv = nn.Conv1d(c, c, 1, bias=False)
        self.proj_in = nn.Linear(c, d, bias=False)
        self.transformer_blocks = nn.ModuleList([Block(dims) for _ in range(dims.num_layers)])
        self.proj_out = nn.Linear(d, c, bias=False)
        self.postprocess_conv = nn.Conv1d(c, c, 1, bias=False)

    def time_token(self, t: torch.Tensor) -> torch.Tensor:
        """The prepended time token `[B, 1, width]`."""
        return self.timestep_proj(time_embedding_features(t, self.time_proj.weight))[:, None]

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n_tokens = x.shape[-1] + 1                                      # time token at position 0
        cos, sin = rope_tables(n_tokens, self.dims.rotary_dim, x.device)
        h = self.proj_in((self.preprocess_conv(x) + x).transpose(1, 2))  # [B, T, width]
        h = torch.cat([self.time_token(t).to(h.dtype), h], dim=1)       # [B, T+1, width]
        for block in self.transformer_blocks:
            h = block(h, context, cos, sin)
        o = self.proj_out(h).transpose(1, 2)[:, :, 1:]                  # [B, C_in, T]
        return self.postprocess_conv(o) + o


class _FourierFrequencies(nn.Module):
    """Holds `time_proj.weight`, the stored Gaussian Fourier frequencies `W` `[time_proj_dim/2]`."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n), requires_grad=False)


def load_flow(sd: Mapping[str, torch.Tensor], config: Mapping | None = None) -> FlowTransformer:
    model = FlowTransformer(FlowDims.from_state_dict(sd, config))
    model.load_state_dict({k: sd[k] for k in model.state_dict()}, strict=True)
    return model.eval()
