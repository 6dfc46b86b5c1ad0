"""Video frames for the two visual encoders, picked and prepared exactly as the authors do.

One decoding pass over the video stream feeds both pickers; frames are resized the moment they
are picked, so memory holds at most two windows of 224x224 frames whatever the video's length.

**CLIP** (the authors' ``extract_clip.get_video_frames``, decord backend): decoded frame
``round(i * fps / 10)`` (Python's round, ``fps`` the stream's average frame rate) for
``i = 0..99``; indices past the last frame are dropped and black frames appended. Each frame is
resized to 224x224 like Pillow's ``resize(BICUBIC)`` (no crop, aspect not kept), scaled to
[0, 1] and normalised with CLIP's mean and std.

**Synchformer** (``extract_synchformer.VideoDataset``): the stream resampled to 25 fps as the
``fps`` filter torchaudio's ``StreamingMediaDecoder(frame_rate=25)`` inserts picks frames (see
``FpsFilter``), the first 250 frames, zero frames appended if short. The zeros are appended to
the raw uint8 frames, so after normalisation a padded frame is -1, not 0. Each frame: short side
resized to 224 (bicubic, antialiased, as torchvision's ``v2.Resize`` on uint8), centre crop 224,
``(x / 255 - 0.5) / 0.5``. Cut into 30 segments ``[8s : 8s + 16]`` with ``segments``.

**Windows beyond the authors' first ten seconds** (our extension): window ``k`` covers
``[10k, 10k + 10)`` s. Its CLIP frame ``i`` is decoded frame ``round((100k + i) * fps / 10)`` and
its Synchformer frames are outputs ``250k .. 250k + 249`` of the same 25 fps resampling, i.e.
both rules run on the whole video and are cut every ten seconds; for ``k = 0`` this is exactly
the authors' input. Which windows there are is ``count_windows`` of the decoded video's length:
window ``k >= 1`` only where the video runs past the end of window ``k - 1`` (with overlapping
windows, the frames after 9 s of a 10-second clip belong to window 0 and open no other).

**On a GPU**: with ``upload``, ``windows`` yields ``FrameWindow``s instead: each picked frame
is decoded, turned upright and handed to ``upload`` (once, however many streams and windows pick
it), and the resize and normalisation run on the device (``vssflow.kernels.frames``), bit for
bit as here.

**Rotation**: frames are turned upright by the display matrix (as decord does; torchaudio does
not, so for rotated videos the authors' Synchformer frames were sideways).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO, Callable, Iterator, Literal, Union

import av
import numpy as np

from .contracts import CLIP, SEGMENT_FRAMES, SEGMENT_STEP, SYNCH, WINDOW_SECONDS
from .errors import VideoError
from .resize import planar

VideoSource = Union[str, "os.PathLike[str]", BinaryIO]


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about the video stream.

    ``fps`` is the average frame rate (what decord's ``get_avg_fps`` returns, the CLIP rule's
    rate); ``duration`` the stream's duration in seconds (``n_frames / fps`` when the container
    has none); ``n_frames`` the container's frame count (packets counted when it has none);
    ``width``/``height`` as displayed, after ``rotation`` (degrees counter-clockwise).
    """

    fps: float
    duration: float
    n_frames: int
    width: int
    height: int
    rotation: int
    has_audio: bool


def count_windows(duration: float, hop: float) -> int:
    """Windows of 10 s starting every ``hop`` seconds for a video of ``duration`` seconds: the
    first, and window ``k >= 1`` only where the video runs past the end of window ``k - 1``
    (``duration > (k - 1) * hop + 10``). So a clip of at most 10 s is the authors' one window."""
    return 1 + max(0, math.ceil((duration - WINDOW_SECONDS) / hop - 1e-9))


@dataclass(frozen=True)
class VideoWindow:
    """The encoder inputs for seconds ``[start, start + 10)`` of a video.

    ``clip_pixels [100, 3, 224, 224]`` and ``synch_pixels [250, 3, 224, 224]`` are the resized
    uint8 frames, padding included (zeros); ``clip_count``/``synch_count`` of them came from the
    video. ``clip_frames`` and ``synch_frames`` normalise them to float32 on each access (the
    window itself holds only the uint8 frames, 52 MB).
    """

    index: int
    clip_pixels: np.ndarray
    synch_pixels: np.ndarray
    clip_count: int
    synch_count: int
    hop: float = WINDOW_SECONDS
    end: float | None = None      # the last window only: seconds from the first frame to the video's end

    @property
    def start(self) -> float:
        return float(self.index * self.hop)

    @property
    def last(self) -> bool:
        return self.end is not None

    @property
    def clip_frames(self) -> np.ndarray:
        """``[100, 3, 224, 224]`` float32, normalised as ``CLIP`` says."""
        return CLIP.normalise(self.clip_pixels)

    @property
    def synch_frames(self) -> np.ndarray:
        """``[250, 3, 224, 224]`` float32: ``(x / 255 - 0.5) / 0.5``; padding is -1."""
        return SYNCH.normalise(self.synch_pixels)

    @functools.cached_property
    def clip_digests(self) -> tuple[bytes, ...]:
        """A digest of each CLIP frame's pixels (padding: that of a black frame): equal digests,
        equal encoder inputs. Computed once, by whichever thread asks first (a worker that
        prepares windows ahead of the model)."""
        return _digests(self.clip_pixels, self.clip_count)

    @functools.cached_property
    def synch_digests(self) -> tuple[bytes, ...]:
        """A digest of each Synchformer frame's pixels, as ``clip_digests``."""
        return _digests(self.synch_pixels, self.synch_count)

    def synch_segments(self) -> np.ndarray:
        """``[30, 16, 3, 224, 224]`` float32 segments of ``synch_frames`` (a strided view of a
        fresh array; see ``segments``)."""
        return segments(self.synch_frames)


@dataclass(frozen=True)
class FrameWindow:
    """The frames picked for seconds ``[start, start + 10)``, not yet resized.

    ``clip`` and ``synch`` hold, for each picked frame in order, what ``upload`` returned for
    its upright RGB uint8 ``[H, W, 3]`` array (typically a device tensor); a frame picked by
    both streams or by two overlapping windows is the same object. The padding of
    ``VideoWindow`` (black CLIP frames, zero Synchformer frames) is not stored.
    """

    index: int
    clip: tuple
    synch: tuple
    hop: float = WINDOW_SECONDS
    end: float | None = None      # as VideoWindow.end

    @property
    def start(self) -> float:
        return float(self.index * self.hop)

    @property
    def last(self) -> bool:
        return self.end is not None

    @property
    def clip_count(self) -> int:
        return len(self.clip)

    @property
    def synch_count(self) -> int:
        return len(self.synch)


def segments(frames: np.ndarray) -> np.ndarray:
    """Cut ``[250, ...]`` into ``[30, 16, ...]``: segment ``s`` is ``frames[8s : 8s + 16]``.

    A read-only strided view (no copy); ``np.ascontiguousarray`` it to feed an engine.
    """
    assert frames.shape[0] == SYNCH.frames, f"{frames.shape=}"
    view = np.lib.stride_tricks.sliding_window_view(frames, SEGMENT_FRAMES, axis=0)
    view = view[::SEGMENT_STEP]                                  # [30, ..., 16]
    return np.moveaxis(view, -1, 1)                              # [30, 16, ...]


def clip_frame_index(j: int, fps: float) -> int:
    """Decoded frame index of the ``j``-th CLIP frame of the video (window ``j // 100``)."""
    return round(j * fps / CLIP.rate)


class FpsFilter:
    """FFmpeg's ``fps`` filter (``fps=25``, defaults ``round=near``, ``eof_action=round``, no
    ``start_time``) as a frame picker, transcribed from ``libavfilter/vf_fps.c``.

    Each input timestamp is rescaled to output ticks (1/rate s) rounding half away from zero.
    Output ticks start at the first frame's tick; tick ``t`` shows the latest frame whose tick is
    ``<= t``; frames are dropped or repeated to fill the ticks. At end of stream, ticks before
    the end-of-stream timestamp (rescaled the same way) are filled with the last frame.

    torchaudio closes its filter graph with no timestamp, and FFmpeg 4-6 (the versions it
    supports) then end the stream at the last frame's own timestamp, so a clip ending at
    ``t_last`` yields ``round(25 * t_last) - round(25 * t_first)`` frames: a 10.0 s clip gives
    249, not 250, and is padded with one zero frame. FFmpeg >= 7 uses ``t_last + duration``.
    """

    def __init__(self, time_base: Fraction, rate: int = SYNCH.rate):
        self.time_base, self.rate = Fraction(time_base), rate
        self._frames: list[tuple[int, object]] = []              # at most two (tick, payload)
        self._next: int | None = None                            # next output tick
        self._eof: int | None = None

    def _ticks(self, pts: int) -> int:
        """``av_rescale_q_rnd(pts, time_base, 1/rate, AV_ROUND_NEAR_INF)``."""
        num = pts * self.time_base.numerator * self.rate
        den = self.time_base.denominator
        q, r = divmod(abs(num), den)
        q += 2 * r >= den                                         # halves away from zero
        return q if num >= 0 else -q

    def push(self, pts: int, payload: object) -> list[object]:
        """Feed one decoded frame (``pts`` in ``time_base``); returns the frames to output."""
        self._frames.append((self._ticks(pts), payload))
        out: list[object] = []
        while len(self._frames) == 2:
            self._step(out)
        return out

    def close(self, eof_pts: int) -> list[object]:
        """End of stream at ``eof_pts`` (in ``time_base``); returns the remaining outputs."""
        self._eof = self._ticks(eof_pts)
        out: list[object] = []
        while self._frames:
            self._step(out)
        return out

    def _step(self, out: list[object]) -> None:
        if self._next is None:
            self._next = self._frames[0][0]
        if len(self._frames) == 2 and self._frames[1][0] <= self._next:
            self._frames.pop(0)                                   # superseded: drop
        elif self._eof is not None and self._eof <= self._next:
            self._frames.pop(0)                                   # past the end: drop
        else:
            out.append(self._frames[0][1])                        # show it for one tick
            self._next += 1


def probe(video: VideoSource) -> VideoInfo:
    """Read fps, duration, frame count, displayed size, rotation and whether there is audio.

    Decodes the first frame (to read its rotation and prove the stream decodes).
    Raises ``VideoError`` for a file without a decodable video stream.
    """
    with _open(video) as (container, stream):
        first, packets = None, 0
        try:
            for packet in container.demux(stream):
                packets += packet.size > 0
                if first is None:
                    first = next(iter(packet.decode()), None)
                elif stream.frames > 0:
                    break                           # the container counts frames for us
        except av.FFmpegError as e:
            raise VideoError(f"{_name(video)}: corrupt video data ({_reason(e)})") from None
        if first is None:
            raise VideoError(f"{_name(video)}: the video stream has no frames")
        fps = _average_rate(stream, video)
        n_frames = stream.frames if stream.frames > 0 else packets
        if stream.duration is not None and stream.duration > 0:
            duration = float(stream.duration * stream.time_base)
        else:
            duration = n_frames / fps
        rotation = _rotation(first)
        width, height = first.width, first.height
        if rotation % 180:
            width, height = height, width
        return VideoInfo(fps=fps, duration=duration, n_frames=n_frames, width=width,
                         height=height, rotation=rotation, has_audio=bool(container.streams.audio))


@dataclass(frozen=True)
class VideoFrames:
    """Already-decoded video: RGB uint8 frames ``[N, H, W, 3]`` shown at ``fps`` frames per second."""

    frames: np.ndarray
    fps: float

    def as_file(self) -> io.BytesIO:
        """The frames as an in-memory rawvideo stream (lossless, exact timestamps) that
        ``probe`` and ``windows`` read like any file."""
        frames = np.asarray(self.frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
            raise VideoError(f"decoded frames must be uint8 [N, H, W, 3] with N >= 1, got {frames.dtype} "
                             f"{tuple(frames.shape)}")
        if not (np.isfinite(self.fps) and 0 < self.fps <= 1000):
            raise VideoError(f"decoded frames need a frame rate in (0, 1000], got {self.fps}")
        rate = Fraction(self.fps).limit_denominator(1001)
        buf = io.BytesIO()
        with av.open(buf, "w", format="nut") as out:
            stream = out.add_stream("rawvideo", rate=rate)
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "rgb24"
            stream.time_base = 1 / rate
            for i, f in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
                frame.pts = i
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode(None):
                out.mux(packet)
        buf.seek(0)
        return buf


def windows(video: VideoSource, *, hop: float = WINDOW_SECONDS, synch_eof: Literal["frame", "end"] = "frame",
            upload: Callable[[np.ndarray], object] | None = None) -> Iterator[VideoWindow | FrameWindow]:
    """Stream the video and yield one ``VideoWindow`` of 10 seconds every ``hop`` seconds, in order.

    ``hop`` below 10 makes windows overlap: window k holds CLIP frames ``100 k hop / 10 + i`` and
    25 fps frames ``25 k hop + i`` of the whole video (``hop`` a multiple of 0.2 s); a frame
    in an overlap goes into both windows. Only the windows still being filled are in memory.

    ``synch_eof`` is where the 25 fps resampling ends: ``"frame"`` at the last frame's
    timestamp (torchaudio on FFmpeg 4-6, the authors' setup), ``"end"`` at that timestamp plus
    the frame's duration (FFmpeg >= 7). See ``FpsFilter``.

    ``upload``: when given, yield ``FrameWindow``s of ``upload(rgb)`` for each picked frame
    (``rgb`` upright, contiguous ``[H, W, 3]`` uint8, one call per decoded frame picked)
    instead of resized ``VideoWindow``s.

    The last window (``window.last``) carries ``end``: the decoded video's length in seconds,
    from the first frame's timestamp to the end of the last frame. It is the one the decoding
    found, whatever the container's header says, and it decides how many windows there are
    (``count_windows``): a window is handed over before the end of the stream only once a frame
    starting past its end has been decoded, so that one more window surely follows.

    Raises ``VideoError`` for a file without a decodable video stream, a corrupt one, or one
    that stops well short of the frame count its container declares.
    """
    if synch_eof not in ("frame", "end"):
        raise ValueError(f"synch_eof must be 'frame' or 'end', got {synch_eof!r}")
    clip_step, synch_step = round(hop * CLIP.rate), round(hop * SYNCH.rate)
    if not 0 < hop <= WINDOW_SECONDS or abs(clip_step - hop * CLIP.rate) > 1e-9 \
            or abs(synch_step - hop * SYNCH.rate) > 1e-9:
        raise ValueError(f"hop must be a multiple of 0.2 s in (0, {WINDOW_SECONDS}], got {hop}")

    def holders(j: int, step: int, size: int):
        """(window, position) of every window whose span holds global frame j."""
        return [(k, j - k * step) for k in range(max(0, -(-(j - size + 1) // step)), j // step + 1)]

    def complete(n: int, step: int, size: int) -> int:
        return 0 if n < size else (n - size) // step + 1

    if upload is None:
        new_buffer, clip_of, synch_of = _WindowBuffer, _Frame.clip, _Frame.synch
    else:
        new_buffer, clip_of, synch_of = _FrameBuffer, (lambda f: f.raw(upload)), (lambda f: f.raw(upload))

    def buffer(pending, k: int):
        if k not in pending:
            pending[k] = new_buffer(hop)
        return pending[k]

    def put_synch(pending, m: int, picked) -> None:
        frame = synch_of(picked)
        for k, i in holders(m, synch_step, SYNCH.frames):
            buffer(pending, k).synch[i] = frame
            buffer(pending, k).synch_count = i + 1
    with _open(video) as (container, stream):
        fps = _average_rate(stream, video)
        synch = FpsFilter(stream.time_base)
        pending: dict[int, _WindowBuffer] = {}
        clip_next = 0                                  # next CLIP frame, counted over the video
        synch_done = 0                                 # Synchformer frames output so far
        decoded = 0
        last: _Frame | None = None
        for n, frame in enumerate(_decode(container, stream, video)):
            current = _Frame(frame, n, last)
            decoded, last = n + 1, current
            if n == 0:
                first_pts = current.pts
            while clip_frame_index(clip_next, fps) <= n:
                for k, i in holders(clip_next, clip_step, CLIP.frames):
                    buffer(pending, k).clip[i] = clip_of(current)
                    buffer(pending, k).clip_count = i + 1
                clip_next += 1
            for picked in synch.push(current.pts, current):
                put_synch(pending, synch_done, picked)
                synch_done += 1
            done = min(complete(clip_next, clip_step, CLIP.frames), complete(synch_done, synch_step, SYNCH.frames))
            # Windows before the last of a video as long as this frame's start: each has a successor.
            followed = count_windows(float((current.pts - first_pts) * stream.time_base), hop) - 1
            for k in sorted(pending):
                if k < min(done, followed):
                    yield pending.pop(k).finish(k)
        if last is None:
            raise VideoError(f"{_name(video)}: the video stream has no frames")
        _check_complete(stream, decoded, video)
        last_duration = _duration(last, fps, stream.time_base)
        eof = last.pts + (last_duration if synch_eof == "end" else 0)
        for picked in synch.close(eof):
            put_synch(pending, synch_done, picked)
            synch_done += 1
        end = float((last.pts + last_duration - first_pts) * stream.time_base)
        final = count_windows(end, hop) - 1               # windows past it hold only frames of the one before
        for k in range(min(pending, default=0), final + 1):
            yield buffer(pending, k).finish(k, end if k == final else None)


class _WindowBuffer:
    """uint8 frames of one window as they are picked."""

    def __init__(self, hop: float = WINDOW_SECONDS):
        self.hop = hop
        self.clip = np.zeros((CLIP.frames, 3, CLIP.size, CLIP.size), np.uint8)
        self.synch = np.zeros((SYNCH.frames, 3, SYNCH.size, SYNCH.size), np.uint8)
        self.clip_count = self.synch_count = 0

    def finish(self, index: int, end: float | None = None) -> VideoWindow:
        """Black CLIP padding and zero Synchformer padding are the zeros never overwritten."""
        return VideoWindow(index, self.clip, self.synch, self.clip_count, self.synch_count, self.hop, end)


class _FrameBuffer:
    """One window's picked frames as ``upload`` returned them."""

    def __init__(self, hop: float = WINDOW_SECONDS):
        self.hop = hop
        self.clip: list = [None] * CLIP.frames
        self.synch: list = [None] * SYNCH.frames
        self.clip_count = self.synch_count = 0

    def finish(self, index: int, end: float | None = None) -> FrameWindow:
        # Positions fill in order from 0, so the first `count` are all set.
        return FrameWindow(index, tuple(self.clip[:self.clip_count]), tuple(self.synch[:self.synch_count]), self.hop,
                           end)


def frame_digest(pixels: np.ndarray) -> bytes:
    """16 bytes that differ for frames whose pixels differ (BLAKE2b of the contiguous array)."""
    return hashlib.blake2b(memoryview(np.ascontiguousarray(pixels)), digest_size=16).digest()


@functools.lru_cache(maxsize=1)
def padding_digest() -> bytes:
    """The digest of a padding frame: zeros (black for CLIP; -1 after Synchformer's normalisation)."""
    return frame_digest(np.zeros((3, SYNCH.size, SYNCH.size), np.uint8))


def _digests(pixels: np.ndarray, count: int) -> tuple[bytes, ...]:
    return tuple(frame_digest(p) for p in pixels[:count]) + (padding_digest(),) * (len(pixels) - count)


class _Frame:
    """A decoded frame, converted to RGB and resized only if some picker asks, at most once."""

    def __init__(self, frame: av.VideoFrame, index: int, previous: _Frame | None):
        self.frame, self.index = frame, index
        self.pts = _pts(frame, previous)
        self.duration = frame.duration
        self._planar: np.ndarray | None = None
        self._clip: np.ndarray | None = None
        self._synch: np.ndarray | None = None
        self._raw: object = None

    def _rgb(self) -> np.ndarray:
        """``[H, W, 3]`` uint8, upright (a strided view when rotated)."""
        rgb = self.frame.to_ndarray(format="rgb24")
        turns = _rotation(self.frame) // 90
        return np.rot90(rgb, turns) if turns else rgb

    def _rgb_planar(self) -> np.ndarray:
        if self._planar is None:
            self._planar = planar(self._rgb())                        # [3, H, W] float32
        return self._planar

    def raw(self, upload: Callable[[np.ndarray], object]) -> object:
        """``upload`` of the upright RGB frame, called at most once."""
        if self._raw is None:
            self._raw = upload(np.ascontiguousarray(self._rgb()))
        return self._raw

    def clip(self) -> np.ndarray:
        """``[3, 224, 224]`` uint8, Pillow's bicubic resize."""
        if self._clip is None:
            x = self._rgb_planar()
            self._clip = CLIP.resizer(x.shape[1], x.shape[2])(x)
        return self._clip

    def synch(self) -> np.ndarray:
        """``[3, 224, 224]`` uint8, torchvision's short-side resize and centre crop."""
        if self._synch is None:
            x = self._rgb_planar()
            self._synch = SYNCH.resizer(x.shape[1], x.shape[2])(x)
            # CLIP picks a frame while it is decoded, the 25 fps filter later: the float copy
            # (400 MB for an 8K frame) is no longer needed once both are made.
            self._planar = None
        return self._synch


def _pts(frame: av.VideoFrame, previous: _Frame | None) -> int:
    """The frame's timestamp, or (like torchaudio) an estimate where the decoder gives none."""
    if frame.pts is not None:
        return int(frame.pts)
    if frame.dts is not None:
        return int(frame.dts)
    return previous.pts + 1 if previous is not None else 0


def _duration(frame: _Frame, fps: float, time_base: Fraction) -> int:
    """The last frame's duration in ``time_base`` (one average frame when the file has none)."""
    if frame.duration:
        return int(frame.duration)
    return max(1, round(1 / (fps * time_base)))


def _rotation(frame: av.VideoFrame) -> int:
    """Counter-clockwise display rotation, snapped to 0/90/180/270 (flips are ignored)."""
    angle = frame.rotation or 0
    return int(round(angle / 90.0)) % 4 * 90


@contextlib.contextmanager
def _open(video: VideoSource):
    """Open ``video`` (path or binary file object) and yield (container, first video stream)."""
    if hasattr(video, "seek"):
        video.seek(0)
    elif not os.path.exists(os.fspath(video)):
        raise VideoError(f"{_name(video)}: no such file")
    try:
        container = av.open(video if hasattr(video, "read") else os.fspath(video), "r")
    except av.EOFError:
        raise VideoError(f"{_name(video)}: the file ends before any video frame "
                         "(empty or truncated)") from None
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"{_name(video)}: not a readable video file ({_reason(e)})") from None
    try:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["no streams"]
            raise VideoError(f"{_name(video)}: no video stream (has {', '.join(kinds)})")
        if _is_still_image(container):
            raise VideoError(f"{_name(video)}: a still image ({container.streams.video[0].codec_context.name}), "
                             "not a video")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        yield container, stream
    finally:
        container.close()


def _is_still_image(container) -> bool:
    """FFmpeg reads a PNG/JPEG/... file as a one-frame stream through its image demuxers
    (`image2`, `png_pipe`, `jpeg_pipe`, ...); animated formats (GIF, APNG) have their own."""
    name = container.format.name
    return name == "image2" or name.endswith("_pipe")


def _decode(container, stream, video: VideoSource) -> Iterator[av.VideoFrame]:
    try:
        for packet in container.demux(stream):
            for frame in packet.decode():
                yield frame
    except av.FFmpegError as e:
        raise VideoError(f"{_name(video)}: corrupt video data ({_reason(e)})") from None


def _average_rate(stream, video: VideoSource) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return rate.numerator / rate.denominator     # C's double division, as decord
    raise VideoError(f"{_name(video)}: the video stream has no frame rate")


def missing_frames_accepted(declared: int) -> int:
    """Frames a file may lack against its container's count and still be decoded as nearly
    complete (its audio keeps the container's duration); one lacking more is truncated."""
    return max(2, declared // 100)


def _check_complete(stream, decoded: int, video: VideoSource) -> None:
    """A file cut short still opens when its index comes first; it then decodes far fewer
    frames than the index lists."""
    declared = stream.frames
    if declared > 0 and decoded < declared - missing_frames_accepted(declared):
        raise VideoError(f"{_name(video)}: truncated: {decoded} of {declared} frames decode")


def _name(video: VideoSource) -> str:
    if hasattr(video, "read"):
        return getattr(video, "name", "<file object>")
    return os.fspath(video)


def _reason(e: Exception) -> str:
    text = getattr(e, "strerror", None) or str(e)
    return " ".join(str(text).split())
