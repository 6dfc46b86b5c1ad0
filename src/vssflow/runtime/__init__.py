"""Runtime side of vssflow: inputs, solvers, backends, streaming. Imports no torch by itself.

`from vssflow.runtime import Session` is the embedding API (see `session.py`).
"""

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
