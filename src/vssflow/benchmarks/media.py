"""Synthetic media for the demo, the benchmarks and the tests: videos whose frames say which frame
they are, and plain tones. The one video writer of the project.

Every video frame carries its own decode index as a bar code: a row of square cells through the
centre of the picture, a white guard cell, ``INDEX_BITS`` cells (white for a 1 bit, black for a
0, most significant bit first) and a black guard cell; the guards set the reading threshold.
The cells sit inside the central square of the frame, so they survive the Synchformer centre
crop, and are large enough to survive lossy coding and resizing to 224. A square moving across
the top of the frame and a colour ramp make the rest of the picture non-trivial.
``read_index`` reads the code back from a decoded, resized or cropped frame.
"""

from __future__ import annotations

import functools
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import av
import numpy as np

INDEX_BITS = 11                     # frames 0..2047
_BAND = (0.12, 0.88)                # horizontal extent of the code inside the central square


def code_cells(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) pixel box of each cell: white guard, bits (MSB first), black guard."""
    side = min(width, height)
    n = INDEX_BITS + 2
    left = (width - side) / 2 + side * _BAND[0]
    cell = side * (_BAND[1] - _BAND[0]) / n
    top = (height - cell) / 2
    return [(round(left + b * cell), round(top), round(left + (b + 1) * cell), round(top + cell))
            for b in range(n)]


@functools.lru_cache(maxsize=4)
def _background(width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = (x * 160 // max(width - 1, 1) + 40).astype(np.uint8)     # colour ramps
    img[..., 1] = (y * 160 // max(height - 1, 1) + 40).astype(np.uint8)
    img[..., 2] = 110
    img.flags.writeable = False
    return img


def draw_frame(index: int, width: int, height: int) -> np.ndarray:
    """RGB uint8 ``[height, width, 3]`` picture of frame ``index``."""
    img = _background(width, height).copy()
    box = max(4, min(width, height) // 6)                                   # moving square
    x0 = (index * 3) % max(width - box, 1)
    img[1:1 + box, x0:x0 + box] = (230, 60, 30)
    bits = [1] + [(index >> (INDEX_BITS - 1 - b)) & 1 for b in range(INDEX_BITS)] + [0]
    for bit, (cx0, cy0, cx1, cy1) in zip(bits, code_cells(width, height)):
        img[cy0:cy1, cx0:cx1] = 235 if bit else 16
    return img


def read_index(frame: np.ndarray, source: tuple[int, int] | None = None) -> int:
    """Frame index coded in an RGB frame ``[H, W, 3]`` (uint8, or float in any affine scale).

    ``source = (width, height)`` of the video when the frame was stretched to another aspect
    (CLIP's 224x224); leave it out for frames with the video's aspect or its centre square.
    Reads the middle of each cell and thresholds halfway between the two guard cells; returns -1
    where the guards do not differ (a blank padding frame).
    """
    frame = np.asarray(frame, np.float64)
    h, w = frame.shape[:2]
    sw, sh = source or (w, h)
    values = []
    for cx0, cy0, cx1, cy1 in code_cells(sw, sh):
        cx0, cx1 = cx0 * w / sw, cx1 * w / sw
        cy0, cy1 = cy0 * h / sh, cy1 * h / sh
        mx, my = (cx1 - cx0) / 4, (cy1 - cy0) / 4
        box = frame[round(cy0 + my):round(cy1 - my), round(cx0 + mx):round(cx1 - mx)]
        values.append(box.mean())
    white, black = values[0], values[-1]
    if abs(white - black) < 1e-3 * (1 + abs(white)):
        return -1
    bits = [(v - black) / (white - black) > 0.5 for v in values[1:-1]]
    return int(sum(int(v) << (INDEX_BITS - 1 - b) for b, v in enumerate(bits)))


def make_video(
    path: str | Path,
    seconds: float,
    fps: float | Fraction,
    size: tuple[int, int] = (160, 120),
    codec: str = "libx264",
    *,
    vfr: bool = False,
    timestamps: Sequence[float] | None = None,
    rotate: int = 0,
    audio: bool | str = False,
    audio_layout: str = "mono",
    pix_fmt: str | None = None,
    start: float = 0.0,
    quality: str = "high",
    bframes: int = 0,
    texture: int = 0,
) -> list[Fraction]:
    """Write a test video and return the presentation time (seconds) of each frame written.

    ``fps`` may be a float such as 29.97 (written as 30000/1001) or a Fraction. ``vfr`` makes the
    frame spacing alternate between 0.5x and 1.5x of 1/fps (a variable frame rate file with the
    same average rate); ``timestamps`` gives the frame times explicitly instead. ``rotate`` sets
    the display matrix (degrees counter-clockwise, as ``av.VideoFrame.rotation`` reads it back).
    ``audio``: a sound track too, a tone coded by that encoder (``True``: "aac"), with
    ``audio_layout``'s channels. ``start`` offsets every timestamp. ``seconds = 0`` writes a video stream with no frames.
    ``bframes`` (libx264) allows that many B-frames, so frames are stored out of order as most
    H.264 files have them. ``texture`` adds a fixed noise pattern of that amplitude (levels) to
    every frame, so the decoder has real work, as with camera footage (0: clean frames).
    """
    rate = _as_rate(fps)
    width, height = size
    if timestamps is None:
        count = int(round(seconds * rate))
        step = 1 / rate
        times, t = [], Fraction(0)
        for i in range(count):
            times.append(t)
            t += (step / 2 if i % 2 == 0 else 3 * step / 2) if vfr else step
    else:
        times = [Fraction(t).limit_denominator(1_000_000) for t in timestamps]
    times = [Fraction(t) + Fraction(start).limit_denominator(1_000_000) for t in times]

    time_base = Fraction(1, 90_000) if (vfr or timestamps is not None) else 1 / rate
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = pix_fmt or ("yuv420p" if codec not in ("mjpeg",) else "yuvj420p")
        stream.time_base = time_base
        stream.codec_context.time_base = time_base
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "12" if quality == "high" else "28", "bf": str(bframes)}
        elif codec == "mpeg4":
            stream.options = {"qscale": "2" if quality == "high" else "8"}
        if rotate:
            stream.set_display_rotation(rotate)
        audio_stream = None
        if audio:
            encoder = "aac" if audio is True else audio
            rate = 48000 if encoder in ("libopus", "ac3", "eac3") else 16000    # (those take no 16 kHz)
            audio_stream = container.add_stream(encoder, rate=rate, layout=audio_layout)

        if not times:
            container.start_encoding()               # header only: a stream with no frames
        grain = np.random.default_rng(0).integers(0, texture + 1, (height, width, 3)) if texture else None
        for index, t in enumerate(times):
            picture = draw_frame(index, width, height)
            if grain is not None:
                picture = np.clip(picture.astype(np.int32) + grain - texture // 2, 0, 255).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts = round(t / time_base)
            frame.time_base = time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))

        if audio_stream is not None:
            _write_tone(container, audio_stream, max(seconds, 0.1))
    return times


def make_wav(path: str | Path, seconds: float, sr: int = 16000, channels: int = 1) -> np.ndarray:
    """Write a 16-bit WAV of tones (440 Hz times the channel number) and return it ``[n, ch]``."""
    import soundfile as sf

    t = np.arange(int(round(seconds * sr))) / sr
    data = np.stack([0.3 * np.sin(2 * np.pi * 440 * (c + 1) * t) for c in range(channels)], 1)
    sf.write(str(path), data.astype(np.float32), sr, subtype="PCM_16")
    return data


def _as_rate(fps: float | Fraction) -> Fraction:
    if isinstance(fps, Fraction):
        return fps
    for ntsc in (24, 30, 60):                         # 23.976, 29.97, 59.94 -> n*1000/1001
        if abs(fps - ntsc * 1000 / 1001) < 5e-3:
            return Fraction(ntsc * 1000, 1001)
    return Fraction(fps).limit_denominator(1001)


def _write_tone(container, stream, seconds: float) -> None:
    sr, layout = stream.rate, stream.layout.name
    tone = 0.2 * np.sin(2 * np.pi * 330 * np.arange(int(seconds * sr)) / sr)
    samples = np.repeat(tone.astype(np.float32), len(stream.layout.channels))[None]    # packed: [1, n * channels]
    frame = av.AudioFrame.from_ndarray(samples, format="flt", layout=layout)
    frame.sample_rate = sr
    frame.pts = 0
    for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)
