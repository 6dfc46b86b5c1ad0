"""RawNet3 against the authors' code (imported from their repository at test time, with
asteroid_filterbanks) and against a plain functional rewrite of the same math."""

import copy
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vssflow.export.errors import CheckpointError
from vssflow.export.rawnet import (RawNetDims, SpeakerEmbedding, authors_state_dict,
                                   load_rawnet)

MIRROR = Path("/work/.mirror/vasflow1+vssflow/repo")
AUTHORS_DIR = "feature/RawNet/python/RawNet3/models"
# The authors' class fixes layer4 = 1536 and attention = 128 and sinc filters = C // 4.
AUTHORS_SMALL = RawNetDims(channels=64, scale=8, sinc_filters=16, embed=1536, attention=128, out=32)


def _model(dims, seed=0):
    sd = authors_state_dict(dims, generator=torch.Generator().manual_seed(seed))
    return load_rawnet(sd), sd


def _speech_like(n, t, seed=1):
    g = torch.Generator().manual_seed(seed)
    time = torch.arange(t) / 16000
    f0 = 100 + 100 * torch.rand(n, 1, generator=g)
    voiced = sum(torch.sin(2 * math.pi * k * f0 * time) / k for k in range(1, 20))
    return (0.1 * voiced + 0.02 * torch.randn(n, t, generator=g)).float()


def test_dims_round_trip():
    for size in ("tiny", "full"):
        dims = RawNetDims.preset(size)
        assert RawNetDims.from_state_dict(authors_state_dict(dims, device="meta")) == dims
    assert RawNetDims.from_state_dict(authors_state_dict(RawNetDims.preset("tiny"), device="meta"),
                                      {"sinc_stride": 5}).sinc_stride == 5


def test_full_size_is_rawnet3():
    sd = authors_state_dict(RawNetDims.preset("full"), device="meta")
    assert 16.2e6 < sum(v.numel() for v in sd.values()) < 16.4e6  # "16.3M parameters"
    assert len(sd) == 234 and sd["conv1.filterbank.low_hz_"].shape == (128, 1)
    assert sd["layer1.residual.0.weight"].shape == (1024, 256, 1)
    assert "layer2.residual.0.weight" not in sd and sd["bn6.running_var"].shape == (256,)
    assert all(v.device.type == "meta" for v in sd.values())


def test_module_keys_are_the_authors_keys():
    model, sd = _model(RawNetDims.preset("tiny"))
    keys = set(model.state_dict())
    assert keys <= set(sd)
    assert set(sd) - keys == {f"{bn}.{k}" for bn in ("bn1", "bn6") for k in (
        "weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    for k in keys:
        assert model.state_dict()[k].shape == sd[k].shape


def test_bad_state_dicts():
    sd = authors_state_dict(RawNetDims.preset("tiny"), device="meta")
    with pytest.raises(CheckpointError, match="lacks layer4.weight"):
        RawNetDims.from_state_dict({k: v for k, v in sd.items() if k != "layer4.weight"})
    with pytest.raises(CheckpointError, match="missing 1: layer2.convs.3.bias"):
        load_rawnet({k: v for k, v in _model(RawNetDims.preset("tiny"))[1].items()
                     if k != "layer2.convs.3.bias"})
    extra = dict(_model(RawNetDims.preset("tiny"))[1], **{"fc7.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="unexpected 1: fc7.weight"):
        load_rawnet(extra)
    with pytest.raises(CheckpointError, match="encoder_type='ASP' is not supported"):
        RawNetDims.from_state_dict(sd, {"encoder_type": "ASP"})


def test_model_pt_file(tmp_path):
    _, sd = _model(RawNetDims.preset("tiny"))
    torch.save({"model": sd, "optimizer": {}}, tmp_path / "model.pt")
    model = load_rawnet(tmp_path / "model.pt")
    x = _speech_like(2, 8000)
    with torch.no_grad():
        assert torch.equal(model(x), _model(RawNetDims.preset("tiny"))[0](x))
    torch.save(sd, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="'model' entry"):
        load_rawnet(tmp_path / "bare.pt")
    torch.save({"model": sd, "cfg": Path("x")}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_rawnet(tmp_path / "pickled.pt")


# ---- a plain functional rewrite ----

def _sinc_bank(sd, kernel):
    """SincNet band-pass pairs (cos: even, sin: odd) evaluated on the whole symmetric grid; the
    window and time grid are the file's buffers (a float32 Hamming window, 2*pi*t)."""
    low = 50 + sd["conv1.filterbank.low_hz_"].abs()[:, 0]
    high = torch.clamp(low + 50 + sd["conv1.filterbank.band_hz_"].abs()[:, 0], 50, 8000)
    left = sd["conv1.filterbank.n_"][0] / (2 * math.pi)                     # t < 0, seconds
    t = torch.cat([left, torch.zeros(1, dtype=left.dtype), -left.flip(0)])
    half_w = sd["conv1.filterbank.window_"]
    window = torch.cat([half_w, torch.ones(1, dtype=half_w.dtype), half_w.flip(0)])
    tt = torch.where(t == 0, torch.ones_like(t), t)
    arg_hi, arg_lo = 2 * math.pi * high[:, None] * tt, 2 * math.pi * low[:, None] * tt
    cos = torch.where(t == 0, 2 * (high - low)[:, None], (arg_hi.sin() - arg_lo.sin()) / (math.pi * tt))
    sin = torch.where(t == 0, torch.zeros((), dtype=t.dtype), (arg_lo.cos() - arg_hi.cos()) / (math.pi * tt))
    band = 2 * (high - low)[:, None]
    return (torch.cat([cos, sin]) * window / torch.cat([band, band]))[:, None, :]


def _bn(x, sd, p):
    return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"],
                        sd[p + ".bias"], False, 0.0, 1e-5)


def _block(x, sd, p, width, scale, dilation, pool):
    res = F.conv1d(x, sd[p + "residual.0.weight"]) if p + "residual.0.weight" in sd else x
    out = _bn(F.conv1d(x, sd[p + "conv1.weight"], sd[p + "conv1.bias"]).clamp(min=0), sd, p + "bn1")
    parts, sp = [], 0
    for i in range(scale - 1):
        sp = _bn(F.conv1d(out[:, i * width:(i + 1) * width] + sp, sd[f"{p}convs.{i}.weight"],
                          sd[f"{p}convs.{i}.bias"], dilation=dilation, padding=dilation).clamp(min=0),
                 sd, f"{p}bns.{i}")
        parts.append(sp)
    parts.append(out[:, (scale - 1) * width:])
    out = _bn(F.conv1d(torch.cat(parts, 1), sd[p + "conv3.weight"], sd[p + "conv3.bias"]).clamp(min=0),
              sd, p + "bn3") + res
    if pool:
        out = F.max_pool1d(out, pool)
    gate = torch.sigmoid(F.linear(out.mean(2), sd[p + "afms.fc.weight"], sd[p + "afms.fc.bias"]))
    return (out + sd[p + "afms.alpha"]) * gate[:, :, None]


def _rewrite(sd, dims, wav):
    x = torch.cat([wav[:, 1:2], wav], dim=1)
    coef = -sd["preprocess.0.flipped_filter"][0, 0, 0]                     # 0.97 as float32
    x = (x[:, 1:] - coef * x[:, :-1])[:, None]                             # pre-emphasis
    x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-4)
    x = x * sd["preprocess.1.weight"] + sd["preprocess.1.bias"]
    x = torch.log(F.conv1d(x, _sinc_bank(sd, dims.sinc_kernel), stride=dims.sinc_stride).abs() + 1e-6)
    x = x - x.mean(-1, keepdim=True)
    w, s = dims.width, dims.scale
    x1 = _block(x, sd, "layer1.", w, s, 2, 5)
    x2 = _block(x1, sd, "layer2.", w, s, 3, 3)
    x3 = _block(F.max_pool1d(x1, 3) + x2, sd, "layer3.", w, s, 4, None)
    x = F.conv1d(torch.cat([F.max_pool1d(x1, 3), x2, x3], 1), sd["layer4.weight"],
                 sd["layer4.bias"]).clamp(min=0)
    n = x.shape[-1]
    ctx = torch.cat([x, x.mean(2, keepdim=True).repeat(1, 1, n),
                     (x.var(2, keepdim=True) * 1).clamp(1e-4, 1e4).sqrt().repeat(1, 1, n)], 1)
    a = _bn(F.conv1d(ctx, sd["attention.0.weight"], sd["attention.0.bias"]).clamp(min=0), sd, "attention.2")
    a = F.conv1d(a, sd["attention.3.weight"], sd["attention.3.bias"]).softmax(dim=2)
    mu = (x * a).sum(2)
    sg = ((x * x * a).sum(2) - mu * mu).clamp(1e-4, 1e4).sqrt()
    return F.linear(_bn(torch.cat([mu, sg], 1), sd, "bn5"), sd["fc6.weight"], sd["fc6.bias"])


@pytest.mark.parametrize("dims", [RawNetDims.preset("tiny"), AUTHORS_SMALL], ids=["tiny", "small"])
def test_matches_functional_rewrite(dims):
    """In float64: log|sinc output + 1e-6| makes fp32 results of two correct implementations
    differ by ~1e-4..1e-3 (see test_float32_sensitivity); fp64 shows the math is the same."""
    model, sd = _model(dims)
    model, sd = model.double(), {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    wav = _speech_like(2, 8000).double()
    with torch.no_grad():
        ours, ref = model(wav), _rewrite(sd, dims, wav)
    assert ref.abs().mean() > 0.1
    assert (ours - ref).abs().max() < 1e-8
    assert torch.allclose(model.conv1.filterbank.filters(), _sinc_bank(sd, dims.sinc_kernel), atol=1e-10)


def test_float32_sensitivity():
    """Where conv output ~1e-6, log amplifies fp32 rounding: fp32 vs fp64 of the same module."""
    model, _ = _model(RawNetDims.preset("tiny"))
    wav = _speech_like(3, 16000)
    with torch.no_grad():
        err = (model(wav) - copy.deepcopy(model).double()(wav.double())).abs().max().item()
    assert 1e-6 < err < 1e-3


def test_embedding_is_the_mean_over_crops():
    model, _ = _model(RawNetDims.preset("tiny"))
    crops = _speech_like(4, 8000)
    with torch.no_grad():
        assert torch.allclose(SpeakerEmbedding(model)(crops), model(crops).mean(0))
        one_at_a_time = torch.cat([model(c[None]) for c in crops])  # eval BN: crops independent
        assert (one_at_a_time - model(crops)).abs().max() < 1e-5


# ---- the authors' code ----

@pytest.fixture(scope="module")
def authors_rawnet(tmp_path_factory):
    pytest.importorskip("asteroid_filterbanks")
    pkg = tmp_path_factory.mktemp("authors") / "authors_rawnet3"
    pkg.mkdir()
    try:
        for name in ("RawNet3.py", "RawNetBasicBlock.py"):
            src = subprocess.run(["git", "-C", str(MIRROR), "show", f"HEAD:{AUTHORS_DIR}/{name}"],
                                 capture_output=True, check=True, timeout=60).stdout
            (pkg / name).write_bytes(src)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("the authors' repository is not mirrored here")
    (pkg / "__init__.py").write_text("")
    sys.path.insert(0, str(pkg.parent))
    try:
        from authors_rawnet3.RawNet3 import RawNet3 as AuthorsRawNet3
        from authors_rawnet3.RawNetBasicBlock import Bottle2neck
    finally:
        sys.path.remove(str(pkg.parent))

    def build(dims):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AuthorsRawNet3(Bottle2neck, model_scale=dims.scale, context=True, summed=True,
                                  C=dims.channels, encoder_type="ECA", nOut=dims.out,
                                  out_bn=False, sinc_stride=dims.sinc_stride, log_sinc=True,
                                  norm_sinc="mean", grad_mult=1).eval()
    return build


@pytest.mark.filterwarnings("ignore::FutureWarning")  # their torch.cuda.amp.autocast
@pytest.mark.parametrize("dims,samples", [(AUTHORS_SMALL, 48000), (RawNetDims.preset("full"), 12000)],
                         ids=["small", "full"])
def test_matches_the_authors_code(authors_rawnet, dims, samples):
    theirs = authors_rawnet(dims)
    _, sd = _model(dims, seed=3)
    assert set(theirs.state_dict()) == set(sd)  # their strict load_state_dict accepts our layout
    for k, v in theirs.state_dict().items():
        assert v.shape == sd[k].shape and v.dtype == sd[k].dtype, k
    theirs.load_state_dict(sd, strict=True)
    ours = load_rawnet(sd)
    wav = _speech_like(2, samples, seed=4)
    with torch.no_grad():
        got, ref = ours(wav), theirs(wav)
    assert ref.abs().mean() > 0.1 and (got - ref).abs().max() < 1e-4
    # the sinc buffers we write are the ones asteroid makes
    fresh = authors_rawnet(dims).state_dict()
    for k in ("conv1.filterbank.window_", "conv1.filterbank.n_", "conv1.filterbank.low_hz_",
              "conv1.filterbank.band_hz_", "preprocess.0.flipped_filter"):
        assert torch.allclose(fresh[k], sd[k], rtol=1e-4, atol=1e-6), k


def test_onnx_export(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, _ = _model(RawNetDims.preset("tiny"))
    speaker = SpeakerEmbedding(model).eval()
    path = tmp_path / "rawnet.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(speaker, (_speech_like(2, 8000),), str(path), input_names=["crops"],
                          output_names=["speaker"], dynamic_axes={"crops": {0: "N", 1: "T"}},
                          opset_version=18, dynamo=False, do_constant_folding=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    crops = _speech_like(10, 16000, seed=7)
    got = sess.run(None, {"crops": crops.numpy()})[0]
    with torch.no_grad():
        ref = speaker(crops).numpy()
        exact = copy.deepcopy(speaker).double()(crops.double()).numpy()
    assert got.shape == (32,) and np.abs(ref).mean() > 0.1
    # ONNX Runtime is as close to the fp64 result as PyTorch fp32 is (see test_float32_sensitivity)
    assert np.abs(got - exact).max() < 2 * np.abs(ref - exact).max() + 1e-5
    assert np.abs(got - ref).max() < 1e-3
