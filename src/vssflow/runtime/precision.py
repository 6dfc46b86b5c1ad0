"""Precision: which graphs a model folder holds, which a backend runs, and the finite-value guard.

Half precision lives in the graphs: `vssflow-export --precision fp16` writes a
mixed-precision `<stage>.fp16.onnx` beside every `<stage>.onnx` of `FP16_STAGES` (the policy is
`vssflow.export.precision`); inputs and outputs stay float32, so the stage contracts are the same
at every precision. A backend at fp16 runs those graphs (or engines built from them, or the torch
modules under the same policy); a window whose latent, mel or audio is not finite is generated
again in FP32 (`window.py`).

Torch-free: the runtime reads this on any machine.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .errors import ModelFolderError

PRECISIONS = ("fp32", "fp16", "bf16")           # what a backend runs at (bf16: torch only)
EXPORT_PRECISIONS = ("fp16", "fp32")            # what vssflow-export writes: fp16 adds half graphs to fp32 ones
# Stages with a half graph. The speaker encoder (RawNet3) stays FP32: it runs once per clip, and
# its sinc filterbank takes sin/cos of band edges in Hz.
FP16_STAGES = ("clip_encoder", "synch_encoder", "condition", "flow_step", "vae_decoder", "vocoder")
REEXPORT = "re-export with vssflow-export --precision fp16"


def graph_name(stage: str, precision: str = "fp32") -> str:
    """The ONNX file of `stage` at `precision`: `flow_step.onnx`, `flow_step.fp16.onnx`."""
    return f"{stage}.onnx" if precision == "fp32" else f"{stage}.{precision}.onnx"


def weights_name(graph: str) -> str:
    """The file beside graph file `graph` that holds its large weights (ONNX external data, which
    ONNX Runtime memory-maps instead of copying): `flow_step.onnx.data`. Folders exported before
    it keep their weights inside the graph."""
    return f"{graph}.data"


def folder_precisions(manifest: Mapping) -> tuple[str, ...]:
    """The graph precisions a model folder holds: ("fp32",) or ("fp32", "fp16").
    Folders written before precisions were recorded hold fp32 graphs only."""
    return tuple(manifest["precisions"]) if "precisions" in manifest else ("fp32",)


def stage_precision(manifest: Mapping, stage: str, precision: str) -> str:
    """The precision `stage` runs at in a backend at `precision`: its own, or fp32 for a stage
    the folder has no half graph of (the speaker encoder)."""
    return precision if graph_name(stage, precision) in manifest["files"] else "fp32"


def require_graphs(folder, precision: str) -> None:
    """Raise ModelFolderError (exit 3) when `folder` has no graphs at `precision`."""
    if precision != "fp32" and precision not in folder_precisions(folder.manifest):
        raise ModelFolderError(f"{folder.path}: exported without {precision.upper()} graphs: {REEXPORT}")


def nonfinite(**arrays: np.ndarray) -> list[str]:
    """The names of the arrays holding a NaN or an infinity."""
    return [name for name, a in arrays.items() if not np.isfinite(a).all()]
