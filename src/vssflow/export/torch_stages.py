"""The stages as PyTorch modules, from a model folder's `weights.pt`: the torch backend."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import AuthorsCheckpoint, ModelDims, safe_load, split_state_dict
from .onnx_export import stage_modules


def save_weights(ckpt: AuthorsCheckpoint, synchformer_sd: dict, path: Path, rawnet_sd: dict | None = None) -> None:
    """The authors' tensors as they are (their key layout), Synchformer's and RawNet3's, weights only."""
    from .checkpoint import COMPONENTS, atomic_torch_save
    sd = {c.prefix + k: v for c in COMPONENTS for k, v in ckpt.tensors[c.name].items()}
    obj = {"state_dict": sd, "synchformer": dict(synchformer_sd)}
    if rawnet_sd is not None:
        obj["rawnet"] = dict(rawnet_sd)
    atomic_torch_save(obj, path)


def read_weights(path: Path) -> tuple[AuthorsCheckpoint, torch.nn.Module, torch.nn.Module | None]:
    """A model folder's `weights.pt`: (the authors' checkpoint, Synchformer, RawNet3 or None),
    dims from the folder's manifest."""
    from .checkpoint import dims_from_json, load_weights
    from .synchformer import SynchformerDims, SynchformerVisual
    manifest = json.loads((Path(path).parent / "manifest.json").read_text())
    obj = safe_load(path)
    ckpt = AuthorsCheckpoint(ModelDims.from_json(manifest["dims"]), split_state_dict(obj["state_dict"], str(path)))
    synch = SynchformerVisual(dims_from_json(SynchformerDims, manifest["synchformer_dims"]))
    load_weights(synch, obj["synchformer"], f"{path} (synchformer)")
    rawnet = None
    if "rawnet" in obj:
        from .rawnet import load_rawnet
        rawnet = load_rawnet(obj["rawnet"])
    return ckpt, synch, rawnet


def load_stage_modules(path: Path, device: str = "cpu", precision: str = "fp32") -> dict[str, torch.nn.Module]:
    """Every stage's module on `device`; at fp16/bf16 the stages of `FP16_STAGES` run under the
    half-precision policy (`export/precision.py`), the others (the speaker encoder) in FP32."""
    from vssflow.runtime.precision import FP16_STAGES

    from .precision import half_stage
    modules = {name: m.to(device).eval() for name, m in stage_modules(*read_weights(path)).items()}
    return {name: half_stage(m, precision, copy_=False) if name in FP16_STAGES else m for name, m in modules.items()}
