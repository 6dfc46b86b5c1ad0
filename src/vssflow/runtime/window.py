"""One 10-second window, stage by stage: conditions, sampling, decoding to audio chunks.

The Session strings these together for each window of a video (`generate`); benchmarks and
batch runs call them one by one. Each takes the backend that runs the stages and the `Run` that
records what a generation did (seconds per stage, flow evaluations, intermediates, progress,
FP32 fallbacks), so a result carries its own record:

    run = Run.new()
    cond = conditions(backend, run, window, phone_ids, speaker)     # once per window
    z = sample(backend, run, cond, noise, solver="euler", steps=25, cfg=3.0)
    mel = mel_of(backend, run, z)                                   # the VAE once
    for chunk in vocode(backend, run, mel): ...                     # the vocoder in chunks

or all of it, with the guard, as `generate(backend, run, window, phone_ids, speaker, noise)`.

The guard (`generate`): in half precision a value can pass FP16's 65504 and become inf or NaN.
The window's latent and mel are checked before any of its audio is given out; a window where
either is not finite is generated again, whole, in FP32 (`backend.fp32()`). The vocoder streams
exactly chunk by chunk, so a chunk of audio that is not finite is decoded again alone in FP32
before it is given out. Each fallback is recorded in `Run.fallbacks`, and the first one of a run
adds one note.

Several windows (of one clip or of several) go through `sample` and `decode_rows` together as
a batch `[B, ...]` (the contracts' batch axis), their records kept apart by `Runs`, which hands
each window's row, share of time and flow evaluations to that window's own `Run`; with the
guard, as `generate_rows`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence

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
        self.spent(name, seconds)
        self.report({"kind": "stage", "stage": name, "seconds": seconds})

    def spent(self, name: str, seconds: float) -> None:
        """Add `seconds` to stage `name` without a progress event (work done on another thread)."""
        self.timings[name] = self.timings.get(name, 0.0) + seconds

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

    def evaluated(self, seconds: float) -> None:
        """One flow evaluation of `seconds` (no progress event: the solver's steps report)."""
        self.nfe += 1
        self.timings["flow_step"] = self.timings.get("flow_step", 0.0) + seconds

    def keep_rows(self, name: str, batch) -> None:
        """Keep a batch `[1, ...]` of this window as its one row."""
        assert len(batch) == 1, f"{name}: {batch.shape=} for one window"
        self.keep(name, batch[0])


class Runs:
    """The records of the windows in one batched call: row `i` is window `windows[i]` of the
    generation `runs[i]` (one generation may have several rows). Each row's `Run` gets its
    row of what is kept, one flow evaluation per evaluation, and an equal share of each call's
    seconds, so the records of a batch add up to its time."""

    def __init__(self, runs: Sequence[Run], windows: Sequence[int]):
        assert len(runs) == len(windows) > 0, f"{len(runs)=} {len(windows)=}"
        self.runs, self.windows = list(runs), list(windows)

    call = Run.call

    def timed(self, name: str, seconds: float) -> None:
        share = seconds / len(self.runs)
        for run, w in self._rows():
            run.window = w
            run.timed(name, share * sum(r is run for r in self.runs))

    def evaluated(self, seconds: float) -> None:
        for run in self.runs:
            run.evaluated(seconds / len(self.runs))

    def keep_rows(self, name: str, batch) -> None:
        for run, row in zip(self.runs, batch):
            run.keep(name, row)

    def report(self, event: dict) -> None:
        for run, w in self._rows():
            run.window = w
            run.report(event)

    def _rows(self) -> list[tuple[Run, int]]:
        """Each generation once, with its first window in the batch."""
        first: dict[int, tuple[Run, int]] = {}
        for run, w in zip(self.runs, self.windows):
            first.setdefault(id(run), (run, w))
        return list(first.values())


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


def encode(backend, run: Run, window: video.VideoWindow | video.FrameWindow, encoders=None
           ) -> tuple[np.ndarray, np.ndarray]:
    """The window's encoder features: CLIP `[100, Dc]`, Synchformer `[240, Ds]`. With `encoders`
    (`features.Encoders`, a Session's), each distinct input encoded once, padding included;
    without, every frame and segment, as the authors do."""
    if encoders is not None:
        return encoders.encode(backend, run, [window])[0]
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


def conditions(backend, run: Run, window, phone_ids: np.ndarray, speaker: np.ndarray, encoders=None
               ) -> dict[str, np.ndarray]:
    """Everything once per window: both encoders, then the condition stage."""
    features = encode(backend, run, window, encoders)
    return _condition_window(backend, run, features, phone_ids, speaker)


def conditions_rows(backend, runs: Runs, windows: Sequence, phone_ids: Sequence[np.ndarray],
                    speakers: Sequence[np.ndarray], encoders) -> dict[str, np.ndarray]:
    """`conditions` of several windows, stacked on the batch axis as `flow_step` takes them:
    the encoders over all of them at once (`encoders.encode`), the condition stage (batch 1)
    for each."""
    features = encoders.encode(backend, runs, windows)
    conds = [_condition_window(backend, run, f, ids, spk)
             for run, f, ids, spk in zip(runs.runs, features, phone_ids, speakers)]
    return stack_conditions(conds)


def _condition_window(backend, run: Run, features, phone_ids, speaker) -> dict[str, np.ndarray]:
    clip, synch = features
    run.keep("clip_features", clip)
    run.keep("synch_features", synch)
    run.keep("phone_ids", phone_ids)
    return condition(backend, run, clip, synch, phone_ids, speaker)


# The batch axis of each output of the condition stage, as `flow_step` takes it.
_BATCH_AXIS = {"cond_bias": 0, "keys": 1, "values": 1, "channels": 0}


def stack_conditions(conds: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The condition stage's outputs of several windows, one batch (`[B, T, width]`, `[L, B, ...]`)."""
    if len(conds) == 1:
        return conds[0]
    return {k: np.concatenate([c[k] for c in conds], axis=axis) for k, axis in _BATCH_AXIS.items()}


# --- sampling --------------------------------------------------------------------------------

def sample(backend, run: Run | Runs, cond: dict[str, np.ndarray], noise: np.ndarray, *, solver: str = "euler",
           steps: int = 25, cfg: float = 3.0) -> np.ndarray:
    """The ODE from `noise` `[128, T]` (t = 0) to the window's latent `[1, 128, T]` (t = 1),
    `flow_step` as the velocity, the state in the backend's own arrays throughout.

    Several windows at once: `noise` `[B, 128, T]`, `cond` stacked (`stack_conditions`), `run` a
    `Runs` -> `[B, 128, T]`. Every row takes the same times, so only fixed-step solvers batch
    (dopri5 picks its steps from the whole state's error)."""
    arrays = backend.arrays
    flow_velocity = backend.velocity(cond, cfg)
    for name, seconds in getattr(flow_velocity, "startup", {}).items():    # compile / capture, once a shape
        run.timed(name, seconds)
    x = noise if noise.ndim == 3 else noise[None]
    assert solver != "dopri5" or len(x) == 1, f"dopri5 takes one window at a time, got {x.shape=}"
    clock = StepClock(arrays)

    def velocity(t: float, z):
        with backend.lock:
            mark = clock.start()
            v = flow_velocity(t, z)
            clock.stop(mark, run)
        return v

    def step(info: dict) -> None:
        run.report({"kind": "step", "step": info["step"], "t": info["t"], "nfe": info["nfe"]})

    run.keep_rows("initial_latent", x)
    z1 = solvers.solve(solver, velocity, arrays.upload(x), steps, callback=step,
                       frozen=arrays.upload(cond["channels"]))
    clock.flush(run)
    z1 = arrays.numpy(z1)
    run.keep_rows("final_latent", z1)
    return z1


class StepClock:
    """Seconds per flow evaluation. On the host, `perf_counter` around each call; where the arrays
    are CUDA tensors, a pair of CUDA events per call, read after the loop (`flush`), so the loop
    never waits for the GPU (replayed graphs and eager launches are asynchronous: host time
    would measure the launch, not the work)."""

    def __init__(self, arrays):
        device = getattr(arrays, "device", None)
        self.cuda = device is not None and getattr(device, "type", "") == "cuda"
        self.pending: list = []

    def start(self):
        if not self.cuda:
            return time.perf_counter()
        import torch
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        return start

    def stop(self, start, run) -> None:
        if not self.cuda:
            run.evaluated(time.perf_counter() - start)
            return
        import torch
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.pending.append((start, end))

    def flush(self, run) -> None:
        """Record the evaluations timed by events (one synchronisation, after the loop)."""
        if self.pending:
            self.pending[-1][1].synchronize()
            for start, end in self.pending:
                run.evaluated(start.elapsed_time(end) / 1000)
            self.pending = []


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


def decode_rows(backend, run: Run | Runs, z: np.ndarray, samples: int | None = None) -> Iterator[np.ndarray]:
    """A batch of windows decoded: latents `[B, 128, T]` -> audio chunks `[B, n]` (the VAE once, the
    vocoder in overlapping chunks, as `mel_of` and `vocode` for one). `samples`: the most any row
    keeps (None: all); the vocoder stops once its chunks cover them, as a stream's reader stops
    pulling `vocode` at the clip's end."""
    mel = run.call(backend, "vae_decoder", {"z": z})["mel"]                          # [B, 4T, 64]
    run.keep_rows("mel", mel)
    made = 0
    for a0, b0, s0, s1 in vocoder_chunks(mel.shape[1]):
        if samples is not None and made >= samples:
            return
        audio = run.call(backend, "vocoder", {"mel": np.ascontiguousarray(mel[:, a0:b0])})["audio"]   # [B, n]
        made += s1 - s0
        yield audio[:, s0:s1]


def generate(backend, run: Run, window, phone_ids: np.ndarray, speaker: np.ndarray, noise: np.ndarray, *,
             solver: str = "euler", steps: int = 25, cfg: float = 3.0, encoders=None,
             fp32_encoders=None) -> Iterator[np.ndarray]:
    """One window from frames to audio chunks, with the guard (see the module doc): conditions,
    sampling and the VAE, again in FP32 if the latent or the mel is not finite, checked before the
    first chunk goes out; then the vocoder chunk by chunk. `encoders`: the Session's feature cache
    (`features.Encoders`); an FP32 redo uses `fp32_encoders`, its own (the first holds half-precision
    features), so a redone window equals an FP32 run's."""
    mark, first = run.mark(), backend

    def latent_and_mel(b) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
        cond = conditions(b, run, window, phone_ids, speaker, encoders if b is first else fp32_encoders)
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


def generate_rows(backend, runs: Sequence[Run], windows: Sequence, phone_ids: Sequence[np.ndarray],
                  speakers: Sequence[np.ndarray], noise: np.ndarray, *, solver: str = "euler", steps: int = 25,
                  cfg: float = 3.0, encoders=None, fp32_encoders=None,
                  samples: Sequence[int | None] | None = None) -> list[list[np.ndarray]]:
    """Several windows as one batch, row `i` being `windows[i]` of the generation `runs[i]`:
    conditions (`encoders` over all of them at once), one ODE over `noise` `[B, 128, T]`, the
    VAE and the vocoder likewise; each row's audio chunks. `encoders` is required here.
    `samples[i]`: how many of row `i`'s samples its clip keeps (None: all); the vocoder decodes
    up to the most of them, so a short clip's window does not vocode its padding.

    The guard, for a batch: at half precision, when a row's latent or audio is not finite, the
    batch's windows are generated again one by one through `generate` (which checks each before
    anything goes out and redoes in FP32 only the ones that fail), their records rewound to
    before the batch. Rare, so simply. Its results go out only whole, so checking after the
    batch gives nothing away."""
    marks = [(run, run.mark()) for run in {id(r): r for r in runs}.values()]
    rows = Runs(runs, [w.index for w in windows])
    cond = conditions_rows(backend, rows, windows, phone_ids, speakers, encoders)
    z = sample(backend, rows, cond, noise, solver=solver, steps=steps, cfg=cfg)
    pieces: list[list[np.ndarray]] = [[] for _ in windows]
    most = None if samples is None or None in samples else max(samples)
    for chunk in decode_rows(backend, rows, z, most):
        for row, audio in zip(pieces, chunk):
            row.append(audio)
    if backend.precision == "fp32" or not any(nonfinite(latent=z[i], audio=np.concatenate(row))
                                              for i, row in enumerate(pieces)):
        return pieces
    for run, mark in marks:
        run.rewind(mark)
    pieces = []
    for run, w, ids, speaker, n in zip(runs, windows, phone_ids, speakers, noise):
        run.window = w.index
        pieces.append(list(generate(backend, run, w, ids, speaker, n, solver=solver, steps=steps, cfg=cfg,
                                    encoders=encoders, fp32_encoders=fp32_encoders)))
    return pieces

