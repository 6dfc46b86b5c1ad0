"""What an export writes: its options, read by the exporter and by `vssflow-export` (torch-free,
so the command line can say what is missing before anything heavy is imported)."""

from __future__ import annotations

import dataclasses

PRECISIONS = ("fp32", "fp16")
EXPORT_BACKENDS = ("onnx", "trt", "all")     # trt/all: TensorRT engines too, where TensorRT and a GPU exist


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    precision: str = "fp32"          # one of PRECISIONS (TensorRT engines; the ONNX files stay fp32)
    backend: str = "onnx"            # one of EXPORT_BACKENDS
    max_seconds: float = 10.0
    verify: bool = True
    # weights.pt, the torch backend's weights: every weight again beside the ONNX files (~3 GB at
    # full size), so only when asked (vssflow-export --torch-weights).
    torch_weights: bool = False
