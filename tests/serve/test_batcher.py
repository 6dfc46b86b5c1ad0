"""The model thread of `/v1/generate` (`serve/batcher.py`): requests waiting together run as one batch,
each gets the result it would get alone, and a bad one fails alone."""

import threading
from pathlib import Path

import numpy as np

from vssflow.runtime.inputs import GenerateOptions
from vssflow.runtime.session import Session
from vssflow.serve.batcher import Batcher, RequestCancelled, batch_key
from vssflow.serve.form import Job


def job(video, **options) -> Job:
    return Job(Path(video), None, GenerateOptions(steps=1, **options), "wav", "keep")


class HeldFirst:
    """The session, its first `generate_many` held until `release` is set (so that the next jobs wait)."""

    def __init__(self, session):
        self.session, self.started, self.release, self.calls = session, threading.Event(), threading.Event(), []

    def generate_many(self, items, options, batch, progress=None):
        self.calls.append((len(items), batch))
        if len(self.calls) == 1:
            self.started.set()
            self.release.wait(timeout=300)
        return self.session.generate_many(items, options, batch=batch, progress=progress)


def test_waiting_requests_run_together_and_each_gets_its_own_result(tiny_model, clip4, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video " * 100)
    with Session(tiny_model, backend="ort", device="cpu") as session:
        held = HeldFirst(session)
        batcher = Batcher(held, batch=4)
        try:
            first = batcher.submit(job(clip4, seed=1))
            assert held.started.wait(timeout=300)                   # the model is busy with the first ...
            waiting = [batcher.submit(job(clip4, seed=2)), batcher.submit(job(clip4, seed=3, transcript="hello")),
                       batcher.submit(job(bad, seed=4)), batcher.submit(job(clip4, seed=5, cfg=1.0))]
            held.release.set()                                      # ... and the others wait together
            results = [f.exception(timeout=300) or f.result() for f in [first, *waiting]]
        finally:
            batcher.close()
        # solver/steps/cfg are shared by a batch: the cfg=1.0 request runs in a group of its own
        assert held.calls == [(1, 1), (3, 3), (1, 1)] and batcher.batches == [1, 3, 1]
        assert "bad.mp4" in str(results[3]) and getattr(results[3], "exit_code", None) == 10
        for r, options in zip([results[i] for i in (0, 1, 2, 4)],
                              [dict(seed=1), dict(seed=2), dict(seed=3, transcript="hello"), dict(seed=5, cfg=1.0)]):
            alone = session.generate(clip4, steps=1, **options)
            assert r.options == alone.options and np.array_equal(r.audio, alone.audio), options


def test_batch_key_is_what_an_item_cannot_set():
    a = GenerateOptions(transcript="hi", speech_start=1.0, speech_end=2.0, seed=3, steps=5)
    assert batch_key(a) == batch_key(GenerateOptions(seed=9, steps=5)) != batch_key(GenerateOptions(steps=6))


def test_cancelled_requests_are_dropped_or_stopped(tiny_model, clip4):
    """Cancelled while waiting: never run. Cancelled while running: its group stops at the next step."""
    with Session(tiny_model, backend="ort", device="cpu") as session:
        held = HeldFirst(session)
        batcher = Batcher(held, batch=4)
        try:
            stop = threading.Event()
            first = batcher.submit(job(clip4, seed=1), stop)
            assert held.started.wait(timeout=300)
            dropped = threading.Event()
            waiting = batcher.submit(job(clip4, seed=2), dropped)
            dropped.set()
            stop.set()                                      # the held run's only request is cancelled
            held.release.set()
            assert isinstance(first.exception(timeout=300), RequestCancelled)
            assert isinstance(waiting.exception(timeout=300), RequestCancelled)
            assert held.calls == [(1, 1)]                   # the dropped one never reached the model
            assert batcher.submit(job(clip4, seed=3)).result(timeout=300).audio.size   # and the next one runs
        finally:
            batcher.close()


def test_a_cancelled_stream_stops_at_its_next_step(tiny_model, clip12):
    """`/v1/stream`'s chunks (`app._Stream`): once cancelled, the run stops before its second window."""
    import pytest

    from vssflow.serve.app import _Stream
    with Session(tiny_model, backend="ort", device="cpu") as session:
        stream = _Stream()
        stream.chunks, _ = session.stream(clip12, steps=2, progress=stream.check)
        assert stream.next().result(timeout=300) is not None
        stream.cancel.set()
        with pytest.raises(RequestCancelled):
            while stream.next().result(timeout=300) is not None:
                pass
        stream.close().result(timeout=300)
        assert stream.chunks.nfe < session.generate(clip12, steps=2).nfe
