"""RawNet3 speaker encoder (the authors' feature/RawNet/python/RawNet3), written out.

The authors build `RawNet3(Bottle2neck, model_scale=8, context=True, summed=True,
encoder_type="ECA", nOut=256, out_bn=False, sinc_stride=10, log_sinc=True, norm_sinc="mean")`
and load `torch.load("model.pt")["model"]` strictly. For one crop of 3 s at 16 kHz:

1. pre-emphasis `y[t] = x[t] - 0.97 x[t-1]` (reflect padding: `y[0] = x[0] - 0.97 x[1]`), then
   InstanceNorm1d(1, eps 1e-4, affine) over time;
2. asteroid's `ParamSincFB(256, 251, stride=10)`: 128 cosine and 128 sine band-pass filters
   built from the learnt band edges (`low_hz_`, `band_hz_`), a half Hamming window (`window_`)
   and time grid (`n_`); conv, |.|, log(. + 1e-6), minus the mean over time;
3. three Res2Net `Bottle2neck` blocks (1024 channels, 8 splits, kernel 3, dilation 2/3/4,
   max-pool 5/3/-, AFMS scaling), `summed`: block 3 gets maxpool3(block 1) + block 2;
4. `layer4` 1x1 conv of [maxpool3(x1), x2, x3] -> 1536, ReLU; channel-wise attentive statistics
   pooling with global context (mean and std over time appended), softmax over time;
5. BatchNorm of [mu, sigma] (3072), Linear -> 256 (`bn6` is in the file but unused).

    crops [N, T] -> embeddings [N, 256]; the speaker vector is their mean (`SpeakerEmbedding`).

Exportable as is: the sinc filters are computed from weights only (constant-folded in ONNX);
`repeat` is written as `expand`, the residual add is out of place.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vssflow.export.errors import CheckpointError
from vssflow.export.random_init import const, init_tensor, randn
from vssflow.runtime.contracts import SAMPLE_RATE

PREEMPHASIS = 0.97
MIN_LOW_HZ = 50.0   # ParamSincFB defaults
MIN_BAND_HZ = 50.0
BLOCKS = ((3, 2, 5), (3, 3, 3), (3, 4, None))   # (kernel, dilation, max-pool) of layer1..3


@dataclass(frozen=True)
class RawNetDims:
    channels: int = 1024      # C: width of the Bottle2neck blocks
    scale: int = 8            # model_scale: Res2Net splits per block
    sinc_filters: int = 256   # C // 4 in the authors' code: 128 cos + 128 sin filters
    sinc_kernel: int = 251
    sinc_stride: int = 10     # not in the weights
    embed: int = 1536         # layer4 output
    attention: int = 128      # hidden size of the attention
    out: int = 256            # nOut

    @property
    def width(self) -> int:   # channels per split
        return self.channels // self.scale

    @classmethod
    def preset(cls, size: str) -> "RawNetDims":
        if size == "full":
            return cls()
        if size == "tiny":
            return cls(channels=64, scale=8, sinc_filters=16, embed=96, attention=16, out=32)
        raise ValueError(f"unknown preset {size!r} (expected 'tiny' or 'full')")

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], config: dict | None = None) -> "RawNetDims":
        """Dimensions from shapes; `config` may give `sinc_stride` (the authors' kwargs names)."""
        need = ["conv1.filterbank.low_hz_", "conv1.filterbank.window_", "layer1.conv1.weight",
                "layer1.convs.0.weight", "layer1.conv3.weight", "layer4.weight",
                "attention.0.weight", "attention.3.weight", "fc6.weight"]
        missing = [k for k in need if k not in sd]
        if missing:
            raise CheckpointError(f"RawNet3 state dict lacks {', '.join(missing)}")
        cfg = config or {}
        for key, value in (("context", True), ("summed", True), ("encoder_type", "ECA"),
                           ("log_sinc", True), ("norm_sinc", "mean"), ("out_bn", False)):
            if key in cfg and cfg[key] != value:
                raise CheckpointError(f"RawNet3 {key}={cfg[key]!r} is not supported (the authors "
                                      f"use {value!r})")
        width = sd["layer1.convs.0.weight"].shape[0]
        channels, split_total = sd["layer1.conv3.weight"].shape[:2]
        embed, cat = sd["layer4.weight"].shape[:2]
        attention, attn_in = sd["attention.0.weight"].shape[:2]
        dims = cls(channels=int(channels), scale=int(split_total // width),
                   sinc_filters=2 * int(sd["conv1.filterbank.low_hz_"].shape[0]),
                   sinc_kernel=2 * int(sd["conv1.filterbank.window_"].shape[0]) + 1,
                   sinc_stride=int(cfg.get("sinc_stride", cls.sinc_stride)), embed=int(embed),
                   attention=int(attention), out=int(sd["fc6.weight"].shape[0]))
        if cat != 3 * channels or attn_in != 3 * embed or sd["attention.3.weight"].shape[0] != embed:
            raise CheckpointError(
                f"RawNet3 layer4.weight {tuple(sd['layer4.weight'].shape)} / attention.0.weight "
                f"{tuple(sd['attention.0.weight'].shape)} do not fit summed, context, ECA pooling")
        return dims


def _batch_norm(sd: dict, name: str, n: int, g, device) -> None:
    sd[f"{name}.weight"] = init_tensor(f"{name}.weight", (n,), g, device)
    sd[f"{name}.bias"] = init_tensor(f"{name}.bias", (n,), g, device)
    sd[f"{name}.running_mean"] = randn((n,), 0.1, g, device)
    var = randn((n,), 0.1, g, device)
    sd[f"{name}.running_var"] = var if str(device) == "meta" else 1 + var.abs()
    sd[f"{name}.num_batches_tracked"] = torch.zeros((), dtype=torch.long, device=device)


def _sinc_init(dims: RawNetDims, device) -> dict[str, torch.Tensor]:
    """ParamSincFB's own buffers and its mel-spaced initial band edges (what training starts from)."""
    half, n = dims.sinc_kernel // 2, dims.sinc_filters // 2
    if str(device) == "meta":
        return {"low_hz_": torch.empty(n, 1, device="meta"), "band_hz_": torch.empty(n, 1, device="meta"),
                "window_": torch.empty(half, device="meta"), "n_": torch.empty(1, half, device="meta")}
    to_mel = lambda hz: 2595 * math.log10(1 + hz / 700)  # noqa: E731
    mel = torch.linspace(to_mel(30), to_mel(SAMPLE_RATE / 2 - (MIN_LOW_HZ + MIN_BAND_HZ)), n + 1)
    hz = 700 * (10 ** (mel / 2595) - 1)
    window = torch.hamming_window(dims.sinc_kernel, periodic=False, dtype=torch.float64)[:half]
    return {"low_hz_": hz[:-1].view(-1, 1), "band_hz_": hz.diff().view(-1, 1),
            "window_": window.float(),
            "n_": 2 * math.pi * (torch.arange(-half, 0.0).view(1, -1) / SAMPLE_RATE)}


def authors_state_dict(dims: RawNetDims, *, generator: torch.Generator | None = None,
                       device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of the authors' `model.pt["model"]`, keys as in the file."""
    g, sd = generator, {}
    flipped = const((1, 1, 2), 1.0, device)
    if str(device) != "meta":
        flipped[0, 0, 0] = -PREEMPHASIS
    sd["preprocess.0.flipped_filter"] = flipped
    sd["preprocess.1.weight"] = init_tensor("preprocess.1.weight", (1,), g, device)
    sd["preprocess.1.bias"] = init_tensor("preprocess.1.bias", (1,), g, device)
    sd.update({f"conv1.filterbank.{k}": v for k, v in _sinc_init(dims, device).items()})
    _batch_norm(sd, "bn1", dims.sinc_filters, g, device)
    inplanes = dims.sinc_filters
    for i, _ in enumerate(BLOCKS, 1):
        p, w, c = f"layer{i}.", dims.width, dims.channels
        for name, shape in ((f"{p}conv1.weight", (w * dims.scale, inplanes, 1)),
                            (f"{p}conv1.bias", (w * dims.scale,))):
            sd[name] = init_tensor(name, shape, g, device)
        _batch_norm(sd, f"{p}bn1", w * dims.scale, g, device)
        for j in range(dims.scale - 1):
            sd[f"{p}convs.{j}.weight"] = init_tensor("weight", (w, w, 3), g, device)
            sd[f"{p}convs.{j}.bias"] = init_tensor("bias", (w,), g, device)
            _batch_norm(sd, f"{p}bns.{j}", w, g, device)
        sd[f"{p}conv3.weight"] = init_tensor("weight", (c, w * dims.scale, 1), g, device)
        sd[f"{p}conv3.bias"] = init_tensor("bias", (c,), g, device)
        _batch_norm(sd, f"{p}bn3", c, g, device)
        alpha = randn((c, 1), 0.05, g, device)
        sd[f"{p}afms.alpha"] = alpha if str(device) == "meta" else alpha + 1
        sd[f"{p}afms.fc.weight"] = init_tensor("weight", (c, c), g, device)
        sd[f"{p}afms.fc.bias"] = init_tensor("bias", (c,), g, device)
        if inplanes != c:
            sd[f"{p}residual.0.weight"] = init_tensor("weight", (c, inplanes, 1), g, device)
        inplanes = c
    sd["layer4.weight"] = init_tensor("weight", (dims.embed, 3 * dims.channels, 1), g, device)
    sd["layer4.bias"] = init_tensor("bias", (dims.embed,), g, device)
    sd["attention.0.weight"] = init_tensor("weight", (dims.attention, 3 * dims.embed, 1), g, device)
    sd["attention.0.bias"] = init_tensor("bias", (dims.attention,), g, device)
    _batch_norm(sd, "attention.2", dims.attention, g, device)
    sd["attention.3.weight"] = init_tensor("weight", (dims.embed, dims.attention, 1), g, device)
    sd["attention.3.bias"] = init_tensor("bias", (dims.embed,), g, device)
    _batch_norm(sd, "bn5", 2 * dims.embed, g, device)
    sd["fc6.weight"] = init_tensor("weight", (dims.out, 2 * dims.embed), g, device)
    sd["fc6.bias"] = init_tensor("bias", (dims.out,), g, device)
    _batch_norm(sd, "bn6", dims.out, g, device)
    return sd


class PreEmphasis(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("flipped_filter", torch.tensor([[[-PREEMPHASIS, 1.0]]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, T] -> [N, 1, T]
        return F.conv1d(F.pad(x.unsqueeze(1), (1, 0), "reflect"), self.flipped_filter)


class SincFilterbank(nn.Module):
    """asteroid_filterbanks `ParamSincFB`: band-pass filters from learnt band edges."""

    def __init__(self, dims: RawNetDims):
        super().__init__()
        half, n = dims.sinc_kernel // 2, dims.sinc_filters // 2
        self.low_hz_ = nn.Parameter(torch.zeros(n, 1))
        self.band_hz_ = nn.Parameter(torch.zeros(n, 1))
        self.register_buffer("window_", torch.zeros(half))
        self.register_buffer("n_", torch.zeros(1, half))

    def filters(self) -> torch.Tensor:  # -> [F, 1, K]
        low = MIN_LOW_HZ + self.low_hz_.abs()                                    # [F/2, 1]
        high = torch.clamp(low + MIN_BAND_HZ + self.band_hz_.abs(), MIN_LOW_HZ, SAMPLE_RATE / 2)
        band = (high - low)[:, 0]
        ft_low, ft_high = low @ self.n_, high @ self.n_                           # [F/2, K/2]
        cos_left = (torch.sin(ft_high) - torch.sin(ft_low)) / (self.n_ / 2) * self.window_
        sin_left = (torch.cos(ft_low) - torch.cos(ft_high)) / (self.n_ / 2) * self.window_
        cos = torch.cat([cos_left, 2 * band.view(-1, 1), cos_left.flip(1)], dim=1)
        sin = torch.cat([sin_left, torch.zeros_like(band.view(-1, 1)), -sin_left.flip(1)], dim=1)
        bank = torch.cat([cos / (2 * band[:, None]), sin / (2 * band[:, None])], dim=0)
        return bank.unsqueeze(1)


class SincEncoder(nn.Module):
    """asteroid_filterbanks `Encoder(ParamSincFB(...))`, keys `conv1.filterbank.*`."""

    def __init__(self, dims: RawNetDims):
        super().__init__()
        self.filterbank = SincFilterbank(dims)
        self.stride = dims.sinc_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, 1, T] -> [N, F, (T - K) // stride + 1]
        return F.conv1d(x, self.filterbank.filters(), stride=self.stride)


class AFMS(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels, 1))
        self.fc = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, T]
        y = torch.sigmoid(self.fc(x.mean(dim=2)))                                 # [N, C]
        return (x + self.alpha) * y.unsqueeze(2)


class Bottle2neck(nn.Module):
    def __init__(self, inplanes: int, dims: RawNetDims, kernel: int, dilation: int, pool: int | None):
        super().__init__()
        w, c = dims.width, dims.channels
        self.width, self.nums = w, dims.scale - 1
        self.conv1 = nn.Conv1d(inplanes, w * dims.scale, 1)
        self.bn1 = nn.BatchNorm1d(w * dims.scale)
        pad = kernel // 2 * dilation
        self.convs = nn.ModuleList(nn.Conv1d(w, w, kernel, dilation=dilation, padding=pad)
                                   for _ in range(self.nums))
        self.bns = nn.ModuleList(nn.BatchNorm1d(w) for _ in range(self.nums))
        self.conv3 = nn.Conv1d(w * dims.scale, c, 1)
        self.bn3 = nn.BatchNorm1d(c)
        self.pool = pool
        self.afms = AFMS(c)
        self.residual = (nn.Sequential(nn.Conv1d(inplanes, c, 1, bias=False)) if inplanes != c
                         else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, Cin, T] -> [N, C, T // pool]
        residual = self.residual(x)
        spx = torch.split(self.bn1(F.relu(self.conv1(x))), self.width, dim=1)
        outs, sp = [], None
        for i in range(self.nums):
            sp = spx[i] if i == 0 else sp + spx[i]
            sp = self.bns[i](F.relu(self.convs[i](sp)))
            outs.append(sp)
        out = self.bn3(F.relu(self.conv3(torch.cat(outs + [spx[self.nums]], dim=1)))) + residual
        if self.pool:
            out = F.max_pool1d(out, self.pool)
        return self.afms(out)


class RawNet3(nn.Module):
    def __init__(self, dims: RawNetDims):
        super().__init__()
        self.dims = dims
        self.preprocess = nn.Sequential(PreEmphasis(), nn.InstanceNorm1d(1, eps=1e-4, affine=True))
        self.conv1 = SincEncoder(dims)  # `bn1` and `bn6` are in the file, unused by the authors
        inplanes = [dims.sinc_filters, dims.channels, dims.channels]
        self.layer1, self.layer2, self.layer3 = (Bottle2neck(i, dims, *b) for i, b in zip(inplanes, BLOCKS))
        self.layer4 = nn.Conv1d(3 * dims.channels, dims.embed, 1)
        self.attention = nn.Sequential(
            nn.Conv1d(3 * dims.embed, dims.attention, 1), nn.ReLU(), nn.BatchNorm1d(dims.attention),
            nn.Conv1d(dims.attention, dims.embed, 1), nn.Softmax(dim=2))
        self.bn5 = nn.BatchNorm1d(2 * dims.embed)
        self.fc6 = nn.Linear(2 * dims.embed, dims.out)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:  # [N, T] -> [N, out]
        x = torch.log(self.conv1(self.preprocess(wav)).abs() + 1e-6)             # [N, F, T']
        x = x - x.mean(dim=-1, keepdim=True)
        x1 = self.layer1(x)                                                       # [N, C, T'/5]
        x2 = self.layer2(x1)                                                      # [N, C, T'/15]
        x3 = self.layer3(F.max_pool1d(x1, 3) + x2)
        x = self.layer4(torch.cat([F.max_pool1d(x1, 3), x2, x3], dim=1)).relu()  # [N, E, T'']
        t = x.shape[-1]
        mean = x.mean(dim=2, keepdim=True).expand(-1, -1, t)
        std = x.var(dim=2, keepdim=True).clamp(min=1e-4, max=1e4).sqrt().expand(-1, -1, t)
        w = self.attention(torch.cat([x, mean, std], dim=1))                      # [N, E, T'']
        mu = (x * w).sum(dim=2)
        sg = ((x ** 2 * w).sum(dim=2) - mu ** 2).clamp(min=1e-4, max=1e4).sqrt()
        return self.fc6(self.bn5(torch.cat([mu, sg], dim=1)))                      # [N, out]


class SpeakerEmbedding(nn.Module):
    """The authors' speaker vector: RawNet3 over the crops, averaged. crops [N, T] -> [out]."""

    def __init__(self, rawnet: RawNet3):
        super().__init__()
        self.rawnet = rawnet

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.rawnet(crops).mean(dim=0)


def load_rawnet(source: Mapping[str, torch.Tensor] | str | os.PathLike,
                config: dict | None = None) -> RawNet3:
    """RawNet3 from its state dict, or from the authors' `model.pt` (`{"model": state dict}`)."""
    if isinstance(source, (str, os.PathLike)):
        from vssflow.export.checkpoint import RAWNET, read_aux
        _, source, _ = read_aux(RAWNET, source, unwrap="model")
    dims = RawNetDims.from_state_dict(source, config)
    from vssflow.export.checkpoint import check_tensors
    check_tensors("RawNet3 state dict", source, authors_state_dict(dims, device="meta"))
    model = RawNet3(dims)
    model.load_state_dict({k: source[k] for k in model.state_dict()}, strict=True)
    return model.eval()
