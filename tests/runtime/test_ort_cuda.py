"""The ort backend on CUDA, with a stand-in `onnxruntime` (no GPU here): which provider a session
really got, what is asked of the CUDA provider, when torch tensors are bound, and what crosses
per step without torch."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from tests.export import fake_trt
from vssflow.runtime import backends
from vssflow.runtime.backends import Arrays, OrtBackend, TorchArrays
from vssflow.runtime.errors import BackendError
from vssflow.runtime.model_folder import ModelFolder
from vssflow.runtime.solvers import solve


def fake_onnxruntime(monkeypatch, cuda_loads: bool) -> types.SimpleNamespace:
    """`onnxruntime-gpu` as far as the backend calls it: CUDA always listed as available (as the real
    one does even where its libraries are missing), in a session's own providers only if `cuda_loads`.
    A flow_step session's velocity is 2 z + keys.sum(); the record of calls is returned."""
    log = types.SimpleNamespace(sessions=[], preloaded=0, uploads=[], runs=0, bound=[])

    class OrtValue:
        def __init__(self, a):
            self.a = a

        @classmethod
        def ortvalue_from_numpy(cls, a, device_type="cpu", device_id=0):
            log.uploads.append((a.shape, device_type, device_id))
            return cls(a.copy())

    class Binding:
        def __init__(self):
            self.inputs = {}

        def bind_ortvalue_input(self, name, value):
            log.bound.append(name)
            self.inputs[name] = value.a

        def bind_cpu_input(self, name, a):
            log.bound.append(name)
            self.inputs[name] = a

        def bind_output(self, name, device_type="cpu", device_id=0, *rest):
            assert device_type == "cpu"

        def copy_outputs_to_cpu(self):
            return [self.out]

    class InferenceSession:
        def __init__(self, path, options, providers):
            log.sessions.append((path.rsplit("/", 1)[-1], providers))
            self.providers = [p if isinstance(p, str) else p[0] for p in providers]
            if not cuda_loads:
                self.providers = [p for p in self.providers if p != "CUDAExecutionProvider"]

        def get_providers(self):
            return self.providers

        def io_binding(self):
            return Binding()

        def run_with_iobinding(self, binding):
            log.runs += 1
            i = binding.inputs
            binding.out = (2 * i["z"] + i["keys"].sum()).astype(np.float32)

    ort = types.SimpleNamespace(
        get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
        disable_telemetry_events=lambda: None, SessionOptions=types.SimpleNamespace,
        InferenceSession=InferenceSession, OrtValue=OrtValue)

    def preload_dlls():
        assert not log.sessions, "preload_dlls must run before the first CUDA session"
        log.preloaded += 1
    ort.preload_dlls = preload_dlls
    monkeypatch.setitem(sys.modules, "onnxruntime", ort)
    monkeypatch.setattr(OrtBackend, "_preloaded", False)
    return log


@pytest.fixture
def folder(tmp_path):
    return ModelFolder.open(fake_trt.model_folder(tmp_path / "m"))


def test_cuda_provider_that_did_not_load_falls_back_under_auto(monkeypatch, folder):
    log = fake_onnxruntime(monkeypatch, cuda_loads=False)
    b = OrtBackend(folder)
    assert b.providers == ["CPUExecutionProvider"] and not b.on_gpu and b.precision == "fp32"
    assert type(b.arrays) is Arrays
    assert len(b.notes) == 1 and b.notes[0].startswith("ONNX Runtime's CUDA provider did not load")
    assert "the ort backend runs on the CPU" in b.notes[0] and "\n" not in b.notes[0]
    assert log.preloaded == 1


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_provider_that_did_not_load_is_an_error_when_asked_for(monkeypatch, folder, device):
    fake_onnxruntime(monkeypatch, cuda_loads=False)
    with pytest.raises(BackendError, match=f"^device {device} asked for, but ONNX Runtime's CUDA provider did "
                                           "not load") as e:
        OrtBackend(folder, device)
    assert e.value.exit_code == 4


def test_cuda_provider_options(monkeypatch, folder):
    """device_id from cuda:N, HEURISTIC convolution search; a CPU build of torch binds no tensors."""
    log = fake_onnxruntime(monkeypatch, cuda_loads=True)
    b = OrtBackend(folder, "cuda:1")
    assert b.on_gpu and b.precision == "fp16" and b.notes == ()
    assert type(b.arrays) is Arrays and not isinstance(b.arrays, TorchArrays)  # torch here has no CUDA
    name, options = log.sessions[0][1][0]
    assert name == "CUDAExecutionProvider"
    assert options == {"device_id": "1", "cudnn_conv_algo_search": "HEURISTIC"}   # no torch stream to share
    b._stage("vocoder")
    assert log.sessions[-1][0] == "vocoder.fp16.onnx" and log.preloaded == 1


def test_without_torch_constants_are_uploaded_once_per_window(monkeypatch, folder):
    log = fake_onnxruntime(monkeypatch, cuda_loads=True)
    monkeypatch.setitem(sys.modules, "torch", None)
    b = OrtBackend(folder, "cuda")
    c = folder.contracts["flow_step"]
    feed = c.sample("min")
    cond = {k: feed[k] for k in backends.FLOW_CONSTANTS}
    velocity = b.velocity(cond, 3.0)
    assert sorted(shape for shape, *_ in log.uploads) == sorted(cond[k].shape for k in backends.FLOW_CONSTANTS)
    assert {(d, i) for _, d, i in log.uploads} == {("cuda", 0)}
    z1 = solve("euler", velocity, feed["z"], 4)
    assert log.runs == 4 and len(log.uploads) == 3                         # nothing uploaded again
    assert log.bound.count("keys") == 1 and log.bound.count("z") == 4
    expected = feed["z"].copy()
    for _ in range(4):
        expected = expected + 0.25 * (2 * expected + feed["keys"].sum())
    np.testing.assert_allclose(z1, expected, rtol=1e-5)
