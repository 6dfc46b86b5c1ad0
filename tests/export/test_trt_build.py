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

from tests.export import fake_trt
from vssflow.export import trt_build
from vssflow.runtime import engines
from vssflow.runtime.contracts import ModelSizes, stage_contracts

ROOT = Path(__file__).resolve().parents[2]


def test_missing_tensorrt(monkeypatch):
    monkeypatch.setattr(engines, "cuda_gpu_visible", lambda: True)       # as on a machine with a CUDA GPU
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    for ok, reason in (trt_build.support(), engines.availability()):
        assert not ok and reason.startswith("TensorRT is not installed") and "\n" not in reason


@pytest.mark.parametrize("version,flag", [("8.6.1", False), ("9.3.0", True), ("10.3.0", False)])
def test_tensorrt_without_strong_typing_is_named(monkeypatch, version, flag):
    monkeypatch.setattr(engines, "cuda_gpu_visible", lambda: True)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt.tensorrt(version, flag))
    for ok, reason in (trt_build.support(), engines.availability()):
        assert not ok and reason.startswith(f"TensorRT {version} cannot build strongly typed networks")
        assert "\n" not in reason


@pytest.mark.parametrize("version", ["10.3.0", "11.4.0.106"])
def test_tensorrt_10_and_11_are_accepted(monkeypatch, version):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt.tensorrt(version))
    assert engines.tensorrt_problem() is None
    monkeypatch.setattr(engines, "cuda_problem", lambda device=0: None)     # as on a machine with a CUDA GPU
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
    for trt in (None, fake_trt.tensorrt("8.6.1", False), fake_trt.tensorrt("11.4.0.106")):
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        for ok, reason in (trt_build.support(), engines.availability()):
            assert (ok, reason) == (False, "no CUDA GPU is visible; TensorRT engines are built and run on one")


@pytest.mark.parametrize("version,ok", [("0.49.9", False), ("0.50.2", False), ("0.50.3", True), ("0.53.6", True)])
def test_polygraphy_version(monkeypatch, version, ok):
    """0.50.3 is the first Polygraphy that guards `precision_is_set` and `int8_calibrator` (gone in TensorRT 11)."""
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt.tensorrt("11.4.0.106"))
    monkeypatch.setitem(sys.modules, "polygraphy", types.SimpleNamespace(__version__=version))
    monkeypatch.setattr(engines, "cuda_problem", lambda device=0: None)
    got, reason = trt_build.support()
    assert got == ok and (ok or "0.50.3 or later needed" in reason)


def test_gpu_extra_has_the_polygraphy_floor_the_build_checks():
    """`pip install 'vssflow[gpu]'` cannot resolve a Polygraphy that `support()` refuses."""
    import tomllib
    gpu = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert f"polygraphy>={'.'.join(map(str, trt_build.MIN_POLYGRAPHY))}" in gpu
    assert trt_build.MIN_POLYGRAPHY >= (0, 50, 3)


def _removed_in_trt11(network, config, save_timing_cache):
    raise AttributeError("'tensorrt_bindings.tensorrt.ILayer' object has no attribute 'precision_is_set'")


def test_any_build_failure_is_one_line_naming_the_stage(monkeypatch, tmp_path):
    """An old Polygraphy on TensorRT 11 raises AttributeError mid-build: exit 4 naming the stage, not a traceback."""
    from vssflow.runtime.errors import BackendError
    fake_trt.polygraphy(monkeypatch, build=_removed_in_trt11)
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
    fake_trt.polygraphy(monkeypatch, build=interrupted)
    with pytest.raises(KeyboardInterrupt):
        trt_build.engine_bytes(tmp_path / "vocoder.onnx", stage_contracts(ModelSizes())["vocoder"])


def test_missing_polygraphy(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt.tensorrt("10.3.0"))
    monkeypatch.setitem(sys.modules, "polygraphy", None)
    monkeypatch.setattr(engines, "cuda_problem", lambda device=0: None)
    ok, reason = trt_build.support()
    assert not ok and reason.startswith("Polygraphy is not installed")


def test_profile_is_the_contract_profile():
    c = stage_contracts(ModelSizes(), max_latents=250)["flow_step"]
    shapes = trt_build.profile_shapes(c)
    assert list(shapes) == ["z", "t", "cond_bias", "keys", "values", "cfg"]
    assert shapes["z"] == ((1, 128, 25), (1, 128, 250), (4, 128, 250))
    assert shapes["keys"] == ((10, 1, 12, 26, 64), (10, 1, 12, 251, 64), (10, 4, 12, 251, 64))
    assert shapes["t"] == ((1,), (1,), (1,))


def test_encoder_profiles_stop_at_the_rows_the_runtime_sends():
    """The encoders' engines take at most a piece's rows (`memory.engine_contract`), the most any
    memory plan sends, so their scratch is a piece's, not a whole window's; other stages as their
    contract says."""
    from vssflow.runtime.memory import DEFAULT_ACTIVATIONS, engine_contract, piece_rows
    contracts = stage_contracts(ModelSizes(), max_latents=250)
    rows = piece_rows(contracts, DEFAULT_ACTIVATIONS)
    synch = trt_build.profile_shapes(engine_contract(contracts, "synch_encoder"))
    assert rows["synch_encoder"] < 30 and synch["segments"][2][0] == rows["synch_encoder"]
    assert synch["segments"][0] == trt_build.profile_shapes(contracts["synch_encoder"])["segments"][0]
    clip = trt_build.profile_shapes(engine_contract(contracts, "clip_encoder"))
    assert clip["frames"][2][0] == rows["clip_encoder"]
    assert engine_contract(contracts, "flow_step") is contracts["flow_step"]
    assert engines.profile_key(engine_contract(contracts, "synch_encoder")) != engines.profile_key(
        contracts["synch_encoder"])                                     # engines built before are told apart
    assert all(piece_rows(contracts, a)[s] <= rows[s] for a in (1 << 20, DEFAULT_ACTIVATIONS // 2, DEFAULT_ACTIVATIONS)
               for s in rows)                                            # no plan sends more


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


# --- vssflow-export --engines-for: a folder's own graphs -> this GPU's engines, in place ----------

def test_gpu_tag_comes_from_the_cuda_driver(monkeypatch):
    """Torch-free, and the same tag torch's device name gave (engines named before keep matching)."""
    from vssflow.runtime import cuda_driver
    monkeypatch.setattr(cuda_driver, "device", lambda n=0: cuda_driver.Device(n, "NVIDIA H100 80GB HBM3", 9, 0))
    monkeypatch.setitem(sys.modules, "torch", None)
    assert engines.gpu_tag() == "nvidia-h100-80gb-hbm3-sm90"
    monkeypatch.setattr(cuda_driver, "device", lambda n=0: cuda_driver.Device(n, "Orin", 8, 7))
    assert engines.gpu_tag() == "orin-sm87"


def test_device_ordinal():
    from vssflow.runtime import cuda_driver
    from vssflow.runtime.errors import BackendError
    assert [cuda_driver.ordinal(d) for d in (None, "cuda", "cuda:0", "cuda:3")] == [0, 0, 0, 3]
    with pytest.raises(BackendError, match="expected cuda or cuda:N"):
        cuda_driver.ordinal("cuda:x")


def test_building_needs_no_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt.tensorrt("10.3.0"))
    monkeypatch.setitem(sys.modules, "torch", None)
    fake_trt.polygraphy(monkeypatch)
    fake_trt.a_gpu(monkeypatch)
    assert trt_build.support() == (True, "")


def test_engines_for_builds_lists_and_matches(monkeypatch, tmp_path):
    """Every stage's engine from the folder's own graphs, recorded in its manifest, found by the runtime."""
    from vssflow.export.cli import memory_lines
    from vssflow.runtime.model_folder import ModelFolder
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt.tensorrt("10.3.0", contracts=stage_contracts(ModelSizes())))
    monkeypatch.setitem(sys.modules, "torch", None)
    calls = fake_trt.polygraphy(monkeypatch, build=lambda network, config, save_timing_cache:
                                b"engine of " + Path(network[1]).name.encode())
    fake_trt.a_gpu(monkeypatch)
    path = fake_trt.model_folder(tmp_path / "m")
    report = trt_build.engines_for(path)                       # fp16: the folder has FP16 graphs
    folder = ModelFolder.open(path, verify_hashes=True)        # every file listed, of its size and hash
    assert set(report) == set(folder.contracts)
    assert report["flow_step"]["onnx"] == "flow_step.fp16.onnx" and report["speaker_encoder"]["precision"] == "fp32"
    assert calls.caches == [None] * len(report)                # the folder's timing cache is another GPU's
    found = engines.match_engines(folder, "nvidia-h100-80gb-hbm3-sm90", "10.3.0", "fp16")
    assert found == {k: v["engine"] for k, v in report.items()}
    assert (path / found["vocoder"]).read_bytes() == b"engine of vocoder.fp16.onnx"
    # each engine's bytes and scratch (read back from the built engine) recorded: the GPU budget printed
    assert report["vocoder"]["bytes"] == len(b"engine of vocoder.fp16.onnx")
    assert report["flow_step"]["scratch_bytes"] == 1000 * (1 + len("flow_step"))
    gpu = [line for line in memory_lines(folder.manifest) if line.startswith("GPU memory, TensorRT engines:")]
    assert len(gpu) == 1 and "shared scratch 16 KiB" in gpu[0]            # speaker_encoder's, the largest
    assert folder.manifest["report"]["tensorrt"] == report and folder.manifest["versions"]["tensorrt"] == "10.3.0"
    assert not [p for p in path.iterdir() if p.name.startswith(".engines.")]
    again = trt_build.engines_for(path)                        # nothing to do: the same names are listed
    assert again == {} and ModelFolder.open(path).manifest["report"]["tensorrt"] == report


def test_engines_for_fp32(monkeypatch, tmp_path):
    from vssflow.runtime.model_folder import ModelFolder
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt.tensorrt("11.4.0.106"))
    fake_trt.polygraphy(monkeypatch)
    fake_trt.a_gpu(monkeypatch, "orin-sm87")
    path = fake_trt.model_folder(tmp_path / "m")
    report = trt_build.engines_for(path, "fp32")
    assert {v["onnx"] for v in report.values()} == {f"{k}.onnx" for k in report}
    engines.match_engines(ModelFolder.open(path), "orin-sm87", "11.4.0.106", "fp32")


def test_engines_for_a_failed_stage_leaves_the_folder_as_it_was(monkeypatch, tmp_path):
    from vssflow.runtime.errors import BackendError
    from vssflow.runtime.model_folder import ModelFolder
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt.tensorrt("11.4.0.106"))

    def build(network, config, save_timing_cache):
        if Path(network[1]).name.startswith("vae_decoder"):
            _removed_in_trt11(network, config, save_timing_cache)
        return b"engine"
    fake_trt.polygraphy(monkeypatch, build=build)
    fake_trt.a_gpu(monkeypatch)
    path = fake_trt.model_folder(tmp_path / "m")
    ModelFolder.open(path)
    before = fake_trt.snapshot(path, stamp=False)
    with pytest.raises(BackendError, match=r"^vae_decoder: TensorRT could not build an engine from vae_decoder"):
        trt_build.engines_for(path)
    assert fake_trt.snapshot(path, stamp=False) == before


def test_engines_for_without_tensorrt_changes_nothing(monkeypatch, tmp_path):
    from vssflow.runtime.errors import BackendError
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(engines, "cuda_gpu_visible", lambda: True)       # as on a machine with a CUDA GPU
    path = fake_trt.model_folder(tmp_path / "m")
    before = fake_trt.snapshot(path)
    with pytest.raises(BackendError, match="^cannot build TensorRT engines here: TensorRT is not installed"):
        trt_build.engines_for(path)
    assert fake_trt.snapshot(path) == before


@pytest.mark.parametrize("version", ["8.5.2.2", "8.6.2.3"])            # JetPack 5.1.x, JetPack 6.0
def test_a_jetpack_without_tensorrt_10_is_told_which_jetpack(monkeypatch, version):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt.tensorrt(version, strongly_typed=version.startswith("8.6")))
    reason = engines.tensorrt_problem()
    assert reason.startswith(f"TensorRT {version} cannot build strongly typed networks") and "\n" not in reason
    assert "JetPack 6.1 or later, which ships 10.3" in reason
