"""One generation's inputs, checked and read before any model runs: the options, the video's
header, the phoneme track over every window, the initial noise, the reference voice.

    prepared = prepare(session, "clip.mp4", GenerateOptions(steps=25), ref_audio="voice.wav")
    prepared.info                                   # StreamInfo: known before the first chunk
    for w in frame_windows(prepared.source, session.frames_device, seconds.append): ...
        window_phone_ids(prepared.track, w.index), prepared.noise_of(w.index)
    speaker = speaker_embedding(session.backend, prepared.crops, session.sizes.speaker_dim, run)

The single stream (`session.py`) and many clips (`batch.py`) both start here.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator

import numpy as np

from . import contracts as C
from . import audio, extras, solvers, text, video
from .backends import PREPROCESS
from .errors import BackendError, VssflowInputError
from .timeline import WINDOW_HOP, track_latents
from .window import Run


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    """What shapes a result; travels with it. Change one with `dataclasses.replace`."""

    transcript: str | None = None
    speech_start: float | None = None     # seconds from the start of the video
    speech_end: float | None = None
    solver: str = "euler"
    steps: int = 25                       # fixed-step solvers; dopri5 chooses its own
    cfg: float = 3.0
    seed: int = 0

    def check(self) -> None:
        """Raise VssflowInputError for an option no run can use."""
        if self.solver not in solvers.SOLVERS:
            raise VssflowInputError(f"unknown solver {self.solver!r}: choose one of {', '.join(solvers.SOLVERS)}")
        if self.solver != "dopri5" and not 1 <= self.steps <= 1000:
            raise VssflowInputError(f"steps must be between 1 and 1000, got {self.steps}")
        if not np.isfinite(self.cfg) or not 0 <= self.cfg <= 100:
            raise VssflowInputError(f"cfg must be a finite number between 0 and 100, got {self.cfg}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise VssflowInputError(f"seed must be a whole number from 0 up (numpy's generators take no "
                                    f"negative seeds), got {self.seed!r}")
        if self.transcript is None and (self.speech_start is not None or self.speech_end is not None):
            raise VssflowInputError("speech start/end given without a transcript")

    def for_clip(self, duration: float) -> GenerateOptions:
        """The speech interval's defaults filled in: from 0 to the end of the clip (at most 10 s)."""
        if self.transcript is None:
            return self
        return dataclasses.replace(
            self, speech_start=0.0 if self.speech_start is None else self.speech_start,
            speech_end=min(duration, C.WINDOW_SECONDS) if self.speech_end is None else self.speech_end)


@dataclasses.dataclass(frozen=True)
class StreamInfo:
    """Known before the first chunk: what will come out and how it is made. `duration` and
    `n_windows` are what the container says; the decoded frames decide (a wrong header is noted
    in the run's `notes`)."""

    duration: float
    sample_rate: int
    n_windows: int
    backend: str
    options: GenerateOptions
    video: video.VideoInfo
    demo_model: bool
    precision: str = "fp32"          # the backend's; windows that fell back to FP32: the result's `fallbacks`


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One generation's inputs, checked and read (`prepare`), before any model runs."""

    source: object                                    # a path or a binary file object
    info: StreamInfo
    track: np.ndarray                                 # phoneme ids over every window's span
    noise_of: Callable[[int], np.ndarray]             # window -> initial latent [128, T]
    crops: np.ndarray | None                          # the reference voice's crops for RawNet3


@dataclasses.dataclass(frozen=True)
class Item:
    """One clip of a batch: the video and what it changes of the batch's options (None: the batch's)."""

    video: object                                  # a path, a binary file object or `VideoFrames`
    transcript: str | None = None
    speech_start: float | None = None
    speech_end: float | None = None
    seed: int | None = None
    ref_audio: object = None                       # a reference voice (path or file object)
    noise: np.ndarray | None = None                # the initial latent, as `generate(noise=)` takes it

    def fields(self) -> dict:
        """The options this item sets, as `generate` takes them as keywords."""
        return {k: getattr(self, k) for k in ("transcript", "speech_start", "speech_end", "seed")
                if getattr(self, k) is not None}


def as_item(x) -> Item:
    return x if isinstance(x, Item) else Item(x)


def prepare(session, video_source, options: GenerateOptions | None = None, *, ref_audio=None,
            noise: np.ndarray | None = None, **fields) -> Prepared:
    """Every input checked and read, before any model runs. `session`: the `Session` that will
    run it (its model folder, backend and description); `fields` change `options`."""
    options = dataclasses.replace(options or GenerateOptions(), **fields)
    options.check()
    if isinstance(video_source, video.VideoFrames):
        video_source = video_source.as_file()
    meta = video.probe(video_source)
    options = options.for_clip(meta.duration)
    folder = session.folder
    if ref_audio is not None and "speaker_encoder" not in folder.contracts:
        raise VssflowInputError(f"{folder.path}: this model folder has no speaker stage; "
                                "re-export with --rawnet to use a reference voice")
    speaker_crops = None if ref_audio is None else audio.speaker_crops(audio.load_reference(ref_audio))
    n_windows = video.count_windows(meta.duration, WINDOW_HOP)    # as the container says; decoding decides
    track = phoneme_track(options, meta.duration, n_windows)
    noise_of = noise_source(noise, options.seed, (n_windows, folder.sizes.audio_channels, C.WINDOW_LATENTS))
    info = StreamInfo(meta.duration, C.SAMPLE_RATE, n_windows, session.describe(), options, meta,
                      folder.is_demo, session.backend.precision)
    return Prepared(video_source, info, track, noise_of, speaker_crops)


def phoneme_track(o: GenerateOptions, duration: float, n_windows: int) -> np.ndarray:
    """Phoneme ids over the windows' whole timeline, stretched over the speech interval."""
    total = track_latents(n_windows)
    if o.transcript is None:
        return np.zeros(total, np.int64)
    return text.phoneme_ids(o.transcript, o.speech_start, o.speech_end,
                            window_seconds=total / C.LATENT_RATE, clip_seconds=duration)


def noise_source(noise: np.ndarray | None, seed: int, shape: tuple[int, int, int]) -> Callable[[int], np.ndarray]:
    """The initial latent of window k, `[128, T]`: the seed's draws in window order (so a
    video that decodes to more windows than its container said just draws more), or the
    `noise` given, `[128, T]` or `[windows, 128, T]`; `shape` is `(windows, 128, T)` as the
    container says."""
    if noise is None:
        rng, drawn = np.random.default_rng(seed), []

        def seeded(k: int) -> np.ndarray:
            while len(drawn) <= k:
                drawn.append(rng.standard_normal(shape[1:], dtype=np.float32))
            return drawn[k]
        return seeded
    noise = np.asarray(noise, dtype=np.float32)
    if noise.shape == shape[1:]:
        noise = noise[None]
    if noise.ndim == 4 and noise.shape[1] == 1:
        noise = noise[:, 0]
    if noise.shape != shape:
        raise VssflowInputError(f"noise must have shape {shape[1:]} or {shape} for this video, got {noise.shape}")

    def given(k: int) -> np.ndarray:
        if k >= len(noise):
            raise VssflowInputError(f"noise holds {len(noise)} windows, but the video decodes to more than its "
                                    "container said; give one per window or a seed")
        return noise[k]
    return given


def speaker_embedding(backend, crops: np.ndarray | None, speaker_dim: int, run: Run) -> np.ndarray:
    """The speaker embedding `[1, Dspk]`: RawNet3 on the reference voice's crops, or zeros."""
    if crops is None:
        return np.zeros((1, speaker_dim), np.float32)
    speaker = run.call(backend, "speaker_encoder", {"crops": crops})["embedding"]
    run.keep("speaker", speaker[0])
    return speaker


def frames_device(preprocess: str, device: str | None, backend: str, triton: bool) -> str | None:
    """Where frames are prepared (`backends.PREPROCESS`): None for the host, else the backend's
    device. `auto` picks the device only on a GPU with Triton there for the kernels (their torch
    reference is dense FP64 products: slower than the host path); `device` insists."""
    if preprocess not in PREPROCESS:
        raise VssflowInputError(f"preprocess must be one of {', '.join(PREPROCESS)}, got {preprocess!r}")
    if preprocess == "host":
        return None
    if preprocess == "auto" and not (str(device).startswith("cuda") and triton):
        return None
    if device is None:
        raise BackendError(f"the {backend} backend takes frames from the host; preprocessing on the "
                           "device needs the torch backend")
    return device


def frame_windows(source, frames_device: str | None, record: Callable[[float], None]
                  ) -> Iterator[video.VideoWindow | video.FrameWindow]:
    """`video.windows` every `WINDOW_HOP` seconds, frames prepared on the host (`frames_device`
    None) or uploaded to that device; the seconds spent getting each window (decoding, and on
    the host resizing), and after the last the seconds to the end of the stream, to `record`."""
    upload = None
    if frames_device is not None:
        upload = extras.load("kernels.frames", "torch", "preparing frames on the device").uploader(frames_device)
    windows = video.windows(source, hop=WINDOW_HOP, upload=upload)
    while True:
        t0 = time.perf_counter()
        w = next(windows, None)
        record(time.perf_counter() - t0)
        if w is None:
            return
        yield w
