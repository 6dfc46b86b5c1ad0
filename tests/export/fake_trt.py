"""Stand-ins for what the TensorRT path reads where there is no TensorRT, Polygraphy or GPU: a
`tensorrt` module as far as version checks read it, `polygraphy` modules as far as `trt_build`
calls them, and a model folder with a valid manifest whose graphs are a few bytes each (enough
for everything that names, hashes, lists and matches them)."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import importlib.machinery
import json
import sys
import types
from pathlib import Path

import numpy as np

from vssflow.runtime.contracts import ModelSizes, stage_contracts
from vssflow.runtime.model_folder import FORMAT_VERSION, STAMP
from vssflow.runtime.precision import FP16_STAGES, graph_name


def tensorrt(version: str, strongly_typed: bool = True, contracts=None, memory=None) -> types.ModuleType:
    """A module that looks like the `tensorrt` bindings as far as the checks read them; with
    `contracts` (stage -> StageContract) and `memory` (a `FakeCuda`), as far as the trt backend runs
    them too: an engine file's bytes name its stage (`b"engine of <stage>..."`, as `polygraphy`
    below builds them), and its context computes `2 z + keys.sum()` for flow_step, zeros elsewhere."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    members = {"STRONGLY_TYPED": 1} if strongly_typed else {"EXPLICIT_BATCH": 0}
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(**members)
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED="user")
    for name in ("float32", "float16", "int32", "int64", "bool"):
        setattr(trt, name, f"DataType.{name}")
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.log = types.SimpleNamespace(contexts=[], memory_sizes={}, executed=[])

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            stage = data.decode().split("engine of ", 1)[1].split(".")[0]
            return FakeEngine(stage, contracts[stage], memory, trt.log)
    trt.Runtime = Runtime
    return trt


class TensorTable:
    """An ICudaEngine's I/O queries over `self.tensors` (name -> (mode, dtype, shape))."""

    def get_tensor_name(self, i):
        return list(self.tensors)[i]

    def get_tensor_mode(self, name):
        return self.tensors[name][0]

    def get_tensor_dtype(self, name):
        return self.tensors[name][1]

    def get_tensor_shape(self, name):
        return self.tensors[name][2]


class FakeEngine(TensorTable):
    """An ICudaEngine of a stage as the trt backend reads it: I/O as in the contract, a scratch size."""

    def __init__(self, stage, contract, memory, log):
        self.stage, self.contract, self.memory, self.log = stage, contract, memory, log
        self.tensors = {s.name: ("in" if s in contract.inputs else "out", f"DataType.{s.dtype}",
                                 tuple(-1 if isinstance(a, str) else a for a in s.shape))
                        for s in contract.inputs + contract.outputs}
        self.num_io_tensors = len(self.tensors)
        self.device_memory_size_v2 = 1000 * (1 + len(stage))          # stages differ in scratch size
        log.memory_sizes[stage] = self.device_memory_size_v2

    def create_execution_context(self, strategy):
        assert strategy == "user"
        ctx = FakeContext(self)
        self.log.contexts.append(ctx)
        return ctx


class FakeContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.scratch, self.streams = engine, {}, {}, None, []

    def set_device_memory(self, ptr, size):
        self.scratch = (ptr, size)

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def get_tensor_shape(self, name):
        c = self.engine.contract
        sizes = {}
        for s in c.inputs:
            sizes.update((a, d) for a, d in zip(s.shape, self.shapes.get(s.name, ())) if isinstance(a, str))
        spec = next(s for s in c.outputs if s.name == name)
        return tuple(a if isinstance(a, int) else sizes.get(a, 7) for a in spec.shape)   # 7: an axis outputs derive

    def execute_async_v3(self, stream):
        assert stream and self.scratch is not None and self.scratch[1] >= self.engine.device_memory_size_v2
        self.streams.append(stream)
        self.engine.log.executed.append((self.engine.stage, dict(self.shapes)))
        mem, c = self.engine.memory, self.engine.contract
        if self.engine.stage == "flow_step":
            z = mem.read(self.addresses["z"], self.shapes["z"], "float32")
            keys = mem.read(self.addresses["keys"], self.shapes["keys"], "float32")
            mem.write(self.addresses["velocity"], (2 * z + keys.sum()).astype(np.float32))
        else:
            for s in c.outputs:
                mem.write(self.addresses[s.name], np.zeros(self.get_tensor_shape(s.name), s.dtype))
        return True


class FakeCuda:
    """`polygraphy.cuda.wrapper()` over host memory: device addresses are keys of `blocks`."""

    def __init__(self):
        self.blocks, self.next, self.copies, self.streams, self.device = {}, 0x10000, [], [], None
        self.handle = types.SimpleNamespace(cudaSetDevice=self._set_device)

    def _set_device(self, n):
        self.device = n
        return 0

    def check(self, status):
        if status != 0:                        # Polygraphy: G_LOGGER.critical -> PolygraphyException
            raise RuntimeError(f"CUDA Error: {status}.")

    def malloc(self, nbytes):
        ptr, self.next = self.next, self.next + nbytes + 256
        self.blocks[ptr] = np.zeros(nbytes, np.uint8)
        return ptr

    def free(self, ptr):
        del self.blocks[ptr]

    def create_stream(self):
        self.streams.append(0x5700 + len(self.streams))
        return self.streams[-1]

    def stream_synchronize(self, ptr):
        assert ptr in self.streams

    def destroy_stream(self, ptr):
        self.streams.remove(ptr)

    def memcpy(self, dst, src, nbytes, kind, stream_ptr=None):
        assert stream_ptr in self.streams
        self.copies.append((kind, nbytes))
        if kind == "h2d":
            self.blocks[dst][:nbytes] = np.frombuffer(ctypes.string_at(src, nbytes), np.uint8)
        else:
            ctypes.memmove(dst, self.blocks[src].ctypes.data, nbytes)

    def read(self, ptr, shape, dtype):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return np.frombuffer(self.blocks[ptr][:n].tobytes(), dtype).reshape(shape)

    def write(self, ptr, a):
        self.blocks[ptr][:a.nbytes] = np.frombuffer(a.tobytes(), np.uint8)


def polygraphy(monkeypatch, build=lambda network, config, save_timing_cache: b"engine of " + Path(network[1]).name.encode(),
               version: str = "0.53.6") -> types.SimpleNamespace:
    """Stand-in `polygraphy` modules; `build(network, config, save_timing_cache)` plays
    `engine_bytes_from_network` (`network` is `("network", onnx path)`), and `polygraphy.cuda` a
    `FakeCuda` (`calls.cuda`). Returns a record of the calls."""
    calls = types.SimpleNamespace(networks=[], profiles=[], caches=[])

    class Profile(dict):
        def add(self, name, min, opt, max):
            self[name] = (min, opt, max)
            return self

    def network_from_onnx_path(path, strongly_typed=False):
        assert strongly_typed
        calls.networks.append(Path(path).name)
        return ("network", path)

    def create_config(profiles, load_timing_cache=None):
        calls.profiles += profiles
        calls.caches.append(load_timing_cache)
        return "config"

    root = types.ModuleType("polygraphy")
    root.__version__, root.__spec__ = version, importlib.machinery.ModuleSpec("polygraphy", None)
    calls.cuda = FakeCuda()
    root.cuda = types.SimpleNamespace(wrapper=lambda: calls.cuda,
                                      MemcpyKind=types.SimpleNamespace(HostToDevice="h2d", DeviceToHost="d2h"))
    modules = {"polygraphy": root, "polygraphy.cuda": root.cuda,
               "polygraphy.backend": types.ModuleType("polygraphy.backend"),
               "polygraphy.backend.trt": types.SimpleNamespace(
                   Profile=Profile, CreateConfig=create_config, network_from_onnx_path=network_from_onnx_path,
                   engine_bytes_from_network=build),
               "polygraphy.logger": types.SimpleNamespace(G_LOGGER=types.SimpleNamespace(
                   WARNING=2, verbosity=lambda level: contextlib.nullcontext()))}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return calls


def a_gpu(monkeypatch, tag: str = "nvidia-h100-80gb-hbm3-sm90") -> None:
    """As on a machine with one CUDA GPU (the driver's answers, without a driver)."""
    from vssflow.runtime import engines
    monkeypatch.setattr(engines, "cuda_problem", lambda device=0: None)
    monkeypatch.setattr(engines, "gpu_tag", lambda device=0: tag)


def model_folder(path: Path, fp16: bool = True) -> Path:
    """A model folder of the default sizes whose graphs are placeholders: opens, lists, matches."""
    path.mkdir(parents=True)
    contracts = stage_contracts(ModelSizes())
    files = {}
    for stage in contracts:
        for precision in ("fp32", "fp16") if fp16 and stage in FP16_STAGES else ("fp32",):
            data = f"{precision} graph of {stage}".encode()
            (path / graph_name(stage, precision)).write_bytes(data)
            files[graph_name(stage, precision)] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest = {"format_version": FORMAT_VERSION, "sizes": dataclasses.asdict(ModelSizes()),
                "contracts": {k: c.to_json() for k, c in contracts.items()},
                "precisions": ["fp32", "fp16"] if fp16 else ["fp32"], "files": files,
                "versions": {}, "report": {"tensorrt": {"skipped": "TensorRT is not installed"}}}
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return path


def snapshot(path: Path, stamp: bool = True) -> dict[str, bytes]:
    """Every file under `path` (hidden ones too) and its bytes: a folder 'unchanged' means equal
    snapshots. `stamp=False` leaves out the hash stamp, which opening a folder may rewrite."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and (stamp or p.name != STAMP)}
