"""One TensorRT engine at run time: its I/O checked against the stage contract when it is loaded,
every call's return value checked, its scratch memory supplied by the caller.

Torch-free: it takes device pointers and a stream handle; the trt backend owns the buffers and
the stream. The `tensorrt` module is passed in (the backend imports it lazily), so everything
here runs against a stand-in where there is no TensorRT.

TensorRT calls used, the same in 10.x (JetPack 6: 10.3) and 11.x (checked against NVIDIA's
Python API pages for 10.x and 11.0/11.4, and Polygraphy 0.53.6's `backend/trt/runner.py`, which
runs on both): `ICudaEngine.num_io_tensors`, `get_tensor_name`, `get_tensor_mode`,
`get_tensor_dtype`, `get_tensor_shape`, `create_execution_context(ExecutionContextAllocationStrategy
.USER_MANAGED)`; `IExecutionContext.set_input_shape`, `get_tensor_shape`, `set_tensor_address`,
`execute_async_v3` (each returns False, or None for a context, on failure). Where they differ:
the scratch size is `device_memory_size_v2` from 10.1 on (11 has only that; 10.0 only
`device_memory_size`), and it is handed over with `set_device_memory(ptr, size)` from 10.1 on
(the `device_memory` attribute before).
"""

from __future__ import annotations

from collections.abc import Mapping

from .contracts import StageContract
from .errors import BackendError

# TensorRT data types by numpy name (the contracts' dtype names); getattr: `bool`/`int64` spellings
# are those of 10.x and 11.x.
_DTYPES = ("float32", "float16", "int32", "int64", "bool")


def dtype_names(trt) -> dict:
    """TensorRT DataType -> numpy dtype name, for the types a stage contract uses."""
    return {getattr(trt, name): name for name in _DTYPES if hasattr(trt, name)}


def check_io(stage: str, engine, contract: StageContract, trt, where: str) -> None:
    """Raise BackendError unless `engine`'s inputs and outputs are the contract's: the same names,
    dtypes, ranks, and fixed sizes where the contract fixes them (a symbolic axis may be dynamic, -1).
    `where`: the engine file, named in the error."""
    names = dtype_names(trt)
    found = {"input": {}, "output": {}}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        kind = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        found[kind][name] = (names.get(engine.get_tensor_dtype(name), str(engine.get_tensor_dtype(name))),
                             tuple(engine.get_tensor_shape(name)))
    for kind, specs in (("input", contract.inputs), ("output", contract.outputs)):
        want = [s.name for s in specs]
        if sorted(found[kind]) != sorted(want):
            raise BackendError(f"{stage}: {where} has {kind}s {sorted(found[kind])}, the stage contract "
                               f"{sorted(want)}: an engine of another model; re-run vssflow-export --engines-for")
        for s in specs:
            dtype, shape = found[kind][s.name]
            fixed_ok = len(shape) == len(s.shape) and all(
                d == a or (isinstance(a, str) and (d == -1 or contract.axes[a][0] == d == contract.axes[a][2]))
                for d, a in zip(shape, s.shape))
            if dtype != s.dtype or not fixed_ok:
                raise BackendError(f"{stage}: {where}: {kind} {s.name} is {dtype} {list(shape)}, the stage contract "
                                   f"says {s.dtype} {list(s.shape)}; re-run vssflow-export --engines-for")


def device_memory_size(engine) -> int:
    """Bytes of scratch memory a context of `engine` needs (its largest profile)."""
    size = getattr(engine, "device_memory_size_v2", None)
    return int(engine.device_memory_size if size is None else size)


def context_without_memory(stage: str, engine, trt):
    """An execution context that allocates no scratch memory of its own (`set_device_memory`)."""
    ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    if not ctx:
        raise BackendError(f"{stage}: TensorRT could not create an execution context (out of GPU memory?)")
    return ctx


def set_device_memory(ctx, ptr: int, size: int) -> None:
    """Give `ctx` the scratch memory at `ptr` (`size` bytes, 256-byte aligned)."""
    if hasattr(ctx, "set_device_memory"):
        ctx.set_device_memory(ptr, size)
    else:
        ctx.device_memory = ptr


def set_inputs(stage: str, ctx, inputs: Mapping[str, tuple[tuple[int, ...], int]]) -> None:
    """Each input's shape and device address (`name -> (shape, pointer)`)."""
    for name, (shape, ptr) in inputs.items():
        if not ctx.set_input_shape(name, shape):
            raise BackendError(f"{stage}: TensorRT refused the shape {list(shape)} of {name} (outside the engine's "
                               "optimization profile?)")
        if not ctx.set_tensor_address(name, ptr):
            raise BackendError(f"{stage}: TensorRT refused the address of {name}")


def output_shape(stage: str, ctx, name: str) -> tuple[int, ...]:
    """The shape of output `name` for the input shapes set."""
    shape = tuple(ctx.get_tensor_shape(name))
    if any(d < 0 for d in shape):
        raise BackendError(f"{stage}: TensorRT cannot tell the shape of {name} ({list(shape)}) from the inputs")
    return shape


def execute(stage: str, ctx, outputs: Mapping[str, int], stream: int) -> None:
    """Set each output's address (`name -> pointer`) and enqueue the engine on `stream` (a
    `cudaStream_t` as an int; not the default stream, so it can be captured and runs unsynchronised)."""
    for name, ptr in outputs.items():
        if not ctx.set_tensor_address(name, ptr):
            raise BackendError(f"{stage}: TensorRT refused the address of {name}")
    if not ctx.execute_async_v3(stream):
        raise BackendError(f"{stage}: TensorRT failed to run the engine (see its log above)")
