"""Hostile inputs, generated: broken, odd and extreme videos, transcripts and reference voices.

Every builder writes into a folder given by the caller and returns the path; all are small
(64x48 frames, a few seconds) except `video_8k`, which holds two 7680x4320 frames.
"""

from __future__ import annotations

import struct
from pathlib import Path

import av
import numpy as np
import soundfile as sf
from PIL import Image

from vssflow.benchmarks.media import draw_frame, make_video, make_wav

SIZE = (64, 48)


def mp4_boxes(data: bytes) -> dict[str, tuple[int, int]]:
    """Top-level MP4 boxes: type -> (offset, size)."""
    boxes, i = {}, 0
    while i + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[i:i + 8])
        boxes[kind.decode("latin-1")] = (i, size)
        if size < 8:
            break
        i += size
    return boxes


def faststart_video(path: Path, seconds: float, size=SIZE) -> Path:
    """An MP4 with its index (moov) before the frames, as web videos are written."""
    with av.open(str(path), "w", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "12"}
        for i in range(int(round(seconds * 25))):
            frame = av.VideoFrame.from_ndarray(draw_frame(i, *size), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def good_video(folder: Path, seconds: float = 4, name: str = "good.mp4") -> Path:
    path = folder / name
    make_video(path, seconds, 25, SIZE)
    return path


def truncated(source: Path, fraction: float, out: Path) -> Path:
    """The first `fraction` of `source`'s bytes (a download or copy cut short)."""
    data = source.read_bytes()
    out.write_bytes(data[:int(len(data) * fraction)])
    return out


def corrupt_mdat(source: Path, out: Path, n_bytes: int, seed: int = 0) -> Path:
    """`source` with `n_bytes` random bytes written over the middle of its frame data (mdat)."""
    data = bytearray(source.read_bytes())
    offset, size = mp4_boxes(bytes(data))["mdat"]
    middle = offset + size // 2
    data[middle:middle + n_bytes] = np.random.default_rng(seed).bytes(n_bytes)
    out.write_bytes(bytes(data))
    return out


def image(folder: Path, fmt: str, name: str | None = None) -> Path:
    """A photo: random pixels saved as PNG or JPEG (`name` may give it a video's extension)."""
    path = folder / (name or f"photo.{fmt}")
    pixels = np.random.default_rng(0).integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format={"png": "PNG", "jpg": "JPEG"}[fmt])
    return path


def audio_only(folder: Path) -> Path:
    """An M4A-like MP4 holding only an AAC track."""
    path = folder / "song.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        t = np.arange(16000) / 16000
        frame = av.AudioFrame.from_ndarray((0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None],
                                           format="flt", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return path


def video_8k(folder: Path) -> Path:
    """Two 7680x4320 frames (0.08 s): ~100 MB per decoded RGB frame."""
    path = folder / "8k.mp4"
    make_video(path, 2 / 25, 25, (7680, 4320))
    return path


# --- reference voices -------------------------------------------------------------------------

def silent_wav(folder: Path) -> Path:
    path = folder / "silent.wav"
    sf.write(path, np.zeros(16000), 16000, subtype="PCM_16")
    return path


def short_wav(folder: Path) -> Path:
    path = folder / "short.wav"
    make_wav(path, 0.1, 16000, 1)
    return path


def multichannel_96k(folder: Path) -> Path:
    path = folder / "six_channels_96k.wav"
    make_wav(path, 1.0, 96000, 6)
    return path


def corrupt_wavs(folder: Path) -> dict[str, Path]:
    """Files named .wav that no reader accepts: random bytes, a header cut short, nothing."""
    good = folder / "voice.wav"
    make_wav(good, 0.5, 16000, 1)
    files = {"random": (folder / "random.wav", np.random.default_rng(3).bytes(3000)),
             "header_cut": (folder / "header_cut.wav", good.read_bytes()[:30]),
             "empty": (folder / "empty.wav", b"")}
    for path, content in files.values():
        path.write_bytes(content)
    return {k: p for k, (p, _) in files.items()}
