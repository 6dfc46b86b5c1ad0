"""Privacy: vssflow stores nothing outside the model folder and its own cache, and opens no
network connection. Each run here is a fresh process with a fresh, empty HOME."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vssflow.benchmarks.media import make_video

# Records every attempt to resolve a name or open a connection through Python's sockets, in any
# Python process started with it on PYTHONPATH (the children of a run too).
AUDIT_HOOK = textwrap.dedent("""
    import os, sys
    _log = os.environ["VSSFLOW_TEST_NET_LOG"]
    def _hook(event, args):
        if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
                     "socket.sendto", "socket.sendmsg"):
            with open(_log, "a") as f:
                f.write(f"{event} {args!r}\\n")
    sys.addaudithook(_hook)
""")


@pytest.fixture
def fresh(tmp_path):
    """(the environment of a fresh user: an empty HOME, no XDG_CACHE_HOME, no ORT_* of theirs,
    the audit hook; the network log; HOME)"""
    home, hook = tmp_path / "home", tmp_path / "hook"
    home.mkdir()
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(AUDIT_HOOK)
    log = tmp_path / "net.log"
    env = {k: v for k, v in os.environ.items()
           if k not in ("XDG_CACHE_HOME", "VSSFLOW_HOME", "PYTHONPATH") and not k.startswith("ORT_")}
    env |= {"HOME": str(home), "PYTHONPATH": str(hook), "VSSFLOW_TEST_NET_LOG": str(log)}
    return env, log, home


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


def test_the_audit_hook_sees_a_connection(fresh, tmp_path):
    """The check below can fail: a lookup through Python's sockets is logged."""
    env, log, _ = fresh
    subprocess.run([sys.executable, "-c", "import socket\ntry: socket.getaddrinfo('localhost', 80)\nexcept OSError: pass"],
                   env=env, check=True, timeout=60)
    assert "socket.getaddrinfo ('localhost', 80" in log.read_text()


@pytest.mark.parametrize("package", ["vssflow.runtime", "vssflow.export", "vssflow.benchmarks"])
def test_onnxruntime_writes_nothing_once_any_package_of_ours_is_imported(fresh, package):
    """onnxruntime (1.29+) writes ~/.cache/Microsoft/DeveloperTools/.onnxruntime/{deviceid,
    onnxruntime.db} at import unless ORT_DISABLE_TELEMETRY is set before: each package sets it,
    so even a plain `import onnxruntime` after it writes nothing. A user's own value wins."""
    env, log, home = fresh
    code = (f"import {package}, os, onnxruntime\n"
            "print(os.environ.get('ORT_DISABLE_TELEMETRY'), os.environ.get('ORT_TELEMETRY_DISABLED'))")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _files(home) == [] and not log.exists()
    assert r.stdout.split() == ["1", "1"]
    r = subprocess.run([sys.executable, "-c", f"import {package}, os; print(os.environ['ORT_DISABLE_TELEMETRY'])"],
                       env=env | {"ORT_DISABLE_TELEMETRY": "0"}, capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["0"], r.stderr


def test_a_run_stores_nothing_outside_the_cache_and_opens_no_connection(fresh, tmp_path):
    """`vssflow-run clip.mp4 -o out.mp4` with no --model (it exports the demo model into
    ~/.cache/vssflow first), then `vssflow-export --demo --out DIR`, as a new user on a fresh
    HOME: files appear only in ~/.cache/vssflow, the model folder and the output; no name is
    looked up, no socket connects."""
    env, log, home = fresh
    work = tmp_path / "work"
    work.mkdir()
    make_video(work / "clip.mp4", 1, 25, (64, 48), audio=True)
    r = subprocess.run([sys.executable, "-m", "vssflow.runtime.cli", "clip.mp4", "-o", "out.mp4", "--steps", "1"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "vssflow.export.cli", "--demo", "--out", "model", "--backend", "onnx",
                        "--no-verify", "--precision", "fp32", "-q"], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert [f for f in _files(home) if not f.startswith(".cache/vssflow/")] == []
    assert any(f.startswith(".cache/vssflow/demo-model/") for f in _files(home))
    assert sorted({f.split("/")[0] for f in _files(work)}) == ["clip.mp4", "model", "out.mp4"]
    assert not log.exists(), log.read_text()
