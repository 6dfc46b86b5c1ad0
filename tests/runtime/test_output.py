"""Writing results, in-process, read back with FFmpeg."""

from __future__ import annotations

import av
import numpy as np

from tests.media import make_video
from vssflow.runtime.output import write_video_file

SR = 16000
SIZE = (64, 48)


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
