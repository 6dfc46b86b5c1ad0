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


def load_stage_modules(path: Path, device: str = "cpu") -> dict[str, torch.nn.Module]:
    from .synchformer import SynchformerDims, SynchformerVisual
    manifest = json.loads((Path(path).parent / "manifest.json").read_text())
    obj = safe_load(path)
    ckpt = AuthorsCheckpoint(ModelDims.from_json(manifest["dims"]), split_state_dict(obj["state_dict"], str(path)))
    synch = SynchformerVisual(SynchformerDims(**{k: tuple(v) if isinstance(v, list) else v
                                                 for k, v in manifest["synchformer_dims"].items()}))
    synch.load_state_dict({k: obj["synchformer"][k] for k in synch.state_dict()}, strict=True)
    rawnet = None
    if "rawnet" in obj:
        from .rawnet import load_rawnet
        rawnet = load_rawnet(obj["rawnet"])
    return {name: m.to(device).eval() for name, m in stage_modules(ckpt, synch.eval(), rawnet).items()}
