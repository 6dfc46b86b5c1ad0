"""One 10-second window, stage by stage: conditions, sampling, decoding to audio chunks.

The Session strings these together for each window of a video (`generate`); benchmarks and
batch runs call them one by one. Each takes the backend that runs the stages and the `Run` that
records what a generation did (seconds per stage, flow evaluations, intermediates, progress,
FP32 fallbacks), so a result carries its own record:

    run = Run()
    cond = conditions(backend, run, window, phone_ids, speaker)     # once per window
    z = sample(backend, run, cond, noise, solver="euler", steps=25, cfg=3.0)
    for chunk in decode(backend, run, z): ...                       # the VAE once, the vocoder in chunks

The guard (`generate`): in half precision a value can pass FP16's 65504 and become inf or NaN.
The window's latent and mel are checked before any of its audio is given out; a window where
either is not finite is generated again, whole, in FP32 (`backend.fp32()`). The vocoder streams
exactly chunk by chunk, so a chunk of audio that is not finite is decoded again alone in FP32
before it is given out. Each fallback is recorded in `Run.fallbacks`, and the first one of a run
adds one note.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator

import numpy as np

from . import contracts as C
from . import extras, solvers, video
from .errors import NonFiniteError
from .precision import nonfinite

Progress = Callable[[dict], None]


@dataclasses.dataclass
class Run:
    """What one generation did, kept apart from any other's (threads may share a Session).

    `timings`: seconds per stage, summed over windows (`frames`: decoding and preparing the
    video frames on the host; `preprocess`: preparing them on the device). `nfe`: flow_step
    calls, each running both CFG passes. `intermediates`: features, ids, latents, mel and audio,
    when asked for. `notes`: what a user should know about the result, one line each.
    `fallbacks`: each window (or vocoder chunk) generated again in FP32 because its half-precision
    values were not finite: `{"window", "found" (latent, mel or audio), "redone" (window or chunk),
    "chunk" (for a chunk)}`.
    `progress(event)` hears of every stage call (`{"kind": "stage", "window", "stage",
    "seconds"}`), solver step (`{"kind": "step", "window", "step", "t", "nfe"}`) and fallback
    (`{"kind": "fallback", "window", ...}`).
    """

    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    nfe: int = 0
    intermediates: dict[str, list[np.ndarray]] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    progress: Progress | None = None
    window: int = 0                          # the window being generated
    fallbacks: list[dict] = dataclasses.field(default_factory=list)

    @classmethod
    def new(cls, keep_intermediates: bool = False, progress: Progress | None = None) -> Run:
        return cls(intermediates={} if keep_intermediates else None, progress=progress)

    def keep(self, name: str, value) -> None:
        if self.intermediates is not None:
            self.intermediates.setdefault(name, []).append(value)

    def mark(self) -> dict[str, int]:
        """Where the intermediates stand, for `rewind` (a window generated again keeps one copy)."""
        return {k: len(v) for k, v in (self.intermediates or {}).items()}

    def rewind(self, mark: dict[str, int]) -> None:
        for k, v in (self.intermediates or {}).items():
            del v[mark.get(k, 0):]

    def fell_back(self, precision: str, found: list[str], redone: str, chunk: int | None = None) -> None:
        """Record that FP16 (or BF16) gave non-finite `found` values and `redone` (the window, or one
        vocoder chunk) was generated again in FP32; the first time in a run, one note says so."""
        entry = {"window": self.window, "found": list(found), "redone": redone,
                 **({} if chunk is None else {"chunk": chunk})}
        if not self.fallbacks:
            what = "the window" if chunk is None else f"vocoder chunk {chunk}"
            self.notes.append(f"{precision.upper()} gave non-finite values ({', '.join(found)}) in window "
                              f"{self.window + 1}: {what} was generated again in FP32 (every later fallback is "
                              "listed in the result's fallbacks)")
        self.fallbacks.append(entry)
        self.report({"kind": "fallback", **entry})

    def kept(self) -> dict[str, np.ndarray] | None:
        """The intermediates, one array each: audio joined, the rest stacked by window."""
        if self.intermediates is None:
            return None
        return {k: np.concatenate(v) if k == "audio" else np.stack(v) for k, v in self.intermediates.items()}

    def timed(self, name: str, seconds: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + seconds
        self.report({"kind": "stage", "stage": name, "seconds": seconds})

    def report(self, event: dict) -> None:
        if self.progress is not None:
            self.progress({"window": self.window, **event})

    def call(self, backend, stage: str, feed: dict) -> dict[str, np.ndarray]:
        """`backend.run(stage, feed)`, timed without the wait for another thread's call."""
        with backend.lock:
            t0 = time.perf_counter()
            out = backend.run(stage, feed)
            self.timed(stage, time.perf_counter() - t0)
        return out


# --- conditions ------------------------------------------------------------------------------

def nearest_indices(in_len: int, out_len: int, exact: bool = False) -> np.ndarray:
    """Source indices of PyTorch's `nearest` / `nearest-exact` 1-d interpolation (float32 scale)."""
    if in_len == out_len:
        return np.arange(out_len)
    scale = np.float32(in_len) / np.float32(out_len)
    pos = np.arange(out_len, dtype=np.float32)
    src = np.floor((pos + np.float32(0.5)) * scale if exact else pos * scale).astype(np.int64)
    return np.minimum(src, in_len - 1)


def to_latent_rate(clip: np.ndarray, synch: np.ndarray, length: int = C.WINDOW_LATENTS
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Encoder features at the latent rate, as the condition stage takes them (the authors' infer.py):
    CLIP `[100, Dc]` by `nearest`, Synchformer `[240, Ds]` by `nearest-exact` -> `[1, T, D]` each."""
    return (np.ascontiguousarray(clip[nearest_indices(len(clip), length)][None]),
            np.ascontiguousarray(synch[nearest_indices(len(synch), length, exact=True)][None]))


def encoder_inputs(backend, run: Run, window: video.VideoWindow | video.FrameWindow):
    """(clip frames `[100, 3, 224, 224]`, Synchformer segments `[30, 16, 3, 224, 224]`): numpy from
    the host for a `VideoWindow`, tensors made on the device for a `FrameWindow`."""
    if isinstance(window, video.VideoWindow):
        return window.clip_frames, np.ascontiguousarray(window.synch_segments())
    frames_module = extras.load("kernels.frames", "torch", "preparing frames on the device")
    import torch
    t0 = time.perf_counter()
    dtype = getattr(torch, backend.folder.contracts["clip_encoder"].inputs[0].dtype)    # the engines' own
    frames, segments = frames_module.window_inputs(window, dtype=dtype)
    if frames.is_cuda:
        torch.cuda.synchronize(frames.device)      # time the kernels, not their launch
    run.timed("preprocess", time.perf_counter() - t0)
    return frames, segments


def encode(backend, run: Run, window: video.VideoWindow | video.FrameWindow) -> tuple[np.ndarray, np.ndarray]:
    """The window's encoder features: CLIP `[100, Dc]`, Synchformer `[240, Ds]`."""
    frames, segments = encoder_inputs(backend, run, window)
    clip = run.call(backend, "clip_encoder", {"frames": frames})["features"]
    synch = run.call(backend, "synch_encoder", {"segments": segments})["features"]
    return clip, synch.reshape(-1, synch.shape[-1])


def condition(backend, run: Run, clip: np.ndarray, synch: np.ndarray, phone_ids: np.ndarray,
              speaker: np.ndarray) -> dict[str, np.ndarray]:
    """The condition stage on encoder features (resampled here to the latent rate), the window's
    phoneme ids `[T]` and the speaker embedding `[1, Dspk]`: folded condition and K/V cache."""
    clip_t, synch_t = to_latent_rate(clip, synch, len(phone_ids))
    return run.call(backend, "condition", {"clip": clip_t, "synch": synch_t, "phone_ids": phone_ids[None],
                                           "speaker": speaker})


def conditions(backend, run: Run, window, phone_ids: np.ndarray, speaker: np.ndarray) -> dict[str, np.ndarray]:
    """Everything once per window: both encoders, then the condition stage."""
    clip, synch = encode(backend, run, window)
    run.keep("clip_features", clip)
    run.keep("synch_features", synch)
    run.keep("phone_ids", phone_ids)
    return condition(backend, run, clip, synch, phone_ids, speaker)


# --- sampling --------------------------------------------------------------------------------

def sample(backend, run: Run, cond: dict[str, np.ndarray], noise: np.ndarray, *, solver: str = "euler",
           steps: int = 25, cfg: float = 3.0) -> np.ndarray:
    """The ODE from `noise` `[128, T]` (t = 0) to the window's latent `[1, 128, T]` (t = 1),
    `flow_step` as the velocity, the state in the backend's own arrays throughout."""
    arrays = backend.arrays
    flow_velocity = backend.velocity(cond, cfg)

    def velocity(t: float, z):
        run.nfe += 1
        with backend.lock:
            t0 = time.perf_counter()
            v = flow_velocity(t, z)
            run.timings["flow_step"] = run.timings.get("flow_step", 0.0) + time.perf_counter() - t0
        return v

    def step(info: dict) -> None:
        run.report({"kind": "step", "step": info["step"], "t": info["t"], "nfe": info["nfe"]})

    run.keep("initial_latent", noise)
    z1 = solvers.solve(solver, velocity, arrays.upload(noise[None]), steps, callback=step,
                       frozen=arrays.upload(cond["channels"]))
    z1 = arrays.numpy(z1)
    run.keep("final_latent", z1[0])
    return z1


# --- decoding --------------------------------------------------------------------------------

def vocoder_chunks(mel_frames: int) -> list[tuple[int, int, int, int]]:
    """How the vocoder streams `mel_frames`: for each chunk of `VOCODER_CHUNK` frames, the mel
    span fed `[a0, b0)` (the chunk plus overlap) and the samples of its output kept `[s0, s1)`.
    With `VOCODER_OVERLAP` past the vocoder's receptive field, the chunks equal a one-shot decode."""
    step, ov, per = C.VOCODER_CHUNK, C.VOCODER_OVERLAP, C.SAMPLES_PER_MEL
    out = []
    for a in range(0, mel_frames, step):
        b = min(mel_frames, a + step)
        a0, b0 = max(0, a - ov), min(mel_frames, b + ov)
        out.append((a0, b0, (a - a0) * per, (b - a0) * per + (C.VOCODER_EXTRA if b == mel_frames else 0)))
    return out


def mel_of(backend, run: Run, z: np.ndarray) -> np.ndarray:
    """The VAE decoder on the window's latent `[1, 128, T]`: log-mel `[1, 4T, 64]`."""
    return run.call(backend, "vae_decoder", {"z": z})["mel"]


def vocode(backend, run: Run, mel: np.ndarray) -> Iterator[np.ndarray]:
    """Log-mel `[1, M, 64]` -> audio chunks, the vocoder in overlapping chunks (convolutions only:
    exact). A chunk that is not finite at half precision is decoded again in FP32 before it goes out."""
    for i, (a0, b0, s0, s1) in enumerate(vocoder_chunks(mel.shape[1])):
        feed = {"mel": np.ascontiguousarray(mel[:, a0:b0])}
        audio = run.call(backend, "vocoder", feed)["audio"][0]
        if backend.stage_precision("vocoder") != "fp32" and nonfinite(audio=audio):
            run.fell_back(backend.precision, ["audio"], "chunk", chunk=i)
            audio = run.call(backend.fp32(), "vocoder", feed)["audio"][0]
        yield audio[s0:s1]


def decode(backend, run: Run, z: np.ndarray) -> Iterator[np.ndarray]:
    """Latent `[1, 128, T]` -> audio chunks: the VAE once (its GroupNorm and attention see the
    whole window), the vocoder in overlapping chunks (convolutions only: exact)."""
    mel = mel_of(backend, run, z)                                                     # [1, 4T, 64]
    run.keep("mel", mel[0])
    yield from vocode(backend, run, mel)


def generate(backend, run: Run, window, phone_ids: np.ndarray, speaker: np.ndarray, noise: np.ndarray, *,
             solver: str = "euler", steps: int = 25, cfg: float = 3.0) -> Iterator[np.ndarray]:
    """One window from frames to audio chunks, with the guard (see the module doc): conditions,
    sampling and the VAE, again in FP32 if the latent or the mel is not finite, checked before the
    first chunk goes out; then the vocoder chunk by chunk."""
    mark = run.mark()

    def latent_and_mel(b) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
        cond = conditions(b, run, window, phone_ids, speaker)
        z = sample(b, run, cond, noise, solver=solver, steps=steps, cfg=cfg)
        if nonfinite(latent=z):                        # no VAE run on a latent that failed
            return z, None, ["latent"]
        mel = mel_of(b, run, z)
        return z, mel, nonfinite(mel=mel)

    z, mel, bad = latent_and_mel(backend)
    if bad and backend.precision != "fp32":
        run.fell_back(backend.precision, bad, "window")
        run.rewind(mark)
        backend = backend.fp32()                       # the whole window, the vocoder too
        z, mel, bad = latent_and_mel(backend)
    if bad:
        raise NonFiniteError(f"window {run.window + 1}: the {bad[0]} is not finite in FP32 either: the model's "
                             "weights overflow even there")
    run.keep("mel", mel[0])
    yield from vocode(backend, run, mel)
