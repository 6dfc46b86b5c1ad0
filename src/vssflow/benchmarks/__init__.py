"""Benchmarks: latency, real-time factor, memory and quality beside the authors' way."""
