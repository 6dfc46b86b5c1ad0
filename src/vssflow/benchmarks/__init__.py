"""Benchmarks: latency, real-time factor, memory and quality beside the authors' way."""

import vssflow.runtime  # noqa: F401,E402  (first: onnxruntime's telemetry off before anything imports it)
