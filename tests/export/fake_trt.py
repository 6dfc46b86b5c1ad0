"""Stand-ins for what the TensorRT path reads where there is no TensorRT, Polygraphy or GPU: a
`tensorrt` module as far as version checks read it, `polygraphy` modules as far as `trt_build`
calls them, and a model folder with a valid manifest whose graphs are a few bytes each (enough
for everything that names, hashes, lists and matches them)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import sys
import types
from pathlib import Path

from vssflow.runtime.contracts import ModelSizes, stage_contracts
from vssflow.runtime.model_folder import FORMAT_VERSION, STAMP
from vssflow.runtime.precision import FP16_STAGES, graph_name


def tensorrt(version: str, strongly_typed: bool = True) -> types.ModuleType:
    """A module that looks like the `tensorrt` bindings as far as the checks read them."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    members = {"STRONGLY_TYPED": 1} if strongly_typed else {"EXPLICIT_BATCH": 0}
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(**members)
    return trt


def polygraphy(monkeypatch, build=lambda network, config, save_timing_cache: b"engine",
               version: str = "0.53.6") -> types.SimpleNamespace:
    """Stand-in `polygraphy` modules; `build(network, config, save_timing_cache)` plays
    `engine_bytes_from_network` (`network` is `("network", onnx path)`). Returns a record of the calls."""
    calls = types.SimpleNamespace(networks=[], profiles=[], caches=[])

    class Profile(dict):
        def add(self, name, min, opt, max):
            self[name] = (min, opt, max)
            return self

    def network_from_onnx_path(path, strongly_typed=False):
        assert strongly_typed
        calls.networks.append(Path(path).name)
        return ("network", path)

    def create_config(profiles, load_timing_cache=None):
        calls.profiles += profiles
        calls.caches.append(load_timing_cache)
        return "config"

    modules = {"polygraphy": types.SimpleNamespace(__version__=version),
               "polygraphy.backend": types.ModuleType("polygraphy.backend"),
               "polygraphy.backend.trt": types.SimpleNamespace(
                   Profile=Profile, CreateConfig=create_config, network_from_onnx_path=network_from_onnx_path,
                   engine_bytes_from_network=build),
               "polygraphy.logger": types.SimpleNamespace(G_LOGGER=types.SimpleNamespace(
                   WARNING=2, verbosity=lambda level: contextlib.nullcontext()))}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return calls


def a_gpu(monkeypatch, tag: str = "nvidia-h100-80gb-hbm3-sm90") -> None:
    """As on a machine with one CUDA GPU (the driver's answers, without a driver)."""
    from vssflow.runtime import engines
    monkeypatch.setattr(engines, "cuda_problem", lambda device=0: None)
    monkeypatch.setattr(engines, "gpu_tag", lambda device=0: tag)


def model_folder(path: Path, fp16: bool = True) -> Path:
    """A model folder of the default sizes whose graphs are placeholders: opens, lists, matches."""
    path.mkdir(parents=True)
    contracts = stage_contracts(ModelSizes())
    files = {}
    for stage in contracts:
        for precision in ("fp32", "fp16") if fp16 and stage in FP16_STAGES else ("fp32",):
            data = f"{precision} graph of {stage}".encode()
            (path / graph_name(stage, precision)).write_bytes(data)
            files[graph_name(stage, precision)] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest = {"format_version": FORMAT_VERSION, "sizes": dataclasses.asdict(ModelSizes()),
                "contracts": {k: c.to_json() for k, c in contracts.items()},
                "precisions": ["fp32", "fp16"] if fp16 else ["fp32"], "files": files,
                "versions": {}, "report": {"tensorrt": {"skipped": "TensorRT is not installed"}}}
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return path


def snapshot(path: Path, stamp: bool = True) -> dict[str, bytes]:
    """Every file under `path` (hidden ones too) and its bytes: a folder 'unchanged' means equal
    snapshots. `stamp=False` leaves out the hash stamp, which opening a folder may rewrite."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and (stamp or p.name != STAMP)}
