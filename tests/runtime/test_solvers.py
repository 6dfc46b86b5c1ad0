"""Solvers against torchdiffeq (the authors' sampler) and against each other."""

import numpy as np
import pytest
import torch

from vssflow.runtime import solvers

torchdiffeq = pytest.importorskip("torchdiffeq")

GRID = torch.linspace(0, 1, 11)


def _field(seed: int = 0, n: int = 12, frozen: int = 4, dtype=torch.float32):
    """A nonlinear, time-dependent vector field whose last `frozen` channels have zero velocity."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(n, n, generator=g) / np.sqrt(n)).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)

    def v(t, x):
        t = torch.as_tensor(t, dtype=x.dtype)
        out = torch.tanh(x @ a.T + b * torch.cos(3 * t)) * (1 + t) - 0.5 * x
        out[..., n - frozen:] = 0
        return out
    return v


def _torchdiffeq_run(v, x0, **kw):
    """torchdiffeq's dopri5 exactly as flow_matching's ODESolver calls it; counts evaluations and steps."""
    nfe, accepted = [0], []

    class F(torch.nn.Module):
        def forward(self, t, x):
            nfe[0] += 1
            return v(t, x)

        def callback_accept_step(self, t0, y0, dt):
            accepted.append(float(t0 + dt))

    out = torchdiffeq.odeint(F(), x0, GRID, method="dopri5", atol=1e-5, rtol=1e-5, **kw)
    return out[-1], nfe[0], accepted


def _ours(v, x0, **kw):
    nfe, accepted = [0], []

    def counted(t, x):
        nfe[0] += 1
        return v(t, x)
    out = solvers.dopri5(counted, x0, GRID.tolist(), callback=lambda i: accepted.append(i["t"]), **kw)
    return out, nfe[0], accepted


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dopri5_matches_torchdiffeq(seed):
    v = _field(seed)
    x0 = torch.randn(2, 12, generator=torch.Generator().manual_seed(10 + seed))
    ref, ref_nfe, ref_steps = _torchdiffeq_run(v, x0)
    ours, nfe, steps = _ours(v, x0)
    assert nfe == ref_nfe and len(steps) == len(ref_steps)
    assert np.allclose(steps, ref_steps, rtol=0, atol=1e-9)
    assert (ours - ref).abs().max() <= 1e-5


def test_dopri5_on_numpy_arrays_matches_torch():
    v = _field(3)
    x0 = torch.randn(2, 12, generator=torch.Generator().manual_seed(4))
    ref = solvers.dopri5(v, x0)
    ours = solvers.dopri5(lambda t, x: v(t, torch.from_numpy(x)).numpy(), x0.numpy())
    assert isinstance(ours, np.ndarray) and np.abs(ours - ref.numpy()).max() <= 1e-5


def test_dopri5_frozen_channels_take_the_same_steps():
    """Integrating only the moving channels, with the frozen ones counted in the norms, is exact.

    In float64: in float32 the first step's error estimate is rounding noise (ratio ~1e-5), which a
    CPU's vector width changes for a state of 8 channels against one of 12 (FMA in the vector body,
    not in the scalar tail: 40% apart on an AVX-512 machine), and every later step follows it."""
    n, k = 12, 4
    v = _field(5, n, k, torch.float64)
    x0 = torch.randn(2, n, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 3
    full, full_nfe, full_steps = _ours(v, x0)
    frozen = x0[:, n - k:]
    part, nfe, steps = _ours(lambda t, x: v(t, torch.cat([x, frozen], dim=-1))[:, : n - k],
                             x0[:, : n - k], frozen=frozen)
    assert nfe == full_nfe and np.allclose(steps, full_steps, rtol=1e-9)
    assert (part - full[:, : n - k]).abs().max() <= 1e-9
    # Without the frozen channels in the norm the step control differs: the option matters.
    _, nfe_wrong, _ = _ours(lambda t, x: v(t, torch.cat([x, frozen], dim=-1))[:, : n - k], x0[:, : n - k])
    assert nfe_wrong != full_nfe


@pytest.mark.parametrize("name,method", [("euler", "euler"), ("midpoint", "midpoint"), ("rk4", "rk4")])
def test_fixed_step_solvers_match_torchdiffeq(name, method):
    v = _field(7)
    x0 = torch.randn(3, 12, generator=torch.Generator().manual_seed(8))
    ts = solvers.uniform_timesteps(8)
    ref = torchdiffeq.odeint(lambda t, x: v(t, x), x0, torch.tensor(ts, dtype=torch.float32), method=method)[-1]
    ours = solvers.solve(name, v, x0, 8)
    assert (ours - ref).abs().max() <= 1e-5


def test_solvers_converge_to_dopri5():
    v = _field(9)
    x0 = torch.randn(2, 12, generator=torch.Generator().manual_seed(9))
    ref = solvers.dopri5(v, x0, rtol=1e-8, atol=1e-8)
    errors = {}
    for name in solvers.FIXED_STEP_SOLVERS:
        e8 = (solvers.solve(name, v, x0, 8) - ref).abs().max()
        e32 = (solvers.solve(name, v, x0, 32) - ref).abs().max()
        assert e32 < e8
        errors[name] = e32
    assert errors["rk4"] < errors["heun"] < errors["euler"]
    assert errors["midpoint"] < errors["euler"]


def test_callback_and_nfe_counts():
    v = _field(0)
    x0 = torch.zeros(1, 12)
    seen = []
    solvers.solve("heun", v, x0, 5, callback=seen.append)
    assert [s["nfe"] for s in seen] == [2, 4, 6, 8, 10] and seen[-1]["t"] == 1.0


def test_bad_solver_and_steps():
    with pytest.raises(ValueError, match="unknown solver"):
        solvers.solve("rk45", lambda t, x: x, torch.zeros(1), 4)
    with pytest.raises(ValueError, match="steps"):
        solvers.uniform_timesteps(0)
