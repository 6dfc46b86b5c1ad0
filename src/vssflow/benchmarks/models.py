"""What both ways run on: the model folder, the authors' PyTorch modules of the same weights, the inputs.

* `model_folder(size)`: random weights in the authors' checkpoint layout, exported once into a
  cache folder (`$VSSFLOW_HOME/bench-models/<size>-seed<seed>`) and reused.
* `authors_modules(folder)`: the authors' modules (unfolded transformer, condition projections,
  CLIP, Synchformer, VAE decoder and vocoder) from the folder's `weights.pt` — the very tensors
  the exported graphs were made from.
* `make_inputs(...)`: a synthetic 10-second clip, the phoneme track and the initial noise.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from vssflow.runtime import contracts as C

from .media import make_video

DEMO_NOTE = "BENCHMARK MODEL: random weights in the authors' layout; it runs the whole pipeline but makes noise."


def cache_root() -> Path:
    from vssflow.runtime.model_folder import vssflow_home
    return vssflow_home() / "bench-models"


def model_folder(size: str, seed: int = 0, root: Path | None = None, progress=lambda msg: None,
                 precision: str = "fp32") -> Path:
    """The exported random-weight model of `size`, written and exported on first use; exported
    again with FP16 graphs beside the FP32 ones where `precision` is fp16 and they are missing."""
    from vssflow.export.onnx_export import ExportOptions, export_random
    out = (root or cache_root()) / f"{size}-seed{seed}"
    manifest = out / "manifest.json"
    if manifest.is_file() and (precision == "fp32" or precision in json.loads(manifest.read_text())["precisions"]):
        return out
    progress(f"writing random {size} weights in the authors' layout and exporting to {out} "
             f"({precision}; once: later runs reuse it)")
    export_random(out, size, seed, options=ExportOptions(precision=precision, backend="onnx", verify=False,
                                                       torch_weights=True), replace=True,
                  progress=lambda m: progress(f"export: {m}"), note=DEMO_NOTE)
    return out


def authors_modules(folder: Path, device: str = "cpu") -> dict:
    """The authors' modules, eager fp32, loaded strictly from `folder/weights.pt`.

    Keys: flow, conditions, clip, decoder (VAE + vocoder), synchformer.
    """
    from vssflow.export.checkpoint import build_modules
    from vssflow.export.torch_stages import read_weights
    folder = Path(folder)
    weights = folder / "weights.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"{folder}: no weights.pt; the authors' baseline needs the PyTorch weights "
                                "(export without --no-torch-weights)")
    ckpt, synch, _ = read_weights(weights)
    modules = build_modules(ckpt)
    modules["synchformer"] = synch
    return {k: m.to(device).eval() for k, m in modules.items()}


# --- inputs ---------------------------------------------------------------------------------------

def first_window(video: Path):
    """The encoder inputs of the video's first 10 seconds (`VideoWindow`), the file closed after."""
    from vssflow.runtime import video as V
    windows = V.windows(video)
    try:
        return next(windows)
    finally:
        windows.close()


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The same inputs for both ways: video file, phoneme ids `[250]`, noise `[Ca, 250]`."""

    video: Path
    seconds: float
    phone_ids: np.ndarray
    noise: np.ndarray
    transcript: str | None
    speech: tuple[float, float] | None

    def save(self, path: Path) -> Path:
        np.savez(path, phone_ids=self.phone_ids, noise=self.noise)
        meta = {"video": str(self.video), "seconds": self.seconds, "transcript": self.transcript,
                "speech": list(self.speech) if self.speech else None}
        path.with_suffix(".json").write_text(json.dumps(meta))
        return path

    @classmethod
    def load(cls, path: Path) -> Inputs:
        arrays = np.load(path)
        meta = json.loads(Path(path).with_suffix(".json").read_text())
        return cls(Path(meta["video"]), meta["seconds"], arrays["phone_ids"], arrays["noise"], meta["transcript"],
                   tuple(meta["speech"]) if meta["speech"] else None)


def make_inputs(work: Path, audio_channels: int, seconds: float, seed: int, transcript: str | None,
                speech: tuple[float, float], video: Path | None = None) -> Inputs:
    from vssflow.runtime import text
    from vssflow.runtime import video as V
    if video is None:
        video = work / "clip.mp4"
        make_video(video, seconds, 25, (320, 240))
    duration = V.probe(video).duration
    if transcript is not None:
        speech = (min(speech[0], duration / 2), min(speech[1], duration))
        ids = text.phoneme_ids(transcript, speech[0], speech[1], clip_seconds=min(duration, C.WINDOW_SECONDS))
    else:
        ids = np.zeros(C.WINDOW_LATENTS, np.int64)
    noise = np.random.default_rng(seed).standard_normal((audio_channels, C.WINDOW_LATENTS), dtype=np.float32)
    return Inputs(Path(video), min(duration, C.WINDOW_SECONDS), ids[:C.WINDOW_LATENTS].astype(np.int64), noise,
                  transcript, speech if transcript is not None else None)
