"""`Session`: a model folder, a backend, and the pipeline from video to sound track.

    session = Session("models/vssflow")
    result = session.generate("clip.mp4", transcript="hello there", speech_start=1.0, speech_end=3.0)
    chunks, info = session.stream("clip.mp4")       # info at once, chunks as they are ready

Per 10-second window: the encoders and the condition stage run once; the ODE loop calls only
`flow_step` (both CFG passes batched); the VAE decodes the window's latent once and the
vocoder streams it out in chunks. Longer videos take 10-second windows every 9 seconds, each
streamed as soon as it is done, the 1-second overlaps joined by an equal-power crossfade.
`video` may be a path, a binary file object, or `VideoFrames(frames, fps)` already decoded.

Frames are resized and normalised on the host (`video.py`, numpy), or, for a backend whose
encoders run on a GPU, on that GPU (`vssflow.kernels.frames`, Triton): the picked frames go up
once per window and come out bit for bit the same; see `PREPROCESS`.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from . import contracts as C
from . import audio, solvers, text, video
from .backends import create_backend
from .errors import BackendError, VssflowInputError
from .model_folder import ModelFolder


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

    def check(self, duration: float) -> None:
        if self.solver not in solvers.SOLVERS:
            raise VssflowInputError(f"unknown solver {self.solver!r}: choose one of {', '.join(solvers.SOLVERS)}")
        if self.solver != "dopri5" and not 1 <= self.steps <= 1000:
            raise VssflowInputError(f"steps must be between 1 and 1000, got {self.steps}")
        if not np.isfinite(self.cfg) or not 0 <= self.cfg <= 100:
            raise VssflowInputError(f"cfg must be a finite number between 0 and 100, got {self.cfg}")
        if self.transcript is None and (self.speech_start is not None or self.speech_end is not None):
            raise VssflowInputError("speech start/end given without a transcript")


@dataclasses.dataclass
class StreamInfo:
    """Known before the first chunk: what will come out and how it is made."""

    duration: float
    sample_rate: int
    n_windows: int
    backend: str
    options: GenerateOptions
    video: video.VideoInfo
    demo_model: bool


@dataclasses.dataclass
class Result:
    audio: np.ndarray                 # float32 [samples], 16 kHz, cut to the video's length
    sample_rate: int
    info: StreamInfo
    timings: dict[str, float]         # seconds per stage, summed over windows
    nfe: int                          # flow_step calls (each runs both CFG passes)
    intermediates: dict[str, np.ndarray] | None = None

    @property
    def options(self) -> GenerateOptions:
        return self.info.options


class _Run:
    """One generation's own record (threads sharing a Session each have theirs)."""

    def __init__(self, keep: bool):
        self.timings: dict[str, float] = {}
        self.nfe = 0
        self.intermediates: dict[str, list[np.ndarray]] | None = {} if keep else None

    def keep(self, name: str, value: np.ndarray) -> None:
        if self.intermediates is not None:
            self.intermediates.setdefault(name, []).append(value)

    def stats(self) -> dict:
        kept = None
        if self.intermediates is not None:
            kept = {k: np.concatenate(v) if k == "audio" else np.stack(v) for k, v in self.intermediates.items()}
        return {"nfe": self.nfe, "timings": dict(self.timings), "intermediates": kept}


# Where frames are resized and normalised: "host" (numpy, any backend), "device" (on the
# backend's device, torch or trt backends), "auto" (device when that is a GPU). On a CPU torch
# device "device" runs the kernels' reference (dense float64 products, ~7x slower than the
# host path): for checking, not speed.
PREPROCESS = ("auto", "host", "device")

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


def nearest_indices(in_len: int, out_len: int, exact: bool = False) -> np.ndarray:
    """Source indices of PyTorch's `nearest` / `nearest-exact` 1-d interpolation (float32 scale)."""
    if in_len == out_len:
        return np.arange(out_len)
    scale = np.float32(in_len) / np.float32(out_len)
    pos = np.arange(out_len, dtype=np.float32)
    src = np.floor((pos + np.float32(0.5)) * scale if exact else pos * scale).astype(np.int64)
    return np.minimum(src, in_len - 1)


class Session:
    """A loaded model: `generate()` for a whole result, `stream()` for chunks as they are ready.

    Thread safety: a Session may be shared by threads. Every backend call is serialized by a
    lock (backends hold one set of buffers), so concurrent generations take turns stage by stage
    rather than run in parallel; each keeps its own state, so results equal sequential calls.
    The lock is never held while a chunk is out with the caller: a stream abandoned half-way
    blocks nobody.
    """

    def __init__(self, model_dir: str | Path, backend: str = "auto", device: str | None = None,
                 verify_hashes: bool = True, preprocess: str = "auto"):
        self.folder = ModelFolder.open(model_dir, verify_hashes=verify_hashes)
        self.backend = create_backend(self.folder, backend, device)
        self.frames_device = self._frames_device(preprocess)       # None: frames on the host
        self.sizes = self.folder.sizes
        self._lock = threading.Lock()
        self._last = _Run(keep=False)

    # --- public ---------------------------------------------------------------------------
    def generate(self, video_source, transcript: str | None = None, speech_start: float | None = None,
                 speech_end: float | None = None, ref_audio=None, solver: str = "euler", steps: int = 25,
                 cfg: float = 3.0, seed: int = 0, noise: np.ndarray | None = None,
                 keep_intermediates: bool = False, progress: Callable[[dict], None] | None = None) -> Result:
        chunks, info, run = self._start(video_source, transcript, speech_start, speech_end, ref_audio, solver,
                                        steps, cfg, seed, noise, keep_intermediates, progress)
        pieces = list(chunks)
        audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
        stats = run.stats()
        return Result(audio, C.SAMPLE_RATE, info, stats["timings"], stats["nfe"], stats["intermediates"])

    def last_run(self) -> dict:
        """NFE, per-stage seconds and (if kept) intermediates of the last finished generation."""
        return self._last.stats()

    def stream(self, video_source, transcript: str | None = None, speech_start: float | None = None,
               speech_end: float | None = None, ref_audio=None, solver: str = "euler", steps: int = 25,
               cfg: float = 3.0, seed: int = 0, noise: np.ndarray | None = None,
               keep_intermediates: bool = False,
               progress: Callable[[dict], None] | None = None) -> tuple[Iterator[np.ndarray], StreamInfo]:
        """(chunks, info): `info` at once; `chunks` yields float32 audio as each piece is ready."""
        chunks, info, _ = self._start(video_source, transcript, speech_start, speech_end, ref_audio, solver, steps,
                                      cfg, seed, noise, keep_intermediates, progress)
        return chunks, info

    def _start(self, video_source, transcript, speech_start, speech_end, ref_audio, solver, steps, cfg, seed,
               noise, keep_intermediates, progress) -> tuple[Iterator[np.ndarray], StreamInfo, _Run]:
        """Check every input (raising before any model runs); the chunks fill their own `_Run`."""
        if isinstance(video_source, video.VideoFrames):
            video_source = video_source.as_file()
        meta = video.probe(video_source)
        if transcript is not None:          # defaults: from 0 to the end of the clip (at most 10 s)
            speech_start = 0.0 if speech_start is None else speech_start
            speech_end = min(meta.duration, C.WINDOW_SECONDS) if speech_end is None else speech_end
        options = GenerateOptions(transcript, speech_start, speech_end, solver, steps, cfg, seed)
        options.check(meta.duration)
        if ref_audio is not None and "speaker_encoder" not in self.folder.contracts:
            raise VssflowInputError(f"{self.folder.path}: this model folder has no speaker stage; "
                                    "re-export with --rawnet to use a reference voice")
        speaker_crops = None if ref_audio is None else audio.speaker_crops(audio.load_reference(ref_audio))
        n_windows = video.count_windows(meta.duration, WINDOW_HOP)    # as the container says; decoding decides
        ids = self._phoneme_track(options, meta.duration, n_windows)
        noise = self._noise(noise, seed, n_windows)
        info = StreamInfo(meta.duration, C.SAMPLE_RATE, n_windows, self.describe(), options, meta,
                          self.folder.is_demo)
        run = _Run(keep_intermediates)
        return self._chunks(video_source, meta, options, ids, noise, speaker_crops, run, progress), info, run

    def describe(self) -> str:
        """The backend, and where frames are prepared when not on the host."""
        where = "" if self.frames_device is None else f", frames on {self.frames_device}"
        return self.backend.describe() + where

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

    # --- steps ----------------------------------------------------------------------------
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

    def _chunks(self, source, meta, options, ids, noise, crops, run: _Run, progress) -> Iterator[np.ndarray]:
        speaker = np.zeros((1, self.sizes.speaker_dim), np.float32)
        if crops is not None:
            speaker = self._timed(run, "speaker_encoder", "speaker_encoder", {"crops": crops})["embedding"]
            run.keep("speaker", speaker[0])
        upload = None
        if self.frames_device is not None:
            from vssflow.kernels.frames import uploader
            upload = uploader(self.frames_device)
        length: list[int] = []          # samples to write, known once the last window is decoded

        def window_audio():
            for window in video.windows(source, hop=WINDOW_HOP, upload=upload):
                if window.last:
                    length.append(output_samples(meta, window.end))
                z = self._window_latent(run, window, options, ids, noise(window.index), speaker, progress)
                yield self._decode(run, z)

        written = 0
        for chunk in crossfade_windows(window_audio()):
            # The cut falls in the last window's audio, which comes only once that window is known.
            if length:
                chunk = chunk[:max(0, length[0] - written)]
            written += len(chunk)
            if len(chunk):
                run.keep("audio", chunk)
                yield chunk
            if length and written >= length[0]:
                break
        self._last = run

    def _timed(self, run: _Run, name: str, stage: str, feed: dict) -> dict:
        with self._lock:
            t0 = time.perf_counter()
            out = self.backend.run(stage, feed)
            run.timings[name] = run.timings.get(name, 0.0) + time.perf_counter() - t0
        return out

    def _encoder_inputs(self, run: _Run, window: video.VideoWindow | video.FrameWindow):
        """(clip frames, Synchformer segments): numpy from the host, or tensors made on the device."""
        if isinstance(window, video.VideoWindow):
            return window.clip_frames, np.ascontiguousarray(window.synch_segments())
        import torch

        from vssflow.kernels.frames import window_inputs
        t0 = time.perf_counter()
        dtype = getattr(torch, self.folder.contracts["clip_encoder"].inputs[0].dtype)    # the engines' own
        frames, segments = window_inputs(window, dtype=dtype)
        if frames.is_cuda:
            torch.cuda.synchronize(frames.device)      # time the kernels, not their launch
        run.timings["preprocess"] = run.timings.get("preprocess", 0.0) + time.perf_counter() - t0
        return frames, segments

    def _window_latent(self, run: _Run, window: video.VideoWindow | video.FrameWindow, o: GenerateOptions,
                       ids: np.ndarray, noise: np.ndarray, speaker: np.ndarray, progress) -> np.ndarray:
        T = C.WINDOW_LATENTS
        frames, segments = self._encoder_inputs(run, window)
        clip = self._timed(run, "clip_encoder", "clip_encoder", {"frames": frames})["features"]
        synch = self._timed(run, "synch_encoder", "synch_encoder", {"segments": segments})["features"]
        del frames, segments                           # device memory back before the ODE loop
        synch = synch.reshape(-1, synch.shape[-1])                                   # [240, Ds]
        clip_t = clip[nearest_indices(len(clip), T)][None]                           # [1, T, Dc]
        synch_t = synch[nearest_indices(len(synch), T, exact=True)][None]            # [1, T, Ds]
        window_ids = ids[window.index * HOP_LATENTS:window.index * HOP_LATENTS + T]
        window_ids = np.pad(window_ids, (0, T - len(window_ids)))[None]     # past the track: no speech
        cond = self._timed(run, "condition", "condition", {"clip": clip_t, "synch": synch_t,
                                                      "phone_ids": window_ids, "speaker": speaker})
        for name, value in (("clip_features", clip), ("synch_features", synch), ("phone_ids", window_ids[0]),
                            ("initial_latent", noise)):
            run.keep(name, value)
        flow_velocity, to_native, to_numpy = self.backend.flow_loop(cond, o.cfg)

        def velocity(t: float, z):
            run.nfe += 1
            with self._lock:
                t0 = time.perf_counter()
                v = flow_velocity(t, z)
                run.timings["flow_step"] = run.timings.get("flow_step", 0.0) + time.perf_counter() - t0
            return v

        def report(step: dict) -> None:
            if progress is not None:
                progress({"window": window.index, "step": step["step"], "t": step["t"], "nfe": step["nfe"]})

        z0 = to_native(noise[None])                                                  # [1, 128, T]
        z1 = to_numpy(solvers.solve(o.solver, velocity, z0, o.steps, callback=report,
                                    frozen=to_native(cond["channels"])))
        run.keep("final_latent", z1[0])
        return z1

    def _decode(self, run: _Run, z: np.ndarray) -> Iterator[np.ndarray]:
        """Latent `[1, 128, T]` -> audio chunks: the VAE once, the vocoder in overlapping chunks."""
        mel = self._timed(run, "vae_decoder", "vae_decoder", {"z": z})["mel"]        # [1, 4T, 64]
        run.keep("mel", mel[0])
        m = mel.shape[1]
        step, ov = C.VOCODER_CHUNK, C.VOCODER_OVERLAP
        for a in range(0, m, step):
            b = min(m, a + step)
            a0, b0 = max(0, a - ov), min(m, b + ov)
            audio = self._timed(run, "vocoder", "vocoder", {"mel": np.ascontiguousarray(mel[:, a0:b0])})["audio"][0]
            end = (b - a0) * C.SAMPLES_PER_MEL + (C.VOCODER_EXTRA if b == m else 0)
            yield audio[(a - a0) * C.SAMPLES_PER_MEL:end]
