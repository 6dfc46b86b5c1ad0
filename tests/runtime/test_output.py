"""Writing results, in-process, read back with FFmpeg."""

from __future__ import annotations

import av
import numpy as np
import pytest

from tests.media import make_video
from vssflow.runtime.output import write_video_file

SR = 16000
BURST = SR // 2                 # a 1 kHz burst peaks here (0.5 s): where the sound is, in time
SIZE = (64, 48)


def sound(n: int) -> np.ndarray:
    """A quiet 440 Hz tone with a loud 1 kHz burst of 50 ms centred on sample ``BURST``."""
    t = np.arange(n) / SR
    x = 0.1 * np.sin(2 * np.pi * 440 * t)
    burst = np.arange(BURST - 400, BURST + 400)
    x[burst] += 0.7 * np.hanning(800) * np.cos(2 * np.pi * 1000 * (burst - BURST) / SR)
    return x.astype(np.float32)


def burst_at(x: np.ndarray) -> float:
    """Sample on which the burst's energy is centred (only the burst passes 0.35)."""
    loud = np.flatnonzero(np.abs(x) > 0.35)
    energy = x[loud[0]:loud[-1] + 1].astype(np.float64) ** 2
    return loud[0] + float(np.sum(np.arange(len(energy)) * energy) / np.sum(energy))


def video_packets(path) -> list[bytes]:
    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(c.streams.video[0]) if p.size]


def test_mkv_with_b_frames_keeps_every_frame(tmp_path):
    """H.264 with B-frames in Matroska: its first packets have no dts, and are copied all the same."""
    video = tmp_path / "clip.mkv"
    make_video(video, 2, 25, SIZE, bframes=2)
    with av.open(str(video)) as c:
        assert next(c.demux(video=0)).dts is None
    out = tmp_path / "out.mkv"
    write_video_file(out, video, [np.zeros(2 * SR, np.float32)], SR)
    assert video_packets(out) == video_packets(video)
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 50


@pytest.mark.parametrize("name", ["clip.mp4", "clip.mkv"])
def test_sound_starts_with_the_first_frame_of_a_late_starting_video(name, tmp_path):
    """A stream whose first frame is at 5 s (a cut from a broadcast, say): the sound starts there,
    by the timestamps a player goes by (within 2 ms: Matroska keeps whole milliseconds)."""
    video = tmp_path / name
    make_video(video, 1, 25, SIZE, start=5.0)
    out = tmp_path / f"out{video.suffix}"
    write_video_file(out, video, [sound(SR)], SR)
    with av.open(str(out)) as c:
        assert next(c.decode(video=0)).time == 5.0
    with av.open(str(out)) as c:
        frames = list(c.decode(audio=0))
    decoded = np.concatenate([f.to_ndarray()[0] for f in frames])
    assert abs(frames[0].time + burst_at(decoded) / SR - 5.0 - BURST / SR) < 2e-3
