"""Export side of vssflow: PyTorch model definitions, the authors' checkpoint, ONNX and TensorRT."""
