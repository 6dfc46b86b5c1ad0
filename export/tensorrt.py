"""TensorRT engines from the exported ONNX files (optional: TensorRT is imported lazily).

FP16 engines keep LayerNorm/normalization, softmax, the RoPE trigonometry and reductions in
FP32 (layer precision constraints), so FP16 cannot overflow where the model accumulates.
Engine names say what makes them valid: ONNX hash, GPU and compute capability, TensorRT
version, precision and profile. A timing cache is kept beside them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

from vssflow.runtime import engines
from vssflow.runtime.contracts import StageContract
from vssflow.runtime.model_folder import sha256

# Layer types whose outputs stay FP32 in an FP16 engine.
_FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX", "REDUCE")
_FP32_UNARY = ("COS", "SIN", "EXP", "SQRT", "RECIP")


def engine_name(stage: str, onnx_path: Path, precision: str, contract: StageContract) -> str:
    """The name the runtime looks for (`vssflow.runtime.engines`): this GPU, this TensorRT, this ONNX file."""
    import tensorrt as trt
    return engines.engine_name(stage, sha256(onnx_path), engines.gpu_tag(), trt.__version__, precision,
                               engines.profile_key(contract))


def build_engine(onnx_path: Path, contract: StageContract, precision: str, out_dir: Path,
                 cache_path: Path) -> Path:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for spec in contract.inputs:
        shapes = [contract.shape(spec, w) for w in ("min", "opt", "max")]
        profile.set_shape(spec.name, *shapes)
    config.add_optimization_profile(profile)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            kind = str(layer.type).rsplit(".", 1)[-1]
            unary = kind == "UNARY" and str(getattr(layer, "op", "")).rsplit(".", 1)[-1] in _FP32_UNARY
            if kind in _FP32_LAYER_TYPES or unary:
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path.name}")
    cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    path = out_dir / engine_name(contract.name, onnx_path, precision, contract)
    path.write_bytes(memoryview(serialized))
    return path


def build_engines(folder: Path, contracts: Mapping[str, StageContract], precision: str,
                  progress: Callable[[str], None] = lambda m: None) -> dict:
    ok, reason = engines.availability()
    if not ok:
        progress(f"TensorRT: skipped: {reason}")
        return {"skipped": reason}
    report = {}
    for name, contract in contracts.items():
        onnx_path = folder / f"{name}.onnx"
        if not onnx_path.exists():
            continue
        progress(f"{name}: building a {precision} TensorRT engine")
        t0 = time.perf_counter()
        engine = build_engine(onnx_path, contract, precision, folder, folder / "timing.cache")
        report[name] = {"engine": engine.name, "seconds": round(time.perf_counter() - t0, 1)}
    return report
