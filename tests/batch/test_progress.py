"""The batch's progress line: items done of total, the current item's stage, an ETA."""

import io

from vssflow.runtime.progress import BatchProgress, clock


def test_progress_line_says_done_current_stage_and_eta():
    out = io.StringIO()
    bar = BatchProgress(["a.mp4", "bad.mp4", "c.mp4"], [0, 2], out, steps=25, every=0)
    bar.row({"index": 1, "status": "failed"})                      # refused before it ran
    bar.event({"item": 0, "kind": "step", "window": 0, "step": 11, "t": 0.48, "nfe": 12})
    assert bar.line().startswith("[1/3] a.mp4: flow_step 12/25 (window 1) · 0 ok, 0 skipped, 1 failed")
    bar.row({"index": 0, "status": "ok"})
    bar.event({"item": 1, "kind": "stage", "window": 0, "stage": "vae_decoder", "seconds": 0.1})
    assert bar.line().startswith("[2/3] c.mp4: vae_decoder (window 1) · 1 ok, 0 skipped, 1 failed · ETA ")
    bar.close()
    assert out.getvalue().endswith("\r") and "\n" not in out.getvalue()
    assert clock(42) == "0:42" and clock(3725) == "1:02:05"
