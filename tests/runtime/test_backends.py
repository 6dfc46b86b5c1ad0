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


# --- the capture runners, through their eager fallback ---------------------------------------------

def test_runner_eager_fallback_gives_the_same_bits(tiny_model):
    """The torch velocity through its runner (static buffers, eager on the CPU) equals the flow
    step called directly; a second window of the same shape reuses the runner with its own
    constants loaded; outputs are copies (a kept velocity does not change with the next call)."""
    backend = create_backend(ModelFolder.open(tiny_model), "torch", "cpu")
    assert not backend.cuda_graphs
    kept = []
    for seed in (1, 2):
        feed = _feed(backend, seed)
        v, whole = backend.velocity(feed, 3.0), Backend.velocity(backend, feed, 3.0)
        assert v.startup == {}                                  # nothing captured or compiled on the CPU
        z = backend.arrays.upload(feed["z"])
        first = v(0.25, z)
        kept.append((first.clone(), first))
        v(0.5, z)                                               # the next call: `first` must not change
        np.testing.assert_array_equal(first.numpy(), whole(0.25, z).numpy())
    assert len(backend.runners) == 1
    for copy, returned in kept:
        assert np.array_equal(copy.numpy(), returned.numpy())


def test_runner_cache_by_shape(tiny_model):
    """A new shape (batch, length) makes a new runner, never reuses another's; the count is
    bounded (least recent dropped, deactivated); close() empties it."""
    from vssflow.runtime.graphs import CapturedRunner, RunnerCache
    backend = create_backend(ModelFolder.open(tiny_model), "torch", "cpu")
    c = backend.folder.contracts["flow_step"]
    for batch, length in ((1, 40), (2, 40), (1, 30), (1, 40)):
        feed = c.sample("opt", seed=1, B=batch, T=length, T1=length + 1)
        out = backend.velocity(feed, 3.0)(0.5, backend.arrays.upload(feed["z"]))
        assert tuple(out.shape) == (batch, 128, length)
    assert len(backend.runners) == 3
    backend.close()
    assert len(backend.runners) == 0

    import torch
    cache, made = RunnerCache(max_runners=2), []

    def make(n):
        made.append(CapturedRunner(lambda x: x * n, [torch.ones(n)], [], capture=False))
        return made[-1]
    for n in (1, 2, 3, 1):
        runner, new = cache.get(("s", n), lambda: make(n))
        assert torch.equal(runner.infer(torch.full((n,), 2.0)), torch.full((n,), 2.0 * n))
    assert [k[1] for k in cache.keys()] == [3, 1] and len(made) == 4
    assert not made[0].active and not made[1].active           # dropped ones freed their buffers
    cache.close()
    assert len(cache) == 0 and not any(r.active for r in made)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_captured_flow_step_replays_what_eager_gives(tiny_model, precision):
    """On CUDA: the flow step captured once and replayed for every step and window equals the
    same backend run eagerly (no graphs), within rounding of the fused kernels' launch order."""
    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    folder = ModelFolder.open(tiny_model)
    graphs = create_backend(folder, "torch", "cuda", precision=precision)
    eager = type(graphs)(folder, "cuda", precision, cuda_graphs=False)
    assert graphs.cuda_graphs
    for seed in (1, 2):
        feed = _feed(graphs, seed)
        vg, ve = graphs.velocity(feed, 3.0), eager.velocity(feed, 3.0)
        assert ("capture" in vg.startup) == (seed == 1) and vg.runner.graph is not None
        z = graphs.arrays.upload(feed["z"])
        outs = [vg(t, z) for t in TIMES]                       # kept: each a copy, not the buffer
        for t, got in zip(TIMES, outs):
            torch.testing.assert_close(got, ve(t, z), rtol=1e-3, atol=1e-3)
    graphs.close()
    assert len(graphs.runners) == 0
