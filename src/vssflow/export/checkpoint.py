"""The authors' checkpoint files, read as they are and written in their exact layout.

* `model.ckpt`: a PyTorch Lightning checkpoint `{"state_dict": {...}, ...}` whose keys carry the
  prefixes `vaflow.` (flow transformer), `cond_proj.` `ref_proj.` `synch_proj.` `lip_proj.`
  `phone_embedding.` (conditions), `image_encoder.visual.` (CLIP), `vae.` and `vocoder.`.
* `synchformer_state_dict.pth`: MMAudio's Synchformer state dict.
* RawNet3 `model.pt`: `{"model": state_dict}`.

Every file is opened with `torch.load(weights_only=True)`: a checkpoint never runs code. The
mapping is strict: a missing, unexpected or mis-shaped tensor is an error naming every
offending key. Dimensions come from tensor shapes; what shapes cannot tell comes from defaults
matching the real model, overridden by the authors' `config.json` files (`--assets`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class Component:
    """One trained part inside the authors' `.ckpt`."""

    name: str
    prefix: str                       # key prefix in the checkpoint
    module: str                       # module of vssflow.export defining it
    dims_class: str
    state_dict_fn: str = "authors_state_dict"
    config_path: str | None = None    # its config.json inside the authors' assets folder
    roots: tuple[str, ...] = ()       # for prefix "": the first key segments it owns
    keep: str = ""                    # separate files: only keys starting so are read (strictly)

    def owns(self, key: str) -> bool:
        if self.prefix:
            return key.startswith(self.prefix)
        return key.split(".", 1)[0] in self.roots

    def _mod(self):
        return importlib.import_module(f"vssflow.export.{self.module}")

    @property
    def dims_cls(self) -> type:
        return getattr(self._mod(), self.dims_class)

    def authors_state_dict(self, dims, **kw) -> dict[str, torch.Tensor]:
        return getattr(self._mod(), self.state_dict_fn)(dims, **kw)


COMPONENTS: tuple[Component, ...] = (
    Component("flow", "vaflow.", "transformer", "FlowDims",
              config_path="stable_audio/ckpt/transformer_lip_synch_text/config.json"),
    Component("conditions", "", "conditions", "ConditionDims",
              roots=("cond_proj", "ref_proj", "synch_proj", "lip_proj", "phone_embedding")),
    Component("clip", "image_encoder.visual.", "clip", "ClipDims"),
    Component("vae", "vae.", "decoder", "VAEDims", state_dict_fn="vae_authors_state_dict",
              config_path="vae/config.json"),
    Component("vocoder", "vocoder.", "decoder", "VocoderDims",
              state_dict_fn="vocoder_authors_state_dict", config_path="vocoder/config.json"),
)
# The authors' Synchformer loader keeps `vfeat_extractor.*` (strictly) and drops every other key
# (`feature/synchformer/synchformer.py::load_state_dict`): the audio branch and sync head of MMAudio's
# file are never used, so a file without them, or with other ones, is read as they read it.
SYNCHFORMER = Component("synchformer", "", "synchformer", "SynchformerDims", keep="vfeat_extractor.")
RAWNET = Component("rawnet", "", "rawnet", "RawNetDims")


@dataclasses.dataclass(frozen=True)
class ModelDims:
    """Dimensions of every part in the authors' `.ckpt`; written to the exported manifest."""

    flow: Any
    conditions: Any
    clip: Any
    vae: Any
    vocoder: Any

    @property
    def audio_channels(self) -> int:
        return self.flow.in_channels - self.conditions.channel_dim

    @classmethod
    def preset(cls, size: str) -> ModelDims:
        # "small": a narrower transformer for CPU benchmarks; the other parts at "full" size.
        sub = {"small": "full"}.get(size, size)
        return cls(**{c.name: c.dims_cls.preset(size if c.name == "flow" else sub) for c in COMPONENTS})

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping) -> ModelDims:
        return cls(**{c.name: dims_from_json(c.dims_cls, d[c.name]) for c in COMPONENTS})


def dims_from_json(dims_cls: type, d: Mapping):
    """A frozen dims dataclass from its JSON form (lists back to tuples)."""
    def tup(v):
        return tuple(tup(x) for x in v) if isinstance(v, list) else v
    return dims_cls(**{k: tup(v) for k, v in d.items()})


@dataclasses.dataclass
class AuthorsCheckpoint:
    """The authors' `.ckpt` split into components: tensors without their prefixes."""

    dims: ModelDims
    tensors: dict[str, dict[str, torch.Tensor]]
    path: Path | None = None


# --- reading ---------------------------------------------------------------------------------

def safe_load(path: str | os.PathLike) -> Any:
    """`torch.load(weights_only=True)` with one-line errors; never executes pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)", str(e))
        what = f"a pickled {found.group(1)}" if found else "pickled objects other than tensors"
        raise CheckpointError(
            f"{path}: refused: the file holds {what}, which could run code when loaded; "
            "a checkpoint must hold only tensors and plain values. Re-save it with only the state dict.") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None


def _read_configs(assets: str | os.PathLike | None) -> dict[str, dict]:
    configs: dict[str, dict] = {}
    if assets is None:
        return configs
    assets = Path(assets)
    if not assets.is_dir():
        raise CheckpointError(f"{assets}: the assets folder does not exist")
    for c in COMPONENTS:
        if c.config_path and (assets / c.config_path).is_file():
            try:
                configs[c.name] = json.loads((assets / c.config_path).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{assets / c.config_path}: unreadable config ({e})") from None
    return configs


def check_tensors(what: str, tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                  prefix: str = "") -> None:
    """Raise one CheckpointError naming every missing, unexpected and mis-shaped key."""
    problems = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shaped = sorted(k for k in set(expected) & set(tensors)
                    if tuple(tensors[k].shape) != tuple(expected[k].shape))

    def names(keys, fmt=lambda k: prefix + k):
        shown = ", ".join(fmt(k) for k in keys[:20])
        return shown + (f" and {len(keys) - 20} more" if len(keys) > 20 else "")

    if missing:
        problems.append(f"missing {len(missing)}: {names(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {names(unexpected)}")
    if shaped:
        problems.append("wrong shape {}: {}".format(len(shaped), names(
            shaped, lambda k: f"{prefix}{k} {tuple(tensors[k].shape)} != {tuple(expected[k].shape)}")))
    not_tensor = sorted(k for k, v in tensors.items() if not isinstance(v, torch.Tensor))
    if not_tensor:
        problems.append(f"not tensors: {names(not_tensor)}")
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems))


def split_state_dict(sd: Mapping[str, Any], what: str) -> dict[str, dict[str, Any]]:
    parts: dict[str, dict[str, Any]] = {c.name: {} for c in COMPONENTS}
    stray = []
    for key, value in sd.items():
        owner = next((c for c in COMPONENTS if c.owns(key)), None)
        if owner is None:
            stray.append(key)
        else:
            parts[owner.name][key[len(owner.prefix):]] = value
    if stray:
        shown = ", ".join(sorted(stray)[:20]) + (f" and {len(stray) - 20} more" if len(stray) > 20 else "")
        raise CheckpointError(f"{what}: unexpected {len(stray)} tensors belonging to no part of VSSFlow: {shown}")
    for name, part in parts.items():
        if not part:
            prefix = next(c.prefix or "cond_proj." for c in COMPONENTS if c.name == name)
            raise CheckpointError(f"{what}: no tensors for the {name} (keys starting {prefix!r}); "
                                  "is this the VSSFlow checkpoint?")
    return parts


def read_checkpoint(path: str | os.PathLike, assets: str | os.PathLike | None = None) -> AuthorsCheckpoint:
    """Load the authors' `.ckpt` strictly: every tensor accounted for, every shape consistent."""
    path = Path(path)
    obj = safe_load(path)
    if not isinstance(obj, Mapping) or "state_dict" not in obj or not isinstance(obj["state_dict"], Mapping):
        raise CheckpointError(f"{path}: not a Lightning checkpoint: expected a dict with a 'state_dict' entry")
    configs = _read_configs(assets)
    parts = split_state_dict(obj["state_dict"], str(path))
    dims = {}
    for c in COMPONENTS:
        d = c.dims_cls.from_state_dict(parts[c.name], configs.get(c.name))
        check_tensors(f"{path} ({c.name})", parts[c.name], c.authors_state_dict(d, device="meta"), c.prefix)
        dims[c.name] = d
    model_dims = ModelDims(**dims)
    if model_dims.audio_channels <= 0 or model_dims.audio_channels % 8:
        raise CheckpointError(f"{path}: the flow transformer takes {model_dims.flow.in_channels} channels but "
                              f"the conditions fill {model_dims.conditions.channel_dim}: inconsistent widths")
    if model_dims.flow.cross_dim != model_dims.conditions.cond_out:
        raise CheckpointError(f"{path}: cross-attention takes width {model_dims.flow.cross_dim} but the "
                              f"condition projections give {model_dims.conditions.cond_out}")
    return AuthorsCheckpoint(model_dims, parts, path)


def read_aux(component: Component, path: str | os.PathLike, unwrap: str | None = None):
    """Load a separate weight file (Synchformer, RawNet3) strictly: returns (dims, state dict, ignored),
    `ignored` the number of tensors outside `component.keep`, left out of the state dict."""
    obj = safe_load(path)
    if unwrap is not None:
        if not isinstance(obj, Mapping) or unwrap not in obj:
            raise CheckpointError(f"{path}: expected a dict with a {unwrap!r} entry ({component.name} weights)")
        obj = obj[unwrap]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict of {component.name} weights")
    kept = {k: v for k, v in obj.items() if str(k).startswith(component.keep)} if component.keep else dict(obj)
    if not kept:
        raise CheckpointError(f"{path}: no {component.keep}* tensors: not a {component.name} weight file")
    dims = component.dims_cls.from_state_dict(kept)
    expected = {k: v for k, v in component.authors_state_dict(dims, device="meta").items()
                if k.startswith(component.keep)}
    check_tensors(f"{path} ({component.name})", kept, expected)
    return dims, kept, len(obj) - len(kept)


# --- writing ---------------------------------------------------------------------------------

def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary name beside `path`, then rename: never a half-written file."""
    from vssflow.runtime.files import atomic_output
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def random_state_dict(dims: ModelDims, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for c in COMPONENTS:
        for k, v in c.authors_state_dict(getattr(dims, c.name), generator=g).items():
            sd[c.prefix + k] = v.contiguous()
    return sd


def write_checkpoint(path: str | os.PathLike, dims: ModelDims, seed: int = 0) -> None:
    """A Lightning-style `.ckpt` in the authors' exact layout, with random weights."""
    atomic_torch_save({"state_dict": random_state_dict(dims, seed), "epoch": 0, "global_step": 0,
                       "pytorch-lightning_version": "2.4.0"}, path)


def write_aux(component: Component, path: str | os.PathLike, size: str, seed: int = 0,
              wrap: str | None = None) -> None:
    g = torch.Generator().manual_seed(seed)
    sd = component.authors_state_dict(component.dims_cls.preset(size), generator=g)
    atomic_torch_save({wrap: sd} if wrap else sd, path)


def write_random_assets(folder: str | os.PathLike, size: str = "tiny", seed: int = 0) -> dict[str, Path]:
    """`model.ckpt`, `synchformer_state_dict.pth` and RawNet3 `model.pt` with random weights."""
    folder = Path(folder)
    paths = {"checkpoint": folder / "model.ckpt", "synchformer": folder / "synchformer_state_dict.pth",
             "rawnet": folder / "rawnet3_model.pt"}
    write_checkpoint(paths["checkpoint"], ModelDims.preset(size), seed)
    write_aux(SYNCHFORMER, paths["synchformer"], "full" if size == "small" else size, seed + 1)
    write_aux(RAWNET, paths["rawnet"], "full" if size == "small" else size, seed + 2, wrap="model")
    return paths


def load_weights(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], what: str,
                 prefix: str = "") -> torch.nn.Module:
    """Load the tensors `module` uses (a subset of the file's) strictly, as fp32; eval mode.

    Raises CheckpointError naming every tensor the module needs that is missing or mis-shaped.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in tensors]
    shaped = [k for k in expected if k in tensors and tuple(tensors[k].shape) != tuple(expected[k].shape)]
    if missing or shaped:
        parts = [f"missing {', '.join(prefix + k for k in missing[:10])}"
                 + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")] if missing else []
        parts += [f"wrong shape {prefix}{k} {tuple(tensors[k].shape)} != {tuple(expected[k].shape)}"
                  for k in shaped[:10]]
        raise CheckpointError(f"{what}: " + "; ".join(parts))
    module.load_state_dict({k: tensors[k].float() for k in expected}, strict=True)
    return module.eval()


def _loaded(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    return load_weights(module, tensors, type(module).__name__)


def build_modules(ckpt: AuthorsCheckpoint) -> dict[str, torch.nn.Module]:
    """The PyTorch modules of every part, built from the checked dims, weights loaded strictly."""
    from . import clip, conditions, decoder, transformer
    d, t = ckpt.dims, ckpt.tensors
    return {"flow": _loaded(transformer.FlowTransformer(d.flow), t["flow"]),
            "conditions": _loaded(conditions.ConditionProjector(d.conditions), t["conditions"]),
            "clip": _loaded(clip.ClipVisual(d.clip), t["clip"]),
            "decoder": decoder.Decoder(_loaded(decoder.VAEDecoder(d.vae), t["vae"]),
                                       _loaded(decoder.Vocoder(d.vocoder), t["vocoder"])).eval()}
