"""Our runtime, one stage at a time through its backend, plus the solver sweep and FP16.

The stages run through `Session.backend.run(stage, feed)` with the feeds the runtime's
per-window functions build (`vssflow.runtime.window`); the ODE loops are the runtime's solvers
driving the backend's flow velocity (both CFG passes in one call, condition folded,
cross-attention K/V cached, the state in the backend's own arrays). The condition stage gets the same encoder
features the baseline computed, so both flows start from identical conditions and noise.
"""

from __future__ import annotations

import time

import numpy as np

from vssflow.runtime import solvers, window
from vssflow.runtime.contracts import LATENT_RATE
from vssflow.runtime import video as V
from vssflow.runtime.session import Session

from . import timing
from .models import Inputs, first_window
from .settings import BenchSettings


class Ours:
    """A Session on the model folder, with the state each stage hands the next."""

    name = "ours"

    def __init__(self, settings: BenchSettings, folder, inputs_path):
        timing.reset_peak_rss()
        timing.cuda_memory(reset=True)
        self.settings, self.folder = settings, folder
        self.inputs = Inputs.load(inputs_path)
        t0 = time.perf_counter()
        self.session = Session(folder, backend=settings.backend, device=settings.device, verify_hashes=False)
        self.load_s = time.perf_counter() - t0
        self.backend = self.session.backend
        self.call = self.backend.run
        first = first_window(self.inputs.video)
        self.frames = np.ascontiguousarray(first.clip_frames[:settings.clip_frames])
        self.segments = np.ascontiguousarray(first.synch_segments()[:settings.synch_segments])
        self.z0 = self.backend.arrays.upload(self.inputs.noise[None])                   # [1, Ca, T]
        self.timer = timing.CallTimer(self._velocity, timing.cuda_sync)
        self.sampling_calls: list[float] = []
        self.extra: dict = {}

    def _timed(self, fn) -> float:
        t0 = time.perf_counter()
        self.last = fn()
        timing.cuda_sync()
        return time.perf_counter() - t0

    def run(self, stage: str, warm: bool = False) -> float:
        """Run `stage` once and return its seconds; `warm`: a warm-up run (light input if so set)."""
        return getattr(self, f"_{stage}")(warm and self.settings.light_warmup)

    def set_features(self, features: dict) -> None:
        """The baseline's encoder outputs (`clip [100, Dc]`, `synch [240, Ds]`) for the condition stage."""
        clip_t, synch_t = window.to_latent_rate(features["clip"], features["synch"])
        self.condition_feed = {"clip": clip_t, "synch": synch_t, "phone_ids": self.inputs.phone_ids[None].astype(np.int64),
                               "speaker": np.zeros((1, self.session.sizes.speaker_dim), np.float32)}

    # --- stages -----------------------------------------------------------------------------
    def _decode(self, light: bool) -> float:
        return self._timed(lambda: list(V.windows(self.inputs.video)))

    def _clip_encoder(self, light: bool) -> float:
        frames = self.frames[:1] if light else self.frames
        return self._timed(lambda: self.call("clip_encoder", {"frames": frames}))

    def _synch_encoder(self, light: bool) -> float:
        segments = self.segments[:1] if light else self.segments
        return self._timed(lambda: self.call("synch_encoder", {"segments": segments}))

    def _condition(self, light: bool) -> float:
        seconds = self._timed(lambda: self.call("condition", self.condition_feed))
        self.cond = self.last
        self.velocity = self.backend.velocity(self.cond, self.settings.cfg)          # constants uploaded once
        return seconds

    def _velocity(self, t: float, z):
        return self.velocity(t, z)

    def _flow_step(self, light: bool) -> float:
        return self._timed(lambda: self._velocity(0.5, self.z0))

    def _loop(self, solver: str, steps: int | None) -> tuple[float, int, np.ndarray]:
        before = len(self.timer.samples)
        frozen = self.backend.arrays.upload(self.cond["channels"])
        seconds = self._timed(lambda: solvers.solve(solver, self.timer, self.z0, steps, frozen=frozen))
        return seconds, len(self.timer.samples) - before, self.backend.arrays.numpy(self.last)

    def _sampling(self, light: bool) -> float:
        seconds, self.nfe, self.latent = self._loop(self.settings.solver, self.settings.steps)
        self.sampling_calls += self.timer.samples[-self.nfe:]                  # like theirs: this loop's calls
        return seconds

    def _parity(self, light: bool) -> float:
        """The authors' solver through our graphs: only the rewrite differs from theirs."""
        seconds, nfe, z1 = self._loop("dopri5", None)
        self.extra["parity"] = {"nfe": nfe, "loop": timing.Stat.of([seconds]).to_json(), "latent": z1[0],
                                "mel": self.call("vae_decoder", {"z": z1})["mel"][0]}
        return seconds

    def _vae_decoder(self, light: bool) -> float:
        z = self.latent[..., :LATENT_RATE] if light else self.latent
        seconds = self._timed(lambda: self.call("vae_decoder", {"z": z}))
        if not light:
            self.mel = self.last["mel"]                                                 # [1, 4T, 64]
        return seconds

    def _vocoder(self, light: bool) -> float:
        """The whole window in overlapping chunks, as the Session streams it; chunk times kept."""
        spans = window.vocoder_chunks(self.mel.shape[1])[:1 if light else None]
        times = []

        def chunks():
            for a0, b0, _, _ in spans:
                t0 = time.perf_counter()
                self.call("vocoder", {"mel": np.ascontiguousarray(self.mel[:, a0:b0])})
                timing.cuda_sync()
                times.append(time.perf_counter() - t0)
        seconds = self._timed(chunks)
        if not light:
            self.extra.setdefault("vocoder_chunk", []).extend(times)
            self.extra.setdefault("vocoder_first_chunk", []).append(times[0])
            self.extra["vocoder_chunks"] = len(spans)
        return seconds

    def _generate_kwargs(self) -> dict:
        speech = self.inputs.speech
        return dict(transcript=self.inputs.transcript, speech_start=speech[0] if speech else None,
                    speech_end=speech[1] if speech else None, solver=self.settings.solver,
                    steps=self.settings.steps, cfg=self.settings.cfg, noise=self.inputs.noise)

    def _end_to_end(self, light: bool) -> float:
        """`Session.generate` on the video file: decode, encoders, condition, loop, decoder, vocoder."""
        seconds = self._timed(lambda: self.session.generate(self.inputs.video, **self._generate_kwargs()))
        self.extra["end_to_end"] = {"nfe": self.last.nfe, "stage_seconds": self.last.timings}
        return seconds

    def _first_chunk(self, light: bool) -> float:
        """Until `Session.stream` yields its first chunk of audio."""
        def first():
            chunks, _info = self.session.stream(self.inputs.video, **self._generate_kwargs())
            next(chunks)
            return chunks
        seconds = self._timed(first)
        self.last.close()
        return seconds

    # --- quality ----------------------------------------------------------------------------
    def sweep(self) -> list[dict]:
        """Every (solver, steps) of the settings once: NFE, loop seconds, final latent and log-mel."""
        rows = []
        for solver, steps in self.settings.sweep():
            # The headline configuration runs again here: its loop time then comes from the same
            # stretch of time (and machine load) as the others'.
            seconds, nfe, z1 = self._loop(solver, steps)
            same = (solver, steps) == (self.settings.solver, self.settings.steps) and np.array_equal(z1, self.latent)
            mel = self.mel if same else self.call("vae_decoder", {"z": z1})["mel"]
            rows.append({"solver": solver, "steps": steps, "nfe": nfe, "seconds": seconds, "latent": z1[0],
                         "mel": mel[0], "headline": (solver, steps) == (self.settings.solver, self.settings.steps)})
        return rows

    def fp16(self) -> dict:
        return fp16_quality(self.settings, self.folder, self.condition_feed, self.inputs)

    def result(self) -> dict:
        return {"backend": self.session.backend.describe(), "load_s": self.load_s, "nfe": self.nfe,
                "flow_step_in_loop": self.sampling_calls, **self.extra,
                "peak_rss_bytes": timing.peak_rss_bytes(), "peak_device_bytes": timing.cuda_memory()}


def fp16_quality(settings: BenchSettings, folder, feed: dict, inputs: Inputs) -> dict:
    """The headline solver in FP16 (CUDA autocast, and weights cast to half) beside FP32, torch modules.

    Only where torch sees a CUDA GPU: FP16 is a GPU deployment path, and on a CPU it is neither
    what runs nor fast. The VAE stays fp32, so the log-mel difference is the flow's alone.
    """
    try:
        import torch
    except ImportError:
        return {"skipped": "FP16 vs FP32 needs PyTorch with CUDA; torch is not installed"}
    if not torch.cuda.is_available() or (settings.device or "cuda") == "cpu":
        return {"skipped": "FP16 vs FP32 runs on a CUDA GPU only (torch autocast / half); none here"}
    import copy

    from vssflow.export.torch_stages import load_stage_modules
    device = settings.device if (settings.device or "").startswith("cuda") else "cuda"
    mods = load_stage_modules(folder / "weights.pt", device)
    with torch.inference_mode():
        cond_bias, keys, values, _ = mods["condition"](*(torch.from_numpy(v).to(device) for v in feed.values()))
        cfg = torch.tensor([settings.cfg], device=device)
        z0 = torch.from_numpy(inputs.noise[None]).to(device)
        step, half_step = mods["flow_step"], copy.deepcopy(mods["flow_step"]).half()

        def fp32(t, z):
            return step(z, torch.tensor([t], device=device), cond_bias, keys, values, cfg)

        def autocast_fp16(t, z):
            with torch.autocast("cuda", dtype=torch.float16):
                return fp32(t, z).float()

        def half_fp16(t, z):
            t = torch.tensor([t], device=device, dtype=torch.half)
            return half_step(z.half(), t, cond_bias.half(), keys.half(), values.half(), cfg.half()).float()

        results = {}
        for name, fn in (("fp32", fp32), ("autocast_fp16", autocast_fp16), ("half_fp16", half_fp16)):
            fn(0.5, z0)                                                                  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            z1 = solvers.solve(settings.solver, fn, z0, settings.steps)
            torch.cuda.synchronize()
            results[name] = {"loop_s": time.perf_counter() - t0, "latent": z1[0].float().cpu().numpy(),
                             "mel": mods["vae_decoder"](z1)[0].float().cpu().numpy()}
    return {"solver": settings.solver, "steps": settings.steps, "variants": results}
