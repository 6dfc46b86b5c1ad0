"""ODE solvers for the flow `dx/dt = v(t, x)` from t=0 (noise) to t=1 (data).

Every solver is a pure function `solve(velocity, x, timesteps, callback=None, ...) -> x1` over
arrays of either numpy or torch (only arithmetic operators and a few element-wise functions
are used), so the same code drives every backend and the PyTorch reference. `velocity(t, x)`
takes a Python float `t`. `callback(info)` is called after each accepted step with a dict
holding `t`, `dt`, `nfe`, `step`, `x`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

Velocity = Callable[[float, object], object]
Callback = Callable[[dict], None]

FIXED_STEP_SOLVERS = ("euler", "midpoint", "heun", "rk4")
SOLVERS = FIXED_STEP_SOLVERS + ("dopri5",)


def uniform_timesteps(steps: int) -> np.ndarray:
    """`steps + 1` equally spaced times from 0 to 1, as `torch.linspace(0, 1, steps + 1)`."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return np.linspace(0.0, 1.0, steps + 1)


def _fixed(step: Callable, velocity: Velocity, x, timesteps: Sequence[float], callback: Callback | None,
           nfe_per_step: int):
    ts = [float(t) for t in timesteps]
    for i, (t0, t1) in enumerate(zip(ts[:-1], ts[1:])):
        x = step(velocity, x, t0, t1 - t0)
        if callback is not None:
            callback({"step": i, "t": t1, "dt": t1 - t0, "nfe": (i + 1) * nfe_per_step, "x": x})
    return x


def sample_euler(velocity: Velocity, x, timesteps: Sequence[float], callback: Callback | None = None):
    """Forward Euler."""
    return _fixed(lambda f, x, t, h: x + h * f(t, x), velocity, x, timesteps, callback, 1)


def sample_midpoint(velocity: Velocity, x, timesteps: Sequence[float], callback: Callback | None = None):
    """Explicit midpoint (RK2), as torchdiffeq's `midpoint`."""
    def step(f, x, t, h):
        return x + h * f(t + 0.5 * h, x + (0.5 * h) * f(t, x))
    return _fixed(step, velocity, x, timesteps, callback, 2)


def sample_heun(velocity: Velocity, x, timesteps: Sequence[float], callback: Callback | None = None):
    """Heun's method (explicit trapezoid, RK2)."""
    def step(f, x, t, h):
        k1 = f(t, x)
        k2 = f(t + h, x + h * k1)
        return x + (0.5 * h) * (k1 + k2)
    return _fixed(step, velocity, x, timesteps, callback, 2)


def sample_rk4(velocity: Velocity, x, timesteps: Sequence[float], callback: Callback | None = None):
    """Fourth-order Runge-Kutta, the 3/8 rule torchdiffeq's `rk4` uses."""
    def step(f, x, t, h):
        k1 = f(t, x)
        k2 = f(t + h / 3, x + (h / 3) * k1)
        k3 = f(t + 2 * h / 3, x + h * (k2 - k1 / 3))
        k4 = f(t + h, x + h * (k1 - k2 + k3))
        return x + (h * 0.125) * (k1 + 3 * (k2 + k3) + k4)
    return _fixed(step, velocity, x, timesteps, callback, 4)


# Dormand–Prince 5(4) tableau, its error weights and dense-output midpoint, as torchdiffeq.
_DP_C = (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = ((1 / 5,),
         (3 / 40, 9 / 40),
         (44 / 45, -56 / 15, 32 / 9),
         (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
         (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
         (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
_DP_E = (35 / 384 - 1951 / 21600, 0.0, 500 / 1113 - 22642 / 50085, 125 / 192 - 451 / 720,
         -2187 / 6784 + 12231 / 42400, 11 / 84 - 649 / 6300, -1 / 60)
_DP_MID = (6025192743 / 30085553152 / 2, 0.0, 51252292925 / 65400821598 / 2,
           -2691868925 / 45128329728 / 2, 187940372067 / 1594534317056 / 2,
           -1776094331 / 19743644256 / 2, 11237099 / 235043384 / 2)


def _xp(x):
    """The array module of `x` (numpy or torch), without importing torch for numpy input."""
    if isinstance(x, np.ndarray):
        return np
    import torch
    return torch


def _prev_float32(t: float) -> float:
    """The float32 just below `t`: torchdiffeq evaluates the last two stages there."""
    return float(np.nextafter(np.float32(t), np.float32(-np.inf)))


def _f32(a) -> float:
    return float(np.float32(a))


def _f32_mul(a: float, b: float) -> float:
    """a * b rounded as float32 arithmetic would (torchdiffeq keeps tableau and dt in float32)."""
    return float(np.float32(a) * np.float32(b))


def _combo(xp, x, ks, coeffs, h: float):
    """`x + sum(k * (coeffs * h), axis=-1)` over the stacked stages, as torchdiffeq reduces them."""
    n = len(coeffs)
    weights = np.asarray([_f32_mul(c, h) for c in coeffs], dtype=np.float32)
    if xp is np:
        stacked = np.stack(ks[:n], axis=-1)
        return x + (stacked * weights).sum(axis=-1)
    stacked = xp.stack(ks[:n], dim=-1)
    return x + (stacked * xp.from_numpy(weights).to(stacked.device)).sum(dim=-1)


def dopri5(velocity: Velocity, x, t_grid: Sequence[float] = tuple(np.linspace(0, 1, 11)), *,
           rtol: float = 1e-5, atol: float = 1e-5, frozen=None, callback: Callback | None = None,
           max_steps: int = 10_000):
    """Adaptive Dormand–Prince 5(4) reproducing torchdiffeq's `dopri5` step control.

    Same initial-step rule (Hairer et al. II.4), error ratio `rms(err / (atol + rtol max(|y0|,|y1|)))`,
    step-size update (safety 0.9, factors 0.2..10, order 5), dense output through the points
    of `t_grid` (the authors' grid is `linspace(0, 1, 11)`), float32 stage times with the last
    two stages one ulp below the step end, and the same float32 reductions, so on torch
    tensors it takes the very steps torchdiffeq takes. Returns the state at `t_grid[-1]`.

    `frozen`: the part of the authors' state that the flow never changes (the condition
    channels `k`, whose velocity is zero). The RMS norms are taken as if `frozen` were part of
    the state, so a state holding only the 128 audio channels takes the same steps as the
    authors' 1952-channel state.
    """
    xp = _xp(x)
    n_frozen = 0 if frozen is None else int(np.prod(frozen.shape))
    n_total = int(np.prod(x.shape)) + n_frozen

    def rms(a, frozen_sq: float = 0.0):
        """0-d float32 RMS of `a` (and the frozen part), as torchdiffeq's _rms_norm computes it."""
        if frozen is None:
            return xp.sqrt((xp.abs(a) ** 2).mean())
        total = float((a.astype(np.float64) ** 2).sum() if xp is np else a.double().pow(2).sum())
        value = math.sqrt((total + frozen_sq) / n_total)
        return np.float32(value) if xp is np else xp.tensor(value, dtype=xp.float32)

    frozen_scaled_sq = 0.0
    if frozen is not None:
        fs = frozen / (atol + rtol * xp.abs(frozen))
        frozen_scaled_sq = float((fs * fs).sum())

    nfe = 0

    def f(t: float, y):
        nonlocal nfe
        nfe += 1
        return velocity(_f32(t), y)

    ts = [float(t) for t in t_grid]
    t0 = ts[0]
    f0 = f(t0, x)

    # Initial step: torchdiffeq's _select_initial_step (order - 1 = 4), with its 0-d float32 ops.
    scale = atol + rtol * xp.abs(x)
    d0 = rms(x / scale, frozen_scaled_sq)
    d1 = rms(f0 / scale)
    h0 = 0.01 * d0 / d1 if not (d0 < 1e-5 or d1 < 1e-5) else d0 * 0 + 1e-6
    f1 = f(t0 + float(h0), x + h0 * f0)
    d2 = xp.abs(rms((f1 - f0) / scale) / h0)
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(d0 * 0 + 1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / 5)
    dt = float(min(100 * h0, h1))

    y, fy, t_start, t_end = x, f0, t0, t0
    interp = None
    step = 0
    for t_out in ts[1:]:
        while t_out > t_end:
            if step >= max_steps:
                raise RuntimeError(f"dopri5: more than {max_steps} steps")
            t_new = t_end + dt
            h = _f32(dt)
            t32 = np.float32(t_end)
            ks = [fy]
            for c, row in zip(_DP_C, _DP_A):
                yi = _combo(xp, y, ks, row, h)
                ti = _prev_float32(t_new) if c == 1.0 else float(t32 + np.float32(_f32_mul(c, h)))
                ks.append(f(ti, yi))
            y_new = yi                                   # FSAL: last row = 5th-order weights
            err = _combo(xp, 0, ks, _DP_E, h)
            tol = atol + rtol * xp.maximum(xp.abs(y), xp.abs(y_new))
            ratio = float(rms(err / tol))
            if ratio <= 1:
                y_mid = _combo(xp, y, ks, _DP_MID, h)
                interp = _fit_quartic(y, y_new, y_mid, ks[0], ks[-1], h)
                t_start, t_end = t_end, t_new
                y, fy = y_new, ks[-1]
                step += 1
                if callback is not None:
                    callback({"step": step, "t": t_end, "dt": t_end - t_start, "nfe": nfe, "x": y})
            dt = _next_step(dt, ratio)
        y_out = _eval_quartic(interp, (t_out - t_start) / (t_end - t_start)) if interp else y
    return y_out


def _next_step(dt: float, ratio: float) -> float:
    if ratio == 0:
        return dt * 10.0
    dfactor = 1.0 if ratio < 1 else 0.2
    return dt * min(10.0, max(0.9 / ratio ** (1.0 / 5), dfactor))


def _fit_quartic(y0, y1, y_mid, f0, f1, h: float):
    a = (2 * h) * (f1 - f0) - 8 * (y1 + y0) + 16 * y_mid
    b = h * (5 * f0 - 3 * f1) + 18 * y0 + 14 * y1 - 32 * y_mid
    c = h * (f1 - 4 * f0) - 11 * y0 - 5 * y1 + 16 * y_mid
    return [y0, h * f0, c, b, a]


def _eval_quartic(coeffs, s: float):
    s = float(np.float32(s))
    total = coeffs[0] + s * coeffs[1]
    power = s
    for c in coeffs[2:]:
        power = power * s
        total = total + power * c
    return total


def solve(name: str, velocity: Velocity, x, steps: int | None = None, *, callback: Callback | None = None,
          frozen=None, rtol: float = 1e-5, atol: float = 1e-5):
    """Run solver `name`: fixed-step ones over `steps` uniform steps, dopri5 on the authors' grid."""
    if name == "dopri5":
        return dopri5(velocity, x, rtol=rtol, atol=atol, frozen=frozen, callback=callback)
    fn = {"euler": sample_euler, "midpoint": sample_midpoint, "heun": sample_heun, "rk4": sample_rk4}.get(name)
    if fn is None:
        raise ValueError(f"unknown solver {name!r}: expected one of {', '.join(SOLVERS)}")
    return fn(velocity, x, uniform_timesteps(steps if steps is not None else 25), callback)
