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

A thin front: each step is public in a module below it, which `batch.py` shares: the inputs
checked and read (`inputs.py`), the windows on one timeline (`timeline.py`), one window's stages
with the guard (`window.py`), what comes back (`results.py`).

Frames are resized and normalised on the host (`video.py`, numpy), or, for a backend whose
encoders run on a GPU, on that GPU (`vssflow.kernels.frames`, Triton): the picked frames go up
once per window and come out bit for bit the same; see `PREPROCESS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from . import extras, window
from .backends import create_backend
from .batch import default_batch, generate_many
from .errors import BackendError
from .features import Encoders
from .inputs import GenerateOptions, Prepared, StreamInfo, frame_windows, frames_device, prepare, speaker_embedding
from .memory import MemoryPlan
from .model_folder import ModelFolder
from .results import AudioStream, Result
from .timeline import FADE_SAMPLES, HOP_SAMPLES, WINDOW_HOP, audio_length, crossfade_windows, cut_audio, \
    window_phone_ids
from .window import Run

# Re-exported: where users and tests have imported them from.
__all__ = ["Session", "GenerateOptions", "StreamInfo", "Result", "AudioStream", "WINDOW_HOP", "HOP_SAMPLES",
           "FADE_SAMPLES", "crossfade_windows"]


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
    not finite is generated again in FP32 (`window.generate`; `generate_many`'s batches through
    `window.generate_rows`).

    `compile`: the torch backend (chosen by it) with its flow step through `torch.compile`, Inductor's
    cache kept across processes (`runtime/compiled.py`); the seconds a run spent compiling are in its
    timings (`compile`).

    `max_memory`: bytes (or "4G") the run plans for (`memory.MemoryPlan`): the encoders' calls in
    pieces sized to what the weights leave; MemoryBudgetError (exit 4) where the weights alone do
    not fit. None: pieces of at most `memory.DEFAULT_ACTIVATIONS`.

    `low_memory`: one stage loaded at a time (the ort and trt backends): the weights held are the
    largest stage's, not every stage's, and each window loads its stages again (a single-window
    clip loads each stage once either way). None: chosen where `max_memory` is too small for
    every stage's weights together.
    """

    def __init__(self, model_dir: str | Path, backend: str = "auto", device: str | None = None,
                 verify_hashes: bool = False, preprocess: str = "auto", precision: str | None = None,
                 compile: bool = False, max_memory: int | str | None = None, low_memory: bool | None = None):
        self.folder = ModelFolder.open(model_dir, verify_hashes=verify_hashes)
        self.backend = create_backend(self.folder, backend, device, precision, compile)
        try:
            self.memory = MemoryPlan.make(self.folder, self.backend.precision, max_memory, low_memory)
            if self.memory.low_memory and not self.backend.stages_apart:
                raise BackendError(f"the {self.backend.name} backend loads every stage's weights together (weights.pt), so it "
                                   "cannot hold one stage at a time (--low-memory, or a --max-memory below every "
                                   "stage's weights): use --backend ort or trt")
        except Exception:
            self.backend.close()
            raise
        self.backend.pieces = dict(self.memory.rows)          # the encoders' rows per call
        self.backend.resident = 1 if self.memory.low_memory else None
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
        prepared = prepare(self, video_source, options, ref_audio=ref_audio, noise=noise, **fields)
        run = Run.new(keep_intermediates, progress)
        return AudioStream(self._chunks(prepared, run), prepared.info, run), prepared.info

    def generate_many(self, items: Iterable, options: GenerateOptions | None = None, *,
                      keep_intermediates: bool = False, progress: Callable[[dict], None] | None = None,
                      batch: int | None = None, workers: int = 1, **fields) -> Iterator[Result | Exception]:
        """One `Result` per item, or the exception that item raised, in input order, each as soon
        as it (and every item before it) is done; one bad item never stops the others.

        An item is a video (as `generate` takes it) or an `Item` (`inputs.py`; a video and what it changes
        of `options`: transcript, speech interval, seed, reference voice, noise). Every item gets
        `options` (or its fields as keywords) otherwise, so its result equals `generate`'s with the
        same options (within 1e-5: windows of several items share calls). `batch`: windows per
        flow-step call (default: `default_batch`); `workers`: threads decoding and preparing
        the next items' frames while the model runs. `progress(event)` hears `generate`'s events,
        each with the `item` it belongs to. See `batch.py`."""
        yield from generate_many(self, items, options, keep_intermediates=keep_intermediates, progress=progress,
                                 batch=batch, workers=workers, **fields)

    @property
    def default_batch(self) -> int:
        """Windows per flow-step call in `generate_many` when not given: see `batch.default_batch`."""
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
    def _frames_device(self, preprocess: str) -> str | None:
        return frames_device(preprocess, self.backend.frames_device, self.backend.name,
                             triton=not extras.missing("kernels"))

    def _chunks(self, prepared: Prepared, run: Run) -> Iterator[np.ndarray]:
        options, track = prepared.info.options, prepared.track
        speaker = speaker_embedding(self.backend, prepared.crops, self.sizes.speaker_dim, run)
        length: list[int] = []          # samples to write, known once the last window is decoded

        def window_audio():
            frames: list[float] = []                    # seconds spent getting each window
            for w in frame_windows(prepared.source, self.frames_device, frames.append):
                run.window = w.index
                run.timed("frames", frames.pop())
                if w.last:
                    length.append(audio_length(prepared.info.video, w, run))
                yield window.generate(self.backend, run, w, window_phone_ids(track, w.index), speaker,
                                      prepared.noise_of(w.index), solver=options.solver, steps=options.steps,
                                      cfg=options.cfg, encoders=self.encoders, fp32_encoders=self.fp32_encoders)
            if frames:                                  # the end of the stream, after the last window
                run.timed("frames", frames.pop())

        yield from cut_audio(crossfade_windows(window_audio()), length, run)
