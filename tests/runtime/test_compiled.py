"""`--compile` (runtime/compiled.py): the option reaches the torch backend, and the compiled flow
step gives what the eager one gives."""

from pathlib import Path

import numpy as np
import pytest

from vssflow.runtime import compiled
from vssflow.runtime.backends import create_backend
from vssflow.runtime.errors import BackendError
from vssflow.runtime.model_folder import ModelFolder
from vssflow.runtime.session import Session


def test_compile_reaches_the_torch_backend(tiny_model):
    session = Session(tiny_model, compile=True, device="cpu")           # auto + compile: torch
    assert session.backend.name == "torch" and session.backend.compile
    assert "compiled" in session.backend.describe()
    assert not Session(tiny_model, backend="torch", device="cpu").backend.compile
    with pytest.raises(BackendError, match="compile is the torch backend's") as e:
        create_backend(ModelFolder.open(tiny_model), "ort", compile=True)
    assert e.value.exit_code == 4


def test_cli_compile_flag_reaches_the_session_settings():
    from vssflow.runtime.cli import _Model
    assert _Model(None, "auto", "cpu", "auto", False, None, True).settings()["compile"] is True
    assert _Model(None, "auto", "cpu", "auto", False).settings()["compile"] is False


def test_cache_dir_is_vssflows_unless_the_user_set_it(monkeypatch, tmp_path):
    monkeypatch.delenv(compiled.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compiled.cache_dir() == tmp_path / "vssflow" / "inductor"
    monkeypatch.setenv(compiled.CACHE_ENV, str(tmp_path / "mine"))
    assert compiled.cache_dir() == Path(tmp_path / "mine")


@pytest.mark.slow   # ~40 s on 2 cores: Inductor compiles the tiny flow step (C++ through gcc)
def test_compiled_flow_step_matches_eager(tiny_model, monkeypatch, tmp_path):
    monkeypatch.setenv(compiled.CACHE_ENV, str(tmp_path / "inductor"))
    folder = ModelFolder.open(tiny_model)
    comp, eager = create_backend(folder, "torch", "cpu", compile=True), create_backend(folder, "torch", "cpu")
    feed = folder.contracts["flow_step"].sample("opt", seed=1, B=1, T=40, T1=41)
    v = comp.velocity(feed, 3.0)
    assert set(v.startup) == {"compile"} and v.startup["compile"] > 0       # a run's timings show it
    assert any((tmp_path / "inductor").iterdir())                           # the cache a later start reads
    z = comp.arrays.upload(feed["z"])
    for t in (0.0, 0.5):
        got, ref = v(t, z).numpy(), eager.velocity(feed, 3.0)(t, z).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
