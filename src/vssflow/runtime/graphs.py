"""CUDA graphs for the torch backend: one captured call per shape, replayed.

Polygraphy's runner shape. A `CapturedRunner` holds one function at one set of input shapes:
`activate()` allocates its static input buffers and, on CUDA, warms the function up on a side
stream and captures it into a `torch.cuda.CUDAGraph`; `infer(*varying)` copies the per-call
inputs into their buffers and replays; `deactivate()` frees the graph and the buffers. Inputs come
in two kinds: `varying` (copied in every call: the flow step's `z` and time token) and `constant`
(copied in by `load`, once per window: condition bias, keys, values, cfg).

Where there is no CUDA device the runner runs the function eagerly on the same static buffers,
so the buffer logic is the same on a CPU (and tested there); the results are those of calling the
function directly, bit for bit.

The rule for callers: a replay writes the graph's output buffer in place, so the next replay
overwrites what the last one returned. Solvers keep earlier velocities (rk4's k1-k3, dopri5's
`ks`), so `infer` returns a copy of the output (one device copy of `[B, 128, T]`: microseconds),
never the buffer itself.

`RunnerCache` keeps one runner per key (stage, shapes, dtypes): a new shape activates a new
runner (captured anew), never replays another's; at most `max_runners` are kept (the least
recently used is deactivated first), and `close()` deactivates all, so graph memory is bounded
and freed.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

# Warm-up calls before a capture: the first call builds caches (RoPE tables, cuBLAS handles,
# compiled kernels under torch.compile), which must not happen inside the capture.
WARMUP_CALLS = 2
MAX_RUNNERS = 8


def shape_key(tensors: Sequence[torch.Tensor]) -> tuple:
    """What a captured graph depends on: every input's shape, dtype and device."""
    return tuple((tuple(t.shape), t.dtype, str(t.device)) for t in tensors)


class CapturedRunner:
    """`fn(*varying, *constant) -> Tensor` at one set of input shapes, replayed from a CUDA graph
    (or run eagerly on the same static buffers without CUDA, or with `capture=False`)."""

    def __init__(self, fn: Callable[..., torch.Tensor], varying: Sequence[torch.Tensor],
                 constant: Sequence[torch.Tensor], capture: bool | None = None, warmup: bool = False):
        """`capture`: None captures on CUDA only. `warmup`: call `fn` before the first `infer` even
        without a capture (a compiled `fn` compiles there, timed in `seconds`)."""
        self.fn, self.warmup = fn, warmup
        self._examples = (list(varying), list(constant))
        device = varying[0].device
        self.capture = device.type == "cuda" if capture is None else capture
        self.graph = None
        self.inputs: list[torch.Tensor] = []
        self.output: torch.Tensor | None = None
        self.seconds: dict[str, float] = {}        # what activation cost: "warmup" (compile), "capture"
        self.n_varying = len(varying)

    @property
    def active(self) -> bool:
        return bool(self.inputs)

    def activate(self) -> CapturedRunner:
        """Allocate the static buffers (filled with the example inputs) and, on CUDA, capture."""
        if self.active:
            return self
        varying, constant = self._examples
        self.inputs = [t.detach().clone() for t in (*varying, *constant)]
        self._examples = ([], [])
        if not self.capture:
            if self.warmup:
                t0 = time.perf_counter()
                self.fn(*self.inputs)
                self.seconds = {"warmup": time.perf_counter() - t0}
            return self
        t0 = time.perf_counter()
        side = torch.cuda.Stream(device=self.inputs[0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self.fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = self.fn(*self.inputs)
        torch.cuda.synchronize()
        self.seconds = {"warmup": t1 - t0, "capture": time.perf_counter() - t1}
        return self

    def load(self, *constant: torch.Tensor) -> None:
        """Copy the constant inputs (once per window) into their buffers."""
        assert len(constant) == len(self.inputs) - self.n_varying, f"{len(constant)=}"
        for buf, t in zip(self.inputs[self.n_varying:], constant):
            if buf is not t:
                buf.copy_(t)

    def infer(self, *varying: torch.Tensor) -> torch.Tensor:
        """Copy the per-call inputs in, run (replay), and return a copy of the output."""
        assert self.active, "activate() first"
        assert len(varying) == self.n_varying, f"{len(varying)=}"
        for buf, t in zip(self.inputs, varying):
            buf.copy_(t)
        if self.graph is None:
            return self.fn(*self.inputs)           # eager: a fresh tensor already
        self.graph.replay()
        return self.output.clone()

    def deactivate(self) -> None:
        """Free the graph, its output and the static buffers."""
        self.graph, self.output, self.inputs = None, None, []

    def __enter__(self) -> CapturedRunner:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()


class RunnerCache:
    """Active runners by key (stage and input shapes), at most `max_runners`, least recent evicted."""

    def __init__(self, max_runners: int = MAX_RUNNERS):
        self.max_runners = max_runners
        self._runners: OrderedDict[tuple, CapturedRunner] = OrderedDict()

    def get(self, key: tuple, make: Callable[[], CapturedRunner]) -> tuple[CapturedRunner, bool]:
        """The runner for `key`, activated; made (and activated) if new. Returns (runner, new)."""
        runner = self._runners.pop(key, None)
        new = runner is None
        if new:
            while len(self._runners) >= self.max_runners:
                _, old = self._runners.popitem(last=False)
                old.deactivate()
            runner = make().activate()
        self._runners[key] = runner
        return runner, new

    def __len__(self) -> int:
        return len(self._runners)

    def keys(self) -> list[tuple]:
        return list(self._runners)

    def close(self) -> None:
        while self._runners:
            self._runners.popitem()[1].deactivate()
