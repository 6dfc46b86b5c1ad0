"""The CLIP visual tower against transformers' CLIPVisionModel (weights converted from OpenAI's layout)."""

import pytest
import torch

from vssflow.export.clip import ClipDims, ClipVisual, authors_state_dict, load_clip
from vssflow.export.errors import CheckpointError


def _sd(dims: ClipDims, seed: int = 0) -> dict:
    return authors_state_dict(dims, generator=torch.Generator().manual_seed(seed))


def _frames(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def test_full_key_set_is_openai_visual():
    sd = authors_state_dict(ClipDims.preset("full"), device="meta")
    assert len(sd) == 6 + 12 * 12 + 2  # OpenAI ViT-B/16 `visual.*`: 152 tensors
    assert all(v.device.type == "meta" for v in sd.values())
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["conv1.weight"] == (768, 3, 16, 16)
    assert shapes["class_embedding"] == (768,)
    assert shapes["positional_embedding"] == (197, 768)
    assert shapes["proj"] == (768, 512)
    assert shapes["ln_post.weight"] == shapes["ln_post.bias"] == (768,)
    block = {k.split(".", 3)[3]: s for k, s in shapes.items() if k.startswith("transformer.resblocks.11.")}
    assert block == {
        "attn.in_proj_weight": (2304, 768), "attn.in_proj_bias": (2304,),
        "attn.out_proj.weight": (768, 768), "attn.out_proj.bias": (768,),
        "ln_1.weight": (768,), "ln_1.bias": (768,),
        "mlp.c_fc.weight": (3072, 768), "mlp.c_fc.bias": (3072,),
        "mlp.c_proj.weight": (768, 3072), "mlp.c_proj.bias": (768,),
        "ln_2.weight": (768,), "ln_2.bias": (768,),
    }
    assert ClipDims.from_state_dict(sd) == ClipDims.preset("full") == ClipDims(768, 12, 12, 16, 224, 512)


def test_tiny_round_trip_and_module_keys():
    dims = ClipDims.preset("tiny")
    sd = _sd(dims)
    assert ClipDims.from_state_dict(sd) == dims and dims.heads == 1
    assert sum(v.numel() for v in sd.values()) * 4 < 2e6
    model = ClipVisual(dims)
    own = model.state_dict()
    assert set(own) == set(sd) - {"ln_post.weight", "ln_post.bias", "proj"}
    assert all(own[k].shape == sd[k].shape for k in own)
    assert ClipDims.from_state_dict(sd, {"heads": 2}).heads == 2


def test_bad_state_dicts_raise():
    sd = _sd(ClipDims.preset("tiny"))
    with pytest.raises(CheckpointError, match="positional_embedding"):
        load_clip({k: v for k, v in sd.items() if k != "positional_embedding"})
    with pytest.raises(CheckpointError, match="resblocks.1.mlp.c_fc.bias"):
        load_clip({k: v for k, v in sd.items() if k != "transformer.resblocks.1.mlp.c_fc.bias"})
    with pytest.raises(CheckpointError, match="ln_2.weight"):
        load_clip({**sd, "transformer.resblocks.0.ln_2.weight": torch.ones(65)})


def _to_hf(sd: dict, dims: ClipDims) -> dict:
    """OpenAI visual layout -> transformers CLIPVisionModel keys."""
    w = dims.width
    out = {
        "vision_model.embeddings.class_embedding": sd["class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": sd["conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": sd["ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["ln_post.bias"],
    }
    for i in range(dims.layers):
        src, dst = f"transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{dst}self_attn.{name}.weight"] = sd[src + "attn.in_proj_weight"][j * w:(j + 1) * w]
            out[f"{dst}self_attn.{name}.bias"] = sd[src + "attn.in_proj_bias"][j * w:(j + 1) * w]
        pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
        for a, b in pairs.items():
            out[f"{dst}{b}.weight"] = sd[f"{src}{a}.weight"]
            out[f"{dst}{b}.bias"] = sd[f"{src}{a}.bias"]
    return out


def _hf_model(sd: dict, dims: ClipDims):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=dims.width, intermediate_size=4 * dims.width,
                           num_hidden_layers=dims.layers, num_attention_heads=dims.heads,
                           image_size=dims.image_size, patch_size=dims.patch_size,
                           hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=dims.output_dim)
    hf = CLIPVisionModel(cfg).eval()
    own = hf.state_dict()
    state = _to_hf(sd, dims)
    if not any(k.startswith("vision_model.") for k in own):  # transformers >= 5: no wrapper
        state = {k.removeprefix("vision_model."): v for k, v in state.items()}
    state.update({k: v for k, v in own.items() if k not in state and "position_ids" in k})
    hf.load_state_dict(state, strict=True)
    return hf


@pytest.mark.parametrize("dims", [ClipDims.preset("tiny"),
                                  ClipDims(width=128, layers=2, heads=2, output_dim=32)],
                         ids=["tiny", "two_heads"])
def test_matches_transformers_clip(dims):
    sd = _sd(dims, seed=3)
    ours = load_clip(sd)
    hf = _hf_model(sd, dims)
    x = _frames()
    with torch.no_grad():
        y = ours(x)
        out = hf(pixel_values=x)
    # HF's last_hidden_state is the encoder output after pre_layrnorm + blocks: no post_layernorm.
    ref = out.last_hidden_state[:, 0]
    assert y.shape == (3, dims.width)
    assert ref.abs().mean() > 0.3  # non-trivial magnitude
    assert (y - ref).abs().max() < 1e-4
    # the pooled output is ln_post(CLS), which the authors do not apply
    assert (y - out.pooler_output).abs().max() > 0.1
    # frames are encoded independently
    assert (ours(x[1:2]) - y[1:2]).abs().max() < 1e-5


def test_quick_gelu_not_gelu():
    dims = ClipDims.preset("tiny")
    sd = _sd(dims, seed=4)
    ours = load_clip(sd)
    hf = _hf_model(sd, dims)
    hf.config.hidden_act = "gelu"
    from transformers.activations import ACT2FN
    for layer in getattr(hf, "vision_model", hf).encoder.layers:
        layer.mlp.activation_fn = ACT2FN["gelu"]
    x = _frames(2, seed=5)
    with torch.no_grad():
        assert (ours(x) - hf(pixel_values=x).last_hidden_state[:, 0]).abs().max() > 1e-3


def test_onnx_export_matches(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = load_clip(_sd(ClipDims.preset("tiny"), seed=6))
    path = tmp_path / "clip_tiny.onnx"
    torch.onnx.export(model, (_frames(2),), str(path), input_names=["frames"], output_names=["features"],
                      dynamic_axes={"frames": {0: "N"}}, opset_version=17, dynamo=False)
    x = _frames(3, seed=7)
    out = ort.InferenceSession(str(path)).run(None, {"frames": x.numpy()})[0]
    with torch.no_grad():
        assert abs(out - model(x).numpy()).max() < 1e-4
