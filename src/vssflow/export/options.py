"""What an export writes: its options, read by the exporter and by `vssflow-export` (torch-free,
so the command line can say what is missing before anything heavy is imported)."""

from __future__ import annotations

import dataclasses

from vssflow.runtime.precision import EXPORT_PRECISIONS

PRECISIONS = EXPORT_PRECISIONS               # fp16 (FP32 + FP16 graphs), fp32: the runtime's list, read here

EXPORT_BACKENDS = ("onnx", "trt", "all")     # trt/all: TensorRT engines too, where TensorRT and a GPU exist


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    # fp16: the FP32 graphs and, beside them, the FP16 graphs (`<stage>.fp16.onnx`), and FP16
    # TensorRT engines built from those; fp32: FP32 graphs (and FP32 engines) only.
    precision: str = "fp16"
    backend: str = "onnx"            # one of EXPORT_BACKENDS
    max_seconds: float = 10.0
    verify: bool = True              # ORT vs torch per stage, and each FP16 graph vs its FP32 graph
    # weights.pt, the torch backend's weights: every weight again beside the ONNX files (~3 GB at
    # full size), so only when asked (vssflow-export --torch-weights).
    torch_weights: bool = False
    graphs: bool = True              # False: weights.pt and the manifest only (the torch backend alone)
