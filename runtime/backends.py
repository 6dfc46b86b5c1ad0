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

from .errors import BackendError
from .model_folder import ModelFolder

BACKENDS = ("auto", "trt", "ort", "torch")


class Backend:
    name = "base"

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
        return self._ort.InferenceSession(str(self.folder.file(f"{name}.onnx")), opts, providers=self.providers)

    def _run(self, stage, session, feed):
        return session.run(None, feed)

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
        if not self.folder.file("weights.pt").is_file():
            raise BackendError(f"{folder.path}: no weights.pt (export without --no-torch-weights for the torch backend)")
        self._modules = None

    def _all_modules(self):
        if self._modules is None:
            from vssflow.export.torch_stages import load_stage_modules
            self._modules = load_stage_modules(self.folder.file("weights.pt"), self.device)
        return self._modules

    def _load(self, name: str):
        return self._all_modules()[name]

    def _run(self, stage, module, feed):
        torch = self._torch
        with torch.inference_mode():
            out = module(*(torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in feed.values()))
        out = out if isinstance(out, tuple) else (out,)
        return [o.float().cpu().numpy() for o in out]

    def describe(self) -> str:
        return f"torch ({self.device})"


class TrtBackend(Backend):
    """TensorRT engines built by `vssflow-export --backend trt` for this GPU and TensorRT version."""

    name = "trt"

    def __init__(self, folder: ModelFolder, device: str | None = None):
        super().__init__(folder, device)
        from vssflow.export.tensorrt import availability  # lazy: imports tensorrt only when asked
        ok, reason = availability()
        if not ok:
            raise BackendError(f"the trt backend is unavailable: {reason}")
        self.engines = self._matching_engines()
        missing = [s for s in folder.contracts if s not in self.engines]
        if missing:
            raise BackendError(f"{folder.path}: no TensorRT engine for {', '.join(missing)} built for this GPU "
                               "and TensorRT version; re-run vssflow-export --backend trt")

    def _matching_engines(self) -> dict[str, str]:
        import tensorrt as trt

        from vssflow.export.tensorrt import gpu_tag
        tag = f".{gpu_tag()}.trt{trt.__version__}."
        found = {}
        for f in self.folder.manifest["files"]:
            if f.endswith(".engine") and tag in f:
                found[f.split(".", 1)[0]] = f
        return found

    def _load(self, name: str):
        import tensorrt as trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(self.folder.file(self.engines[name]).read_bytes())
        return engine, engine.create_execution_context()

    def _run(self, stage, runner, feed):
        import torch
        engine, ctx = runner
        contract = self.folder.contracts[stage]
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).cuda() for k, v in feed.items()}
        for k, v in tensors.items():
            ctx.set_input_shape(k, tuple(v.shape))
            ctx.set_tensor_address(k, v.data_ptr())
        outs = []
        for s in contract.outputs:
            o = torch.empty(tuple(ctx.get_tensor_shape(s.name)), dtype=torch.float32, device="cuda")
            ctx.set_tensor_address(s.name, o.data_ptr())
            outs.append(o)
        stream = torch.cuda.current_stream()
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise BackendError(f"TensorRT failed to run {stage}")
        stream.synchronize()
        return [o.cpu().numpy() for o in outs]


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
            return makers[name]()
        except BackendError as e:
            reasons.append(str(e))
    raise BackendError("no backend can run this model: " + " | ".join(reasons))
