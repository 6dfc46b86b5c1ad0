"""Runtime side of vssflow: inputs, solvers, backends, streaming. Imports no torch by itself.

`from vssflow.runtime import Session` is the embedding API (see `session.py`).
"""

import os as _os

# onnxruntime (1.29 and later) writes a device id and usage events under ~/.cache/Microsoft the
# moment it is imported, and may upload them; only these variables, set before that import, stop
# it. Every package of vssflow imports this one first (a user's own setting wins).
for _name in ("ORT_DISABLE_TELEMETRY", "ORT_TELEMETRY_DISABLED"):
    _os.environ.setdefault(_name, "1")

__all__ = ["Session", "Result", "GenerateOptions", "VideoFrames"]


def __getattr__(name: str):
    # Lazy, so `import vssflow.runtime.solvers` does not pull in av and the session.
    if name == "VideoFrames":
        from .video import VideoFrames
        return VideoFrames
    if name in __all__:
        from . import session
        return getattr(session, name)
    raise AttributeError(f"module 'vssflow.runtime' has no attribute {name!r}")
