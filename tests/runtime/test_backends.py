"""The torch backend's flow velocity: per-window and per-time work done once, the same bits as the
flow step's graph; the capture runners (`runtime/graphs.py`) through their eager fallback on the CPU."""

import numpy as np
import pytest

from vssflow.runtime.backends import Backend, create_backend
from vssflow.runtime.model_folder import ModelFolder

TIMES = (0.0, 0.25, 0.5)


def _feed(backend, seed: int, batch: int = 1):
    return backend.folder.contracts["flow_step"].sample("opt", seed=seed, B=batch, T=40, T1=41)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_torch_velocity_is_the_flow_step(tiny_model, precision):
    """Two windows through `TorchBackend.velocity` (K/V repeated once per window, time tokens kept
    across windows) equal `flow_step` run whole at every step, bit for bit."""
    backend = create_backend(ModelFolder.open(tiny_model), "torch", "cpu", precision=precision)
    for seed in (1, 2):
        feed = _feed(backend, seed)
        ours, whole = backend.velocity(feed, 3.0), Backend.velocity(backend, feed, 3.0)
        z = backend.arrays.upload(feed["z"])
        for t in TIMES:
            np.testing.assert_array_equal(backend.arrays.numpy(ours(t, z)), backend.arrays.numpy(whole(t, z)))


def test_time_tokens_and_window_kv_are_computed_once(tiny_model, monkeypatch):
    backend = create_backend(ModelFolder.open(tiny_model), "torch", "cpu")
    step = backend._flow_step()
    calls = {"time_token": 0, "window_kv": 0}
    for name in calls:
        def counted(*args, _f=getattr(step, name), _n=name):
            calls[_n] += 1
            return _f(*args)
        monkeypatch.setattr(step, name, counted)
    for seed in (1, 2):                                      # two windows, the same times
        feed = _feed(backend, seed)
        v = backend.velocity(feed, 3.0)
        for t in TIMES:
            v(t, backend.arrays.upload(feed["z"]))
    assert calls == {"time_token": len(TIMES), "window_kv": 2}
    backend.close()
    assert not backend._tokens
