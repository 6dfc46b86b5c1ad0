"""TensorRT through Polygraphy (export/trt_build.py): what can be checked without TensorRT.

Building an engine needs TensorRT and a GPU (`trt` marker); here, with a stand-in `tensorrt`
module: the one-line reasons given where TensorRT cannot build strongly typed networks (one
place for that fact: `runtime.engines`, read by the trt backend and the exporter), the
optimization profile, the names, and that no removed TensorRT API is left in the tree.
"""

import ast
import sys
import types
from pathlib import Path

import pytest

from vssflow.export import trt_build
from vssflow.runtime import engines
from vssflow.runtime.contracts import ModelSizes, stage_contracts

ROOT = Path(__file__).resolve().parents[2]


def _tensorrt(version: str, strongly_typed: bool = True) -> types.ModuleType:
    """A module that looks like the `tensorrt` bindings as far as the checks read them."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    members = {"STRONGLY_TYPED": 1} if strongly_typed else {"EXPLICIT_BATCH": 0}
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(**members)
    return trt


def test_missing_tensorrt(monkeypatch):
    monkeypatch.setattr(engines, "cuda_gpu_visible", lambda: True)       # as on a machine with a CUDA GPU
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    for ok, reason in (trt_build.support(), engines.availability()):
        assert not ok and reason.startswith("TensorRT is not installed") and "\n" not in reason


@pytest.mark.parametrize("version,flag", [("8.6.1", False), ("9.3.0", True), ("10.3.0", False)])
def test_tensorrt_without_strong_typing_is_named(monkeypatch, version, flag):
    monkeypatch.setattr(engines, "cuda_gpu_visible", lambda: True)
    monkeypatch.setitem(sys.modules, "tensorrt", _tensorrt(version, flag))
    for ok, reason in (trt_build.support(), engines.availability()):
        assert not ok and reason.startswith(f"TensorRT {version} cannot build strongly typed networks")
        assert "\n" not in reason


@pytest.mark.parametrize("version", ["10.3.0", "11.4.0.106"])
def test_tensorrt_10_and_11_are_accepted(monkeypatch, version):
    monkeypatch.setitem(sys.modules, "tensorrt", _tensorrt(version))
    assert engines.tensorrt_problem() is None
    monkeypatch.setattr(engines, "availability", lambda: (True, ""))     # as on a machine with a CUDA GPU
    ok, reason = trt_build.support()
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        assert not ok and reason.startswith("Polygraphy is not installed")
    else:
        assert ok and reason == ""


def test_without_a_gpu_that_is_the_one_reason(monkeypatch):
    """No CUDA GPU: TensorRT is no option, and nothing advises installing it (nor Polygraphy)."""
    monkeypatch.setattr(engines, "cuda_gpu_visible", lambda: False)
    for trt in (None, _tensorrt("8.6.1", False), _tensorrt("11.4.0.106")):
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        for ok, reason in (trt_build.support(), engines.availability()):
            assert (ok, reason) == (False, "no CUDA GPU is visible; TensorRT engines are built and run on one")


@pytest.mark.parametrize("version,ok", [("0.49.8", False), ("0.49.9", True), ("0.50.1", True)])
def test_polygraphy_version(monkeypatch, version, ok):
    monkeypatch.setitem(sys.modules, "tensorrt", _tensorrt("11.4.0.106"))
    monkeypatch.setitem(sys.modules, "polygraphy", types.SimpleNamespace(__version__=version))
    monkeypatch.setattr(engines, "availability", lambda: (True, ""))
    got, reason = trt_build.support()
    assert got == ok and (ok or "0.49.9 or later needed" in reason)


def test_missing_polygraphy(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", _tensorrt("10.3.0"))
    monkeypatch.setitem(sys.modules, "polygraphy", None)
    monkeypatch.setattr(engines, "availability", lambda: (True, ""))
    ok, reason = trt_build.support()
    assert not ok and reason.startswith("Polygraphy is not installed")


def test_profile_is_the_contract_profile():
    c = stage_contracts(ModelSizes(), max_latents=250)["flow_step"]
    shapes = trt_build.profile_shapes(c)
    assert list(shapes) == ["z", "t", "cond_bias", "keys", "values", "cfg"]
    assert shapes["z"] == ((1, 128, 25), (1, 128, 250), (4, 128, 250))
    assert shapes["keys"] == ((10, 1, 12, 26, 64), (10, 1, 12, 251, 64), (10, 4, 12, 251, 64))
    assert shapes["t"] == ((1,), (1,), (1,))


def test_no_engines_without_tensorrt(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    report = trt_build.build_engines(tmp_path, stage_contracts(ModelSizes()), "fp16")
    assert "skipped" in report and list(tmp_path.iterdir()) == []


# The weak-typing switches and the build calls TensorRT 11 removed (NVIDIA's 10.x -> 11.x migration guide), as attribute names.
REMOVED = {"FP16", "BF16", "INT8", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS", "set_output_type",
           "build_engine", "build_cuda_engine", "max_workspace_size", "EXPLICIT_BATCH", "create_network"}


def test_no_removed_tensorrt_api_in_the_tree():
    """Engines are built through Polygraphy only: no code of the package uses a removed API
    (docstrings may name them, to say why not)."""
    used = []
    package = ROOT / "src" / "vssflow"
    for folder in ("export", "runtime", "kernels", "benchmarks"):
        assert (package / folder).is_dir(), folder
        for path in (package / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr in REMOVED:
                    used.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
    assert used == []
    assert "network_from_onnx_path" in (package / "export" / "trt_build.py").read_text()
