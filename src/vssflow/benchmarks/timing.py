"""Timing, memory and machine facts: the measuring tools every benchmark phase shares.

`measure(fn, repeats, warmup)` runs `fn` warm-up times untimed, then `repeats` times timed, and
summarises the samples as a `Stat` (median and spread). Peak host memory is the kernel's
high-water mark of this process (`VmHWM`), which `reset_peak_rss()` restarts where Linux allows.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class Stat:
    """Seconds (or any unit) over repeated runs: median, spread and the raw samples."""

    samples: tuple[float, ...]

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stat:
        if not len(samples):
            raise ValueError("a Stat needs at least one sample")
        return cls(tuple(float(s) for s in samples))

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def median(self) -> float:
        return float(np.median(self.samples))

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def iqr(self) -> float:
        q1, q3 = np.percentile(self.samples, [25, 75])
        return float(q3 - q1)

    def scaled(self, factor: float) -> Stat:
        return Stat(tuple(s * factor for s in self.samples))

    def to_json(self) -> dict:
        return {"median": self.median, "min": self.min, "max": self.max, "iqr": self.iqr, "n": self.n,
                "samples": list(self.samples)}

    def __str__(self) -> str:
        if self.n == 1:
            return fmt_seconds(self.median) + " (n=1)"
        return f"{fmt_seconds(self.median)} [{fmt_seconds(self.min)}-{fmt_seconds(self.max)}, n={self.n}]"


def fmt_seconds(s: float) -> str:
    if s >= 100:
        return f"{s:.0f} s"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"


def measure(fn: Callable[[], object], repeats: int, warmup: int = 1,
            warmup_fn: Callable[[], object] | None = None, sync: Callable[[], None] = lambda: None
            ) -> tuple[Stat, object]:
    """(timings of `repeats` calls of `fn`, the last call's result); `warmup` untimed calls first.

    `warmup_fn` (default `fn`) lets an expensive stage warm up on a lighter input: the first
    call's one-off costs (lazy loading, kernel selection, allocator growth) are what warm-up is for.
    `sync` waits for queued device work (CUDA) so that each sample covers its own work only.
    """
    for _ in range(warmup):
        (warmup_fn or fn)()
    sync()
    samples, out = [], None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return Stat.of(samples), out


class CallTimer:
    """Wraps a function and records the seconds of every call (for per-NFE statistics)."""

    def __init__(self, fn: Callable, sync: Callable[[], None] = lambda: None):
        self.fn, self.sync = fn, sync
        self.samples: list[float] = []
        self.recording = True

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.sync()
        if self.recording:
            self.samples.append(time.perf_counter() - t0)
        return out


# --- memory ---------------------------------------------------------------------------------------

def status_kib(field: str, pid: int | str = "self") -> int | None:
    """A KiB field of `/proc/PID/status` (`VmRSS`, `VmHWM`); None where there is none (the process
    gone, not Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process: `VmHWM` (resettable), else `ru_maxrss`."""
    hwm = status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    scale = 1 if sys.platform == "darwin" else 1024          # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    """Restart the `VmHWM` high-water mark at the current RSS (Linux >= 4.0); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cuda_memory(reset: bool = False) -> int | None:
    """`torch.cuda.max_memory_allocated()` (bytes) when torch sees a GPU, else None."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats()
        return 0
    return int(torch.cuda.max_memory_allocated())


def cuda_sync() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# --- the machine ----------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:  # noqa: BLE001 - any failure means "not installed"
        return None


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict:
    """What the figures were measured on: CPU, cores, memory, load, GPU, package versions."""
    info = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": _total_memory(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpu": None,
        "versions": {"python": platform.python_version(),
                     **{m: _version(m) for m in ("vssflow", "numpy", "torch", "onnxruntime", "onnxruntime-gpu",
                                                 "tensorrt", "av", "torchdiffeq")}},
        "git_commit": _git_commit(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
                if k in os.environ},
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info
