"""window.sample's bookkeeping: what a velocity paid to start (compile, capture) and each step's time."""

import threading

import numpy as np

from vssflow.runtime import window
from vssflow.runtime.backends import Arrays


class _Velocity:
    startup = {"capture": 0.25}

    def __call__(self, t, z):
        return -z


class _Backend:
    arrays, lock = Arrays(), threading.RLock()

    def velocity(self, cond, cfg):
        return _Velocity()


def test_sample_records_startup_and_every_step_on_the_host():
    run = window.Run.new()
    cond = {"channels": np.zeros((1, 4, 10), np.float32)}
    z = window.sample(_Backend(), run, cond, np.ones((128, 10), np.float32), steps=3)
    np.testing.assert_allclose(z, np.full((1, 128, 10), (2 / 3) ** 3, np.float32), rtol=1e-6)
    assert run.nfe == 3 and run.timings["flow_step"] > 0 and run.timings["capture"] == 0.25


def test_step_clock_uses_the_host_clock_without_cuda():
    clock, run = window.StepClock(Arrays()), window.Run.new()
    assert not clock.cuda
    clock.stop(clock.start(), run)
    clock.flush(run)
    assert run.nfe == 1 and not clock.pending
