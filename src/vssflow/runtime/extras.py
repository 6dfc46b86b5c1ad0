"""The optional parts of vssflow: which packages each extra needs, and the one door to the
packages built on the runtime.

The runtime is the base of the package graph: `vssflow.export` and `vssflow.kernels` import it,
never the other way round. Where the runtime does need them (the torch backend runs the export's
PyTorch modules, device preprocessing runs the kernels, `vssflow-run` without `--model` exports
the demo model), it goes through `load`, which imports them lazily and, when an extra is not
installed, says in one line which one to install.

What each extra holds is read from the installed package's metadata, so `pyproject.toml` stays
the one list.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re

from .errors import BackendError

DISTRIBUTION = "vssflow"
# Where a distribution's import name is not its name with "-" as "_".
_MODULE_OF = {"onnxruntime-gpu": "onnxruntime", "pillow": "PIL"}
# What each optional package of vssflow needs, when the metadata cannot say (a source tree on sys.path).
_FALLBACK = {"export": ("torch", "onnx", "onnxscript"), "torch": ("torch",), "cpu": ("onnxruntime",),
             "kernels": ("triton",), "ray": ("ray",),
             "serve": ("starlette", "uvicorn", "python-multipart", "prometheus-client"),
             "serve-ray": ("starlette", "uvicorn", "python-multipart", "prometheus-client", "ray")}


def requirements(extra: str) -> tuple[str, ...]:
    """Distribution names `pip install 'vssflow[extra]'` installs (from the metadata's Requires-Dist)."""
    try:
        reqs = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return _FALLBACK.get(extra, ())
    marker = re.compile(r"""extra\s*==\s*["']%s["']""" % re.escape(extra))
    return tuple(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0] for r in reqs if marker.search(r))


def missing(extra: str) -> list[str]:
    """The distributions of `extra` whose module cannot be imported here."""
    out = []
    for dist in requirements(extra):
        module = _MODULE_OF.get(dist.lower(), dist.replace("-", "_"))
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):         # a finder that refuses it, a broken half-install
            found = False
        if not found:
            out.append(dist)
    return out


def install_hint(extra: str, absent: list[str] | None = None) -> str:
    absent = missing(extra) if absent is None else absent
    return f"pip install 'vssflow[{extra}]'" + (f" (missing: {', '.join(absent)})" if absent else "")


def require(extra: str, what: str) -> None:
    """Raise BackendError (exit 4) naming the extra to install when a package of `extra` is missing."""
    absent = missing(extra)
    if absent:
        raise BackendError(f"{what} needs the {extra} extra: {install_hint(extra, absent)}")


def onnxruntime():
    """`onnxruntime`, its telemetry off (the variables `vssflow.runtime` sets before any import,
    and its events switch): vssflow stores nothing outside its folders and talks to no network.
    Every import of onnxruntime in vssflow comes through here."""
    import onnxruntime as ort
    ort.disable_telemetry_events()
    return ort


def load(module: str, extra: str, what: str):
    """`vssflow.<module>` (e.g. "export.torch_stages"), once `extra`'s packages are present."""
    require(extra, what)
    return importlib.import_module(f"vssflow.{module}")
