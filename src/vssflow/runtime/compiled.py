"""`torch.compile` for the torch backend's flow step (`vssflow-run --compile`).

Inductor's caches (its FX graph cache and generated kernels) live in `TORCHINDUCTOR_CACHE_DIR`;
unless the user set it, that is `~/.cache/vssflow/inductor` (under `XDG_CACHE_HOME` when set),
kept across processes, so a second start loads what the first compiled instead of compiling
again. The time a window spent compiling is in its run's timings (`compile`).

Under compile the modules take their fast paths: attention through the fused
`scaled_dot_product_attention` (`export/precision.attention` writes it out only when traced for
export), RoPE and the casts fused by Inductor. The Triton RoPE kernel, which rotates in place, is
for eager CUDA only (`export/transformer._rope_kernels`): under compile Inductor generates the
fused rotation itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def cache_dir() -> Path:
    """Where Inductor's cache is: the user's `TORCHINDUCTOR_CACHE_DIR`, else vssflow's."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vssflow" / "inductor"


def compile_fn(fn: Callable) -> Callable:
    """`torch.compile(fn)` with shapes static (the flow step is called at one shape per window
    length and batch) and Inductor's cache in `cache_dir()`."""
    import torch
    path = cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault(CACHE_ENV, str(path))   # read by Inductor when it compiles
    return torch.compile(fn, dynamic=False)
