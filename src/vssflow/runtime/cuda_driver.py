"""The CUDA driver, through ctypes: whether a GPU is visible, and what it is. No torch, no cuda-python.

What the TensorRT path asks of a GPU before it has buffers (the engine build, the engine names):
`libcuda.so.1` (Linux, Jetson's too) or `nvcuda.dll` comes with the NVIDIA driver itself, and the
calls used here (`cuInit`, `cuDeviceGetCount`, `cuDeviceGet`, `cuDeviceGetName`,
`cuDeviceGetAttribute`) have kept their ABI since CUDA 2. `CUDA_VISIBLE_DEVICES` applies as it
does to PyTorch, so ordinal N here is `cuda:N` there, and the name is the one
`torch.cuda.get_device_properties(N).name` reports (the runtime fills it from `cuDeviceGetName`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import sys

from .errors import BackendError

# CUdevice_attribute values (cuda.h)
_COMPUTE_CAPABILITY_MAJOR = 75
_COMPUTE_CAPABILITY_MINOR = 76


class CudaDriverError(RuntimeError):
    """No usable CUDA driver or device here (the message says which)."""


@dataclasses.dataclass(frozen=True)
class Device:
    ordinal: int
    name: str                   # e.g. "NVIDIA H100 80GB HBM3", "Orin"
    major: int                  # compute capability
    minor: int


@functools.lru_cache(maxsize=1)
def _driver() -> ctypes.CDLL:
    names = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        raise CudaDriverError("no NVIDIA driver here (libcuda cannot be loaded)")
    _check(lib.cuInit(0), "cuInit")
    return lib


def _check(status: int, call: str) -> None:
    if status != 0:
        raise CudaDriverError(f"the CUDA driver failed in {call} (CUresult {status})")


def device_count() -> int:
    """CUDA devices visible here; 0 where there is no driver or no device."""
    try:
        lib = _driver()
    except CudaDriverError:
        return 0
    n = ctypes.c_int(0)
    return n.value if lib.cuDeviceGetCount(ctypes.byref(n)) == 0 else 0


def device(ordinal: int = 0) -> Device:
    """Name and compute capability of device `ordinal`. Raises CudaDriverError."""
    lib = _driver()
    handle, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    _check(lib.cuDeviceGet(ctypes.byref(handle), ordinal), f"cuDeviceGet({ordinal})")
    name = ctypes.create_string_buffer(256)
    _check(lib.cuDeviceGetName(name, len(name), handle), "cuDeviceGetName")
    _check(lib.cuDeviceGetAttribute(ctypes.byref(major), _COMPUTE_CAPABILITY_MAJOR, handle), "cuDeviceGetAttribute")
    _check(lib.cuDeviceGetAttribute(ctypes.byref(minor), _COMPUTE_CAPABILITY_MINOR, handle), "cuDeviceGetAttribute")
    return Device(ordinal, name.value.decode(errors="replace"), major.value, minor.value)


def ordinal(device_name: str | None) -> int:
    """The device number of `--device`: `cuda:N` -> N; `cuda`, None -> 0."""
    if not device_name or ":" not in device_name:
        return 0
    index = device_name.split(":", 1)[1]
    if not index.isdigit():
        raise BackendError(f"device {device_name!r}: expected cuda or cuda:N")
    return int(index)
