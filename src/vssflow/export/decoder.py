"""The decoder: audio latent -> log-mel (AudioLDM2's VAE) -> waveform (HiFi-GAN), as the authors run it.

Two parts of the authors' checkpoint, kept as separate modules so the runtime can
run them (and stream them) apart:

* `vae.*`: a diffusers `AutoencoderKL` (keys exactly as its `state_dict()`); inference uses only
  `post_quant_conv` and `decoder.*`, but the file holds the encoder and `quant_conv` too.
  `[B, 8, T, 16]` -> log-mel `[B, 1, 4T, 64]`.
* `vocoder.*`: a transformers `SpeechT5HifiGan`. `[B, L, 64]` -> waveform `[B, 160 L + 32]`:
  the first transposed convolution (kernel 16, stride 5, padding 5) gives `5L + 1` frames, the
  others multiply by 4·2·2·2 exactly.

`Decoder` chains them after the authors' reshape of the flow model's 128 audio channels.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from vssflow.runtime.contracts import SAMPLE_RATE

from .errors import CheckpointError
from .precision import attention
from .random_init import init_tensor, randn

GROUP_NORM_EPS = 1e-6          # diffusers' VAE resnets, mid-block attention and conv_norm_out
HIFIGAN_FINAL_SLOPE = 0.01     # SpeechT5HifiGan's last leaky_relu uses torch's default slope


# --- dimensions --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class VAEDims:
    """AudioLDM2's AutoencoderKL; all but `norm_num_groups` are read off tensor shapes."""

    in_channels: int = 1
    out_channels: int = 1
    latent_channels: int = 8
    block_out_channels: tuple[int, ...] = (128, 256, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32

    @property
    def upscale(self) -> int:
        """Latent -> mel upsampling in both time and frequency (4 for AudioLDM2)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def preset(cls, size: str) -> VAEDims:
        if size == "full":
            return cls()
        if size == "tiny":
            return cls(block_out_channels=(32, 32, 64), layers_per_block=1)
        raise ValueError(f"unknown size {size!r}: expected tiny or full")

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], config: Mapping | None = None) -> VAEDims:
        config = config or {}
        try:
            latent = sd["post_quant_conv.weight"].shape[0]
            out_channels, first = sd["decoder.conv_out.weight"].shape[:2]
            n_blocks = _count(sd, "decoder.up_blocks.")
            n_resnets = _count(sd, "decoder.up_blocks.0.resnets.")
            # up block i outputs block_out_channels[-1 - i]
            blocks = tuple(sd[f"decoder.up_blocks.{i}.resnets.0.conv1.weight"].shape[0]
                           for i in reversed(range(n_blocks)))
            in_channels = sd["encoder.conv_in.weight"].shape[1]
        except KeyError as e:
            raise CheckpointError(f"vae: missing tensor vae.{e.args[0]}") from None
        if n_blocks == 0 or n_resnets < 2 or blocks[0] != first:
            raise CheckpointError("vae: decoder.up_blocks.* do not form a diffusers UpDecoderBlock2D stack")
        groups = int(config.get("norm_num_groups", 32))
        if config.get("act_fn", "silu") != "silu":
            raise CheckpointError(f"vae: act_fn {config['act_fn']!r} in config.json; only 'silu' is supported")
        if any(c % groups for c in blocks):
            raise CheckpointError(f"vae: block widths {blocks} not divisible by norm_num_groups {groups}")
        dims = cls(in_channels=in_channels, out_channels=out_channels, latent_channels=latent,
                   block_out_channels=blocks, layers_per_block=n_resnets - 1, norm_num_groups=groups)
        _check_config("vae", dims, config)
        return dims


@dataclasses.dataclass(frozen=True)
class VocoderDims:
    """AudioLDM2's SpeechT5HifiGan. Rates, dilations, slope and normalize_before cannot be read
    off shapes: they come from the defaults (the real model) or the authors' config.json."""

    model_in_dim: int = 64
    upsample_initial_channel: int = 1024
    upsample_rates: tuple[int, ...] = (5, 4, 2, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (16, 16, 8, 4, 4)
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    leaky_relu_slope: float = 0.1
    normalize_before: bool = False
    sampling_rate: int = SAMPLE_RATE

    @property
    def hop_length(self) -> int:
        """Samples per mel frame, up to the few extra samples of `num_samples`."""
        return math.prod(self.upsample_rates)

    def channels(self, i: int) -> int:
        """Width after upsampler i (i = -1: after conv_pre)."""
        return self.upsample_initial_channel // 2 ** (i + 1)

    def num_samples(self, mel_frames: int) -> int:
        """Exact waveform length for `mel_frames` frames: 160 L + 32 for the real model."""
        n = mel_frames
        for r, k in zip(self.upsample_rates, self.upsample_kernel_sizes):
            n = (n - 1) * r - 2 * ((k - r) // 2) + k
        return n

    @classmethod
    def preset(cls, size: str) -> VocoderDims:
        if size == "full":
            return cls()
        if size == "tiny":
            return cls(upsample_initial_channel=32)
        raise ValueError(f"unknown size {size!r}: expected tiny or full")

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], config: Mapping | None = None) -> VocoderDims:
        config = config or {}
        d = cls()
        try:
            initial, model_in_dim = sd["conv_pre.weight"].shape[:2]
            n_up = _count(sd, "upsampler.")
            kernels = tuple(sd[f"upsampler.{i}.weight"].shape[2] for i in range(n_up))
            n_res = _count(sd, "resblocks.")
            n_kernels = n_res // n_up if n_up else 0
            res_kernels = tuple(sd[f"resblocks.{j}.convs1.0.weight"].shape[2] for j in range(n_kernels))
            n_dil = tuple(_count(sd, f"resblocks.{j}.convs1.") for j in range(n_kernels))
        except KeyError as e:
            raise CheckpointError(f"vocoder: missing tensor vocoder.{e.args[0]}") from None
        if n_up == 0 or n_kernels == 0 or n_res != n_up * n_kernels:
            raise CheckpointError(f"vocoder: {n_res} resblocks.* for {n_up} upsampler.*: expected a multiple")
        rates = tuple(int(r) for r in config.get("upsample_rates", d.upsample_rates))
        dilations = tuple(tuple(int(x) for x in ds)
                          for ds in config.get("resblock_dilation_sizes", d.resblock_dilation_sizes))
        if len(rates) != n_up:
            raise CheckpointError(f"vocoder: {n_up} upsampler.* layers but upsample_rates {rates}; "
                                  "pass the authors' vocoder config.json")
        if tuple(len(ds) for ds in dilations) != n_dil:
            raise CheckpointError(f"vocoder: resblocks.* have {n_dil} convs1 layers but resblock_dilation_sizes "
                                  f"{dilations}; pass the authors' vocoder config.json")
        dims = cls(model_in_dim=model_in_dim, upsample_initial_channel=initial, upsample_rates=rates,
                   upsample_kernel_sizes=kernels, resblock_kernel_sizes=res_kernels,
                   resblock_dilation_sizes=dilations,
                   leaky_relu_slope=float(config.get("leaky_relu_slope", d.leaky_relu_slope)),
                   normalize_before=bool(config.get("normalize_before", d.normalize_before)),
                   sampling_rate=int(config.get("sampling_rate", d.sampling_rate)))
        _check_config("vocoder", dims, config)
        return dims


def _count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of consecutive list entries `prefix{0,1,...}.` present in sd."""
    present = {k[len(prefix):].split(".", 1)[0] for k in sd if k.startswith(prefix)}
    n = 0
    while str(n) in present:
        n += 1
    return n


def _check_config(what: str, dims, config: Mapping) -> None:
    """A config.json value that contradicts the tensor shapes means a different model."""
    def norm(v):
        return tuple(norm(x) for x in v) if isinstance(v, (list, tuple)) else v
    for f in dataclasses.fields(dims):
        if f.name in config and norm(config[f.name]) != getattr(dims, f.name):
            raise CheckpointError(f"{what}: config.json has {f.name}={config[f.name]!r} but the tensors "
                                  f"give {getattr(dims, f.name)!r}")


# --- the authors' tensors ------------------------------------------------------------------------

def _resnet_shapes(p: str, cin: int, cout: int) -> dict[str, tuple[int, ...]]:
    s = {p + "norm1.weight": (cin,), p + "norm1.bias": (cin,),
         p + "conv1.weight": (cout, cin, 3, 3), p + "conv1.bias": (cout,),
         p + "norm2.weight": (cout,), p + "norm2.bias": (cout,),
         p + "conv2.weight": (cout, cout, 3, 3), p + "conv2.bias": (cout,)}
    if cin != cout:
        s |= {p + "conv_shortcut.weight": (cout, cin, 1, 1), p + "conv_shortcut.bias": (cout,)}
    return s


def _mid_block_shapes(p: str, c: int) -> dict[str, tuple[int, ...]]:
    s = {f"{p}attentions.0.group_norm.{n}": (c,) for n in ("weight", "bias")}
    for w in ("to_q", "to_k", "to_v", "to_out.0"):
        s |= {f"{p}attentions.0.{w}.weight": (c, c), f"{p}attentions.0.{w}.bias": (c,)}
    return s | _resnet_shapes(p + "resnets.0.", c, c) | _resnet_shapes(p + "resnets.1.", c, c)


def vae_authors_state_dict(dims: VAEDims, *, generator: torch.Generator | None = None,
                           device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor under `vae.` in the authors' checkpoint (the whole AutoencoderKL)."""
    blocks, n, lat = dims.block_out_channels, dims.layers_per_block, dims.latent_channels
    shapes: dict[str, tuple[int, ...]] = {"encoder.conv_in.weight": (blocks[0], dims.in_channels, 3, 3),
                                          "encoder.conv_in.bias": (blocks[0],)}
    cout = blocks[0]
    for i, width in enumerate(blocks):
        cin, cout = cout, width
        for j in range(n):
            shapes |= _resnet_shapes(f"encoder.down_blocks.{i}.resnets.{j}.", cin if j == 0 else cout, cout)
        if i < len(blocks) - 1:
            shapes |= {f"encoder.down_blocks.{i}.downsamplers.0.conv.weight": (cout, cout, 3, 3),
                       f"encoder.down_blocks.{i}.downsamplers.0.conv.bias": (cout,)}
    shapes |= _mid_block_shapes("encoder.mid_block.", blocks[-1])
    shapes |= {"encoder.conv_norm_out.weight": (blocks[-1],), "encoder.conv_norm_out.bias": (blocks[-1],),
               "encoder.conv_out.weight": (2 * lat, blocks[-1], 3, 3), "encoder.conv_out.bias": (2 * lat,),
               "decoder.conv_in.weight": (blocks[-1], lat, 3, 3), "decoder.conv_in.bias": (blocks[-1],)}
    rev = blocks[::-1]
    for i, width in enumerate(rev):
        cin = rev[max(i - 1, 0)]
        for j in range(n + 1):
            shapes |= _resnet_shapes(f"decoder.up_blocks.{i}.resnets.{j}.", cin if j == 0 else width, width)
        if i < len(rev) - 1:
            shapes |= {f"decoder.up_blocks.{i}.upsamplers.0.conv.weight": (width, width, 3, 3),
                       f"decoder.up_blocks.{i}.upsamplers.0.conv.bias": (width,)}
    shapes |= _mid_block_shapes("decoder.mid_block.", blocks[-1])
    shapes |= {"decoder.conv_norm_out.weight": (blocks[0],), "decoder.conv_norm_out.bias": (blocks[0],),
               "decoder.conv_out.weight": (dims.out_channels, blocks[0], 3, 3),
               "decoder.conv_out.bias": (dims.out_channels,),
               "quant_conv.weight": (2 * lat, 2 * lat, 1, 1), "quant_conv.bias": (2 * lat,),
               "post_quant_conv.weight": (lat, lat, 1, 1), "post_quant_conv.bias": (lat,)}
    return {k: init_tensor(k, s, generator, device) for k, s in shapes.items()}


def vocoder_authors_state_dict(dims: VocoderDims, *, generator: torch.Generator | None = None,
                               device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor under `vocoder.` in the authors' checkpoint (SpeechT5HifiGan, weight norm removed)."""
    sd = {"conv_pre.weight": init_tensor("conv_pre.weight", (dims.channels(-1), dims.model_in_dim, 7),
                                         generator, device),
          "conv_pre.bias": init_tensor("conv_pre.bias", (dims.channels(-1),), generator, device)}
    for i, (r, k) in enumerate(zip(dims.upsample_rates, dims.upsample_kernel_sizes)):
        cin, cout = dims.channels(i - 1), dims.channels(i)
        # ConvTranspose1d weight is [in, out, k]; each output sample sees in * k / r inputs.
        sd[f"upsampler.{i}.weight"] = randn((cin, cout, k), 1.0 / math.sqrt(cin * k / r), generator, device)
        sd[f"upsampler.{i}.bias"] = init_tensor("bias", (cout,), generator, device)
        for j, (kr, dil) in enumerate(zip(dims.resblock_kernel_sizes, dims.resblock_dilation_sizes)):
            p = f"resblocks.{i * len(dims.resblock_kernel_sizes) + j}."
            for conv in ("convs1", "convs2"):
                for m in range(len(dil)):
                    sd[f"{p}{conv}.{m}.weight"] = init_tensor("weight", (cout, cout, kr), generator, device)
                    sd[f"{p}{conv}.{m}.bias"] = init_tensor("bias", (cout,), generator, device)
    c_last = dims.channels(len(dims.upsample_rates) - 1)
    sd["conv_post.weight"] = init_tensor("weight", (1, c_last, 7), generator, device)
    sd["conv_post.bias"] = init_tensor("bias", (1,), generator, device)
    # mean/scale: zeros/ones in AudioLDM2's file; random here so normalize_before is tested.
    sd["mean"] = randn((dims.model_in_dim,), 0.5, generator, device)
    sd["scale"] = init_tensor("scale.weight", (dims.model_in_dim,), generator, device)  # 1 + N(0, 0.05)
    return sd


def authors_state_dict(dims: VAEDims | VocoderDims, *, generator: torch.Generator | None = None,
                       device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """`vae_authors_state_dict` or `vocoder_authors_state_dict`, chosen by the type of `dims`."""
    fn = vae_authors_state_dict if isinstance(dims, VAEDims) else vocoder_authors_state_dict
    return fn(dims, generator=generator, device=device)


# --- VAE decode ---------------------------------------------------------------------------------

class ResnetBlock(nn.Module):
    """diffusers ResnetBlock2D without time embedding: GN-SiLU-conv twice, 1x1 shortcut if widths differ."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=GROUP_NORM_EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=GROUP_NORM_EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, cin, H, W] -> [B, cout, H, W]
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SpatialSelfAttention(nn.Module):
    """diffusers' VAE mid-block Attention: one head of width C over the H*W positions, residual."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=GROUP_NORM_EPS)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        t = self.group_norm(x).flatten(2).transpose(1, 2)                      # [B, H*W, C]
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # [B, 1, HW, C]
        o = attention(q, k, v).squeeze(1)                                       # [B, HW, C], scale 1/sqrt(C)
        return x + self.to_out[0](o).transpose(1, 2).reshape_as(x)             # reshape_as: no baked shape


class MidBlock(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.attentions = nn.ModuleList([SpatialSelfAttention(c, groups)])
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, C, 2H, 2W]
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UpBlock(nn.Module):
    """diffusers UpDecoderBlock2D: layers_per_block + 1 resnets, then nearest 2x + conv (not last)."""

    def __init__(self, cin: int, cout: int, n_resnets: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if j == 0 else cout, cout, groups)
                                      for j in range(n_resnets)])
        self.upsamplers = nn.ModuleList([Upsample(cout)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class _DecoderTrunk(nn.Module):
    """The `decoder.*` tensors: diffusers' VAE Decoder."""

    def __init__(self, dims: VAEDims):
        super().__init__()
        rev, g = dims.block_out_channels[::-1], dims.norm_num_groups
        self.conv_in = nn.Conv2d(dims.latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], g)
        self.up_blocks = nn.ModuleList([
            UpBlock(rev[max(i - 1, 0)], c, dims.layers_per_block + 1, g, upsample=i < len(rev) - 1)
            for i, c in enumerate(rev)])
        self.conv_norm_out = nn.GroupNorm(g, rev[-1], eps=GROUP_NORM_EPS)
        self.conv_out = nn.Conv2d(rev[-1], dims.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(x))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAEDecoder(nn.Module):
    """AutoencoderKL.decode(z).sample: latent `[B, 8, T, 16]` -> log-mel `[B, 1, 4T, 64]`."""

    def __init__(self, dims: VAEDims):
        super().__init__()
        self.dims = dims
        self.post_quant_conv = nn.Conv2d(dims.latent_channels, dims.latent_channels, 1)
        self.decoder = _DecoderTrunk(dims)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


# --- vocoder --------------------------------------------------------------------------------------

class ResidualBlock(nn.Module):
    """transformers HifiGanResidualBlock: per dilation, lrelu-conv(dilated)-lrelu-conv + residual."""

    def __init__(self, c: int, kernel: int, dilations: tuple[int, ...], slope: float):
        super().__init__()
        self.slope = slope
        self.convs1 = nn.ModuleList([nn.Conv1d(c, c, kernel, dilation=d, padding=(kernel - 1) * d // 2)
                                     for d in dilations])
        self.convs2 = nn.ModuleList([nn.Conv1d(c, c, kernel, padding=(kernel - 1) // 2) for _ in dilations])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, N]
        for conv1, conv2 in zip(self.convs1, self.convs2):
            h = conv1(F.leaky_relu(x, self.slope))
            x = x + conv2(F.leaky_relu(h, self.slope))
        return x


class Vocoder(nn.Module):
    """SpeechT5HifiGan: log-mel `[B, L, 64]` -> waveform `[B, dims.num_samples(L)]` in [-1, 1]."""

    def __init__(self, dims: VocoderDims):
        super().__init__()
        self.dims = dims
        self.conv_pre = nn.Conv1d(dims.model_in_dim, dims.channels(-1), 7, padding=3)
        self.upsampler = nn.ModuleList([
            nn.ConvTranspose1d(dims.channels(i - 1), dims.channels(i), k, stride=r, padding=(k - r) // 2)
            for i, (r, k) in enumerate(zip(dims.upsample_rates, dims.upsample_kernel_sizes))])
        self.resblocks = nn.ModuleList([
            ResidualBlock(dims.channels(i), k, d, dims.leaky_relu_slope)
            for i in range(len(dims.upsample_rates))
            for k, d in zip(dims.resblock_kernel_sizes, dims.resblock_dilation_sizes)])
        self.conv_post = nn.Conv1d(dims.channels(len(dims.upsample_rates) - 1), 1, 7, padding=3)
        self.register_buffer("mean", torch.zeros(dims.model_in_dim))
        self.register_buffer("scale", torch.ones(dims.model_in_dim))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        if self.dims.normalize_before:
            mel = (mel - self.mean) / self.scale
        x = self.conv_pre(mel.transpose(1, 2))                       # [B, C0, L]
        nk = len(self.dims.resblock_kernel_sizes)
        for i, up in enumerate(self.upsampler):
            x = up(F.leaky_relu(x, self.dims.leaky_relu_slope))      # [B, C_i, N_i]
            blocks = self.resblocks[i * nk:(i + 1) * nk]
            acc = blocks[0](x)
            for block in blocks[1:]:
                acc = acc + block(x)
            x = acc / nk
        x = self.conv_post(F.leaky_relu(x, HIFIGAN_FINAL_SLOPE))     # [B, 1, S]
        return torch.tanh(x).squeeze(1)                              # [B, S]


# --- the whole decoder ----------------------------------------------------------------------------

class Decoder(nn.Module):
    """Flow-model audio channels `[B, 128, T]` -> waveform `[B, 640 T + 32]` (real dims).

    `scale_factor` is the authors' latent scale (`scale_factor` in infer.py, 1.0): z is divided
    by it before the VAE.
    """

    def __init__(self, vae: VAEDecoder, vocoder: Vocoder, scale_factor: float = 1.0):
        super().__init__()
        self.vae, self.vocoder, self.scale_factor = vae, vocoder, float(scale_factor)

    def latent_to_vae_input(self, z: torch.Tensor) -> torch.Tensor:
        """`[B, F*C, T]` -> `[B, C, T, F]`: channel `C f + c` is latent channel c, frequency f."""
        c = self.vae.dims.latent_channels
        z = z.unflatten(1, (-1, c))                                  # [B, F, C, T]
        return z.transpose(-2, -3).transpose(-2, -1)                 # [B, C, T, F]

    def latent_to_mel(self, z: torch.Tensor) -> torch.Tensor:
        """`[B, 128, T]` -> log-mel `[B, 4T, 64]`."""
        if self.scale_factor != 1.0:
            z = z / self.scale_factor
        return self.vae(self.latent_to_vae_input(z)).squeeze(1)

    def latent_to_waveform(self, z: torch.Tensor) -> torch.Tensor:
        """`[B, 128, T]` -> `[B, samples]`."""
        return self.vocoder(self.latent_to_mel(z))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.latent_to_waveform(z)


def _load(module: nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> nn.Module:
    from vssflow.export.checkpoint import load_weights
    return load_weights(module, sd, what, prefix=what + ".")


def load_vae_decoder(sd: Mapping[str, torch.Tensor], config: Mapping | None = None) -> VAEDecoder:
    """`vae.*` tensors (without the prefix) -> VAEDecoder in eval mode."""
    return _load(VAEDecoder(VAEDims.from_state_dict(sd, config)), sd, "vae")


def load_vocoder(sd: Mapping[str, torch.Tensor], config: Mapping | None = None) -> Vocoder:
    """`vocoder.*` tensors (without the prefix) -> Vocoder in eval mode."""
    return _load(Vocoder(VocoderDims.from_state_dict(sd, config)), sd, "vocoder")


def load_decoder(vae_sd: Mapping[str, torch.Tensor], vocoder_sd: Mapping[str, torch.Tensor],
                 vae_config: Mapping | None = None, vocoder_config: Mapping | None = None,
                 scale_factor: float = 1.0) -> Decoder:
    return Decoder(load_vae_decoder(vae_sd, vae_config), load_vocoder(vocoder_sd, vocoder_config),
                   scale_factor).eval()
