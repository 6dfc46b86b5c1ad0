"""Session.generate_many: one result or error per item, in order, each equal to a single run."""

from __future__ import annotations

import numpy as np
import pytest

from tests.batch.conftest import STEPS
from vssflow.runtime import video
from vssflow.runtime.batch import Item
from vssflow.runtime.errors import VideoError
from vssflow.runtime.features import Encoders
from vssflow.runtime.session import Session
from vssflow.runtime.window import Run, encode


@pytest.mark.parametrize("batch", [1, 4])
def test_results_in_order_equal_single_runs(ort_session, clips, clip12, singles, batch):
    """Windows of several clips (and both windows of a 12-s clip) share calls at batch 4;
    a broken file is its own error; every result equals `generate` within 1e-5."""
    items = [clips / "a.mp4", clips / "broken.mp4", Item(clips / "sub" / "b.mp4", seed=7), clip12,
             clips / "sub" / "b.mp4"]
    events = []
    outs = list(ort_session.generate_many(items, steps=STEPS, batch=batch, workers=2, progress=events.append))
    assert len(outs) == 5 and isinstance(outs[1], VideoError) and "broken.mp4" in str(outs[1])
    for out, name in zip(outs[::2] + outs[4:], ("a", "b7", "b")):
        ref = singles[name]
        assert out.audio.shape == ref.audio.shape and out.nfe == ref.nfe
        assert np.abs(out.audio - ref.audio).max() <= 1e-5
    assert outs[3].nfe == singles["long"].nfe == 2 * STEPS
    assert np.abs(outs[3].audio - singles["long"].audio).max() <= 1e-5
    assert outs[2].options.seed == 7 and outs[0].options.seed == 0
    assert {e["item"] for e in events if e["kind"] == "step"} == {0, 2, 3, 4}


def test_batch_at_one_is_bit_identical(ort_session, clips, singles):
    out = next(ort_session.generate_many([clips / "a.mp4"], steps=STEPS, batch=1))
    assert np.array_equal(out.audio, singles["a"].audio)


def test_the_vocoder_stops_where_the_clips_end(ort_session, clips, clip12):
    """A batch vocodes no more of a window than its clips keep, as a single run does: a 3-s and a 4-s
    clip together take the 4-s clip's chunks; the 12-s clip's first window is vocoded whole."""
    def vocoder_calls(events):
        return sum(e["kind"] == "stage" and e["stage"] == "vocoder" for e in events)
    alone = {}
    for name, path in (("a", clips / "a.mp4"), ("long", clip12)):
        events = []
        ort_session.generate(path, steps=STEPS, progress=events.append)
        alone[name] = vocoder_calls(events)
    events = []
    outs = list(ort_session.generate_many([clips / "sub" / "b.mp4", clips / "a.mp4"], steps=STEPS, batch=2,
                                          progress=events.append))
    assert vocoder_calls([e for e in events if e["item"] == 1]) == alone["a"] < 8   # 10 s: 8 chunks
    events = []
    list(ort_session.generate_many([clip12], steps=STEPS, batch=1, progress=events.append))
    assert vocoder_calls(events) == alone["long"]
    assert all(not isinstance(o, Exception) for o in outs)


def test_clips_up_to_ten_seconds_are_one_window_in_a_batch(ort_session, tmp_path):
    """9.52 s and 10.0 s are one window in a batch as in a single run (`steps` evaluations, a
    one-window noise accepted); one frame past 10 s is two; each result equals its single run."""
    from vssflow.benchmarks.media import make_video
    noise = np.random.default_rng(5).standard_normal((1, 128, 250), dtype=np.float32)
    items, windows = [], []
    for seconds, n in ((9.52, 1), (10.0, 1), (10.04, 2)):
        make_video(tmp_path / f"{seconds:g}.mp4", seconds, 25, (96, 64))
        items.append(Item(tmp_path / f"{seconds:g}.mp4", noise=noise if n == 1 else None))
        windows.append(n)
    outs = list(ort_session.generate_many(items, steps=STEPS, batch=4))
    for item, out, n in zip(items, outs, windows):
        assert not isinstance(out, Exception), out
        single = ort_session.generate(item.video, steps=STEPS, noise=item.noise)
        assert out.nfe == single.nfe == n * STEPS
        assert out.audio.shape == single.audio.shape and np.abs(out.audio - single.audio).max() <= 1e-5


def test_bad_batch_size_and_options_are_refused(ort_session, clips):
    with pytest.raises(Exception, match="batch must be between 1 and 4"):
        list(ort_session.generate_many([clips / "a.mp4"], batch=5))
    out = list(ort_session.generate_many([clips / "a.mp4"], steps=0))
    assert "steps must be between" in str(out[0])          # a bad option is each item's error


def test_the_queue_holds_at_most_capacity_windows(ort_session, clips, clip12):
    """However many items, the workers keep at most `capacity` windows ahead of the model
    (plus one of the item the model waits for), and hand everything over in item order."""
    from vssflow.runtime.batch import _Prefetch
    items = [Item(p) for p in [clip12, clips / "a.mp4"] * 4]
    prefetch = _Prefetch(ort_session, items, None, {"steps": 1}, lambda k: Run(), workers=2, capacity=2)
    order, peak = [], 0
    try:
        for event in prefetch:
            peak = max(peak, prefetch._buffered)
            order.append((event.item, event.kind))
    finally:
        prefetch.close()
    assert peak <= 3
    assert order[:4] == [(0, "ready"), (0, "window"), (0, "window"), (0, "end")]
    assert [k for k, kind in order if kind == "end"] == list(range(8))


def test_padding_is_encoded_once_and_exactly(tiny_model, clips):
    """A 4-s clip pads 60 of 100 CLIP frames and 17 of 30 Synchformer segments: with the Session's
    encoders the padding is encoded once, and the features equal encoding every frame."""
    session = Session(tiny_model, backend="ort")
    w = next(video.windows(clips / "a.mp4", hop=9.0))
    plain = encode(session.backend, Run(), w)
    encoders = Encoders()
    runs = []
    for _ in range(2):
        run = Run()
        deduped = encoders.encode(session.backend, run, [w])[0]
        runs.append(run)
        for a, b in zip(plain, deduped):
            assert np.abs(a - b).max() <= 1e-5
    assert w.clip_count == 40 and encoders.clip.misses == 41          # 40 frames and one black frame
    assert encoders.synch.misses == 30 - 17 + 1                        # real segments and one of padding
    assert runs[1].timings == {"clip_encoder": 0.0, "synch_encoder": 0.0}  # the second time: all cached
