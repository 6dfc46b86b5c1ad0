"""The authors' `.ckpt` layout: written, read strictly, and tampered copies refused by name."""

import argparse
import os
import re

import pytest
import torch

from vssflow.export.checkpoint import (COMPONENTS, ModelDims, build_modules, random_state_dict,
                                       read_checkpoint, write_checkpoint)
from vssflow.export.errors import CheckpointError

# Key names of the authors' checkpoint, as their VAFlow LightningModule saves them.
AUTHORS_KEYS = [
    "vaflow.time_proj.weight", "vaflow.timestep_proj.0.weight", "vaflow.timestep_proj.2.bias",
    "vaflow.preprocess_conv.weight", "vaflow.proj_in.weight", "vaflow.proj_out.weight",
    "vaflow.postprocess_conv.weight", "vaflow.transformer_blocks.0.norm1.weight",
    "vaflow.transformer_blocks.0.attn1.to_q.weight", "vaflow.transformer_blocks.0.attn2.to_k.weight",
    "vaflow.transformer_blocks.0.attn2.to_out.0.weight", "vaflow.transformer_blocks.0.ff.net.0.proj.weight",
    "vaflow.transformer_blocks.0.ff.net.2.bias", "cond_proj.0.weight", "cond_proj.2.weight",
    "ref_proj.0.weight", "synch_proj.2.weight", "lip_proj.0.weight", "phone_embedding.weight",
    "image_encoder.visual.conv1.weight", "image_encoder.visual.class_embedding",
    "image_encoder.visual.positional_embedding", "image_encoder.visual.ln_post.weight",
    "image_encoder.visual.proj", "image_encoder.visual.transformer.resblocks.0.attn.in_proj_weight",
    "vae.post_quant_conv.weight", "vae.quant_conv.weight", "vae.encoder.conv_in.weight",
    "vae.decoder.conv_in.weight", "vae.decoder.mid_block.attentions.0.to_q.weight",
    "vocoder.conv_pre.weight", "vocoder.upsampler.0.weight", "vocoder.resblocks.0.convs1.0.weight",
    "vocoder.conv_post.weight", "vocoder.mean", "vocoder.scale",
]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    write_checkpoint(path, ModelDims.preset("tiny"), seed=0)
    return path


def test_file_is_a_lightning_checkpoint_in_the_authors_layout(tiny_ckpt):
    obj = torch.load(tiny_ckpt, weights_only=True)
    assert set(obj) >= {"state_dict", "epoch", "global_step"}
    missing = [k for k in AUTHORS_KEYS if k not in obj["state_dict"]]
    assert not missing
    assert all(isinstance(v, torch.Tensor) for v in obj["state_dict"].values())


def test_round_trip(tiny_ckpt):
    ckpt = read_checkpoint(tiny_ckpt)
    assert ckpt.dims == ModelDims.preset("tiny")
    assert ckpt.dims.audio_channels == 128
    assert ModelDims.from_json(ckpt.dims.to_json()) == ckpt.dims
    modules = build_modules(ckpt)
    sd = torch.load(tiny_ckpt, weights_only=True)["state_dict"]
    assert torch.equal(modules["flow"].proj_in.weight, sd["vaflow.proj_in.weight"])
    assert torch.equal(modules["clip"].conv1.weight, sd["image_encoder.visual.conv1.weight"])


def test_full_dims_are_read_from_shapes():
    dims = ModelDims.preset("full")
    sd = {}
    for c in COMPONENTS:
        sd.update({c.prefix + k: v for k, v in c.authors_state_dict(getattr(dims, c.name), device="meta").items()})
    from vssflow.export.checkpoint import split_state_dict
    parts = split_state_dict(sd, "full")
    for c in COMPONENTS:
        assert c.dims_cls.from_state_dict(parts[c.name]) == getattr(dims, c.name), c.name
    assert dims.audio_channels == 128 and dims.flow.in_channels == 1952


def _tampered(src, dst, edit):
    obj = torch.load(src, weights_only=True)
    edit(obj["state_dict"])
    torch.save(obj, dst)
    return dst


def test_renamed_key_is_refused_by_name(tiny_ckpt, tmp_path):
    def rename(sd):
        sd["vaflow.transformer_blocks.1.attn1.to_qq.weight"] = sd.pop("vaflow.transformer_blocks.1.attn1.to_q.weight")
    path = _tampered(tiny_ckpt, tmp_path / "renamed.ckpt", rename)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    assert "vaflow.transformer_blocks.1.attn1.to_q.weight" in str(e.value)     # missing
    assert "vaflow.transformer_blocks.1.attn1.to_qq.weight" in str(e.value)    # unexpected


def test_reshaped_tensor_is_refused_by_name(tiny_ckpt, tmp_path):
    def reshape(sd):
        sd["vae.decoder.conv_out.weight"] = sd["vae.decoder.conv_out.weight"][:, :, :2]
    path = _tampered(tiny_ckpt, tmp_path / "reshaped.ckpt", reshape)
    with pytest.raises(CheckpointError, match=r"wrong shape.*vae\.decoder\.conv_out\.weight"):
        read_checkpoint(path)


def test_stray_key_is_refused(tiny_ckpt, tmp_path):
    path = _tampered(tiny_ckpt, tmp_path / "stray.ckpt", lambda sd: sd.update({"extra_head.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="extra_head.weight"):
        read_checkpoint(path)


class Payload:
    """Unpickling this would run code; a weights-only load must refuse it without running it."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/vssflow_pwned",))


def test_pickled_object_is_refused_without_running_it(tiny_ckpt, tmp_path):
    marker = "/tmp/vssflow_pwned"
    if os.path.exists(marker):
        os.remove(marker)
    obj = torch.load(tiny_ckpt, weights_only=True)
    obj["hyper_parameters"] = Payload()
    torch.save(obj, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="refused.*posix.system"):
        read_checkpoint(tmp_path / "evil.ckpt")
    assert not os.path.exists(marker)


def test_harmless_but_unknown_class_is_refused(tiny_ckpt, tmp_path):
    obj = torch.load(tiny_ckpt, weights_only=True)
    obj["hyper_parameters"] = argparse.Namespace(lr=1e-4)
    torch.save(obj, tmp_path / "namespace.ckpt")
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(tmp_path / "namespace.ckpt")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(os.urandom(1000))
    with pytest.raises(CheckpointError, match="junk.ckpt"):
        read_checkpoint(tmp_path / "junk.ckpt")
    torch.save({"model": {}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="state_dict"):
        read_checkpoint(tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="no such file"):
        read_checkpoint(tmp_path / "absent.ckpt")


def test_writes_are_atomic(tmp_path, monkeypatch):
    target = tmp_path / "model.ckpt"

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        write_checkpoint(target, ModelDims.preset("tiny"))
    assert list(tmp_path.iterdir()) == []


def test_random_weights_are_seeded():
    a = random_state_dict(ModelDims.preset("tiny"), seed=1)
    b = random_state_dict(ModelDims.preset("tiny"), seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_synchformer_file_is_read_as_the_authors_read_it(tiny_assets, tmp_path):
    """Their loader keeps `vfeat_extractor.*`, strictly, and drops every other key: a file with the
    visual part only, or another audio side, is read; a missing or unexpected visual key is not."""
    from vssflow.export.checkpoint import SYNCHFORMER, read_aux
    full = torch.load(tiny_assets["synchformer"], weights_only=True)
    visual = {k: v for k, v in full.items() if k.startswith("vfeat_extractor.")}
    dims, sd, ignored = read_aux(SYNCHFORMER, tiny_assets["synchformer"])
    assert sd.keys() == visual.keys() and ignored == len(full) - len(visual) > 0

    cases = {"visual_only": visual,
             "other_audio_side": {**visual, "afeat_extractor.other.weight": torch.zeros(3, 5), "aproj.bias": torch.zeros(7)}}
    for name, tensors in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(tensors, path)
        got_dims, got, got_ignored = read_aux(SYNCHFORMER, path)
        assert got_dims.embed_dim == dims.embed_dim and got.keys() == visual.keys()
        assert got_ignored == len(tensors) - len(visual)

    key = "vfeat_extractor.blocks.0.norm3.weight"
    for name, tensors, needle in [
            ("missing", {k: v for k, v in visual.items() if k != key}, f"missing 1: {key}"),
            ("unexpected", {**visual, "vfeat_extractor.extra.weight": torch.zeros(2)},
             "unexpected 1: vfeat_extractor.extra.weight"),
            ("reshaped", {**visual, key: torch.ones(3)}, f"wrong shape 1: {key} (3,)"),
            ("no_visual", {k: v for k, v in full.items() if not k.startswith("vfeat_extractor.")},
             "no vfeat_extractor.* tensors")]:
        path = tmp_path / f"{name}.pth"
        torch.save(tensors, path)
        with pytest.raises(CheckpointError, match=re.escape(needle)):
            read_aux(SYNCHFORMER, path)


def test_export_says_how_many_synchformer_keys_it_ignored(tiny_assets, tmp_path):
    from vssflow.export.onnx_export import ExportOptions, export_model
    visual = {k: v for k, v in torch.load(tiny_assets["synchformer"], weights_only=True).items()
              if k.startswith("vfeat_extractor.")}
    path = tmp_path / "visual_only.pth"
    torch.save({**visual, "transformer.off_head.weight": torch.zeros(21, 32)}, path)
    said = []
    export_model(tiny_assets["checkpoint"], path, tmp_path / "m", progress=said.append,
                 options=ExportOptions(verify=False, torch_weights=False))
    assert f"Synchformer: {len(visual)} vfeat_extractor.* tensors read; 1 other tensor ignored" in " ".join(said)
