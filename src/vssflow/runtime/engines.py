"""TensorRT engines in a model folder: whether they can run here, what they are called, which fit.

Read by the exporter (which builds and names them) and by the trt backend (which picks the ones
built for this GPU, this TensorRT and this ONNX file). Imports TensorRT only when a function needs
it, and never PyTorch: the GPU comes from the CUDA driver (`cuda_driver`), so engines are
built, named and matched without it.

An engine's file name says what makes it valid:
`{stage}.{onnx sha256[:12]}.{gpu}-sm{cc}.trt{version}.{precision}.p{profile}.engine`, the hash
being that of the graph it was built from: `<stage>.fp16.onnx` for an FP16 engine, `<stage>.onnx`
for an FP32 one (engines are strongly typed: their precision is their graph's).
"""

from __future__ import annotations

import hashlib
import importlib.util
import re

from . import cuda_driver
from .contracts import StageContract
from .errors import BackendError
from .precision import graph_name, stage_precision

MIN_TENSORRT = 10            # strongly typed networks; JetPack 6.1 and 6.2 ship 10.3 (6.0: 8.6, 5.x: 8.5)
_NAME = re.compile(r"(?P<stage>[a-z_0-9]+)\.(?P<onnx>[0-9a-f]{12})\.(?P<gpu>[a-z0-9-]+)"
                   r"\.trt(?P<trt>[0-9][0-9A-Za-z.+]*?)\.(?P<precision>fp16|fp32)"
                   r"\.p(?P<profile>[0-9a-f]{8})\.engine")


NO_GPU = "no CUDA GPU is visible; TensorRT engines are built and run on one"


def cuda_gpu_visible() -> bool:
    """Whether the CUDA driver sees a GPU here (after CUDA_VISIBLE_DEVICES), asked of the driver
    library itself (`cuda_driver`): no torch import, so a machine without one knows in a millisecond
    that TensorRT is no option (and nothing advises installing it)."""
    return cuda_driver.device_count() > 0


def tensorrt_problem() -> str | None:
    """Why the TensorRT here cannot build or run vssflow's engines (one line), or None.

    Strongly typed networks: TensorRT 10.x has them behind `NetworkDefinitionCreationFlag.STRONGLY_TYPED`,
    11.x always (it keeps the flag and ignores it); older versions, or a build without the flag, not."""
    try:
        import tensorrt as trt
    except ImportError:
        return ("TensorRT is not installed: `pip install tensorrt` (x86-64), or on a Jetson use the "
                "one JetPack ships; ONNX files were written and run on ONNX Runtime")
    version = str(getattr(trt, "__version__", "0"))
    major = version.split(".")[0]
    flags = getattr(trt, "NetworkDefinitionCreationFlag", None)
    if not major.isdigit() or int(major) < MIN_TENSORRT or not hasattr(flags, "STRONGLY_TYPED"):
        return (f"TensorRT {version} cannot build strongly typed networks, which vssflow's engines are "
                f"(TensorRT {MIN_TENSORRT}.0 or newer; on a Jetson, JetPack 6.1 or later, which ships 10.3)")
    return None


def cuda_problem(device: int = 0) -> str | None:
    """Why no engine can be built or run on CUDA device `device` here (one line), or None."""
    if not cuda_gpu_visible():
        return NO_GPU
    if device > 0 and device >= (count := cuda_driver.device_count()):       # device 0 is the GPU seen
        return f"no CUDA device {device}: {count} visible"
    return None


def build_problem(device: int = 0) -> str | None:
    """Why TensorRT engines cannot be built here (one line), or None: a CUDA GPU, and TensorRT with
    strongly typed networks; no PyTorch. Without a GPU that is the one reason given."""
    return cuda_problem(device) or tensorrt_problem()


def availability(device: int = 0) -> tuple[bool, str]:
    """(usable, reason): whether the trt backend can run here, and what is missing: a CUDA GPU (without
    one that is the one reason given: what else TensorRT would need does not matter there), TensorRT
    >= 10, and Polygraphy (whose CUDA wrapper holds the backend's buffers: `cuda_memory`).
    No PyTorch: a Jetson's system TensorRT with Polygraphy is enough."""
    problem = cuda_problem(device) or tensorrt_problem()
    if problem is not None:
        return False, problem
    try:
        polygraphy = importlib.util.find_spec("polygraphy") is not None
    except (ImportError, ValueError):
        polygraphy = False
    if not polygraphy:
        return False, ("TensorRT is installed but Polygraphy is not: the trt backend keeps its buffers through "
                       "Polygraphy's CUDA wrapper (pip install polygraphy: pure Python, no PyTorch)")
    return True, ""


def gpu_tag(device: int = 0) -> str:
    """`{gpu name}-sm{major}{minor}` of a CUDA device, e.g. `nvidia-h100-80gb-hbm3-sm90`, from the
    CUDA driver (the same name PyTorch reports, so engines named before keep matching)."""
    d = cuda_driver.device(device)
    name = "".join(ch if ch.isalnum() else "-" for ch in d.name).strip("-").lower()
    return f"{name}-sm{d.major}{d.minor}"


def profile_key(contract: StageContract) -> str:
    """Eight hex digits naming the stage's optimization profile (its axes' min/opt/max)."""
    return hashlib.sha256(repr(sorted(contract.axes.items())).encode()).hexdigest()[:8]


def engine_name(stage: str, onnx_sha256: str, gpu: str, trt_version: str, precision: str, profile: str) -> str:
    """The file name of an engine built from the ONNX file with this sha256 (see the module doc)."""
    return f"{stage}.{onnx_sha256[:12]}.{gpu}.trt{trt_version}.{precision}.p{profile}.engine"


def parse_engine_name(name: str) -> dict[str, str] | None:
    """`engine_name`'s fields, or None for a name not of that form."""
    m = _NAME.fullmatch(name)
    return m.groupdict() if m else None


def match_engines(folder, gpu: str, trt_version: str, precision: str = "fp32") -> dict[str, str]:
    """The engine file of every stage of `folder` (a `ModelFolder`) built at `precision` for this
    GPU and TensorRT version from the folder's graph of that precision (`<stage>.fp16.onnx` for
    fp16; a stage without a half graph, the speaker encoder, has an FP32 engine there too).

    Raises BackendError naming what the engines present were built for: an engine from another
    GPU, TensorRT version, precision or ONNX file is never loaded (TensorRT would refuse it or,
    worse, run it).
    """
    files = folder.manifest["files"]
    found: dict[str, str] = {}
    seen: dict[str, set[str]] = {}
    for f in sorted(files):
        e = parse_engine_name(f)
        if e is None:
            continue
        graph = files.get(graph_name(e["stage"], e["precision"]), {}).get("sha256", "")
        seen.setdefault(e["stage"], set()).add(f"{e['gpu']} / TensorRT {e['trt']} / {e['precision']}"
                                                + ("" if graph.startswith(e["onnx"]) else " / another ONNX file"))
        want = stage_precision(folder.manifest, e["stage"], precision)
        if e["gpu"] == gpu and e["trt"] == trt_version and e["precision"] == want and graph.startswith(e["onnx"]):
            found.setdefault(e["stage"], f)
    missing = [s for s in folder.contracts if s not in found]
    if missing:
        built = sorted(set().union(*seen.values())) if seen else []
        present = f"its engines are for {'; '.join(built)}" if built else "it has no TensorRT engines"
        raise BackendError(f"{folder.path}: no {precision} TensorRT engine for {', '.join(missing)} built for this "
                           f"machine ({gpu} / TensorRT {trt_version}); {present}: run vssflow-export "
                           f"--engines-for {folder.path} --precision {precision} on this machine, or use --backend ort")
    return found
