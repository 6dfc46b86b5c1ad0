"""Writing results: WAV/FLAC, or the input's video stream copied with the new AAC audio.

Every writer goes through `atomic_output`: the file is written under a hidden temporary name
beside the target and renamed into place only when complete; on any error or interrupt the
temporary file is removed, so a partial output never appears.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from .errors import OutputError

AUDIO_FORMATS = {".wav": "WAV", ".flac": "FLAC"}
VIDEO_FORMATS = {".mp4": "mp4", ".mov": "mov", ".m4v": "mp4", ".mkv": "matroska"}


def output_kind(path: Path) -> str:
    ext = path.suffix.lower()
    if ext in AUDIO_FORMATS:
        return "audio"
    if ext in VIDEO_FORMATS:
        return "video"
    raise OutputError(f"{path}: unknown output type {ext or '(none)'}: use .wav, .flac, "
                      f"or a video container ({', '.join(VIDEO_FORMATS)})")


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` on success, delete it otherwise."""
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(f"{path}: the folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_audio_file(path: Path, chunks: Iterable[np.ndarray], sample_rate: int) -> int:
    """Stream float32 chunks into a WAV (float) or FLAC (16-bit) file; returns samples written."""
    import soundfile as sf
    fmt = AUDIO_FORMATS[path.suffix.lower()]
    subtype = "FLOAT" if fmt == "WAV" else "PCM_16"
    n = 0
    try:
        with atomic_output(path) as tmp, sf.SoundFile(tmp, "w", sample_rate, 1, subtype, format=fmt) as f:
            for chunk in chunks:
                f.write(np.clip(chunk, -1.0, 1.0) if subtype == "PCM_16" else chunk)
                n += len(chunk)
    except OSError as e:
        raise OutputError(f"{path}: could not write ({e.strerror or e})") from None
    except sf.LibsndfileError as e:  # libsndfile reports a failed write (a full disk) only as "System error."
        raise OutputError(f"{path}: could not write ({_write_failure(path, e)})") from None
    return n


def _write_failure(path: Path, error: Exception) -> str:
    """What libsndfile leaves unsaid: whether the disk is full."""
    import shutil
    try:
        if shutil.disk_usage(path.parent).free < (1 << 20):
            return "No space left on device"
    except OSError:
        pass
    return str(error).strip() or type(error).__name__


def write_video_file(path: Path, video_in, chunks: Iterable[np.ndarray], sample_rate: int) -> int:
    """Copy `video_in`'s video stream packet for packet (no re-encoding) and add the audio as AAC."""
    import av
    audio = np.concatenate(list(chunks)).astype(np.float32) if chunks is not None else np.zeros(0, np.float32)
    try:
        with atomic_output(path) as tmp:
            src = av.open(str(video_in) if isinstance(video_in, (str, os.PathLike)) else video_in)
            try:
                vin = src.streams.video[0]
                dst = av.open(str(tmp), "w", format=VIDEO_FORMATS[path.suffix.lower()])
                try:
                    vout = dst.add_stream_from_template(vin)
                    aout = dst.add_stream("aac", rate=sample_rate, layout="mono")
                    start = 0                                # the sound starts with the first frame
                    if vin.start_time is not None:
                        start = round(vin.start_time * vin.time_base * sample_rate)
                    # Every packet with data, those without a dts too: Matroska stores none, and
                    # FFmpeg leaves it unset on the first frames of a stream with B-frames; the
                    # muxer derives it from the pts. (demux ends with an empty packet: not one.)
                    for packet in src.demux(vin):
                        if not packet.size:
                            continue
                        packet.stream = vout
                        dst.mux(packet)
                    _encode_audio(dst, aout, audio, sample_rate, start)
                finally:
                    dst.close()
            finally:
                src.close()
    except OSError as e:
        raise OutputError(f"{path}: could not write ({e.strerror or e})") from None
    except av.FFmpegError as e:
        raise OutputError(f"{path}: could not write the video ({e})") from None
    return len(audio)


def _encode_audio(container, stream, audio: np.ndarray, sample_rate: int, start: int = 0,
                  frame_size: int = 1024) -> None:
    import av
    pts = start
    for a in range(0, len(audio), frame_size):
        block = audio[a:a + frame_size]
        frame = av.AudioFrame.from_ndarray(block[None, :], format="flt", layout="mono")
        frame.sample_rate, frame.pts = sample_rate, pts
        pts += len(block)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)
