"""The runtime runs without torch; a plain (non-editable) install gives the imports and scripts."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

def blocking(*modules: str) -> str:
    """Python code that makes `modules` (and their submodules) fail to import, as if not installed."""
    return textwrap.dedent(f"""
        import sys
        class _Blocked:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {modules!r}:
                    raise ImportError(name + " is blocked in this test")
        sys.meta_path.insert(0, _Blocked())
    """)


BLOCK_TORCH = blocking("torch")
# As on a machine with a CUDA GPU (without one, that is the only reason given, TensorRT unnamed).
GPU_VISIBLE = "from vssflow.runtime import engines\nengines.cuda_gpu_visible = lambda: True\n"


def run_blocked(blocked: tuple[str, ...], tool: str, *args, cwd, env=None, prelude: str = "") -> subprocess.CompletedProcess:
    """`tool` (a CLI module) with `blocked` modules missing."""
    code = blocking(*blocked) + prelude + f"sys.argv = [{tool!r}, *{list(map(str, args))!r}]\n" \
        + f"import runpy; runpy.run_module({tool!r}, run_name='__main__')\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={**os.environ, **(env or {})})


def test_runtime_is_the_base_of_the_package_graph(tiny_model, clip4, tmp_path):
    """export, kernels and serve build on the runtime, never the other way: importing every runtime
    module, and a whole ONNX Runtime generation, load no module of vssflow.export, vssflow.kernels or
    vssflow.serve (nor Starlette)."""
    code = textwrap.dedent(f"""
        import pkgutil, sys
        import vssflow.runtime
        for m in pkgutil.iter_modules(vssflow.runtime.__path__):
            __import__("vssflow.runtime." + m.name)
        from vssflow.runtime import Session
        Session({str(tiny_model)!r}, backend="ort").generate({str(clip4)!r}, steps=1)
        upward = sorted(m for m in sys.modules
                        if m.startswith(("vssflow.export", "vssflow.kernels", "vssflow.serve", "starlette")))
        assert not upward, upward
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_runtime_generates_without_torch(tiny_model, clip4, tmp_path):
    code = BLOCK_TORCH + textwrap.dedent(f"""
        import numpy as np
        from vssflow.runtime import Session
        from vssflow.runtime import cli, backends, solvers, text, video, audio  # noqa: F401
        r = Session({str(tiny_model)!r}, backend="ort").generate({str(clip4)!r}, steps=1)
        assert r.audio.shape == (64000,) and np.isfinite(r.audio).all()
        assert "torch" not in sys.modules
        try:
            Session({str(tiny_model)!r}, backend="torch")
        except Exception as e:
            assert "pip install" in str(e), e
        else:
            raise AssertionError("torch backend without torch")
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


@pytest.mark.slow
def test_plain_install_has_packages_data_and_scripts(tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                        "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (target / "vssflow" / "runtime" / "data" / "token_list.json").is_file()
    assert not (target / "vssflow" / "__init__.py").exists()          # an implicit namespace package
    for script in ("vssflow-run", "vssflow-export", "vssflow-serve"):
        assert (target / "bin" / script).is_file()
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import vssflow.export, vssflow.runtime, vssflow.kernels, vssflow.benchmarks, vssflow.serve, "
            "vssflow.runtime.text as t;"
            "assert str(vssflow.runtime.__file__).startswith(%r); print(len(t.token_table()))" % str(target))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "70", r.stderr[-2000:]


def test_auto_backend_with_tensorrt_but_without_polygraphy_falls_back_to_ort(tiny_model, clip4, tmp_path):
    """A Jetson's system TensorRT without Polygraphy (the trt backend's CUDA layer), and no PyTorch:
    `--backend auto` runs on ONNX Runtime and says why."""
    fake = tmp_path / "fake" / "tensorrt"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "10.3.0"\n'
                                      'class NetworkDefinitionCreationFlag:\n    STRONGLY_TYPED = 1\n')
    code = blocking("torch", "polygraphy") + textwrap.dedent(f"""
        sys.path.insert(0, {str(tmp_path / "fake")!r})
        sys.argv = ["vssflow-run", {str(clip4)!r}, "--model", {str(tiny_model)!r}, "-o", "out.wav", "--steps", "1"]
        from vssflow.runtime import cli, engines
        engines.cuda_gpu_visible = lambda: True          # a Jetson has its GPU
        cli.main()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "backend auto: the trt backend is unavailable: TensorRT is installed but Polygraphy is not" in r.stderr
    assert "backend ort" in r.stderr and (tmp_path / "out.wav").is_file()


@pytest.mark.parametrize("version,needle", [("8.6.1", "TensorRT 8.6.1 cannot build strongly typed networks"),
                                            ("10.3.0", "TensorRT is installed but Polygraphy is not")])
def test_tensorrt_availability_names_what_is_missing(monkeypatch, version, needle):
    import types

    from vssflow.runtime import engines
    flags = types.SimpleNamespace(STRONGLY_TYPED=1)
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=version,
                                                                       NetworkDefinitionCreationFlag=flags))
    monkeypatch.setitem(sys.modules, "torch", None)                   # import torch -> ImportError
    monkeypatch.setitem(sys.modules, "polygraphy", None)
    monkeypatch.setattr(engines, "cuda_gpu_visible", lambda: True)    # as on a machine with a CUDA GPU
    ok, reason = engines.availability()
    assert not ok and reason.startswith(needle), reason


@pytest.mark.parametrize("blocked,args,needle", [
    (("torch",), ["--demo", "--out", "m"], "vssflow-export needs the export extra: pip install 'vssflow[export]' "
                                           "(missing: torch)"),
    (("onnx", "onnxscript"), ["--demo", "--out", "m"], "(missing: onnx, onnxscript)"),
    (("onnxruntime",), ["--demo", "--out", "m"], "checking each graph with ONNX Runtime (or pass --no-verify) "
                                                 "needs the cpu extra: pip install 'vssflow[cpu]'"),
], ids=["torch", "onnx", "onnxruntime"])
def test_export_without_its_packages_says_which_extra(tmp_path, blocked, args, needle):
    r = run_blocked(blocked, "vssflow.export.cli", *args, cwd=tmp_path)
    assert r.returncode == 4 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [f"vssflow-export: error: {r.stderr.split('error: ', 1)[1].strip()}"]
    assert needle in r.stderr and not (tmp_path / "m").exists()


def test_run_without_model_or_export_extra_says_which_extra(clip4, tmp_path):
    """No --model: the demo model would be exported, which needs torch; say so in one line."""
    r = run_blocked(("torch",), "vssflow.runtime.cli", clip4, "-o", tmp_path / "out.wav", cwd=tmp_path,
                    env={"VSSFLOW_HOME": str(tmp_path / "home")})
    assert r.returncode == 4 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip() == ("vssflow-run: error: no --model given, and exporting the demo model needs the "
                                "export extra: pip install 'vssflow[export]' (missing: torch)")
    assert not (tmp_path / "out.wav").exists()


def test_engines_for_without_tensorrt_or_torch_changes_nothing(tmp_path):
    """`vssflow-export --engines-for` in a venv with the cpu extra only: one line naming TensorRT,
    exit 4, the folder byte for byte as it was (nothing opened, stamped or staged)."""
    from tests.export import fake_trt
    folder = fake_trt.model_folder(tmp_path / "m")
    before = fake_trt.snapshot(folder)
    r = run_blocked(("torch", "tensorrt", "polygraphy"), "vssflow.export.cli", "--engines-for", folder, cwd=tmp_path,
                    prelude=GPU_VISIBLE)
    assert r.returncode == 4 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        "vssflow-export: error: cannot build TensorRT engines here: TensorRT is not installed: `pip install "
        "tensorrt` (x86-64), or on a Jetson use the one JetPack ships; ONNX files were written and run on ONNX Runtime"]
    assert fake_trt.snapshot(folder) == before


def test_engines_for_takes_no_checkpoint(tmp_path):
    r = run_blocked(("torch",), "vssflow.export.cli", "--engines-for", tmp_path, "--demo", cwd=tmp_path)
    assert r.returncode == 2 and "--engines-for builds engines from the folder's own graphs" in r.stderr
