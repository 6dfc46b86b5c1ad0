"""The trt backend without PyTorch, end to end against stand-ins (no TensorRT or GPU here): engines
built by `--engines-for`, matched, loaded with their I/O checked, run on the backend's own stream
with one shared scratch buffer, a window's flow constants uploaded once; and no torch imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.export import fake_trt
from vssflow.export import trt_build
from vssflow.runtime import backends, engines
from vssflow.runtime.backends import Arrays, TrtBackend, create_backend
from vssflow.runtime.errors import BackendError
from vssflow.runtime.model_folder import ModelFolder
from vssflow.runtime.solvers import solve


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """A model folder with this (stand-in) GPU's FP16 engines, and the stand-ins' record."""
    monkeypatch.setitem(sys.modules, "torch", None)                   # import torch -> ImportError
    calls = fake_trt.polygraphy(monkeypatch)
    fake_trt.a_gpu(monkeypatch)
    path = fake_trt.model_folder(tmp_path / "m")
    folder = ModelFolder.open(path)
    trt = fake_trt.tensorrt("10.3.0", contracts=folder.contracts, memory=calls.cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    trt_build.engines_for(path)
    calls.trt = trt
    return ModelFolder.open(path), calls


def test_trt_backend_runs_without_torch(gpu):
    folder, calls = gpu
    b = create_backend(folder, "trt")
    assert isinstance(b, TrtBackend) and b.precision == "fp16" and type(b.arrays) is Arrays
    assert b.frames_device is None                                    # frames from the host
    c = folder.contracts["flow_step"]
    feed = c.sample("min")
    out = b.run("flow_step", feed)["velocity"]
    np.testing.assert_allclose(out, 2 * feed["z"] + feed["keys"].sum(), rtol=1e-5)
    assert calls.cuda.device == 0 and len(calls.cuda.streams) == 1
    assert calls.trt.log.contexts[-1].streams == calls.cuda.streams    # the backend's own stream, not 0


def test_one_scratch_buffer_of_the_largest_size(gpu):
    folder, calls = gpu
    b = create_backend(folder, "trt")
    for stage in ("vocoder", "flow_step", "clip_encoder"):
        b.run(stage, folder.contracts[stage].sample("min"))
    sizes = calls.trt.log.memory_sizes
    scratch = {ctx.scratch for ctx in calls.trt.log.contexts}
    assert len(scratch) == 1                                          # every context points at one buffer
    assert scratch.pop()[1] == max(sizes[s] for s in ("vocoder", "flow_step", "clip_encoder"))


def test_encoder_calls_stay_within_the_engine_profile(gpu):
    """The encoders' engines take at most a piece's rows (`memory.engine_contract`): a whole window's
    30 segments, even asked for in one call, go in pieces no larger."""
    from vssflow.runtime.memory import engine_contract
    folder, calls = gpu
    b = create_backend(folder, "trt")
    b.pieces = {}                                                      # whole calls asked for
    rows = engine_contract(folder.contracts, "synch_encoder").axes["S"][2]
    out = b.run("synch_encoder", folder.contracts["synch_encoder"].sample("max"))
    sent = [shapes["segments"][0] for stage, shapes in calls.trt.log.executed if stage == "synch_encoder"]
    assert max(sent) == rows < 30 and sum(sent) == 30 and len(out["features"]) == 30


def test_window_constants_go_up_once(gpu):
    folder, calls = gpu
    b = create_backend(folder, "trt")
    c = folder.contracts["flow_step"]
    feed = c.sample("min")
    velocity = b.velocity({k: feed[k] for k in backends.FLOW_CONSTANTS}, 3.0)
    before = len(calls.cuda.copies)
    z1 = solve("euler", velocity, feed["z"], 4)
    per_step = [k for k, _ in calls.cuda.copies[before:]]
    assert per_step == ["h2d", "h2d", "d2h"] * 4                      # z and t up, the velocity down
    expected = feed["z"].copy()
    for _ in range(4):
        expected = expected + 0.25 * (2 * expected + feed["keys"].sum())
    np.testing.assert_allclose(z1, expected, rtol=1e-5)
    blocks = len(calls.cuda.blocks)
    del velocity
    assert len(calls.cuda.blocks) == blocks - 6                       # the window's own buffers freed
    b.close()
    assert calls.cuda.blocks == {} and calls.cuda.streams == []


def test_device_cuda_n_is_current_in_every_calling_thread(gpu, monkeypatch):
    import threading

    from vssflow.runtime import engines
    folder, calls = gpu
    monkeypatch.setattr(engines, "gpu_tag", lambda device=0: "nvidia-h100-80gb-hbm3-sm90")   # both GPUs alike
    b = create_backend(folder, "trt", "cuda:1")
    calls.cuda.device = 0                                             # another thread's current device
    t = threading.Thread(target=b.run, args=("vocoder", folder.contracts["vocoder"].sample("min")))
    t.start()
    t.join()
    assert b.device_id == 1 and calls.cuda.device == 1


def test_a_cuda_runtime_that_cannot_load_is_one_line(gpu):
    folder, calls = gpu
    calls.cuda.handle.cudaSetDevice = lambda n: 35                    # cudaErrorInsufficientDriver
    with pytest.raises(BackendError, match=r"^the CUDA runtime \(libcudart\) cannot be used through Polygraphy "
                                           r"\(CUDA Error: 35.\)"):
        TrtBackend(folder)


def test_without_polygraphy_trt_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt.tensorrt("10.3.0"))
    monkeypatch.setitem(sys.modules, "polygraphy", None)
    monkeypatch.setattr(engines, "cuda_gpu_visible", lambda: True)       # as on a machine with a CUDA GPU
    folder = ModelFolder.open(fake_trt.model_folder(tmp_path / "m"))
    with pytest.raises(BackendError, match="the trt backend is unavailable: TensorRT is installed but Polygraphy "
                                           "is not.*pip install polygraphy"):
        TrtBackend(folder)


def test_the_trt_path_imports_no_torch():
    """Engine matching, the trt backend, the engine build and the CUDA layers: none imports torch."""
    code = textwrap.dedent("""
        import sys
        from vssflow.runtime import backends, cuda_driver, cuda_memory, engines, trt_engine  # noqa: F401
        from vssflow.export import trt_build, cli  # noqa: F401
        assert "torch" not in sys.modules, sorted(m for m in sys.modules if "torch" in m)
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
