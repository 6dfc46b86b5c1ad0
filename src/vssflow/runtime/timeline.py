"""The windows of a video on one timeline: where each starts, its phoneme ids, how their audio is
joined and cut to the video's length.

Windows are 10 s long and start every `WINDOW_HOP` = 9 s; window k >= 1 exists only where the
decoded video runs past the end of window k - 1 (`video.count_windows`), so a clip of at most
10 s is the authors' one window. The 1-second overlaps are joined by an equal-power crossfade:

    window 0  [0 ............ 10)
    window 1           [9 ............ 19)
    audio     0 .... 9 |fade| 10 ..... 19      cut to the video's length (`audio_length`)
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from . import contracts as C
from . import video
from .window import Run

WINDOW_HOP = 9.0
HOP_LATENTS = int(WINDOW_HOP * C.LATENT_RATE)                  # 225
HOP_SAMPLES = int(WINDOW_HOP * C.SAMPLE_RATE)                  # 144 000
FADE_SAMPLES = int((C.WINDOW_SECONDS - WINDOW_HOP) * C.SAMPLE_RATE)   # 16 000


def track_latents(n_windows: int) -> int:
    """Latent frames from the start of window 0 to the end of window `n_windows - 1`."""
    return (n_windows - 1) * HOP_LATENTS + C.WINDOW_LATENTS


def window_phone_ids(track: np.ndarray, index: int) -> np.ndarray:
    """Window `index`'s `[T]` slice of the phoneme track (zeros past its end: no speech)."""
    ids = track[index * HOP_LATENTS:index * HOP_LATENTS + C.WINDOW_LATENTS]
    return np.pad(ids, (0, C.WINDOW_LATENTS - len(ids)))


def crossfade_windows(windows: Iterator[Iterator[np.ndarray]]) -> Iterator[np.ndarray]:
    """Join windows that start every `HOP_SAMPLES`: each window's audio (pieces in order) is
    emitted as it comes, except its tail past `HOP_SAMPLES`, held back until the next window
    comes: then its first `FADE_SAMPLES` are mixed with that tail by an equal-power crossfade.
    When no window follows, the held tail is emitted as it is: the last window ends whole.
    How many windows there are is what `windows` yields, not a count decided beforehand."""
    theta = 0.5 * np.pi * (np.arange(FADE_SAMPLES) + 0.5) / FADE_SAMPLES
    fade_in, fade_out = np.sin(theta).astype(np.float32), np.cos(theta).astype(np.float32)
    tail = None                     # the previous window's audio past its hop, not yet emitted
    for pieces in windows:
        pos, held = 0, []
        if tail is not None:
            tail = np.pad(tail[:FADE_SAMPLES], (0, max(0, FADE_SAMPLES - len(tail))))
        for piece in pieces:
            start, pos = pos, pos + len(piece)
            if tail is not None and start < FADE_SAMPLES:            # crossfade the head
                n = min(FADE_SAMPLES, pos) - start
                mixed = piece[:n] * fade_in[start:start + n] + tail[start:start + n] * fade_out[start:start + n]
                piece = np.concatenate([mixed.astype(np.float32), piece[n:]])
            keep = max(0, min(pos, HOP_SAMPLES) - start)             # hold back this window's tail
            held.append(piece[keep:])
            piece = piece[:keep]
            if len(piece):
                yield piece
        tail = np.concatenate(held) if held else None
    if tail is not None and len(tail):
        yield tail


def output_samples(meta: video.VideoInfo, decoded_end: float) -> int:
    """Samples of audio for the video: its container's duration, unless the decoded frames end
    elsewhere by more than a nearly complete file may (`video.missing_frames_accepted`): a
    header can be wrong, the frames are what is shown."""
    slack = video.missing_frames_accepted(meta.n_frames) / meta.fps
    duration = meta.duration if abs(decoded_end - meta.duration) <= slack + 1e-6 else decoded_end
    return int(round(duration * C.SAMPLE_RATE))


def audio_length(meta: video.VideoInfo, window, run: Run) -> int | None:
    """Samples of audio to write, known at the last window (None before it); a container
    whose duration the frames contradict is noted in `run`."""
    if not window.last:
        return None
    length = output_samples(meta, window.end)
    if length != int(round(meta.duration * C.SAMPLE_RATE)):
        run.notes.append(f"the container says {meta.duration:.2f} s but the frames run "
                         f"{window.end:.2f} s: the sound follows the frames")
    return length


def cut_audio(chunks: Iterator[np.ndarray], length: list[int], run: Run) -> Iterator[np.ndarray]:
    """`chunks` up to `length[0]` samples, kept in `run`. The length comes with the last window,
    so the cut falls in that window's audio, which comes only once the window is known."""
    written = 0
    for chunk in chunks:
        if length:
            chunk = chunk[:max(0, length[0] - written)]
        written += len(chunk)
        if len(chunk):
            run.keep("audio", chunk)
            yield chunk
        if length and written >= length[0]:
            break
