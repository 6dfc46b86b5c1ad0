"""One `Session` shared by threads: results equal sequential calls, an abandoned stream blocks
nobody, and memory stays flat over many generations.

`VSSFLOW_SOAK_N` sets the soak's length (default 5, CI); `VSSFLOW_SOAK_REPORT=path` writes the
RSS after every generation there as JSON (for the figure in the README).
"""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest

SOAK_N = int(os.environ.get("VSSFLOW_SOAK_N", "5"))
THREAD_TIMEOUT = int(os.environ.get("VSSFLOW_THREAD_TIMEOUT", "300"))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _in_threads(jobs: dict) -> dict:
    """Run every job at once (a barrier releases them together); results or exceptions by name."""
    barrier = threading.Barrier(len(jobs))
    out: dict = {}

    def work(name, job):
        barrier.wait()
        try:
            out[name] = job()
        except BaseException as e:  # reported by the test, not lost in the thread
            out[name] = e

    threads = [threading.Thread(target=work, args=item, daemon=True) for item in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(THREAD_TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a generation hung"
    return out


def test_threads_equal_sequential_calls(session, accepted_videos, sequential_results):
    """Four videos, four seeds, four threads on one Session: each result (audio, NFE, every
    intermediate) is the one its sequential call gave; nothing of one run leaks into another."""
    jobs = {name: (lambda p=path, s=i: session.generate(p, steps=1, seed=s, keep_intermediates=True))
            for i, (name, path) in enumerate(accepted_videos.items())}
    got = _in_threads(jobs)
    for name, ref in sequential_results.items():
        r = got[name]
        assert not isinstance(r, BaseException), r
        assert np.array_equal(r.audio, ref.audio), name
        assert r.nfe == ref.nfe == 1 and r.info.duration == ref.info.duration
        assert r.intermediates.keys() == ref.intermediates.keys()
        for key in ref.intermediates:
            assert np.array_equal(r.intermediates[key], ref.intermediates[key]), (name, key)
        assert set(r.timings) == set(ref.timings)


def test_abandoned_stream_blocks_nobody(session, accepted_videos, sequential_results):
    """A consumer fails after the first chunk and keeps the half-read stream (as a logged
    traceback would); another thread's generation still completes, with the right result."""
    chunks, _ = session.stream(accepted_videos["vfr"], steps=1, seed=2)
    try:
        try:
            for _ in chunks:
                raise ConnectionResetError("client went away")
        except ConnectionResetError:
            pass
        got = _in_threads({"other": lambda: session.generate(accepted_videos["odd_size"], steps=1, seed=1)})
        assert np.array_equal(got["other"].audio, sequential_results["odd_size"].audio)
    finally:
        chunks.close()              # so that a failure here does not hang the tests after it


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_soak_memory_is_flat(session, accepted_videos, sequential_results):
    """SOAK_N generations in a loop: RSS after the last is within 64 MB of RSS after the first,
    and results do not drift. The session has already run `sequential_results`' four: the
    first generations of a process load the stages and fill allocator pools (a fresh process
    grows ~200 MB over its first four, then stays flat), which is not what this measures."""
    clip, ref = accepted_videos["odd_size"], sequential_results["odd_size"].audio
    rss = []
    for _ in range(SOAK_N):
        r = session.generate(clip, steps=1, seed=1)
        assert np.array_equal(r.audio, ref)
        del r
        rss.append(_rss_mb())
    if os.environ.get("VSSFLOW_SOAK_REPORT"):
        with open(os.environ["VSSFLOW_SOAK_REPORT"], "w") as f:
            json.dump({"n": SOAK_N, "rss_mb": [round(x, 1) for x in rss]}, f)
    assert rss[-1] - rss[0] < 64, rss
