"""`vssflow-serve --ray`: the same application through Ray Serve (a local instance on 127.0.0.1):
the same answers, the same auth and errors, and SIGTERM ends it with exit 0."""

import json
import signal
import socket
import subprocess
import sys

import pytest

from tests.serve.test_server import AUTH, TOKEN, Server, post, stream

pytest.importorskip("ray.serve")


def free_port() -> int:
    # Ray Serve's proxy takes a port number, not 0: one free a moment ago
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def test_ray_serve_answers_as_one_process(tiny_model, clip4, tmp_path):
    (tmp_path / "token").write_text(TOKEN)
    cli = subprocess.run([sys.executable, "-m", "vssflow.runtime.cli", clip4, "--model", tiny_model, "--seed", "3",
                          "--steps", "1", "-o", tmp_path / "x.wav", "-q"], cwd=tmp_path, capture_output=True,
                         timeout=300)
    assert cli.returncode == 0, cli.stderr
    server = Server(["--model", tiny_model, "--ray", "--port", free_port(), "--token-file", tmp_path / "token",
                     "--max-seconds", 5], env=None, cwd=tmp_path)
    try:
        assert any("through Ray Serve, 1 replica (on CPUs)" in line for line in server.lines), server.lines
        video = {"video": ("clip4.mp4", clip4.read_bytes())}
        status, headers, body = post(server, video, {"format": "wav", "seed": "3", "steps": "1"})
        assert status == 200 and headers["X-NFE"] == "1" and body == (tmp_path / "x.wav").read_bytes()
        assert post(server, video, {}, headers={})[0] == 401
        status, _, body = post(server, {"video": ("clip.mp4", b"not a video " * 100)}, {})
        assert status == 422 and json.loads(body)["exit_code"] == 10
        status, _, pieces = stream(server, video, {"seed": "3", "steps": "1"}, headers=AUTH)
        assert status == 200 and b"".join(pieces)[44:] == body_samples(tmp_path / "x.wav")
    finally:
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=300) == 0, "\n".join(server.lines)
    assert server.lines[-1].endswith("stopped")


def body_samples(wav) -> bytes:
    import numpy as np
    import soundfile as sf
    samples, _ = sf.read(wav, dtype="float32")
    return np.ascontiguousarray(samples, dtype="<f4").tobytes()


def test_ray_options_without_ray_are_refused(tiny_model, tmp_path):
    r = subprocess.run([sys.executable, "-m", "vssflow.serve.cli", "--model", str(tiny_model), "--replicas", "2"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "vssflow-serve: error: --ray-address and --replicas go with --ray"
