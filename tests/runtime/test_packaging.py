"""The runtime runs without torch; a plain (non-editable) install gives the imports and scripts."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

BLOCK_TORCH = textwrap.dedent("""
    import sys
    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
    sys.meta_path.insert(0, _NoTorch())
""")


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
    for script in ("vssflow-run", "vssflow-export"):
        assert (target / "bin" / script).is_file()
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import vssflow.export, vssflow.runtime, vssflow.kernels, vssflow.benchmarks, vssflow.runtime.text as t;"
            "assert str(vssflow.runtime.__file__).startswith(%r); print(len(t.token_table()))" % str(target))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "70", r.stderr[-2000:]


def test_auto_backend_with_tensorrt_but_without_torch_falls_back_to_ort(tiny_model, clip4, tmp_path):
    """A Jetson's system TensorRT with no PyTorch: `--backend auto` runs on ONNX Runtime and says why."""
    fake = tmp_path / "fake" / "tensorrt"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "10.3.0"\n')
    code = BLOCK_TORCH + textwrap.dedent(f"""
        sys.path.insert(0, {str(tmp_path / "fake")!r})
        sys.argv = ["vssflow-run", {str(clip4)!r}, "--model", {str(tiny_model)!r}, "-o", "out.wav", "--steps", "1"]
        from vssflow.runtime import cli
        cli.main()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "backend auto: the trt backend is unavailable: TensorRT is installed but PyTorch is not" in r.stderr
    assert "backend ort" in r.stderr and (tmp_path / "out.wav").is_file()


@pytest.mark.parametrize("version,needle", [("8.6.1", "TensorRT 8.6.1 is too old"),
                                            ("10.3.0", "TensorRT is installed but PyTorch is not")])
def test_tensorrt_availability_names_what_is_missing(monkeypatch, version, needle):
    import types

    from vssflow.runtime import engines
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=version))
    monkeypatch.setitem(sys.modules, "torch", None)                   # import torch -> ImportError
    ok, reason = engines.availability()
    assert not ok and reason.startswith(needle), reason
