"""The progress line: items done of total, the current item's stage, an ETA from measured progress."""

import io

from vssflow.runtime.progress import BatchProgress, clock


class Clock:
    """Time that moves only when the test says."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _window(bar, t, item, window, *, steps, step_s, encoders_s=1.0, decode_s=0.5):
    """One window's events as generate_many reports them: encoders, `steps` steps, VAE and vocoder;
    (time, ETA) after each."""
    etas = []
    t.t += encoders_s
    bar.event({"item": item, "kind": "stage", "window": window, "stage": "encoders", "seconds": encoders_s})
    etas.append((t.t, bar.eta()))
    for s in range(steps):
        t.t += step_s
        bar.event({"item": item, "kind": "step", "window": window, "step": s, "t": s / steps, "nfe": s + 1})
        etas.append((t.t, bar.eta()))
    for stage in ("vae_decoder", "vocoder"):
        t.t += decode_s / 2
        bar.event({"item": item, "kind": "stage", "window": window, "stage": stage, "seconds": decode_s / 2})
        etas.append((t.t, bar.eta()))
    return etas


def test_progress_line_says_done_current_stage_and_eta():
    out, t = io.StringIO(), Clock()
    bar = BatchProgress(["a.mp4", "bad.mp4", "c.mp4"], [0, 2], out, steps=25, every=0, now=t)
    bar.row({"index": 1, "status": "failed"})                      # refused before it ran
    bar.event({"item": 0, "kind": "step", "window": 0, "step": 11, "t": 0.48, "nfe": 12})
    assert bar.line() == "[1/3] a.mp4: flow_step 12/25 (window 1) · 0 ok, 0 skipped, 1 failed"   # none timed yet
    t.t += 0.4
    bar.event({"item": 0, "kind": "step", "window": 0, "step": 12, "t": 0.52, "nfe": 13})
    # 12 steps left of a.mp4, 25 of c.mp4 (as many windows as a.mp4 so far), 0.4 s each: 14.8 s
    assert bar.line() == "[1/3] a.mp4: flow_step 13/25 (window 1) · 0 ok, 0 skipped, 1 failed · ETA 0:15"
    bar.row({"index": 0, "status": "ok"})
    bar.event({"item": 1, "kind": "stage", "window": 0, "stage": "vae_decoder", "seconds": 0.1})
    assert bar.line().startswith("[2/3] c.mp4: vae_decoder (window 1) · 1 ok, 0 skipped, 1 failed · ETA ")
    bar.close()
    assert out.getvalue().endswith("\r") and "\n" not in out.getvalue()
    assert clock(42) == "0:42" and clock(3725) == "1:02:05"


def test_eta_falls_while_an_item_runs_and_ends_near_the_time_taken():
    """Three items of two windows, steps of 0.2 s: the ETA never rises but when news comes (the
    first item's second window, a stage first seen), and each estimate is within a window's
    stages of the time that was actually left."""
    t = Clock()
    bar = BatchProgress(["a", "b", "c"], [0, 1, 2], io.StringIO(), steps=10, every=0, now=t)
    seen = []                                                      # (time, eta)
    for item in range(3):
        for window in range(2):
            seen += _window(bar, t, item, window, steps=10, step_s=0.2)
        bar.row({"index": item, "status": "ok"})
    end = t.t
    timed = [(at, eta) for at, eta in seen if eta is not None]
    assert timed and timed[-1][1] == 0
    after_first_item = [(at, eta) for at, eta in timed if at > end / 3]
    assert all(later <= earlier + 1e-9 for (_, earlier), (_, later) in zip(after_first_item, after_first_item[1:]))
    assert all(abs(eta - (end - at)) <= 1.5 for at, eta in after_first_item)


def test_a_short_single_run_shows_seconds_not_minutes():
    """A 6-second run (3 s of encoders, then steps of 0.1 s): the ETA says seconds from the start."""
    t = Clock()
    bar = BatchProgress(["clip.mp4"], [0], io.StringIO(), steps=25, windows=[1], every=0, now=t)
    etas = [eta for _, eta in _window(bar, t, None, 0, steps=25, step_s=0.1, encoders_s=3.0) if eta is not None]
    assert etas and max(etas) < 3.0
    assert bar.line().startswith("clip.mp4: vocoder (window 1/1)")


def test_a_note_is_drawn_at_once_before_any_event():
    """--ray: the line shows what the run does from the start, not only once an item is done."""
    out = io.StringIO()
    bar = BatchProgress(["a.mp4", "b.mp4"], [0, 1], out, steps=25, every=60)
    bar.note("starting Ray")
    assert out.getvalue() == "\r[0/2] starting Ray · 0 ok, 0 skipped, 0 failed"
