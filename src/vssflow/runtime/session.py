"""`Session`: a model folder, a backend, and the pipeline from video to sound track.

    with Session("models/vssflow") as session:
        result = session.generate("clip.mp4", transcript="hello there", speech_start=1.0, speech_end=3.0)
        chunks, info = session.stream("clip.mp4")     # info at once, chunks as they are ready
        for chunk in chunks: ...
        chunks.nfe, chunks.timings                     # the run's own record, once it is done

Per 10-second window (`window.py`): the encoders and the condition stage run once; the ODE loop
calls only `flow_step` (both CFG passes batched); the VAE decodes the window's latent once and
the vocoder streams it out in chunks. Longer videos take 10-second windows every 9 seconds, each
streamed as soon as it is done, the 1-second overlaps joined by an equal-power crossfade.
`video` may be a path, a binary file object, or `VideoFrames(frames, fps)` already decoded.

Frames are resized and normalised on the host (`video.py`, numpy), or, for a backend whose
encoders run on a GPU, on that GPU (`vssflow.kernels.frames`, Triton): the picked frames go up
once per window and come out bit for bit the same; see `PREPROCESS`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from . import contracts as C
from . import audio, extras, solvers, text, video, window
from .backends import PREPROCESS, create_backend
from .errors import BackendError, VssflowInputError
from .features import Encoders
from .model_folder import ModelFolder
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


@dataclasses.dataclass
class Result:
    audio: np.ndarray                 # float32 [samples], 16 kHz, cut to the video's length
    sample_rate: int
    info: StreamInfo
    timings: dict[str, float]         # seconds per stage, summed over windows
    nfe: int                          # flow_step calls (each runs both CFG passes)
    intermediates: dict[str, np.ndarray] | None = None
    notes: tuple[str, ...] = ()
    fallbacks: tuple[dict, ...] = ()  # windows (or vocoder chunks) generated again in FP32: window.Run

    @property
    def options(self) -> GenerateOptions:
        return self.info.options


class AudioStream(Iterator[np.ndarray]):
    """The chunks of one generation, float32 at 16 kHz, each as soon as it is ready, with the
    run's own record (`nfe`, `timings`, `intermediates`, `notes`), complete once iterated."""

    def __init__(self, chunks: Iterator[np.ndarray], info: StreamInfo, run: Run):
        self._chunks, self.info, self.run = chunks, info, run

    def __next__(self) -> np.ndarray:
        return next(self._chunks)

    def close(self) -> None:
        """Stop early: the generation ends and holds nothing."""
        self._chunks.close()

    @property
    def nfe(self) -> int:
        return self.run.nfe

    @property
    def timings(self) -> dict[str, float]:
        return dict(self.run.timings)

    @property
    def intermediates(self) -> dict[str, np.ndarray] | None:
        return self.run.kept()

    @property
    def notes(self) -> tuple[str, ...]:
        return tuple(self.run.notes)

    @property
    def fallbacks(self) -> tuple[dict, ...]:
        """Windows (or vocoder chunks) generated again in FP32 so far (see `window.Run`)."""
        return tuple(self.run.fallbacks)

    def result(self) -> Result:
        """Every (remaining) chunk, joined, with the record."""
        pieces = list(self)
        audio_ = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
        return Result(audio_, self.info.sample_rate, self.info, self.timings, self.nfe, self.intermediates,
                      self.notes, self.fallbacks)


# Long videos: 10-second windows every 9 seconds; the 1-second overlaps are crossfaded.
WINDOW_HOP = 9.0
HOP_LATENTS = int(WINDOW_HOP * C.LATENT_RATE)                  # 225
HOP_SAMPLES = int(WINDOW_HOP * C.SAMPLE_RATE)                  # 144 000
FADE_SAMPLES = int((C.WINDOW_SECONDS - WINDOW_HOP) * C.SAMPLE_RATE)   # 16 000


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


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One generation's inputs, checked and read (`Session._prepare`), before any model runs."""

    source: object                                    # a path or a binary file object
    info: StreamInfo
    track: np.ndarray                                 # phoneme ids over every window's span
    noise_of: Callable[[int], np.ndarray]             # window -> initial latent [128, T]
    crops: np.ndarray | None                          # the reference voice's crops for RawNet3


def window_phone_ids(track: np.ndarray, index: int) -> np.ndarray:
    """Window `index`'s `[T]` slice of the phoneme track (zeros past its end: no speech)."""
    ids = track[index * HOP_LATENTS:index * HOP_LATENTS + C.WINDOW_LATENTS]
    return np.pad(ids, (0, C.WINDOW_LATENTS - len(ids)))


class Session:
    """A loaded model: `generate()` for a whole result, `stream()` for chunks as they are ready.

    Thread safety: a Session may be shared by threads. Every backend call holds the backend's
    lock (it has one set of buffers), so concurrent generations take turns stage by stage
    rather than run in parallel; each keeps its own record, so results equal sequential calls.
    The lock is never held while a chunk is out with the caller: a stream abandoned half-way
    blocks nobody. `close()` (or `with Session(...)`) frees the backend's sessions, engines and
    device memory.

    `precision`: fp32, fp16 (FP16 graphs on ort, FP16 engines on trt, the torch modules under the
    same policy), bf16 (torch only); None: fp16 where ort or trt runs on a GPU and the folder has
    what it needs, else fp32 (`Backend.half_by_default`). A window whose half-precision values are
    not finite is generated again in FP32 (`window.generate`; `generate_many`'s batches too).

    `compile`: the torch backend (chosen by it) with its flow step through `torch.compile`, Inductor's
    cache kept across processes (`runtime/compiled.py`); the seconds a run spent compiling are in its
    timings (`compile`).
    """

    def __init__(self, model_dir: str | Path, backend: str = "auto", device: str | None = None,
                 verify_hashes: bool = False, preprocess: str = "auto", precision: str | None = None,
                 compile: bool = False):
        self.folder = ModelFolder.open(model_dir, verify_hashes=verify_hashes)
        self.backend = create_backend(self.folder, backend, device, precision, compile)
        self.frames_device = self._frames_device(preprocess)       # None: frames on the host
        self.sizes = self.folder.sizes
        self.encoders = Encoders()           # each distinct frame / segment encoded once (features.py)
        self.fp32_encoders = Encoders()      # the same for windows generated again in FP32 (window.generate)

    # --- public ---------------------------------------------------------------------------
    def generate(self, video_source, options: GenerateOptions | None = None, *, ref_audio=None,
                 noise: np.ndarray | None = None, keep_intermediates: bool = False,
                 progress: Callable[[dict], None] | None = None, **fields) -> Result:
        """The whole sound track. `options`, or its fields as keywords (`transcript=`, `steps=`, ...)."""
        chunks, _ = self.stream(video_source, options, ref_audio=ref_audio, noise=noise,
                                keep_intermediates=keep_intermediates, progress=progress, **fields)
        return chunks.result()

    def stream(self, video_source, options: GenerateOptions | None = None, *, ref_audio=None,
               noise: np.ndarray | None = None, keep_intermediates: bool = False,
               progress: Callable[[dict], None] | None = None, **fields) -> tuple[AudioStream, StreamInfo]:
        """(chunks, info): `info` at once; `chunks` yields float32 audio as each piece is ready.

        Every input is checked here, before any model runs. `progress(event)` hears of each
        stage call and solver step (see `window.Run`)."""
        if options is not None and not isinstance(options, GenerateOptions):
            raise TypeError(f"options must be GenerateOptions, got {type(options).__name__}; "
                            "pass transcript=, steps=, ... as keywords")
        prepared = self._prepare(video_source, options, ref_audio, noise, **fields)
        run = Run.new(keep_intermediates, progress)
        return AudioStream(self._chunks(prepared, run), prepared.info, run), prepared.info

    def generate_many(self, items: Iterable, options: GenerateOptions | None = None, *,
                      keep_intermediates: bool = False, progress: Callable[[dict], None] | None = None,
                      batch: int | None = None, workers: int = 1, **fields) -> Iterator[Result | Exception]:
        """One `Result` per item, or the exception that item raised, in input order, each as soon
        as it (and every item before it) is done; one bad item never stops the others.

        An item is a video (as `generate` takes it) or a `batch.Item` (a video and what it changes
        of `options`: transcript, speech interval, seed, reference voice, noise). Every item gets
        `options` (or its fields as keywords) otherwise, so its result equals `generate`'s with the
        same options (within 1e-5: windows of several items share calls). `batch`: windows per
        flow-step call (default: `default_batch`); `workers`: threads decoding and preparing
        the next items' frames while the model runs. `progress(event)` hears `generate`'s events,
        each with the `item` it belongs to. See `batch.py`."""
        from .batch import generate_many
        yield from generate_many(self, items, options, keep_intermediates=keep_intermediates, progress=progress,
                                 batch=batch, workers=workers, **fields)

    @property
    def default_batch(self) -> int:
        """Windows per flow-step call in `generate_many` when not given: see `batch.default_batch`."""
        from .batch import default_batch
        return default_batch(self)

    def describe(self) -> str:
        """The backend, and where frames are prepared when not on the host."""
        where = "" if self.frames_device is None else f", frames on {self.frames_device}"
        return self.backend.describe() + where

    def close(self) -> None:
        """Free the backend's sessions, engines and device memory (a later call loads them again)."""
        self.backend.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- steps ----------------------------------------------------------------------------
    def _prepare(self, video_source, options: GenerateOptions | None, ref_audio, noise, **fields) -> Prepared:
        """Every input checked and read, before any model runs."""
        options = dataclasses.replace(options or GenerateOptions(), **fields)
        options.check()
        if isinstance(video_source, video.VideoFrames):
            video_source = video_source.as_file()
        meta = video.probe(video_source)
        options = options.for_clip(meta.duration)
        if ref_audio is not None and "speaker_encoder" not in self.folder.contracts:
            raise VssflowInputError(f"{self.folder.path}: this model folder has no speaker stage; "
                                    "re-export with --rawnet to use a reference voice")
        speaker_crops = None if ref_audio is None else audio.speaker_crops(audio.load_reference(ref_audio))
        n_windows = video.count_windows(meta.duration, WINDOW_HOP)    # as the container says; decoding decides
        track = self._phoneme_track(options, meta.duration, n_windows)
        noise_of = self._noise(noise, options.seed, n_windows)
        info = StreamInfo(meta.duration, C.SAMPLE_RATE, n_windows, self.describe(), options, meta,
                          self.folder.is_demo, self.backend.precision)
        return Prepared(video_source, info, track, noise_of, speaker_crops)

    def _frames_device(self, preprocess: str) -> str | None:
        if preprocess not in PREPROCESS:
            raise VssflowInputError(f"preprocess must be one of {', '.join(PREPROCESS)}, got {preprocess!r}")
        device = self.backend.frames_device
        if preprocess == "host" or (preprocess == "auto" and not str(device).startswith("cuda")):
            return None
        if device is None:
            raise BackendError(f"the {self.backend.name} backend takes frames from the host; preprocessing on the "
                               "device needs the torch or trt backend")
        return device

    def _phoneme_track(self, o: GenerateOptions, duration: float, n_windows: int) -> np.ndarray:
        """Phoneme ids over the windows' whole timeline, stretched over the speech interval."""
        total = (n_windows - 1) * HOP_LATENTS + C.WINDOW_LATENTS
        if o.transcript is None:
            return np.zeros(total, np.int64)
        return text.phoneme_ids(o.transcript, o.speech_start, o.speech_end,
                                window_seconds=total / C.LATENT_RATE, clip_seconds=duration)

    def _noise(self, noise: np.ndarray | None, seed: int, n_windows: int) -> Callable[[int], np.ndarray]:
        """The initial latent of window k, `[128, T]`: the seed's draws in window order (so a
        video that decodes to more windows than its container said just draws more), or the
        `noise` given, `[128, T]` or `[windows, 128, T]`."""
        shape = (n_windows, self.sizes.audio_channels, C.WINDOW_LATENTS)
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

    def _windows(self, source, record: Callable[[float], None]) -> Iterator[video.VideoWindow | video.FrameWindow]:
        """`video.windows`, the seconds spent in it for each (decoding, and on the host resizing) to `record`."""
        upload = None
        if self.frames_device is not None:
            upload = extras.load("kernels.frames", "torch", "preparing frames on the device").uploader(
                self.frames_device)
        windows = video.windows(source, hop=WINDOW_HOP, upload=upload)
        while True:
            t0 = time.perf_counter()
            w = next(windows, None)
            record(time.perf_counter() - t0)
            if w is None:
                return
            yield w

    def _speaker(self, crops, run: Run) -> np.ndarray:
        """The speaker embedding `[1, Dspk]`: RawNet3 on the reference voice's crops, or zeros."""
        if crops is None:
            return np.zeros((1, self.sizes.speaker_dim), np.float32)
        speaker = run.call(self.backend, "speaker_encoder", {"crops": crops})["embedding"]
        run.keep("speaker", speaker[0])
        return speaker

    def _length(self, prepared: Prepared, w, run: Run) -> int | None:
        """Samples of audio to write, known at the last window (None before it); a container
        whose duration the frames contradict is noted."""
        if not w.last:
            return None
        meta = prepared.info.video
        length = output_samples(meta, w.end)
        if length != int(round(meta.duration * C.SAMPLE_RATE)):
            run.notes.append(f"the container says {meta.duration:.2f} s but the frames run "
                             f"{w.end:.2f} s: the sound follows the frames")
        return length

    def _chunks(self, prepared: Prepared, run: Run) -> Iterator[np.ndarray]:
        options, track = prepared.info.options, prepared.track
        speaker = self._speaker(prepared.crops, run)
        length: list[int] = []          # samples to write, known once the last window is decoded

        def window_audio():
            frames: list[float] = []                    # seconds spent getting each window
            for w in self._windows(prepared.source, frames.append):
                run.window = w.index
                run.timed("frames", frames.pop())
                if w.last:
                    length.append(self._length(prepared, w, run))
                yield window.generate(self.backend, run, w, window_phone_ids(track, w.index), speaker,
                                      prepared.noise_of(w.index), solver=options.solver, steps=options.steps,
                                      cfg=options.cfg, encoders=self.encoders, fp32_encoders=self.fp32_encoders)
            if frames:                                  # the end of the stream, after the last window
                run.timed("frames", frames.pop())

        yield from cut_audio(crossfade_windows(window_audio()), length, run)
