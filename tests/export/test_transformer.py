"""The flow transformer against diffusers' Stable Audio parts and a plain rewrite of its math."""

import math

import pytest
import torch
import torch.nn.functional as F

from vssflow.export.transformer import (FlowDims, FlowTransformer, apply_rope, authors_state_dict,
                                        load_flow, rope_tables)

# Realistic scale: the real head layout (64-d heads, 2 query heads per kv head), narrow width.
MEDIUM = FlowDims(in_channels=160, width=256, num_layers=2, head_dim=64, num_kv_heads=2,
                  cross_dim=128, ff_inner=512)


def _model(dims: FlowDims, seed: int = 0) -> tuple[FlowTransformer, dict]:
    sd = authors_state_dict(dims, generator=torch.Generator().manual_seed(seed))
    return load_flow(sd), sd


def _inputs(dims: FlowDims, t_len: int = 50, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dims.in_channels, t_len, generator=g)
    t = torch.rand(batch, generator=g)
    c = torch.randn(batch, t_len + 1, dims.cross_dim, generator=g)
    return x, t, c


def test_dims_round_trip():
    for size in ("tiny", "small", "full"):
        dims = FlowDims.preset(size)
        assert FlowDims.from_state_dict(authors_state_dict(dims, device="meta")) == dims
    assert FlowDims.preset("full").num_heads == 24 and FlowDims.preset("full").rotary_dim == 32


def test_full_size_matches_design():
    n = sum(v.numel() for v in authors_state_dict(FlowDims.preset("full"), device="meta").values())
    assert 440e6 < n < 460e6  # "≈ 450M-parameter transformer"


def test_module_keys_are_the_authors_keys():
    model, sd = _model(FlowDims.preset("tiny"))
    assert set(model.state_dict()) == set(sd)


def test_rope_matches_diffusers():
    from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed

    cos_ref, sin_ref = get_1d_rotary_pos_embed(32, 251, use_real=True, repeat_interleave_real=False)
    cos, sin = rope_tables(251, 32)
    assert torch.allclose(cos, cos_ref.float(), atol=1e-5) and torch.allclose(sin, sin_ref.float(), atol=1e-5)
    x = torch.randn(2, 3, 251, 64)
    ours = apply_rope(x, cos, sin)
    ref = torch.cat([apply_rotary_emb(x[..., :32], (cos_ref, sin_ref), use_real=True, use_real_unbind_dim=-2),
                     x[..., 32:]], dim=-1)
    assert (ours - ref).abs().max() < 1e-4


def _diffusers_reference(model: FlowTransformer, sd: dict, dims: FlowDims, x, t, c):
    """The authors' model assembled from diffusers' Stable Audio modules, called as they call them."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed
    from diffusers.models.transformers.stable_audio_transformer import (StableAudioDiTBlock,
                                                                        StableAudioGaussianFourierProjection)

    time_proj = StableAudioGaussianFourierProjection(dims.time_proj_dim // 2, flip_sin_to_cos=True, log=False,
                                                     set_W_to_weight=False)
    time_proj.weight.data.copy_(sd["time_proj.weight"])
    blocks = []
    for i in range(dims.num_layers):
        blk = StableAudioDiTBlock(dim=dims.width, num_attention_heads=dims.num_heads,
                                  num_key_value_attention_heads=dims.num_kv_heads,
                                  attention_head_dim=dims.head_dim, cross_attention_dim=dims.cross_dim,
                                  ff_inner_dim=dims.ff_inner)
        prefix = f"transformer_blocks.{i}."
        blk.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, strict=True)
        blocks.append(blk.eval())
    rope = get_1d_rotary_pos_embed(dims.rotary_dim, x.shape[-1] + 1, use_real=True, repeat_interleave_real=False)
    with torch.no_grad():
        g = model.timestep_proj(time_proj(t)).unsqueeze(1)
        h = F.conv1d(x, sd["preprocess_conv.weight"]) + x
        h = h.transpose(1, 2) @ sd["proj_in.weight"].T
        h = torch.cat([g, h], dim=1)
        for blk in blocks:
            h = h + blk.attn1(blk.norm1(h), rotary_emb=rope)
            h = h + blk.attn2(blk.norm2(h), encoder_hidden_states=c, rotary_emb=rope)  # the authors' addition
            h = h + blk.ff(blk.norm3(h))
        o = (h @ sd["proj_out.weight"].T).transpose(1, 2)[:, :, 1:]
        return F.conv1d(o, sd["postprocess_conv.weight"]) + o


@pytest.mark.parametrize("dims", [FlowDims.preset("tiny"), MEDIUM], ids=["tiny", "medium"])
def test_model_matches_diffusers_blocks(dims):
    model, sd = _model(dims)
    x, t, c = _inputs(dims)
    with torch.no_grad():
        ours = model(x, t, c)
    ref = _diffusers_reference(model, sd, dims, x, t, c)
    assert ref.abs().max() > 1.0  # outputs of real magnitude, not a vacuous comparison
    assert (ours - ref).abs().max() <= 1e-4


def _plain_block(sd: dict, p: str, dims: FlowDims, h, c):
    """A block written out: explicit softmax, RoPE per channel pair, GQA by index."""
    def ln(x, n):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * sd[p + n + ".weight"] + sd[p + n + ".bias"]

    n_tok = h.shape[1]
    half = dims.rotary_dim // 2
    freq = torch.tensor([10000.0 ** (-2 * i / dims.rotary_dim) for i in range(half)], dtype=torch.float64)
    ang = torch.arange(n_tok, dtype=torch.float64)[:, None] * freq[None]       # [N, 16]

    def rope(x):  # x [B, H, N, 64]: pairs (i, i+16) of the first 32 channels rotate by ang[:, i]
        x = x.double()
        a, b = x[..., :half], x[..., half:2 * half]
        out = x.clone()
        out[..., :half] = a * torch.cos(ang) - b * torch.sin(ang)
        out[..., half:2 * half] = b * torch.cos(ang) + a * torch.sin(ang)
        return out.float()

    def split(x, heads):
        return x.view(x.shape[0], x.shape[1], heads, dims.head_dim).transpose(1, 2)

    def attention(q, k, v):
        kv_of_head = [hd * k.shape[1] // q.shape[1] for hd in range(q.shape[1])]
        outs = []
        for hd in range(q.shape[1]):
            scores = q[:, hd] @ k[:, kv_of_head[hd]].transpose(-1, -2) / 8.0
            outs.append(torch.softmax(scores, dim=-1) @ v[:, kv_of_head[hd]])
        return torch.stack(outs, dim=1).transpose(1, 2).reshape(h.shape[0], n_tok, -1)

    w = lambda name: sd[p + name + ".weight"].T  # noqa: E731
    x = ln(h, "norm1")
    q, k, v = split(x @ w("attn1.to_q"), dims.num_heads), split(x @ w("attn1.to_k"), dims.num_heads), \
        split(x @ w("attn1.to_v"), dims.num_heads)
    h = h + attention(rope(q), rope(k), v) @ w("attn1.to_out.0")
    x = ln(h, "norm2")
    q = rope(split(x @ w("attn2.to_q"), dims.num_heads))
    k, v = split(c @ w("attn2.to_k"), dims.num_kv_heads), split(c @ w("attn2.to_v"), dims.num_kv_heads)
    h = h + attention(q, k, v) @ w("attn2.to_out.0")
    x = ln(h, "norm3")
    ab = x @ w("ff.net.0.proj") + sd[p + "ff.net.0.proj.bias"]
    a, b = ab.chunk(2, dim=-1)
    return h + (a * (b * torch.sigmoid(b))) @ w("ff.net.2") + sd[p + "ff.net.2.bias"]


def test_block_matches_plain_rewrite():
    dims = MEDIUM
    model, sd = _model(dims)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 51, dims.width, generator=g)
    c = torch.randn(2, 51, dims.cross_dim, generator=g)
    cos, sin = rope_tables(51, dims.rotary_dim)
    with torch.no_grad():
        ours = model.transformer_blocks[0](h, c, cos, sin)
        ref = _plain_block(sd, "transformer_blocks.0.", dims, h, c)
    assert (ours - ref).abs().max() <= 1e-4


def test_time_token_uses_cos_then_sin():
    model, sd = _model(FlowDims.preset("tiny"))
    t = torch.tensor([0.25])
    w = sd["time_proj.weight"]
    feats = torch.cat([torch.cos(2 * math.pi * 0.25 * w), torch.sin(2 * math.pi * 0.25 * w)])[None]
    with torch.no_grad():
        ref = model.timestep_proj(feats)
        assert torch.allclose(model.time_token(t)[:, 0], ref, atol=1e-6)


def test_cross_attention_rotates_queries_only():
    """Rotating the context tokens' order must change nothing but through q: keys carry no RoPE."""
    dims = FlowDims.preset("tiny")
    model, _ = _model(dims)
    attn = model.transformer_blocks[0].attn2
    g = torch.Generator().manual_seed(5)
    h, c = torch.randn(1, 11, dims.width, generator=g), torch.randn(1, 11, dims.cross_dim, generator=g)
    cos, sin = rope_tables(11, dims.rotary_dim)
    perm = torch.randperm(11, generator=g)
    with torch.no_grad():
        assert torch.allclose(attn(h, c, cos, sin), attn(h, c[:, perm], cos, sin), atol=1e-5)
