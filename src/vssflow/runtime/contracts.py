"""The model's timing and the I/O contract of every exported stage, defined once.

What a window is (10 s, 250 latent frames, 16 kHz audio), how each visual stream is picked and
prepared for its encoder (`StreamSpec`: read by `video.py`, `kernels/preprocess.py` and the
contracts below), and each stage's inputs and outputs: names, dtypes, symbolic axes and their
min/opt/max profiles. Read by the exporter (ONNX names, dynamic axes, TensorRT optimization
profiles, sample inputs) and the runtime (feeds and shape checks), and written into the model
folder's `manifest.json`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from .resize import FrameResizer, clip_resizer, synch_resizer

SAMPLE_RATE = 16000         # Hz: the audio the model makes, and the reference voice it hears
LATENT_RATE = 25            # latent frames per second
WINDOW_SECONDS = 10.0
WINDOW_LATENTS = int(WINDOW_SECONDS * LATENT_RATE)    # 250
SPEAKER_CROPS = 10          # RawNet3 embeds 10 crops of the reference voice, averaged
SPEAKER_SAMPLES = 3 * SAMPLE_RATE   # of 3 s each: RawNet3 was trained on 3 s utterances
MEL_BINS = 64
SAMPLES_PER_MEL = 160


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """One visual stream of a window as the authors prepare it for its encoder (`video.py` has the details).

    `rate` frames per second are picked (`frames` per window); each is resized to `size`
    square, either stretched (`"stretch"`: Pillow's bicubic, aspect not kept; CLIP) or by its
    short side then centre-cropped (`"crop"`: torch's antialiased bicubic; Synchformer), then
    normalised: `(x / 255 - mean) / std`, the scaling as torchvision does it (`divide`: `ToTensor`
    divides by 255; else `v2.ToDtype(scale=True)` multiplies by 1/255, which rounds differently).
    """

    name: str
    rate: int
    size: int
    resize: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    divide: bool

    @property
    def frames(self) -> int:
        """Frames of one window."""
        return int(WINDOW_SECONDS * self.rate)

    def resizer(self, in_h: int, in_w: int) -> FrameResizer:
        return (clip_resizer if self.resize == "stretch" else synch_resizer)(in_h, in_w, self.size)

    def normalise(self, frames: np.ndarray) -> np.ndarray:
        """uint8 `[N, 3, H, W]` -> float32, in float32 as torchvision computes it."""
        x = frames.astype(np.float32)
        if self.divide:
            x /= np.float32(255)
        else:
            x *= np.float32(1.0 / 255)
        x -= np.asarray(self.mean, np.float32)[:, None, None]
        x /= np.asarray(self.std, np.float32)[:, None, None]
        return x


CLIP = StreamSpec("clip", rate=10, size=224, resize="stretch", mean=(0.48145466, 0.4578275, 0.40821073),
                  std=(0.26862954, 0.26130258, 0.27577711), divide=True)
SYNCH = StreamSpec("synch", rate=25, size=224, resize="crop", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                   divide=False)
STREAMS = {s.name: s for s in (CLIP, SYNCH)}
SEGMENT_FRAMES, SEGMENT_STEP = 16, 8        # Synchformer segments: 16 frames every 8
SYNCH_SEGMENTS = (SYNCH.frames - SEGMENT_FRAMES) // SEGMENT_STEP + 1     # 30
SYNCH_TOKENS = 8            # features per segment
VOCODER_EXTRA = 32          # the first transposed convolution makes 5L+1 frames: 160 L + 32 samples
# HiFi-GAN's receptive field reaches about 21 mel frames either side (measured: a change at one
# mel frame moves samples from 22 frames before to 23 after); 32 frames of overlap make the
# chunked vocoder equal to the one-shot one (max abs error ~1e-6).
VOCODER_OVERLAP = 32
VOCODER_CHUNK = 128         # mel frames per streamed chunk (1.28 s of audio)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                              # numpy dtype name
    shape: tuple[int | str, ...]            # int: fixed; str: a symbolic axis of the stage


@dataclasses.dataclass(frozen=True)
class StageContract:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    axes: Mapping[str, tuple[int, int, int]]   # symbolic axis -> (min, opt, max)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """For `torch.onnx.export`: every symbolic axis of every input and output."""
        return {s.name: {i: a for i, a in enumerate(s.shape) if isinstance(a, str)}
                for s in self.inputs + self.outputs if any(isinstance(a, str) for a in s.shape)}

    def shape(self, spec: TensorSpec, which: str = "opt", **sizes: int) -> tuple[int, ...]:
        """A concrete shape: symbolic axes from `sizes`, else the profile's min/opt/max."""
        pick = {"min": 0, "opt": 1, "max": 2}[which]
        return tuple(a if isinstance(a, int) else int(sizes.get(a, self.axes[a][pick])) for a in spec.shape)

    def sample(self, which: str = "opt", seed: int = 0, **sizes: int) -> dict[str, np.ndarray]:
        """Random inputs of the profile's shapes (ids in range, guidance and time plausible)."""
        rng = np.random.default_rng(seed)
        feed = {}
        for s in self.inputs:
            shape = self.shape(s, which, **sizes)
            if s.dtype.startswith("int"):
                feed[s.name] = rng.integers(0, 71, shape).astype(s.dtype)
            elif s.name == "t":
                feed[s.name] = np.full(shape, 0.3, dtype=s.dtype)
            elif s.name == "cfg":
                feed[s.name] = np.full(shape, 3.0, dtype=s.dtype)
            else:
                feed[s.name] = rng.standard_normal(shape).astype(s.dtype)
        return feed

    def check_feed(self, feed: Mapping[str, np.ndarray]) -> None:   # or torch tensors (GPU backends)
        """Raise ValueError naming the first input whose name, dtype, rank or size is off."""
        for s in self.inputs:
            if s.name not in feed:
                raise ValueError(f"{self.name}: missing input {s.name!r}")
            a = feed[s.name]
            if str(a.dtype).removeprefix("torch.") != s.dtype or a.ndim != len(s.shape):   # numpy or torch
                raise ValueError(f"{self.name}.{s.name}: expected {s.dtype} of rank {len(s.shape)}, "
                                 f"got {a.dtype} {tuple(a.shape)}")
            for dim, axis in zip(a.shape, s.shape):
                lo, hi = (axis, axis) if isinstance(axis, int) else (self.axes[axis][0], self.axes[axis][2])
                if not lo <= dim <= hi:
                    raise ValueError(f"{self.name}.{s.name}: axis {axis} is {dim}, allowed {lo}..{hi}")

    def to_json(self) -> dict:
        return {"inputs": [dataclasses.asdict(s) for s in self.inputs],
                "outputs": [dataclasses.asdict(s) for s in self.outputs],
                "axes": {k: list(v) for k, v in self.axes.items()}}

    @classmethod
    def from_json(cls, name: str, d: Mapping) -> StageContract:
        def spec(x):
            return TensorSpec(x["name"], x["dtype"], tuple(x["shape"]))
        return cls(name, tuple(map(spec, d["inputs"])), tuple(map(spec, d["outputs"])),
                   {k: tuple(v) for k, v in d["axes"].items()})


@dataclasses.dataclass(frozen=True)
class ModelSizes:
    """The widths the contracts need, flat, so the runtime reads them without the export code."""

    audio_channels: int = 128
    width: int = 1536
    layers: int = 10
    kv_heads: int = 12
    head_dim: int = 64
    clip_dim: int = 768
    synch_dim: int = 768
    speaker_dim: int = 256
    image_size: int = 224
    synch_frames: int = 16    # frames per Synchformer segment
    condition_channels: int = 1824


def stage_contracts(sizes: ModelSizes, max_latents: int = WINDOW_LATENTS,
                    max_batch: int = 4) -> dict[str, StageContract]:
    s = sizes
    f32, i64 = "float32", "int64"
    px = s.image_size
    latent = {"T": (LATENT_RATE, max_latents, max_latents), "T1": (LATENT_RATE + 1, max_latents + 1, max_latents + 1)}
    kv = (s.layers, "B", s.kv_heads, "T1", s.head_dim)
    return {
        "clip_encoder": StageContract(
            "clip_encoder", (TensorSpec("frames", f32, ("N", 3, px, px)),),
            (TensorSpec("features", f32, ("N", s.clip_dim)),), {"N": (1, CLIP.frames, CLIP.frames)}),
        "synch_encoder": StageContract(
            "synch_encoder", (TensorSpec("segments", f32, ("S", s.synch_frames, 3, px, px)),),
            (TensorSpec("features", f32, ("S", SYNCH_TOKENS, s.synch_dim)),), {"S": (1, SYNCH_SEGMENTS, SYNCH_SEGMENTS)}),
        # RawNet3 over the 10 crops of 3 s, averaged: the speaker embedding (`audio.speaker_crops`).
        "speaker_encoder": StageContract(
            "speaker_encoder", (TensorSpec("crops", f32, (SPEAKER_CROPS, SPEAKER_SAMPLES)),),
            (TensorSpec("embedding", f32, (1, s.speaker_dim)),), {}),
        "condition": StageContract(
            "condition",
            (TensorSpec("clip", f32, (1, "T", s.clip_dim)), TensorSpec("synch", f32, (1, "T", s.synch_dim)),
             TensorSpec("phone_ids", i64, (1, "T")), TensorSpec("speaker", f32, (1, s.speaker_dim))),
            (TensorSpec("cond_bias", f32, (1, "T", s.width)), TensorSpec("keys", f32, (s.layers, 1, s.kv_heads, "T1", s.head_dim)),
             TensorSpec("values", f32, (s.layers, 1, s.kv_heads, "T1", s.head_dim)),
             TensorSpec("channels", f32, (1, s.condition_channels, "T"))),
            latent),
        "flow_step": StageContract(
            "flow_step",
            (TensorSpec("z", f32, ("B", s.audio_channels, "T")), TensorSpec("t", f32, (1,)),
             TensorSpec("cond_bias", f32, ("B", "T", s.width)), TensorSpec("keys", f32, kv),
             TensorSpec("values", f32, kv), TensorSpec("cfg", f32, (1,))),
            (TensorSpec("velocity", f32, ("B", s.audio_channels, "T")),),
            {"B": (1, 1, max_batch), **latent}),
        # The VAE has GroupNorm and attention over the whole window: it runs once per window.
        "vae_decoder": StageContract(
            "vae_decoder", (TensorSpec("z", f32, ("B", s.audio_channels, "T")),),
            (TensorSpec("mel", f32, ("B", "M", MEL_BINS)),),
            {"B": (1, 1, max_batch), "T": latent["T"]}),
        # HiFi-GAN is convolutions only: it streams in chunks of mel frames plus overlap.
        "vocoder": StageContract(
            "vocoder", (TensorSpec("mel", f32, ("B", "M", MEL_BINS)),),
            (TensorSpec("audio", f32, ("B", "S")),),
            {"B": (1, 1, max_batch), "M": (1, VOCODER_CHUNK + 2 * VOCODER_OVERLAP, 4 * max_latents)}),
    }
