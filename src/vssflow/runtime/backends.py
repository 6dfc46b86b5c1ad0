"""Backends that run the exported stages: ONNX Runtime, TensorRT, or the PyTorch modules.

Polygraphy's shape: a backend loads each stage lazily (`_load`) and runs it on arrays of its own
kind (`_infer`); a small `Arrays` adapter moves arrays between numpy and that kind. The base class
does the rest once for all of them: it checks feeds against the stage contracts, converts at the
boundary (`run`: numpy in, numpy out), and builds the flow velocity of the ODE loop (`velocity`),
whose constant inputs are uploaded once per window and whose state stays in the backend's own
arrays (device tensors on a GPU) from the first step to the last.

A backend runs at one precision (`runtime/precision.py`): fp32, or fp16 where it runs the
FP16 graphs (ort), the engines built from them (trt) or the torch modules under the same policy
(torch, which also has bf16). By default fp16 where it runs on a GPU and the folder has what
that needs, fp32 on a CPU. `fp32()` is the same kind of backend at FP32, built on first use:
what a window whose FP16 values are not finite is generated again with (`window.py`).

A backend holds one set of buffers, so its calls take turns (`lock`). It is a context manager:
`close()` frees its ONNX Runtime sessions, TensorRT engines, modules and device memory.
Nothing here imports torch, onnxruntime or tensorrt until that backend is chosen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from . import cuda_driver, engines, extras, trt_engine
from .errors import BackendError, ModelFolderError, VssflowError
from .memory import PIECE_STAGES, engine_contract, in_pieces
from .model_folder import ModelFolder
from .precision import FP16_STAGES, PRECISIONS, folder_precisions, graph_name, require_graphs, stage_precision

BACKENDS = ("auto", "trt", "ort", "torch")
# Where frames are resized and normalised: "host" (numpy, any backend), "device" (on the
# backend's `frames_device`: the torch backend), "auto" (device when that is a GPU and Triton is
# here for the kernels). Without Triton "device" runs the kernels' reference (dense float64 products:
# ~7x slower than the host path on a CPU, ~0.5 TFLOP of FP64 per 720p window on a GPU, seconds on a
# GeForce or an Orin): for checking, not speed.
PREPROCESS = ("auto", "host", "device")
# The inputs of `flow_step` that stay the same through one window's ODE loop.
FLOW_CONSTANTS = ("cond_bias", "keys", "values")
# Time tokens the torch backend keeps (a fixed-step solver's 25-100 times; dopri5's differ per window).
TIME_TOKENS_KEPT = 512


class Arrays:
    """numpy arrays on the host: what every backend takes at its boundary."""

    def upload(self, a) -> object:
        return np.ascontiguousarray(a)

    def numpy(self, a) -> np.ndarray:
        return np.asarray(a)

    def scalar(self, value: float) -> object:
        """`[1]` float32, as `flow_step` takes `t` and `cfg`."""
        return np.array([value], np.float32)

    def concat(self, parts: Sequence[object]) -> object:
        """`parts` joined along their first axis."""
        return np.concatenate(parts)


class TorchArrays(Arrays):
    """PyTorch tensors on one device (the GPU backends' buffers, the torch backend's inputs)."""

    def __init__(self, device):
        import torch
        self.torch, self.device = torch, torch.device(device)

    def upload(self, a):
        t = a if self.torch.is_tensor(a) else self.torch.from_numpy(np.ascontiguousarray(a))
        return t.to(self.device).contiguous()

    def numpy(self, a) -> np.ndarray:
        return a.detach().cpu().numpy()

    def scalar(self, value: float):
        return self.torch.full((1,), value, dtype=self.torch.float32, device=self.device)

    def concat(self, parts):
        return self.torch.cat(list(parts))


class Backend:
    name = "base"
    # Where the encoders can take their frames as torch tensors (`kernels.frames` resizes them
    # there); None: numpy arrays from the host only.
    frames_device: str | None = None
    # Set by `create_backend("auto")`: why each backend tried before this one could not run.
    passed_over: tuple[str, ...] = ()
    # What the backend chose on its own that the user should hear of (one line each).
    notes: tuple[str, ...] = ()
    # Whether precision "auto" means fp16 on a GPU: for the graph runtimes, where FP16 is expected to be
    # faster but is unmeasured (no ONNX Runtime CUDA or TensorRT run yet; the device benchmark will
    # say); not for the torch modules, whose eager half mode was slower end to end on an H200
    # (4.2 s against 2.0 s for a 10-second clip at full size: README, "On a GPU").
    half_by_default = True
    # The precisions this kind of backend runs, and why not the others.
    precisions: tuple[str, ...] = ("fp32", "fp16")
    precision_note = "bf16 is the torch backend's (FP16 and FP32 graphs only)"
    # Whether each stage's runner holds its own weights, so that dropping it frees them (`resident`).
    stages_apart = True

    def __init__(self, folder: ModelFolder, device: str | None = None):
        self.folder, self.device = folder, device
        self.arrays: Arrays = Arrays()
        self.lock = threading.RLock()          # held by every call (and by a stage's first load)
        self._stages: dict[str, object] = {}
        self.precision = "fp32"
        self._fp32: Backend | None = None
        # Rows per call of the stages whose rows are independent (`memory.MemoryPlan.rows`): a longer
        # call runs in pieces, the same bits in less memory. Empty: every call whole.
        self.pieces: dict[str, int] = {}
        # At most this many stages loaded at once, the least recently called dropped first (`--low-memory`:
        # 1, so a run holds the largest stage's weights rather than every stage's; each window then
        # loads its stages again). None: every stage stays loaded once called.
        self.resident: int | None = None
        self.loads = 0                  # stages loaded so far (each load after a drop counts again)

    def _set_precision(self, precision: str | None) -> None:
        """`precision`, or by default fp16 on a GPU where the folder has FP16 graphs and this backend
        gains by them (`half_by_default`), else fp32.
        Raises BackendError (exit 4) for a precision this backend cannot run, ModelFolderError
        (exit 3) for one the folder was exported without."""
        if precision is None:
            half = self.on_gpu and self.half_by_default and "fp16" in self._folder_precisions()
            precision = "fp16" if half else "fp32"
        if precision not in PRECISIONS:
            raise BackendError(f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        if precision not in self.precisions:
            raise BackendError(f"the {self.name} backend cannot run {precision}: {self.precision_note}")
        self._require(precision)
        self.precision = precision

    def _folder_precisions(self) -> tuple[str, ...]:
        return folder_precisions(self.folder.manifest)

    def _require(self, precision: str) -> None:
        require_graphs(self.folder, precision)

    def stage_precision(self, stage: str) -> str:
        """What `stage` runs at: the backend's precision, or fp32 where the folder has no half graph."""
        return stage_precision(self.folder.manifest, stage, self.precision)

    def fp32(self) -> Backend:
        """This backend at FP32 (itself when it is): built on first use, sharing this one's lock."""
        if self.precision == "fp32":
            return self
        with self.lock:
            if self._fp32 is None:
                self._fp32 = self._make_fp32()
                self._fp32.lock = self.lock
                self._fp32.pieces, self._fp32.resident = self.pieces, self.resident
            return self._fp32

    def _make_fp32(self) -> Backend:
        return type(self)(self.folder, self.device, "fp32")

    # --- what a backend implements -------------------------------------------------------------
    def _load(self, stage: str):
        """The runner of `stage` (a session, an engine and its context, a module)."""
        raise NotImplementedError

    def _infer(self, stage: str, runner, feed: dict) -> list:
        """Run `stage` on `feed` (its inputs in contract order, in this backend's arrays);
        its outputs in contract order, in this backend's arrays."""
        raise NotImplementedError

    def _release(self) -> None:
        """Free what the runners left behind (device memory caches)."""

    # --- the rest, once ------------------------------------------------------------------------
    def _stage(self, name: str):
        with self.lock:
            runner = self._stages.pop(name, None)
            if runner is None:
                while self.resident is not None and self._stages and len(self._stages) >= self.resident:
                    del self._stages[next(iter(self._stages))]      # the least recently called
                runner = self._load(name)
                self.loads += 1
            self._stages[name] = runner                              # most recent last
            return runner

    def load(self, stage: str) -> None:
        """Load `stage` now (a call loads it otherwise): to time or measure the load on its own."""
        self._stage(stage)

    def run_native(self, stage: str, feed: Mapping[str, object]) -> dict[str, object]:
        """`stage` on a feed of numpy arrays or this backend's own; outputs in its own arrays."""
        contract = self.folder.contracts[stage]
        contract.check_feed(feed)
        names = [s.name for s in contract.outputs]
        with self.lock:
            runner = self._stage(stage)
            feed = {s.name: self.arrays.upload(feed[s.name]) for s in contract.inputs}

            def call(part):
                return dict(zip(names, self._infer(stage, runner, part)))
            return (in_pieces(call, feed, self.pieces[stage], self.arrays.concat) if stage in self.pieces
                    else call(feed))

    def run(self, stage: str, feed: Mapping[str, object]) -> dict[str, np.ndarray]:
        """`stage` on a feed (numpy arrays, or this backend's own); numpy outputs by name."""
        return {k: self.arrays.numpy(v) for k, v in self.run_native(stage, feed).items()}

    def velocity(self, cond: Mapping[str, np.ndarray], cfg: float) -> Callable[[float, object], object]:
        """`velocity(t, z)`: the guided velocity `flow_step` gives for one window's conditions.

        `cond` is the condition stage's output; its constant parts and `cfg` are uploaded once
        here. `z` and the result are this backend's arrays (`self.arrays.upload(noise)`), so a
        GPU backend keeps the state and every constant on the device through the loop."""
        const = {k: self.arrays.upload(cond[k]) for k in FLOW_CONSTANTS}
        const["cfg"] = self.arrays.scalar(cfg)

        def velocity(t: float, z):
            return self.run_native("flow_step", {"z": z, "t": self.arrays.scalar(t), **const})["velocity"]
        return velocity

    def describe(self) -> str:
        return f"{self.name} ({self.precision})"

    @property
    def on_gpu(self) -> bool:
        """Whether the stages run on a GPU (where batching windows pays, and FP16 is the default)."""
        return False

    def close(self) -> None:
        """Drop every loaded stage (and the FP32 twin) and free their memory; a later call loads
        the stage again."""
        with self.lock:
            if self._fp32 is not None:
                self._fp32.close()
                self._fp32 = None
            self._stages.clear()
            self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclasses.dataclass(frozen=True)
class OrtMemory:
    """How ONNX Runtime holds memory on the CPU (`python -m vssflow.benchmarks.memory --ort ...`
    measures each against the default).

    `arena`: "session" (ONNX Runtime's default: a CPU arena per session, each keeping the largest
    pattern its stage ever ran, grown by doubling), "shared" (one arena for every session, grown as
    requested: `kSameAsRequested`), "off" (no arena: the allocator's, so a stage's activations go
    back when its call ends). `mem_pattern`: ONNX Runtime's planned block per input shape (more for
    every new shape). "auto" (None for `mem_pattern`), the default, is per stage: an arena and
    memory patterns for `PLANNED_STAGES`, neither for the others. `prepack`: weights of matrix
    products also copied in the layout MLAS computes in: off, as measured at full size on a 2-core
    CPU, it saves 524 MiB of the flow step's 1633 MiB graph and three quarters of its load time
    (8 s against 32 s) for no measurable cost per call (6.11 s against 6.09 s, median of 3)."""

    arena: str = "auto"
    mem_pattern: bool | None = None
    prepack: bool = False

    ARENAS = ("auto", "session", "shared", "off")
    # Stages called with one shape per window, whose activations a planned pattern reuses: measured at
    # full size, each in a process of its own, a call's peak growth with an arena and patterns against
    # neither: flow step 65 MiB against 231 MiB, VAE decoder 219 against 500, condition 30 against 42.
    # Not the encoders (their pieces vary, and an arena would keep their largest: hundreds of MiB) nor
    # the speaker encoder (705 MiB kept against 123) or the vocoder (chunks of varying length; 26 MiB).
    PLANNED_STAGES = frozenset({"condition", "flow_step", "vae_decoder"})

    @classmethod
    def parse(cls, text: str) -> OrtMemory:
        """`arena=shared,mem_pattern=on,prepack=off` over the defaults ("" or "default": the defaults;
        "ort": ONNX Runtime's own defaults)."""
        if text.strip() == "ort":
            return cls(arena="session", mem_pattern=True, prepack=True)
        fields: dict[str, object] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            if part == "default":
                continue
            key, _, value = part.partition("=")
            if key == "arena" and value in cls.ARENAS:
                fields[key] = value
            elif key == "mem_pattern" and value in ("on", "off", "auto"):
                fields[key] = None if value == "auto" else value == "on"
            elif key == "prepack" and value in ("on", "off"):
                fields[key] = value == "on"
            else:
                raise BackendError(f"ONNX Runtime memory setting {part!r}: expected arena=auto|session|shared|off, "
                                   "mem_pattern=auto|on|off or prepack=on|off")
        return cls(**fields)

    def for_stage(self, stage: str, half: bool = False) -> OrtMemory:
        """The settings of `stage`'s session, "auto" resolved; `half`: it runs an FP16 graph, whose
        weights the CPU provider casts to FP32 as each call needs them (`_ort_cpu_options`), and an
        arena would keep those casts: none for it."""
        planned = stage in self.PLANNED_STAGES and not half
        return dataclasses.replace(self, arena=("session" if planned else "off") if self.arena == "auto" else self.arena,
                                   mem_pattern=planned if self.mem_pattern is None else self.mem_pattern)

    def describe(self) -> str:
        pattern = "auto" if self.mem_pattern is None else "on" if self.mem_pattern else "off"
        return f"arena={self.arena},mem_pattern={pattern},prepack={'on' if self.prepack else 'off'}"


_SHARED_ARENA: list[bool] = []          # the process's one shared CPU arena, registered with ONNX Runtime once


def _ort_cpu_options(ort, opts, memory: OrtMemory, half: bool = False) -> None:
    """Apply `memory` to SessionOptions `opts` of a session on the CPU provider; `half`: the
    session runs an FP16 graph.

    An FP16 graph runs on the CPU provider through the Cast nodes ONNX Runtime inserts around the
    operators it has no FP16 kernel for (matrix products on x86), and its graph optimizations then
    fold the casts of the weights into FP32 copies kept beside the FP16 ones: at full size the flow
    step's 817 MiB graph took 2.4 GiB loaded. With the optimizations off the weights stay FP16 and
    are cast as each call needs them (838 MiB loaded; its call 5.8 s against 5.2 s). The FP16 graphs
    are for GPUs; on a CPU they are the smaller choice, the FP32 ones the faster."""
    if half:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.enable_mem_pattern = memory.mem_pattern
    opts.enable_cpu_mem_arena = memory.arena != "off"
    if not memory.prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if memory.arena == "shared":
        if not _SHARED_ARENA:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))  # kSameAsRequested
            _SHARED_ARENA.append(True)
        opts.add_session_config_entry("session.use_env_allocators", "1")


class OrtBackend(Backend):
    """ONNX Runtime with the best provider present: CUDA (device `cuda:N`), then CPU.

    On the CUDA provider with a CUDA build of PyTorch, arrays are CUDA tensors bound in place
    (IOBinding) and ONNX Runtime computes on a stream of torch's (`user_compute_stream`) that
    waits for torch's current one, so it never reads a tensor torch is still writing. Without
    one, arrays are numpy on the host, and a window's flow constants are uploaded once as device
    `OrtValue`s and stay bound through its ODE loop (the state, 128 x T floats, crosses per step).

    ONNX Runtime falls back to the CPU, with one line in its log, when its CUDA provider cannot
    load (missing CUDA/cuDNN libraries) while still listing it as available; so a session's own
    providers are checked: under `--device cuda` that is an error (exit 4), otherwise the backend
    runs on the CPU and says so (`notes`).
    """

    name = "ort"
    _preloaded = False          # `onnxruntime.preload_dlls()`, once per process

    def __init__(self, folder: ModelFolder, device: str | None = None, precision: str | None = None,
                 memory: OrtMemory = OrtMemory()):
        super().__init__(folder, device)
        self.memory = memory
        try:
            ort = extras.onnxruntime()
        except ImportError:
            raise BackendError("the ort backend needs onnxruntime: pip install 'vssflow[cpu]' "
                               "(or onnxruntime-gpu; on a Jetson, the wheel that matches JetPack)") from None
        self._ort = ort
        self.device_id = cuda_driver.ordinal(device)
        asked = bool(device) and device.startswith("cuda")
        cuda = (device is None or asked) and "CUDAExecutionProvider" in ort.get_available_providers()
        if asked and not cuda:
            raise BackendError(f"device {device} asked for, but onnxruntime has no CUDA provider "
                               "(install onnxruntime-gpu)")
        self._stream = None
        if cuda and _torch_cuda():
            import torch
            self.arrays = TorchArrays(f"cuda:{self.device_id}")
            self._stream = torch.cuda.Stream(self.arrays.device)     # ONNX Runtime's, ordered with torch's
        self.providers = (["CUDAExecutionProvider"] if cuda else []) + ["CPUExecutionProvider"]
        if cuda:
            problem = self._cuda_problem()
            if problem is not None and asked:
                raise BackendError(f"device {device} asked for, but {problem}")
            if problem is not None:
                self.notes = (f"{problem}; the ort backend runs on the CPU",)
                self.providers, self.arrays, self._stream = ["CPUExecutionProvider"], Arrays(), None
        # On the CPU provider an FP16 graph runs through casts (FP32 arithmetic between
        # FP16-rounded tensors): slow, but how FP16's accuracy is checked without a GPU.
        self._set_precision(precision)

    def _provider_options(self) -> list:
        if self.providers[0] != "CUDAExecutionProvider":
            return self.providers
        # HEURISTIC: the vocoder's and decoder's convolutions change shape with every chunk and
        # window length; EXHAUSTIVE (the default) would benchmark cuDNN's algorithms at each new one.
        options = {"device_id": str(self.device_id), "cudnn_conv_algo_search": "HEURISTIC"}
        if self._stream is not None:
            options["user_compute_stream"] = str(self._stream.cuda_stream)
        return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]

    def _session(self, path, stage: str = "", half: bool = False):
        """An InferenceSession of the graph at `path`: `stage`'s (CPU memory settings are per stage),
        an FP16 graph where `half`."""
        if self.providers[0] == "CUDAExecutionProvider" and not OrtBackend._preloaded:
            OrtBackend._preloaded = True
            preload = getattr(self._ort, "preload_dlls", None)     # onnxruntime-gpu >= 1.21
            if preload is not None:
                with contextlib.redirect_stdout(sys.stderr):          # it prints; stdout may be our JSON
                    try:
                        preload()
                    except Exception:             # a layout it does not know: the session says what is missing
                        pass
        opts = self._ort.SessionOptions()
        opts.log_severity_level = 3
        if self.providers[0] == "CPUExecutionProvider":
            _ort_cpu_options(self._ort, opts, self.memory.for_stage(stage, half), half)
        try:
            return self._ort.InferenceSession(str(path), opts, providers=self._provider_options())
        except Exception as e:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...) for bad files
            reason = " ".join(str(e).split())[:300]
            raise ModelFolderError(f"{path}: ONNX Runtime cannot load it ({reason}); re-export the model") from None

    def _make_fp32(self) -> Backend:
        return OrtBackend(self.folder, self.device, "fp32", self.memory)

    def _cuda_problem(self) -> str | None:
        """Whether a session really gets the CUDA provider (tried on the folder's smallest graph), or
        why not, in one line."""
        files = self.folder.manifest["files"]
        graphs = sorted((n for n in files if n.endswith(".onnx")), key=lambda n: files[n].get("bytes", 0))
        if not graphs:
            return None
        if "CUDAExecutionProvider" in self._session(self.folder.file(graphs[0])).get_providers():
            return None
        return ("ONNX Runtime's CUDA provider did not load (its CUDA or cuDNN libraries are missing or of another "
                "version: pip install 'onnxruntime-gpu[cuda,cudnn]', or on a Jetson the wheel built for its JetPack)")

    def _load(self, name: str):
        precision = self.stage_precision(name)
        path = self.folder.file(graph_name(name, precision))
        session = self._session(path, name, half=precision != "fp32")
        if self.providers[0] == "CUDAExecutionProvider" and "CUDAExecutionProvider" not in session.get_providers():
            raise BackendError(f"{name}: ONNX Runtime's CUDA provider did not load for {path.name}")
        return session

    def _infer(self, stage, session, feed):
        if not isinstance(self.arrays, TorchArrays):
            return session.run(None, feed)
        return self._bound(stage, session, feed)

    def _bound(self, stage, session, feed) -> list:
        """IOBinding on CUDA tensors: inputs read in place; an output whose shape the inputs
        fix (the flow velocity) is written in place, any other is allocated by ONNX Runtime."""
        torch = self.arrays.torch
        contract = self.folder.contracts[stage]
        binding = session.io_binding()
        sizes: dict[str, int] = {}
        for spec in contract.inputs:
            t = feed[spec.name]
            sizes.update((a, d) for a, d in zip(spec.shape, t.shape) if isinstance(a, str))
            binding.bind_input(spec.name, "cuda", self.device_id, np.dtype(spec.dtype), tuple(t.shape), t.data_ptr())
        outs: list = []
        for spec in contract.outputs:
            if all(isinstance(a, int) or a in sizes for a in spec.shape):
                o = torch.empty(contract.shape(spec, **sizes), dtype=getattr(torch, spec.dtype), device=self.arrays.device)
                binding.bind_output(spec.name, "cuda", self.device_id, np.dtype(spec.dtype), tuple(o.shape),
                                    o.data_ptr())
                outs.append(o)
            else:
                binding.bind_output(spec.name, "cuda", self.device_id)
                outs.append(None)
        current = torch.cuda.current_stream(self.arrays.device)
        self._stream.wait_stream(current)              # the inputs torch wrote, before ONNX Runtime reads them
        session.run_with_iobinding(binding)
        current.wait_stream(self._stream)              # and its outputs before torch reads them
        return [self.arrays.upload(v.numpy()) if o is None else o for o, v in zip(outs, binding.get_outputs())]

    def velocity(self, cond: Mapping[str, np.ndarray], cfg: float) -> Callable[[float, object], object]:
        """On CUDA without torch: the window's constants uploaded once as device OrtValues and bound
        once; per step only the state and `t` cross (copied in by ONNX Runtime, the velocity out)."""
        if self.providers[0] != "CUDAExecutionProvider" or isinstance(self.arrays, TorchArrays):
            return super().velocity(cond, cfg)
        contract = self.folder.contracts["flow_step"]
        host = {k: np.ascontiguousarray(cond[k]) for k in FLOW_CONSTANTS}
        host["cfg"] = self.arrays.scalar(cfg)
        with self.lock:
            session = self._stage("flow_step")
            binding = session.io_binding()
            on_device = {k: self._ort.OrtValue.ortvalue_from_numpy(host[k], "cuda", self.device_id)
                         for k in FLOW_CONSTANTS}
            for k, v in on_device.items():
                binding.bind_ortvalue_input(k, v)
            binding.bind_cpu_input("cfg", host["cfg"])
            binding.bind_output("velocity", "cpu")

        def velocity(t: float, z):
            z, t_ = np.ascontiguousarray(z), self.arrays.scalar(t)
            contract.check_feed({**host, "z": z, "t": t_})
            with self.lock:
                binding.bind_cpu_input("z", z)
                binding.bind_cpu_input("t", t_)
                session.run_with_iobinding(binding)
                return binding.copy_outputs_to_cpu()[0]
        velocity.constants = on_device                 # kept alive with the binding that reads them
        return velocity

    def describe(self) -> str:
        return f"ort ({self.providers[0]}, {self.precision})"

    @property
    def on_gpu(self) -> bool:
        return self.providers[0] == "CUDAExecutionProvider"


def _torch_cuda() -> bool:
    """Whether a CUDA build of PyTorch with a visible GPU is here (a CPU build is not enough)."""
    if extras.missing("torch"):
        return False
    import torch
    return torch.cuda.is_available()


class TorchBackend(Backend):
    """The export-side PyTorch modules on CPU or CUDA: the reference, and the GPU path without TensorRT."""

    name = "torch"
    stages_apart = False            # every module comes out of one weights.pt load (`_all_modules`)
    half_by_default = False
    # The policy of `export/precision.py` on the modules themselves: no graphs needed.
    precisions = PRECISIONS

    def __init__(self, folder: ModelFolder, device: str | None = None, precision: str | None = None,
                 compile: bool = False, cuda_graphs: bool | None = None):
        """`compile`: the flow step through `torch.compile` (`runtime/compiled.py`). `cuda_graphs`:
        the flow step captured once per shape and replayed (`runtime/graphs.py`); None: on CUDA."""
        super().__init__(folder, device)
        extras.require("torch", "the torch backend")
        import torch

        from .graphs import RunnerCache
        self._torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.compile = compile
        self.cuda_graphs = self.on_gpu if cuda_graphs is None else cuda_graphs
        self.runners = RunnerCache()                      # the flow step's, one per shape
        self._compiled = None
        if "weights.pt" not in folder.manifest["files"]:
            raise BackendError(f"{folder.path}: no weights.pt: the torch backend runs the PyTorch weights; "
                               "re-export with vssflow-export --torch-weights")
        self.arrays = TorchArrays(self.device)
        self._modules = None
        self._tokens: dict[tuple[float, int], object] = {}     # time tokens by (t, rows), oldest first
        self._set_precision(precision)

    def _folder_precisions(self) -> tuple[str, ...]:
        return PRECISIONS

    def _require(self, precision: str) -> None:
        pass

    def stage_precision(self, stage: str) -> str:
        return self.precision if stage in FP16_STAGES else "fp32"

    @property
    def frames_device(self) -> str:
        return self.device

    def _all_modules(self):
        if self._modules is None:
            stages = extras.load("export.torch_stages", "torch", "the torch backend")
            try:  # weights only: a pickled object is refused, never run (checkpoint.safe_load)
                self._modules = stages.load_stage_modules(self.folder.file("weights.pt"), self.device,
                                                          self.precision)
            except VssflowError as e:                      # weights.pt is part of the model folder
                raise ModelFolderError(str(e)) from None
        return self._modules

    def _load(self, name: str):
        return self._all_modules()[name]

    def exact(self):
        """The context every FP32 call on a GPU runs in: TF32 off (`no_tf32`), captured graphs included."""
        return no_tf32(self._torch) if self.on_gpu and self.precision == "fp32" else contextlib.nullcontext()

    def _infer(self, stage, module, feed):
        with self._torch.inference_mode(), self.exact():
            out = module(*feed.values())
        return list(out) if isinstance(out, tuple) else [out]

    def velocity(self, cond: Mapping[str, np.ndarray], cfg: float) -> Callable[[float, object], object]:
        """`Backend.velocity` with each kind of work done as often as it changes: the keys/values
        cast to the compute dtype and repeated to the query heads once per window
        (`FlowStep.window_kv`), each time token once per time and row count, kept across windows
        (`time_token`: a fixed-step solver's times are the same in every window), and only
        `FlowStep.guided` per step. The same computations as `flow_step`'s graph: the same bits."""
        return TorchVelocity(self, cond, cfg)

    def _guided(self, step):
        """`step.guided`, compiled with `torch.compile` when the backend was asked to (once)."""
        if not self.compile:
            return step.guided
        if self._compiled is None:
            from .compiled import compile_fn
            self._compiled = compile_fn(step.guided)
        return self._compiled

    def _flow_step(self):
        """The FlowStep module (inside its HalfStage at half precision)."""
        module = self._stage("flow_step")
        return getattr(module, "module", module)

    def _time_token(self, step, t: float, t_t, rows: int):
        key = (t, rows)
        token = self._tokens.pop(key, None)
        if token is None:
            token = step.time_token(t_t, rows)
            while len(self._tokens) >= TIME_TOKENS_KEPT:        # dopri5's times differ window to window
                del self._tokens[next(iter(self._tokens))]
        self._tokens[key] = token                                 # most recent last
        return token

    def _release(self) -> None:
        self._modules = None
        self._tokens.clear()
        self.runners.close()
        self._compiled = None
        if self._torch.device(self.device).type == "cuda":
            self._torch.cuda.empty_cache()

    def _make_fp32(self) -> Backend:
        return TorchBackend(self.folder, self.device, "fp32", self.compile, self.cuda_graphs)

    def describe(self) -> str:
        extra = "".join(f", {x}" for x, on in (("compiled", self.compile), ("CUDA graphs", self.cuda_graphs)) if on)
        return f"torch ({self.device}, {self.precision}{extra})"

    @property
    def on_gpu(self) -> bool:
        return str(self.device).startswith("cuda")


@contextlib.contextmanager
def no_tf32(torch):
    """FP32 matrix products and convolutions in true FP32 (not TF32, which cuDNN's convolutions use by
    default on Ampere and newer): the torch backend at fp32 on a GPU is the reference the other
    paths are measured against. Restored afterwards: the process's other torch work keeps its setting."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


class TorchVelocity:
    """`TorchBackend.velocity(cond, cfg)`: `velocity(t, z)` for one window, each kind of work
    done as often as it changes (see there). The step runs through the backend's runner for its
    shape (`runtime/graphs.py`: a CUDA graph replayed on a GPU, eager on the same buffers
    elsewhere), activated here, so `startup` holds what this window paid to compile or capture
    ({"compile": s} or {"capture": s}, empty when a runner of this shape existed)."""

    def __init__(self, backend: TorchBackend, cond: Mapping[str, np.ndarray], cfg: float):
        from .graphs import CapturedRunner, shape_key
        torch, arrays = backend._torch, backend.arrays
        self.backend, self.arrays = backend, arrays
        self.step = step = backend._flow_step()
        const = {k: arrays.upload(cond[k]) for k in FLOW_CONSTANTS}
        self.cfg = arrays.scalar(cfg)
        self.checked = const
        bias = const["cond_bias"]
        b, t_len = bias.shape[0], bias.shape[1]
        with backend.lock, torch.inference_mode(), backend.exact():
            keys, values = step.window_kv(const["keys"], const["values"])
            z = torch.zeros((b, step.a_z.shape[1], t_len), dtype=torch.float32, device=bias.device)
            token = backend._time_token(step, 0.0, arrays.scalar(0.0), 2 * b)
            constant = [bias, self.cfg, *keys, *values]
            guided, n_layers = backend._guided(step), len(keys)

            def fn(z, token, bias, cfg, *kv):
                return guided(z, token, bias, list(kv[:n_layers]), list(kv[n_layers:]), cfg)

            key = ("flow_step", backend.precision, backend.compile, backend.cuda_graphs,
                   shape_key([z, token, *constant]))
            t0 = time.perf_counter()
            self.runner, new = backend.runners.get(key, lambda: CapturedRunner(
                fn, [z, token], constant, capture=backend.cuda_graphs, warmup=backend.compile))
            self.runner.load(*constant)                               # this window's
        seconds = time.perf_counter() - t0
        self.startup = {("compile" if backend.compile else "capture"): seconds} \
            if new and (backend.compile or self.runner.graph is not None) else {}

    def __call__(self, t: float, z):
        backend = self.backend
        t_t = self.arrays.scalar(t)
        if self.checked:                                      # the contract, once per window
            backend.folder.contracts["flow_step"].check_feed({"z": z, "t": t_t, **self.checked, "cfg": self.cfg})
            self.checked = None
        with backend.lock, backend._torch.inference_mode(), backend.exact():
            return self.runner.infer(z, backend._time_token(self.step, t, t_t, 2 * z.shape[0]))


class TrtBackend(Backend):
    """TensorRT engines built for this GPU and TensorRT version (`vssflow-export --engines-for`).

    No PyTorch: buffers and the stream are `cuda_memory`'s (Polygraphy's CUDA wrapper), and arrays
    at the boundary are numpy on the host, as are the frames and the ODE state (128 x T floats per
    step), while a window's flow constants are uploaded once and stay on the device through its
    loop (`velocity`). Engines run on that stream, not the default one; the host waits only where
    it reads a result. Each engine's I/O is checked against its stage contract when it is loaded
    (`trt_engine.check_io`); the contexts own no scratch memory: they share one buffer, the size of
    the largest (calls take turns).
    """

    name = "trt"
    on_gpu = True

    def __init__(self, folder: ModelFolder, device: str | None = None, precision: str | None = None):
        super().__init__(folder, device)
        self.device_id = cuda_driver.ordinal(device)
        ok, reason = engines.availability(self.device_id)
        if not ok:
            raise BackendError(f"the trt backend is unavailable: {reason}")
        import tensorrt as trt
        gpu = engines.gpu_tag(self.device_id)
        if precision is None:           # FP16 engines where the export built them, else FP32 ones
            try:
                engines.match_engines(self.folder, gpu, trt.__version__, "fp16")
                precision = "fp16"
            except BackendError:
                precision = "fp32"
        self._set_precision(precision)
        self.engines = engines.match_engines(self.folder, gpu, trt.__version__, self.precision)
        self._memory = None
        self._runtime = None
        self._scratch = None            # every context's scratch memory (a cuda_memory.Buffer)
        self.memory.synchronize()       # the CUDA runtime now, so `auto` falls back where it cannot load

    def _make_fp32(self) -> Backend:
        """FP32 engines where the export built them, else the FP32 graphs on ONNX Runtime."""
        try:
            return TrtBackend(self.folder, self.device, "fp32")
        except BackendError:
            return OrtBackend(self.folder, self.device if _ort_has_cuda() else None, "fp32")

    @property
    def memory(self):
        """The backend's `cuda_memory.DeviceMemory` (made again after `close`)."""
        if self._memory is None:
            from .cuda_memory import DeviceMemory
            self._memory = DeviceMemory(self.device_id)
            self._scratch = self._memory.buffer()
        return self._memory

    def _load(self, name: str):
        import tensorrt as trt
        memory = self.memory
        memory.activate()                           # the engine is deserialized onto this device
        if self._runtime is None:
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        path = self.folder.file(self.engines[name])
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:  # its name said this GPU and version, its contents disagree
            raise BackendError(f"{path}: TensorRT {trt.__version__} cannot load this engine (built for another GPU "
                               "or TensorRT version?); re-run vssflow-export --engines-for, or use --backend ort")
        contract = self.folder.contracts[name]
        trt_engine.check_io(name, engine, contract, trt, path.name)
        if name in PIECE_STAGES:       # its profile may stop at a piece's rows (`memory.engine_contract`)
            rows = engine_contract(self.folder.contracts, name).axes[contract.inputs[0].shape[0]][2]
            self.pieces[name] = min(self.pieces.get(name, rows), rows)
        ctx = trt_engine.context_without_memory(name, engine, trt)
        size = trt_engine.device_memory_size(engine)
        if size > self._scratch.nbytes:             # grow the shared buffer; point every context at the new one
            memory.synchronize()
            self._scratch.reserve(size)
            for stage in self._stages.values():
                trt_engine.set_device_memory(stage.ctx, self._scratch.ptr, self._scratch.nbytes)
        trt_engine.set_device_memory(ctx, self._scratch.ptr, self._scratch.nbytes)
        return _Engine(engine, ctx, {s.name: memory.buffer() for s in contract.inputs + contract.outputs})

    def _enqueue(self, stage: str, runner, inputs: Mapping[str, int], shapes: Mapping[str, tuple]) -> list:
        """Run `stage` on inputs already on the device (`name -> address`, `shapes`); its outputs'
        `(address, shape, dtype)` in contract order, queued on the stream (not yet read)."""
        trt_engine.set_inputs(stage, runner.ctx, {k: (shapes[k], ptr) for k, ptr in inputs.items()})
        outs = []
        for s in self.folder.contracts[stage].outputs:
            shape = trt_engine.output_shape(stage, runner.ctx, s.name)
            outs.append((runner.buffers[s.name].reserve(int(np.prod(shape)) * np.dtype(s.dtype).itemsize), shape,
                         s.dtype))
        trt_engine.execute(stage, runner.ctx, {s.name: o[0] for s, o in zip(self.folder.contracts[stage].outputs, outs)},
                           self.memory.stream)
        return outs

    def _infer(self, stage, runner, feed):
        self.memory.activate()
        inputs = {k: self.memory.upload(runner.buffers[k], v) for k, v in feed.items()}
        return self.memory.download(self._enqueue(stage, runner, inputs, {k: v.shape for k, v in feed.items()}))

    def velocity(self, cond: Mapping[str, np.ndarray], cfg: float) -> Callable[[float, object], object]:
        """The window's constants (and `cfg`) uploaded once into buffers of this window's own (freed
        when the window's loop is over); per step `z` and `t` go up and the velocity comes down."""
        contract = self.folder.contracts["flow_step"]
        host = {k: np.ascontiguousarray(cond[k]) for k in FLOW_CONSTANTS}
        host["cfg"] = self.arrays.scalar(cfg)
        with self.lock:
            runner, memory = self._stage("flow_step"), self.memory
            own = {k: memory.buffer() for k in ("z", "t", *host)}
            on_device = {k: memory.upload(own[k], v) for k, v in host.items()}

        def velocity(t: float, z):
            z, t_ = np.ascontiguousarray(z), self.arrays.scalar(t)
            contract.check_feed({**host, "z": z, "t": t_})
            shapes = {**{k: v.shape for k, v in host.items()}, "z": z.shape, "t": t_.shape}
            with self.lock:
                memory.activate()
                inputs = {**on_device, "z": memory.upload(own["z"], z), "t": memory.upload(own["t"], t_)}
                return memory.download(self._enqueue("flow_step", runner, inputs, shapes))[0]
        weakref.finalize(velocity, _release_quietly, memory, list(own.values()))
        return velocity

    def _release(self) -> None:
        if self._memory is not None:
            self._memory.close()
        self._memory = self._scratch = None

    def describe(self) -> str:
        return f"trt ({self.precision})"


@dataclasses.dataclass
class _Engine:
    """A loaded stage of the trt backend: the engine, its context, a device buffer per input and output."""
    engine: object
    ctx: object
    buffers: dict


def _release_quietly(memory, buffers) -> None:
    """Free a finished window's buffers (a finalizer: the backend may be closed, its memory freed, already)."""
    if memory.stream is not None:
        memory.release(buffers)


def _ort_has_cuda() -> bool:
    if extras.missing("cpu"):
        return False
    return "CUDAExecutionProvider" in extras.onnxruntime().get_available_providers()


def create_backend(folder: ModelFolder, backend: str = "auto", device: str | None = None,
                   precision: str | None = None, compile: bool = False) -> Backend:
    """`auto`: TensorRT if its engines fit this GPU, else ONNX Runtime, else torch.
    `precision`: fp32, fp16 or bf16 (torch); None: each backend's default (fp16 on a GPU).
    `compile`: the torch backend with its flow step through `torch.compile` (`auto` means torch)."""
    if compile:
        if backend not in ("auto", "torch"):
            raise BackendError(f"compile is the torch backend's (torch.compile); the {backend} backend runs "
                               "graphs or engines: use --backend torch")
        backend = "torch"
    makers: dict[str, Callable[[], Backend]] = {
        "trt": lambda: TrtBackend(folder, device, precision), "ort": lambda: OrtBackend(folder, device, precision),
        "torch": lambda: TorchBackend(folder, device, precision, compile=compile)}
    if backend != "auto":
        if backend not in makers:
            raise BackendError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        return makers[backend]()
    reasons = []
    for name in ("trt", "ort", "torch"):
        if name == "trt" and not engines.cuda_gpu_visible():
            continue                    # no GPU: TensorRT is no option here, nor worth a line
        try:
            chosen = makers[name]()
        except BackendError as e:
            reasons.append(str(e))
        else:
            chosen.passed_over = tuple(reasons)
            return chosen
    raise BackendError("no backend can run this model: " + " | ".join(reasons))
