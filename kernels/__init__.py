"""GPU kernels with reference fallbacks."""
