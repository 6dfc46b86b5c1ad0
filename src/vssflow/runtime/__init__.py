"""Runtime side of vssflow: inputs, solvers, backends, streaming. Imports no torch by itself.

`from vssflow.runtime import Session` is the embedding API (see `session.py`).
"""

import importlib
import os as _os

# onnxruntime (1.29 and later) writes a device id and usage events under ~/.cache/Microsoft the
# moment it is imported, and may upload them; only these variables, set before that import, stop
# it. Every package of vssflow imports this one first (a user's own setting wins).
for _name in ("ORT_DISABLE_TELEMETRY", "ORT_TELEMETRY_DISABLED"):
    _os.environ.setdefault(_name, "1")

__all__ = ["Session", "Result", "GenerateOptions", "VideoFrames"]

# Each public name's module, imported on first use, so `import vssflow.runtime.solvers` does not
# pull in av and the session.
_HOMES = {"Session": "session", "Result": "results", "GenerateOptions": "inputs", "VideoFrames": "video"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module 'vssflow.runtime' has no attribute {name!r}")
