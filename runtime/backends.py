"""Backends that run the exported stages: ONNX Runtime, TensorRT, or the PyTorch modules.

Each is a small runner: `run(stage, feed) -> {output name: array}`, stages loaded lazily on
first use. Feeds and results are numpy arrays at the boundary; `flow_loop` keeps the ODE state
on the device for GPU backends. Nothing here imports torch, onnxruntime or tensorrt until that
backend is chosen.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

import numpy as np

from . import engines, extras
from .errors import BackendError, ModelFolderError, VssflowError
from .model_folder import ModelFolder

BACKENDS = ("auto", "trt", "ort", "torch")


class Backend:
    name = "base"
    # Where the encoders can take their frames as torch tensors (`kernels.frames` resizes them
    # there); None: numpy arrays from the host only.
    frames_device: str | None = None
    # Set by `create_backend("auto")`: why each backend tried before this one could not run.
    passed_over: tuple[str, ...] = ()

    def __init__(self, folder: ModelFolder, device: str | None = None):
        self.folder, self.device = folder, device
        self._stages: dict[str, object] = {}
        self._lock = threading.Lock()

    def _stage(self, name: str):
        with self._lock:
            if name not in self._stages:
                self._stages[name] = self._load(name)
            return self._stages[name]

    def _load(self, name: str):
        raise NotImplementedError

    def run(self, stage: str, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        contract = self.folder.contracts[stage]
        contract.check_feed(feed)
        out = self._run(stage, self._stage(stage), {s.name: feed[s.name] for s in contract.inputs})
        return dict(zip((s.name for s in contract.outputs), out))

    def _run(self, stage: str, runner, feed: dict) -> list[np.ndarray]:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    def flow_loop(self, cond: Mapping[str, np.ndarray], cfg: float):
        """(velocity(t, z), to_native, to_numpy) for the ODE loop of one window.

        The constant inputs of `flow_step` (cond_bias, keys, values, cfg) are prepared once;
        `velocity` takes and returns the backend's own array type, so a GPU backend keeps the
        state and every constant on the device through the loop. Here: numpy arrays.
        """
        const = {"cond_bias": cond["cond_bias"], "keys": cond["keys"], "values": cond["values"],
                 "cfg": np.array([cfg], np.float32)}

        def velocity(t: float, z: np.ndarray) -> np.ndarray:
            return self.run("flow_step", {"z": z, "t": np.array([t], np.float32), **const})["velocity"]
        return velocity, (lambda a: a), (lambda a: a)


class OrtBackend(Backend):
    """ONNX Runtime with the best provider present: CUDA, then CPU."""

    name = "ort"

    def __init__(self, folder: ModelFolder, device: str | None = None, threads: int | None = None):
        super().__init__(folder, device)
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError("the ort backend needs onnxruntime: pip install 'vssflow[cpu]' "
                               "(or onnxruntime-gpu; on a Jetson, the wheel that matches JetPack)") from None
        self._ort = ort
        available = ort.get_available_providers()
        want_cuda = device in (None, "cuda") or (device or "").startswith("cuda")
        self.providers = (["CUDAExecutionProvider"] if want_cuda and "CUDAExecutionProvider" in available else []) \
            + ["CPUExecutionProvider"]
        if device and device.startswith("cuda") and "CUDAExecutionProvider" not in available:
            raise BackendError("device cuda asked for, but onnxruntime has no CUDA provider "
                               "(install onnxruntime-gpu)")
        self.threads = threads

    def _load(self, name: str):
        opts = self._ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
        opts.log_severity_level = 3
        path = self.folder.file(f"{name}.onnx")
        try:
            return self._ort.InferenceSession(str(path), opts, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...) for bad files
            reason = " ".join(str(e).split())[:300]
            raise ModelFolderError(f"{path}: ONNX Runtime cannot load it ({reason}); re-export the model") from None

    def _run(self, stage, session, feed):
        return session.run(None, feed)

    def flow_loop(self, cond: Mapping[str, np.ndarray], cfg: float):
        """On the CUDA provider (with torch present to hold device buffers), IOBinding keeps the
        state, the constants and the output on the GPU through the loop; elsewhere, numpy."""
        if self.providers[0] != "CUDAExecutionProvider":
            return super().flow_loop(cond, cfg)
        try:
            import torch
        except ImportError:
            return super().flow_loop(cond, cfg)
        session = self._stage("flow_step")
        dev = {k: torch.from_numpy(np.ascontiguousarray(cond[k])).cuda() for k in ("cond_bias", "keys", "values")}
        dev["cfg"] = torch.tensor([cfg], dtype=torch.float32, device="cuda")
        device_id = torch.cuda.current_device()

        def bind(binding, name, tensor):
            binding.bind_input(name, "cuda", device_id, np.float32, tuple(tensor.shape), tensor.data_ptr())

        def velocity(t: float, z):
            z = z.contiguous()
            tt = torch.full((1,), t, dtype=torch.float32, device="cuda")
            out = torch.empty_like(z)
            binding = session.io_binding()
            for name, tensor in {"z": z, "t": tt, **dev}.items():
                bind(binding, name, tensor)
            binding.bind_output("velocity", "cuda", device_id, np.float32, tuple(out.shape), out.data_ptr())
            session.run_with_iobinding(binding)
            return out
        return (velocity, lambda a: torch.from_numpy(np.ascontiguousarray(a)).cuda(),
                lambda a: a.float().cpu().numpy())

    def describe(self) -> str:
        return f"ort ({self.providers[0]})"


class TorchBackend(Backend):
    """The export-side PyTorch modules on CPU or CUDA: the reference, and the GPU path without TensorRT."""

    name = "torch"

    def __init__(self, folder: ModelFolder, device: str | None = None):
        super().__init__(folder, device)
        try:
            import torch
        except ImportError:
            raise BackendError("the torch backend needs PyTorch: pip install 'vssflow[torch]'") from None
        self._torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if "weights.pt" not in folder.manifest["files"]:
            raise BackendError(f"{folder.path}: no weights.pt (export without --no-torch-weights for the torch backend)")
        self._modules = None

    @property
    def frames_device(self) -> str:
        return self.device

    def _all_modules(self):
        if self._modules is None:
            stages = extras.load("export.torch_stages", "torch", "the torch backend")
            try:  # weights only: a pickled object is refused, never run (checkpoint.safe_load)
                self._modules = stages.load_stage_modules(self.folder.file("weights.pt"), self.device)
            except VssflowError as e:                      # weights.pt is part of the model folder
                raise ModelFolderError(str(e)) from None
        return self._modules

    def _load(self, name: str):
        return self._all_modules()[name]

    def _run(self, stage, module, feed):
        torch = self._torch
        with torch.inference_mode():
            out = module(*(a.to(self.device) if torch.is_tensor(a) else torch.from_numpy(np.ascontiguousarray(a))
                           .to(self.device) for a in feed.values()))
        out = out if isinstance(out, tuple) else (out,)
        return [o.float().cpu().numpy() for o in out]

    def describe(self) -> str:
        return f"torch ({self.device})"

    def flow_loop(self, cond: Mapping[str, np.ndarray], cfg: float):
        """Device tensors through the whole loop: constants uploaded once, no host copy per step."""
        torch, step = self._torch, self._stage("flow_step")
        dev = {k: torch.from_numpy(np.ascontiguousarray(cond[k])).to(self.device)
               for k in ("cond_bias", "keys", "values")}
        w = torch.tensor([cfg], dtype=torch.float32, device=self.device)

        def velocity(t: float, z):
            with torch.inference_mode():
                tt = torch.full((1,), t, dtype=torch.float32, device=self.device)
                return step(z, tt, dev["cond_bias"], dev["keys"], dev["values"], w)
        return (velocity, lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device),
                lambda a: a.float().cpu().numpy())


class TrtBackend(Backend):
    """TensorRT engines built by `vssflow-export --backend trt` for this GPU and TensorRT version."""

    name = "trt"
    frames_device = "cuda"

    def __init__(self, folder: ModelFolder, device: str | None = None):
        super().__init__(folder, device)
        ok, reason = engines.availability()
        if not ok:
            raise BackendError(f"the trt backend is unavailable: {reason}")
        self.engines = self._matching_engines()

    def _matching_engines(self) -> dict[str, str]:
        import tensorrt as trt
        return engines.match_engines(self.folder, engines.gpu_tag(), trt.__version__)

    def _load(self, name: str):
        import tensorrt as trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(self.folder.file(self.engines[name]).read_bytes())
        if engine is None:  # its name said this GPU and version, its contents disagree
            raise BackendError(f"{self.folder.file(self.engines[name])}: TensorRT {trt.__version__} cannot load "
                               "this engine (built for another GPU or TensorRT version?); re-run vssflow-export "
                               "--backend trt, or use --backend ort")
        return engine, engine.create_execution_context()

    def _run(self, stage, runner, feed):
        import torch
        tensors = {k: (v if torch.is_tensor(v) else torch.from_numpy(np.ascontiguousarray(v))).cuda().contiguous()
                   for k, v in feed.items()}
        return [o.cpu().numpy() for o in self._execute(stage, runner, tensors)]

    def _execute(self, stage, runner, tensors: dict) -> list:
        """Run an engine on CUDA tensors (tensor addresses, no copies); outputs as CUDA tensors."""
        import torch
        engine, ctx = runner
        for k, v in tensors.items():
            ctx.set_input_shape(k, tuple(v.shape))
            ctx.set_tensor_address(k, v.data_ptr())
        outs = []
        for s in self.folder.contracts[stage].outputs:
            o = torch.empty(tuple(ctx.get_tensor_shape(s.name)), dtype=torch.float32, device="cuda")
            ctx.set_tensor_address(s.name, o.data_ptr())
            outs.append(o)
        stream = torch.cuda.current_stream()
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise BackendError(f"TensorRT failed to run {stage}")
        stream.synchronize()
        return outs

    def flow_loop(self, cond: Mapping[str, np.ndarray], cfg: float):
        """State and constants stay CUDA tensors through the loop; the engine reads them in place."""
        import torch
        runner = self._stage("flow_step")
        const = {k: torch.from_numpy(np.ascontiguousarray(cond[k])).cuda() for k in ("cond_bias", "keys", "values")}
        const["cfg"] = torch.tensor([cfg], dtype=torch.float32, device="cuda")

        def velocity(t: float, z):
            tt = torch.full((1,), t, dtype=torch.float32, device="cuda")
            return self._execute("flow_step", runner, {"z": z.contiguous(), "t": tt, **const})[0]
        return (velocity, lambda a: torch.from_numpy(np.ascontiguousarray(a)).cuda(),
                lambda a: a.float().cpu().numpy())


def create_backend(folder: ModelFolder, backend: str = "auto", device: str | None = None) -> Backend:
    """`auto`: TensorRT if its engines fit this GPU, else ONNX Runtime, else torch."""
    makers: dict[str, Callable[[], Backend]] = {
        "trt": lambda: TrtBackend(folder, device), "ort": lambda: OrtBackend(folder, device),
        "torch": lambda: TorchBackend(folder, device)}
    if backend != "auto":
        if backend not in makers:
            raise BackendError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        return makers[backend]()
    reasons = []
    for name in ("trt", "ort", "torch"):
        try:
            chosen = makers[name]()
        except BackendError as e:
            reasons.append(str(e))
        else:
            chosen.passed_over = tuple(reasons)
            return chosen
    raise BackendError("no backend can run this model: " + " | ".join(reasons))
