"""The Synchformer visual extractor against a loop-by-loop rewrite of MotionFormer's divided
space-time attention and torch's own TransformerEncoderLayer, and (when its imports are there)
against the authors' vendored code itself."""

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vssflow.export.errors import CheckpointError
from vssflow.export.synchformer import (SynchformerDims, SynchformerVisual, authors_state_dict,
                                        load_synchformer, segment)

TINY = SynchformerDims.preset("tiny")
V = "vfeat_extractor."


def _sd(dims: SynchformerDims = TINY, seed: int = 0) -> dict:
    return authors_state_dict(dims, generator=torch.Generator().manual_seed(seed))


def _segments(n: int = 2, seed: int = 1) -> torch.Tensor:
    """Normalized frames in [-1, 1], as `encode_video_with_sync` gets them."""
    return torch.rand(n, 16, 3, 224, 224, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_full_key_set():
    sd = authors_state_dict(SynchformerDims.preset("full"), device="meta")
    assert all(v.device.type == "meta" for v in sd.values())
    prefixes = {}
    for k in sd:
        prefixes[k.split(".")[0]] = prefixes.get(k.split(".")[0], 0) + 1
    assert prefixes == {"vfeat_extractor": 238, "afeat_extractor": 212, "vproj": 2, "aproj": 2,
                        "transformer": 59}
    assert len(sd) == 513
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes[V + "patch_embed_3d.proj.weight"] == (768, 3, 2, 16, 16)
    assert shapes[V + "patch_embed.proj.weight"] == (768, 3, 16, 16)
    assert shapes[V + "pos_embed"] == (1, 197, 768)
    assert shapes[V + "temp_embed"] == (1, 8, 768)
    assert shapes[V + "cls_token"] == shapes[V + "spatial_attn_agg.cls_token"] == (1, 1, 768)
    block = {k.split(".", 3)[3]: s for k, s in shapes.items() if k.startswith(V + "blocks.11.")}
    assert block == {
        "norm1.weight": (768,), "norm1.bias": (768,), "norm2.weight": (768,), "norm2.bias": (768,),
        "norm3.weight": (768,), "norm3.bias": (768,),
        "attn.qkv.weight": (2304, 768), "attn.qkv.bias": (2304,),
        "attn.proj.weight": (768, 768), "attn.proj.bias": (768,),
        "timeattn.qkv.weight": (2304, 768), "timeattn.qkv.bias": (2304,),
        "timeattn.proj.weight": (768, 768), "timeattn.proj.bias": (768,),
        "mlp.fc1.weight": (3072, 768), "mlp.fc1.bias": (3072,),
        "mlp.fc2.weight": (768, 3072), "mlp.fc2.bias": (768,),
    }
    agg = {k.split(".", 2)[2]: s for k, s in shapes.items() if k.startswith(V + "spatial_attn_agg.")}
    assert agg == {
        "cls_token": (1, 1, 768),
        "self_attn.in_proj_weight": (2304, 768), "self_attn.in_proj_bias": (2304,),
        "self_attn.out_proj.weight": (768, 768), "self_attn.out_proj.bias": (768,),
        "linear1.weight": (3072, 768), "linear1.bias": (3072,),
        "linear2.weight": (768, 3072), "linear2.bias": (768,),
        "norm1.weight": (768,), "norm1.bias": (768,), "norm2.weight": (768,), "norm2.bias": (768,),
    }
    a = "afeat_extractor."
    assert shapes[a + "ast.embeddings.position_embeddings"] == (1, 74, 768)
    assert shapes[a + "ast.embeddings.patch_embeddings.projection.weight"] == (768, 1, 16, 16)
    assert shapes[a + "ast.encoder.layer.11.attention.attention.query.weight"] == (768, 768)
    assert shapes[a + "ast.encoder.layer.11.intermediate.dense.weight"] == (3072, 768)
    assert shapes[a + "freq_attn_agg.linear1.weight"] == (3072, 768)
    assert shapes["transformer.pos_emb_cfg.pos_emb"] == (1, 198, 768)
    assert shapes["transformer.blocks.2.attn.query.weight"] == (768, 768)
    assert shapes["transformer.blocks.2.mlp.0.weight"] == (3072, 768)
    assert shapes["transformer.off_head.weight"] == (21, 768)
    assert shapes["transformer.OFF_tok"] == shapes["transformer.MOD_tok"] == (1, 1, 768)

    dims = SynchformerDims.from_state_dict(sd)
    assert dims == SynchformerDims.preset("full")
    assert (dims.embed_dim, dims.depth, dims.num_heads) == (768, 12, 12)
    assert (dims.patches, dims.num_frames, dims.temporal_tokens) == (196, 16, 8)


def test_tiny_round_trip_and_module_keys():
    sd = _sd()
    assert SynchformerDims.from_state_dict(sd) == TINY
    assert TINY.num_frames == 16 and TINY.temporal_tokens == 8 and TINY.num_heads == 1
    assert sum(v.numel() for v in sd.values()) * 4 < 3e6
    own = SynchformerVisual(TINY).state_dict()
    assert set(own) == {k for k in sd if k.startswith(V)} - {V + "patch_embed.proj.weight",
                                                             V + "patch_embed.proj.bias"}
    assert all(own[k].shape == sd[k].shape for k in own)
    # only the visual branch is needed to load
    vis_only = {k: v for k, v in sd.items() if k.startswith(V)}
    assert SynchformerDims.from_state_dict(vis_only, {"num_heads": 2}).num_heads == 2
    assert SynchformerDims.from_state_dict(vis_only, {"VIT": {"NUM_HEADS": 4}}).num_heads == 4
    load_synchformer(vis_only)


def test_bad_state_dicts_raise():
    sd = _sd()
    with pytest.raises(CheckpointError, match="temp_embed"):
        load_synchformer({k: v for k, v in sd.items() if k != V + "temp_embed"})
    with pytest.raises(CheckpointError, match="blocks.1.timeattn.qkv.bias"):
        load_synchformer({k: v for k, v in sd.items() if k != V + "blocks.1.timeattn.qkv.bias"})
    with pytest.raises(CheckpointError, match="norm3.weight"):
        load_synchformer({**sd, V + "blocks.0.norm3.weight": torch.ones(63)})
    with pytest.raises(CheckpointError, match="heads"):
        SynchformerDims.from_state_dict(sd, {"num_heads": 3})


def test_segments():
    frames = torch.arange(250.0)[:, None, None, None].expand(250, 3, 2, 2)
    segs = segment(frames)
    assert segs.shape == (30, 16, 3, 2, 2)
    assert segs[:, :, 0, 0, 0].tolist() == [list(range(8 * s, 8 * s + 16)) for s in range(30)]


# --- an independent rewrite: explicit patches, loops over heads and attention groups ------------

def _ref_divided_attention(x, w_qkv, b_qkv, w_o, b_o, heads, frames, patches, axis):
    """MotionFormer `DividedAttention`: CLS attends to all; the rest attend within their group + CLS."""
    b, n, d = x.shape
    hd = d // heads
    q, k, v = (x @ w_qkv.T + b_qkv).split(d, dim=-1)
    tok = lambda f, p: 1 + f * patches + p  # noqa: E731  (token order: CLS, then frame-major)
    if axis == "time":
        groups = [[tok(f, p) for f in range(frames)] for p in range(patches)]
    else:
        groups = [[tok(f, p) for p in range(patches)] for f in range(frames)]
    out = torch.zeros_like(q)
    for h in range(heads):
        c = slice(h * hd, (h + 1) * hd)
        qh, kh, vh = q[..., c] * hd ** -0.5, k[..., c], v[..., c]
        att = torch.einsum("bd,bjd->bj", qh[:, 0], kh).softmax(-1)
        out[:, 0, c] = torch.einsum("bj,bjd->bd", att, vh)
        for idx in groups:
            keys = [0] + idx
            att = torch.einsum("bid,bjd->bij", qh[:, idx], kh[:, keys]).softmax(-1)
            out[:, idx, c] = torch.einsum("bij,bjd->bid", att, vh[:, keys])
    return out @ w_o.T + b_o


def _reference(sd: dict, dims: SynchformerDims, segments: torch.Tensor) -> torch.Tensor:
    s_, d, p, tb = segments.shape[0], dims.embed_dim, dims.patch_size, dims.tubelet
    t, g = dims.temporal_tokens, dims.grid
    ln = lambda x, name: F.layer_norm(x, (d,), sd[name + ".weight"], sd[name + ".bias"], 1e-6)  # noqa: E731
    # tubelets [S, c, t, dt, row i, py, col j, px] against the Conv3d kernel [D, c, dt, py, px]
    cubes = segments.permute(0, 2, 1, 3, 4).reshape(s_, 3, t, tb, g, p, g, p)
    x = torch.einsum("sctaiyjx,dcayx->stijd", cubes, sd[V + "patch_embed_3d.proj.weight"])
    x = x + sd[V + "patch_embed_3d.proj.bias"]  # [S, t, g, g, D]
    x = x.reshape(s_, t, g * g, d)
    for f in range(t):  # spatial table shared by frames, temporal table shared by patches
        x[:, f] = x[:, f] + sd[V + "pos_embed"][0, 1:] + sd[V + "temp_embed"][0, f]
    cls = (sd[V + "cls_token"] + sd[V + "pos_embed"][:, :1]).expand(s_, 1, d)
    x = torch.cat([cls, x.reshape(s_, t * g * g, d)], dim=1)
    for i in range(dims.depth):
        b = f"{V}blocks.{i}."
        for attn, norm, axis in (("timeattn", "norm3", "time"), ("attn", "norm1", "space")):
            x = x + _ref_divided_attention(
                ln(x, b + norm), sd[b + attn + ".qkv.weight"], sd[b + attn + ".qkv.bias"],
                sd[b + attn + ".proj.weight"], sd[b + attn + ".proj.bias"],
                dims.num_heads, t, g * g, axis)
        h = F.gelu(ln(x, b + "norm2") @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"])
        x = x + h @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"]
    x = ln(x[:, 1:], V + "norm")  # [S, t*n, D]
    # spatial aggregation: torch's own pre-norm encoder layer on [CLS, patches of one frame]
    agg = torch.nn.TransformerEncoderLayer(d, dims.num_heads, dims.agg_mlp_dim, dropout=0.0,
                                           activation=torch.nn.GELU(), layer_norm_eps=1e-6,
                                           batch_first=True, norm_first=True).eval()
    a = V + "spatial_attn_agg."
    agg.load_state_dict({k[len(a):]: v for k, v in sd.items() if k.startswith(a) and "cls_token" not in k})
    frames = x.reshape(s_ * t, g * g, d)
    frames = torch.cat([sd[a + "cls_token"].expand(s_ * t, 1, d), frames], dim=1)
    return agg(frames)[:, 0].reshape(s_, t, d)


def test_matches_loop_reference():
    sd = _sd(seed=2)
    model = load_synchformer(sd)
    x = _segments(2, seed=3)
    with torch.no_grad():
        y = model(x)
        ref = _reference(sd, TINY, x)
    assert y.shape == (2, 8, 64)
    assert ref.abs().mean() > 0.3  # non-trivial magnitude
    assert (y - ref).abs().max() < 1e-4


def test_two_heads_match_loop_reference():
    dims = SynchformerDims(embed_dim=64, depth=1, num_heads=2, mlp_dim=128, agg_mlp_dim=96,
                           audio_dim=16, audio_depth=1, audio_mlp_dim=16, sync_dim=16, sync_depth=1)
    sd = _sd(dims, seed=4)
    model = load_synchformer(sd, {"num_heads": 2})
    x = _segments(1, seed=5)
    with torch.no_grad():
        assert (model(x) - _reference(sd, dims, x)).abs().max() < 1e-4


def test_mixing_is_within_segment_and_across_frames():
    model = load_synchformer(_sd(seed=6))
    x = _segments(2, seed=7)
    x2 = x.clone()
    x2[0, 14:] = -x2[0, 14:]  # change the last temporal token's frames of segment 0 only
    with torch.no_grad():
        y, y2 = model(x), model(x2)
    assert (y[1] - y2[1]).abs().max() < 1e-5  # segments are independent
    assert (y[0, 0] - y2[0, 0]).abs().max() > 1e-3  # time attention reaches frame 0


def test_onnx_export_matches(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = load_synchformer(_sd(seed=8))
    path = tmp_path / "synchformer_tiny.onnx"
    torch.onnx.export(model, (_segments(1),), str(path), input_names=["segments"],
                      output_names=["features"], dynamic_axes={"segments": {0: "S"}},
                      opset_version=17, dynamo=False)
    x = _segments(3, seed=9)
    out = ort.InferenceSession(str(path)).run(None, {"segments": x.numpy()})[0]
    with torch.no_grad():
        assert abs(out - model(x).numpy()).max() < 1e-4


# --- the authors' own code, when einops / omegaconf and their repository are at hand -------------

AUTHORS_REPO = Path(os.environ.get("VSSFLOW_AUTHORS_REPO", "/work/.mirror/vasflow1+vssflow/repo"))
AUTHORS_FILES = ["__init__.py", "motionformer.py", "synchformer.py", "utils.py",
                 "video_model_builder.py", "vit_helper.py", "divided_224_16x4.yaml"]


def test_matches_authors_code(tmp_path, monkeypatch):
    pytest.importorskip("einops")
    pytest.importorskip("omegaconf")
    pytest.importorskip("requests")
    if not AUTHORS_REPO.exists():
        pytest.skip(f"authors' repository not at {AUTHORS_REPO} (set VSSFLOW_AUTHORS_REPO)")
    pkg = tmp_path / "synchformer"
    pkg.mkdir()
    for name in AUTHORS_FILES:
        text = subprocess.run(["git", "--git-dir", str(AUTHORS_REPO), "show",
                               f"HEAD:feature/synchformer/{name}"],
                              capture_output=True, text=True, check=True).stdout
        if name.endswith(".yaml"):  # the tiny preset
            text = text.replace("EMBED_DIM: 768", "EMBED_DIM: 64").replace(
                "DEPTH: 12", "DEPTH: 2").replace("NUM_HEADS: 12", "NUM_HEADS: 1")
        (pkg / name).write_text(text)
    try:
        import timm.layers  # noqa: F401
    except ImportError:  # only trunc_normal_ and to_2tuple are used
        layers = types.ModuleType("timm.layers")
        layers.trunc_normal_ = lambda t, std=1.0: torch.nn.init.trunc_normal_(t, std=std)
        layers.to_2tuple = lambda v: v if isinstance(v, tuple) else (v, v)
        timm = types.ModuleType("timm")
        timm.layers = layers
        monkeypatch.setitem(sys.modules, "timm", timm)
        monkeypatch.setitem(sys.modules, "timm.layers", layers)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "synchformer" or m.startswith("synchformer.")]:
        monkeypatch.delitem(sys.modules, name)
    try:
        from synchformer import Synchformer

        ref = Synchformer().eval()
    finally:
        for name in [m for m in sys.modules if m == "synchformer" or m.startswith("synchformer.")]:
            del sys.modules[name]
    sd = _sd(seed=10)
    ref.load_state_dict(sd)  # theirs keeps only vfeat_extractor.*, strict
    x = _segments(2, seed=11)
    with torch.no_grad():
        expected = ref(x[:, None])[:, 0]  # encode_video_with_sync: '(b s) 1 t c h w'
        y = load_synchformer(sd)(x)
    assert expected.shape == y.shape == (2, 8, 64)
    assert (y - expected).abs().max() < 1e-4
