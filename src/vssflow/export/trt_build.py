"""TensorRT engines through Polygraphy, strongly typed. TensorRT and Polygraphy
are optional and imported only when an engine is built.

The precision of an engine is the precision of its graph: an FP16 engine is built from
`<stage>.fp16.onnx` (export/precision.py), an FP32 one from `<stage>.onnx`, both as strongly
typed networks. No weak-typing switch is used (`BuilderFlag.FP16/BF16/INT8`,
`OBEY/PREFER_PRECISION_CONSTRAINTS`, per-layer precision or output types): TensorRT 11 has none of
them, and TensorRT 10.x (JetPack 6.1/6.2: 10.3) builds strongly typed networks behind
`NetworkDefinitionCreationFlag.STRONGLY_TYPED`, which TensorRT 11 keeps and ignores (always on).

Polygraphy calls used, checked against its source:
* `network_from_onnx_path(path, strongly_typed=True)`: since 0.49.0; 0.49.9 and later no longer
  set `EXPLICIT_BATCH` on TensorRT >= 10 (that flag is gone in 11). 0.50.3 is the first release that
  guards `layer.precision_is_set` (`backend/trt/config.py`) and `config.int8_calibrator`
  (`backend/trt/util.py`), both removed in TensorRT 11, hence `MIN_POLYGRAPHY` (and the `gpu` extra's floor).
* `CreateConfig(profiles=[Profile], load_timing_cache=path)`: a missing cache file is a warning,
  not an error. It clears TF32 by default, so FP32 engines are true FP32 (the reference).
* `engine_bytes_from_network(network, config, save_timing_cache=path)`: the serialized engine
  (no deserialization, so no GPU runtime is created for it); the timing cache is merged with the
  one on disk under a lock file `<cache>.lock`.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from vssflow.runtime import engines
from vssflow.runtime.contracts import StageContract
from vssflow.runtime.errors import BackendError
from vssflow.runtime.memory import engine_contract
from vssflow.runtime.model_folder import ModelFolder, sha256, update_manifest
from vssflow.runtime.precision import folder_precisions, graph_name, require_graphs, stage_precision

MIN_POLYGRAPHY = (0, 50, 3)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def support(device: int = 0) -> tuple[bool, str]:
    """(usable, one line saying why not): what building engines needs: TensorRT >= 10 with strongly
    typed networks and a CUDA GPU (`runtime.engines.build_problem`; no PyTorch), and Polygraphy."""
    problem = engines.build_problem(device)
    if problem is not None:
        return False, problem
    import tensorrt as trt
    try:
        import polygraphy
    except ImportError:
        return False, "Polygraphy is not installed: `pip install polygraphy`; the ONNX graphs were written"
    if _version(polygraphy.__version__) < MIN_POLYGRAPHY:
        return False, (f"Polygraphy {polygraphy.__version__} is too old for TensorRT {trt.__version__} "
                       f"({'.'.join(map(str, MIN_POLYGRAPHY))} or later needed): `pip install -U polygraphy`")
    return True, ""


def engine_name(stage: str, onnx_path: Path, precision: str, contract: StageContract, device: int = 0) -> str:
    """The name the runtime looks for (`runtime.engines`): this GPU, this TensorRT, this graph."""
    import tensorrt as trt
    return engines.engine_name(stage, sha256(onnx_path), engines.gpu_tag(device), trt.__version__, precision,
                               engines.profile_key(contract))


def profile_shapes(contract: StageContract) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Input name -> (min, opt, max) shape: the stage contract's profile, as TensorRT takes it."""
    return {s.name: tuple(contract.shape(s, which) for which in ("min", "opt", "max")) for s in contract.inputs}


def engine_bytes(onnx_path: Path, contract: StageContract, timing_cache: Path | None = None) -> bytes:
    """Build a strongly typed engine from `onnx_path` with the contract's optimization profile.

    `timing_cache`: read if present, and written back (merged) after the build.
    Raises BackendError (exit 4), one line naming the stage, for any failure of the parse or the
    build: Polygraphy's own errors, and whatever a Polygraphy/TensorRT mismatch raises (an
    AttributeError for an API the TensorRT here no longer has).
    """
    from polygraphy.backend.trt import CreateConfig, Profile, engine_bytes_from_network, network_from_onnx_path
    from polygraphy.logger import G_LOGGER

    profile = Profile()
    for name, (lo, opt, hi) in profile_shapes(contract).items():
        profile.add(name, min=lo, opt=opt, max=hi)
    cache = None if timing_cache is None else str(timing_cache)    # Polygraphy appends ".lock" to a str
    try:
        with G_LOGGER.verbosity(G_LOGGER.WARNING):
            network = network_from_onnx_path(str(onnx_path), strongly_typed=True)
            config = CreateConfig(profiles=[profile],
                                  load_timing_cache=cache if timing_cache and timing_cache.exists() else None)
            return engine_bytes_from_network(network, config=config, save_timing_cache=cache)
    except Exception as e:           # never KeyboardInterrupt: an interrupt stays one
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        raise BackendError(f"{contract.name}: TensorRT could not build an engine from {Path(onnx_path).name} "
                           f"({reason})") from None


def scratch_bytes(data: bytes) -> int | None:
    """The scratch memory an engine's context needs at its profile's largest shapes
    (`device_memory_size`), read by deserializing it on this GPU; None where that fails (the
    runtime, not the export, then says why)."""
    try:
        import tensorrt as trt

        from vssflow.runtime import trt_engine
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(data)
        return None if engine is None else trt_engine.device_memory_size(engine)
    except Exception:
        return None


def write_engine(onnx_path: Path, contract: StageContract, path: Path, timing_cache: Path | None = None) -> dict:
    """`engine_bytes` written to `path` atomically (a temporary name, then a rename); returns its
    name, bytes and scratch bytes (`scratch_bytes`)."""
    from vssflow.runtime.files import write_atomic
    data = bytes(engine_bytes(onnx_path, contract, timing_cache))
    scratch = scratch_bytes(data)
    return {"engine": write_atomic(path, data).name, "bytes": len(data), "scratch_bytes": scratch}


def build_engines(folder: Path, contracts: Mapping[str, StageContract], precision: str,
                  progress: Callable[[str], None] = lambda m: None, *, out: Path | None = None,
                  timing_cache: bool = True, skip: frozenset[str] = frozenset()) -> dict:
    """One engine per stage, from the stage's graph at `precision` in `folder` (a stage without a
    half graph, the speaker encoder, gets an FP32 engine from its FP32 graph), named as the runtime
    matches them, written into `out` (default `folder`, with its `timing.cache`). An engine whose
    name is in `skip` (already there) is not built again. Returns the report for the manifest;
    `{"skipped": reason}` where TensorRT cannot build here."""
    ok, reason = support()
    if not ok:
        progress(f"TensorRT: skipped: {reason}")
        return {"skipped": reason}
    out = folder if out is None else out
    cache = out / "timing.cache" if timing_cache else None
    files = {p.name: {} for p in folder.iterdir()}
    report = {}
    for name in contracts:
        contract = engine_contract(contracts, name)             # encoder profiles stop at a piece's rows
        built = stage_precision({"files": files}, name, precision)
        onnx_path = folder / graph_name(name, built)
        if not onnx_path.exists():
            continue
        target = engine_name(name, onnx_path, built, contract)
        if target in skip:
            progress(f"{name}: {target} is already there")
            continue
        progress(f"{name}: building a strongly typed {built} TensorRT engine from {onnx_path.name}")
        t0 = time.perf_counter()
        written = write_engine(onnx_path, contract, out / target, cache)
        report[name] = {**written, "onnx": onnx_path.name, "precision": built,
                        "seconds": round(time.perf_counter() - t0, 1)}
    if cache is not None:
        Path(str(cache) + ".lock").unlink(missing_ok=True)   # Polygraphy's lock file; this folder is ours alone
    return report


def engines_for(path: str | os.PathLike, precision: str | None = None,
                progress: Callable[[str], None] = lambda m: None) -> dict:
    """Build this GPU's and this TensorRT's engines from the ONNX graphs of the model folder at
    `path` and record them in its manifest (`vssflow-export --engines-for`): no checkpoint, no
    PyTorch, no tracing. `precision`: fp16 (the FP16 graphs) or fp32; None: fp16 where the folder
    has FP16 graphs. Returns the build report (stage -> engine, its bytes and scratch bytes, graph,
    precision, seconds).

    The folder changes only once every engine is built: they are built in a hidden folder inside
    it, moved in under names no manifest lists yet, and then manifest.json is replaced atomically
    (`model_folder.update_manifest`); on any failure the moved engines are removed again.
    No timing cache is read or kept: the folder's is from the GPU it was exported on.
    Raises BackendError (exit 4) where TensorRT cannot build here, or a stage does not build;
    ModelFolderError (exit 3) for a folder that is damaged or lacks the graphs of `precision`.
    """
    ok, reason = support()
    if not ok:
        raise BackendError(f"cannot build TensorRT engines here: {reason}")
    folder = ModelFolder.open(path)                # every listed file checked (size, sha256)
    if precision is None:
        precision = "fp16" if "fp16" in folder_precisions(folder.manifest) else "fp32"
    require_graphs(folder, precision)
    listed = frozenset(folder.manifest["files"])
    staging = Path(tempfile.mkdtemp(prefix=".engines.", dir=folder.path))
    moved: list[Path] = []
    try:
        report = build_engines(folder.path, folder.contracts, precision, progress, out=staging,
                               timing_cache=False, skip=listed)
        for entry in report.values():
            moved.append(folder.path / entry["engine"])
            os.replace(staging / entry["engine"], moved[-1])
        if report:
            import tensorrt as trt
            update_manifest(folder.path, [p.name for p in moved],
                            {"report": {"tensorrt": {**_built(folder.manifest), **report}},
                             "versions": {"tensorrt": trt.__version__}})
    except BaseException:
        for p in moved:
            p.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _built(manifest: dict) -> dict:
    """The engines an earlier build recorded (not an export's "skipped" note)."""
    old = manifest.get("report", {}).get("tensorrt", {})
    return {} if "skipped" in old else dict(old)
