"""Export side of vssflow: PyTorch model definitions, the authors' checkpoint, ONNX and TensorRT."""

import vssflow.runtime  # noqa: F401,E402  (first: onnxruntime's telemetry off before anything imports it)
