"""Runtime side of vssflow: inputs, solvers, backends, streaming. Imports no torch by itself.

`from vssflow.runtime import Session` is the embedding API (see `session.py`).
"""

import importlib

__all__ = ["Session", "Result", "GenerateOptions", "VideoFrames"]

# Each public name's module, imported on first use, so `import vssflow.runtime.solvers` does not
# pull in av and the session.
_HOMES = {"Session": "session", "Result": "results", "GenerateOptions": "inputs", "VideoFrames": "video"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module 'vssflow.runtime' has no attribute {name!r}")
