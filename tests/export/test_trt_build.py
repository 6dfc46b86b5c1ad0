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
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    for ok, reason in (trt_build.support(), engines.availability()):
        assert not ok and reason.startswith("TensorRT is not installed") and "\n" not in reason


@pytest.mark.parametrize("version,flag", [("8.6.1", False), ("9.3.0", True), ("10.3.0", False)])
def test_tensorrt_without_strong_typing_is_named(monkeypatch, version, flag):
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


@pytest.mark.parametrize("version,ok", [("0.49.9", False), ("0.50.2", False), ("0.50.3", True), ("0.53.6", True)])
def test_polygraphy_version(monkeypatch, version, ok):
    """0.50.3 is the first Polygraphy that guards `precision_is_set` and `int8_calibrator` (gone in TensorRT 11)."""
    monkeypatch.setitem(sys.modules, "tensorrt", _tensorrt("11.4.0.106"))
    monkeypatch.setitem(sys.modules, "polygraphy", types.SimpleNamespace(__version__=version))
    monkeypatch.setattr(engines, "availability", lambda: (True, ""))
    got, reason = trt_build.support()
    assert got == ok and (ok or "0.50.3 or later needed" in reason)


def test_gpu_extra_has_the_polygraphy_floor_the_build_checks():
    """`pip install 'vssflow[gpu]'` cannot resolve a Polygraphy that `support()` refuses."""
    import tomllib
    gpu = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert f"polygraphy>={'.'.join(map(str, trt_build.MIN_POLYGRAPHY))}" in gpu
    assert trt_build.MIN_POLYGRAPHY >= (0, 50, 3)


def polygraphy(monkeypatch, build=lambda network, config, save_timing_cache: b"engine",
               version: str = "0.53.6") -> types.SimpleNamespace:
    """Stand-in `polygraphy` modules, as far as `trt_build` calls them; `build` plays
    `engine_bytes_from_network`. Returns a record of the calls."""
    import contextlib
    calls = types.SimpleNamespace(networks=[], profiles=[])

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


def _removed_in_trt11(network, config, save_timing_cache):
    raise AttributeError("'tensorrt_bindings.tensorrt.ILayer' object has no attribute 'precision_is_set'")


def test_any_build_failure_is_one_line_naming_the_stage(monkeypatch, tmp_path):
    """An old Polygraphy on TensorRT 11 raises AttributeError mid-build: exit 4 naming the stage, not a traceback."""
    from vssflow.runtime.errors import BackendError
    polygraphy(monkeypatch, build=_removed_in_trt11)
    c = stage_contracts(ModelSizes())["flow_step"]
    (tmp_path / "flow_step.fp16.onnx").write_bytes(b"graph")
    with pytest.raises(BackendError) as e:
        trt_build.engine_bytes(tmp_path / "flow_step.fp16.onnx", c)
    assert e.value.exit_code == 4 and "\n" not in str(e.value)
    assert str(e.value).startswith("flow_step: TensorRT could not build an engine from flow_step.fp16.onnx")
    assert "AttributeError" in str(e.value) and "precision_is_set" in str(e.value)


def test_an_interrupt_during_a_build_stays_an_interrupt(monkeypatch, tmp_path):
    def interrupted(network, config, save_timing_cache):
        raise KeyboardInterrupt
    polygraphy(monkeypatch, build=interrupted)
    with pytest.raises(KeyboardInterrupt):
        trt_build.engine_bytes(tmp_path / "vocoder.onnx", stage_contracts(ModelSizes())["vocoder"])


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
