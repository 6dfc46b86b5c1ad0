"""Device memory and one stream without PyTorch: what the trt backend's buffers live in.

Through Polygraphy's CUDA wrapper (`polygraphy.cuda.wrapper()`: the CUDA runtime, libcudart, by
ctypes; Polygraphy is pure Python and in the `gpu` extra already, to build engines), so the
TensorRT path needs `tensorrt` + Polygraphy + numpy, as on a Jetson. Calls used, the same in
Polygraphy 0.50.3 and 0.53.6 (`polygraphy/cuda/cuda.py`): `wrapper().malloc/free/memcpy/
create_stream/stream_synchronize/destroy_stream/check`, `MemcpyKind`, and `wrapper().handle` for
`cudaSetDevice` (CUDA runtime API, stable since CUDA 2).

Copies are queued on the one stream with the engines; only `download` waits for it (the host
reads). Host arrays are pageable numpy memory: an upload has read its source when `memcpy`
returns, so the caller may reuse it at once.
"""

from __future__ import annotations

import numpy as np

from .errors import BackendError


class Buffer:
    """One device allocation that grows (never shrinks) to what it is asked to hold."""

    def __init__(self, memory: DeviceMemory):
        self.memory, self.ptr, self.nbytes = memory, 0, 0

    def reserve(self, nbytes: int) -> int:
        """The address of at least `nbytes` bytes (cudaMalloc aligns to 256 bytes, as TensorRT needs)."""
        if nbytes > self.nbytes:
            self.free()
            self.ptr = self.memory.cuda.malloc(max(nbytes, 1))
            self.nbytes = nbytes
        return self.ptr

    def free(self) -> None:
        if self.ptr:
            self.memory.cuda.free(self.ptr)         # cudaFree waits for the work that may still use it
        self.ptr, self.nbytes = 0, 0


class DeviceMemory:
    """Buffers on CUDA device `device` and the stream every copy and engine runs on."""

    def __init__(self, device: int = 0):
        try:
            from polygraphy import cuda
        except ImportError:
            raise BackendError("the trt backend needs Polygraphy for its CUDA buffers: pip install polygraphy "
                               "(pure Python; in the gpu extra)") from None
        self.device = device
        try:
            self.cuda, self._kind = cuda.wrapper(), cuda.MemcpyKind
            self.activate()
            self.stream: int | None = self.cuda.create_stream()      # a cudaStream_t, not the default stream
        except Exception as e:           # Polygraphy raises its own exception when libcudart is missing
            reason = " ".join(str(e).split())[:200]
            raise BackendError(f"the CUDA runtime (libcudart) cannot be used through Polygraphy ({reason}); "
                               "install the CUDA runtime, or on a Jetson check that JetPack's CUDA is on the "
                               "library path") from None
        self._buffers: list[Buffer] = []

    def activate(self) -> None:
        """Make this device the calling thread's current one (the CUDA runtime's is per thread, and a
        Session may be called from several)."""
        self.cuda.check(self.cuda.handle.cudaSetDevice(self.device))

    def buffer(self) -> Buffer:
        b = Buffer(self)
        self._buffers.append(b)
        return b

    def release(self, buffers: list[Buffer]) -> None:
        """Free `buffers` now (a window's, when its ODE loop is over)."""
        for b in buffers:
            b.free()
        self._buffers = [b for b in self._buffers if b not in buffers]

    def upload(self, buffer: Buffer, host: np.ndarray) -> int:
        """Queue a copy of `host` into `buffer` (grown as needed); its device address."""
        host = np.ascontiguousarray(host)
        ptr = buffer.reserve(host.nbytes)
        if host.nbytes:
            self.cuda.memcpy(ptr, host.ctypes.data, host.nbytes, self._kind.HostToDevice, self.stream)
        return ptr

    def download(self, sources: list[tuple[int, tuple[int, ...], str]]) -> list[np.ndarray]:
        """Arrays of `(device address, shape, dtype)`, after everything queued so far (waits for the stream)."""
        out = [np.empty(shape, dtype) for _, shape, dtype in sources]
        for (ptr, _, _), host in zip(sources, out):
            if host.nbytes:
                self.cuda.memcpy(host.ctypes.data, ptr, host.nbytes, self._kind.DeviceToHost, self.stream)
        self.synchronize()
        return out

    def synchronize(self) -> None:
        self.cuda.stream_synchronize(self.stream)

    def close(self) -> None:
        """Free every buffer and the stream (after the work queued on it)."""
        if self.stream is None:
            return
        self.synchronize()
        for b in self._buffers:
            b.free()
        self._buffers.clear()
        self.cuda.destroy_stream(self.stream)
        self.stream = None
