"""The baseline: the authors' way of running the same weights, one stage at a time.

Eager PyTorch fp32, nothing folded or cached: the condition projections give the context and
the condition channels; each function evaluation runs the unfolded transformer twice on the
whole state (conditional and unconditional pass, unbatched, as their `WrappedModel`);
torchdiffeq-exact `dopri5` at rtol = atol = 1e-5 on their output grid; the VAE decodes the
latent and the vocoder makes the whole window's waveform in one call. Video decoding and frame
preparation are the runtime's (the authors' decord/torchaudio path is not reproduced), so that
stage is measured once, on our side, and counted in both end-to-end figures.

`Theirs.run(stage)` runs one stage once and returns its seconds; the driver (`run.py`)
alternates these calls with ours so that both sides of every ratio see the same machine load.
"""

from __future__ import annotations

import time

import numpy as np

from vssflow.runtime import contracts as C
from vssflow.runtime import solvers

from . import timing
from .models import Inputs, authors_modules, first_window
from .settings import BenchSettings


def torch_device(settings: BenchSettings) -> str:
    """The baseline runs where ours runs: CUDA when ours does (or may), else the CPU."""
    import torch
    want = settings.device or "cuda"
    return want if want.startswith("cuda") and torch.cuda.is_available() else "cpu"


def tile(features: np.ndarray, count: int) -> np.ndarray:
    """Encoder outputs of the first frames, repeated to a whole window's `count` rows."""
    return np.resize(features, (count, *features.shape[1:])).astype(np.float32)


class Theirs:
    """The authors' modules on one device, with the state each stage hands the next."""

    name = "theirs"

    def __init__(self, settings: BenchSettings, folder, inputs_path):
        import torch

        from vssflow.export.reference import ReferencePipeline
        timing.reset_peak_rss()
        self.torch, self.settings = torch, settings
        self.inputs = Inputs.load(inputs_path)
        self.device = torch_device(settings)
        timing.cuda_memory(reset=True)
        t0 = time.perf_counter()
        self.m = authors_modules(folder, self.device)
        self.load_s = time.perf_counter() - t0
        self.ref = ReferencePipeline(self.m["flow"], self.m["conditions"], self.m["decoder"])
        window = first_window(self.inputs.video)
        n, s = settings.clip_frames, settings.synch_segments
        self.frames = self._on(window.clip_frames[:n])                                  # [n, 3, 224, 224]
        self.segments = self._on(window.synch_segments()[:s])                           # [s, 16, 3, 224, 224]
        self.speaker = torch.zeros(1, self.m["conditions"].dims.speaker_in, device=self.device)
        self.out: dict = {}
        self.calls: list[float] = []

    def _on(self, a: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def _timed(self, fn) -> float:
        t0 = time.perf_counter()
        self.out["last"] = fn()
        timing.cuda_sync()
        return time.perf_counter() - t0

    def run(self, stage: str, warm: bool = False) -> float:
        """Run `stage` once and return its seconds; `warm`: a warm-up run (light input if so set)."""
        light = warm and self.settings.light_warmup
        with self.torch.inference_mode():
            return getattr(self, f"_{stage}")(light)

    # --- stages -----------------------------------------------------------------------------
    def _clip_encoder(self, light: bool) -> float:
        frames = self.frames[:1] if light else self.frames
        seconds = self._timed(lambda: self.m["clip"](frames))
        if not light:
            self.out["clip"] = tile(self.out["last"].float().cpu().numpy(), C.CLIP.frames)          # [100, Dc]
        return seconds

    def _synch_encoder(self, light: bool) -> float:
        segments = self.segments[:1] if light else self.segments
        seconds = self._timed(lambda: self.m["synchformer"](segments))
        if not light:
            synch = tile(self.out["last"].float().cpu().numpy(), C.SYNCH_SEGMENTS)                 # [30, 8, Ds]
            self.out["synch"] = synch.reshape(-1, synch.shape[-1])                                  # [240, Ds]
        return seconds

    def features(self) -> dict:
        return {"clip": self.out["clip"], "synch": self.out["synch"]}

    def _condition(self, light: bool) -> float:
        clip, synch, ids = self._on(self.out["clip"][None]), self._on(self.out["synch"][None]), \
            self._on(self.inputs.phone_ids[None])
        seconds = self._timed(lambda: self.ref.encode_conditions(clip, synch, ids, self.speaker))
        self.context, self.channels = self.out["last"]
        self.x0 = self.torch.cat([self._on(self.inputs.noise[None]), self.channels], dim=1)   # the full state
        return seconds

    def _velocity(self):
        from vssflow.export.reference import GuidedVelocity
        return GuidedVelocity(self.m["flow"], self.context, self.channels.shape[1], self.settings.cfg)

    def _flow_step(self, light: bool) -> float:
        velocity = self._velocity()
        return self._timed(lambda: velocity(0.5, self.x0))

    def _sampling(self, light: bool) -> float:
        velocity = self._velocity()
        timer = timing.CallTimer(velocity, timing.cuda_sync)
        seconds = self._timed(lambda: solvers.solve("dopri5", timer, self.x0))
        self.calls += timer.samples
        self.nfe = velocity.nfe
        self.latent = self.out["last"][:, :self.ref.audio_channels]                     # [1, Ca, T]
        return seconds

    def _vae_decoder(self, light: bool) -> float:
        z = self.latent[..., :C.LATENT_RATE] if light else self.latent
        seconds = self._timed(lambda: self.m["decoder"].latent_to_mel(z))
        if not light:
            self.mel = self.out["last"]                                                  # [1, 4T, 64]
        return seconds

    def _vocoder(self, light: bool) -> float:
        mel = self.mel[:, :C.VOCODER_CHUNK] if light else self.mel
        return self._timed(lambda: self.m["decoder"].vocoder(mel))

    def _end_to_end(self, light: bool) -> float:
        """Video file to waveform, whole window; their audio exists only when everything is done."""
        m, inputs, on = self.m, self.inputs, self._on

        def pipeline():
            w = first_window(inputs.video)
            clip = m["clip"](on(w.clip_frames))                                            # [100, Dc]
            synch = m["synchformer"](on(np.ascontiguousarray(w.synch_segments())))         # [30, 8, Ds]
            context, channels = self.ref.encode_conditions(clip[None], synch.reshape(1, -1, synch.shape[-1]),
                                                           on(inputs.phone_ids[None]), self.speaker)
            from vssflow.export.reference import GuidedVelocity
            velocity = GuidedVelocity(m["flow"], context, channels.shape[1], self.settings.cfg)
            x1 = solvers.solve("dopri5", velocity, self.torch.cat([on(inputs.noise[None]), channels], 1))
            audio = m["decoder"](x1[:, :self.ref.audio_channels])
            return audio[0, :int(round(inputs.seconds * C.SAMPLE_RATE))].cpu().numpy()
        return self._timed(pipeline)

    def result(self) -> dict:
        return {"device": self.device, "load_s": self.load_s, "nfe": self.nfe, "flow_step_in_loop": self.calls,
                "latent": self.latent[0].float().cpu().numpy(), "mel": self.mel[0].float().cpu().numpy(),
                "peak_rss_bytes": timing.peak_rss_bytes(), "peak_device_bytes": timing.cuda_memory(),
                "torch_threads": self.torch.get_num_threads()}
