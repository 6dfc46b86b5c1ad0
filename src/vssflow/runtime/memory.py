"""Memory: what a model folder's stages need, and the plan the runtime keeps to (`--max-memory`).

Where the bytes go (measured by `python -m vssflow.benchmarks.memory`; full size, FP32 graphs, ONNX
Runtime on a CPU: `benchmarks/results/memory-cpu-full.md`): the weights of every stage, loaded once
and kept; and the activations of the call in flight, of which the encoders' grow with their batch:
CLIP encodes each frame on its own and Synchformer each 16-frame segment on its own, so a call of
N rows holds N rows' activations (30 segments of Synchformer at once are several GiB).

So the encoders run in pieces along their batch axis (`rows`), which is exact: the rows are
independent, and each row's arithmetic is the same in any piece (tested bit for bit). A piece's
size comes from the budget left after the weights, divided by the bytes one row's activations take,
estimated from the contract's input shape (`row_bytes`: `ACTIVATIONS_PER_INPUT` times the bytes of
one row's input, measured on both encoders: a ViT's tokens, and so its activations, scale with its
pixels).

`MemoryPlan.make(folder, precision, budget)`: the weights alone must fit `budget`, with `RESERVE`
for the interpreter, libraries and one window's frames; else `MemoryBudgetError` (exit 4).
Without a budget the encoders still run in pieces of at most `DEFAULT_ACTIVATIONS`' worth.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import numpy as np

from . import contracts as C
from .errors import BackendError, VssflowInputError
from .precision import graph_name, stage_precision, weights_name

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
# Stages whose calls are cut into pieces along their first (batch) axis: their rows are independent.
PIECE_STAGES = ("clip_encoder", "synch_encoder")
# Activation bytes per byte of one row's input, measured at full size on ONNX Runtime's CPU provider
# (`python -m vssflow.benchmarks.memory --size full --ort ort --whole`: CLIP 12.4x, Synchformer 13.7x; rounded up).
ACTIVATIONS_PER_INPUT = 14
# The interpreter, numpy, ONNX Runtime's libraries, one window's frames (~70 MB) and the rest of a run
# that is not the model: measured ~0.5 GiB resident before any stage loads.
RESERVE = 640 * MIB
# The activations an encoder call may take when no budget is given.
DEFAULT_ACTIVATIONS = 1 * GIB
# The decoded frames `generate_many`'s workers may hold ahead of the model when no budget is given
# (about five windows at full size).
QUEUE_BYTES = 256 * MIB

_UNITS = {"": 1, "b": 1, "k": KIB, "kb": KIB, "kib": KIB, "m": MIB, "mb": MIB, "mib": MIB,
          "g": GIB, "gb": GIB, "gib": GIB, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


class MemoryBudgetError(BackendError):
    """A memory budget the model cannot keep to (exit 4, as any backend that cannot run the model)."""


def parse_memory(text: str | int) -> int:
    """Bytes from `4G`, `4GiB`, `3500M`, `512MiB` or a plain number of bytes (units are powers of 1024)."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if m is None or m.group(2).lower() not in _UNITS:
            raise VssflowInputError(f"memory budget {text!r}: expected a size such as 4G, 3500M or 4GiB")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise VssflowInputError(f"memory budget {text!r}: must be more than 0 bytes")
    return value


def format_bytes(n: float) -> str:
    """`3.42 GiB`, `512 MiB`, `96 KiB`."""
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.0f} {unit}"
    return f"{n:.0f} B"


def weight_bytes(manifest: Mapping, precision: str = "fp32") -> dict[str, int]:
    """The bytes of each stage's graph and its weights file (the weights, nearly all of it) as the
    backend loads it, from a model folder's manifest."""
    files = manifest["files"]
    out = {}
    for stage in manifest["contracts"]:
        name = graph_name(stage, stage_precision(manifest, stage, precision))
        if name in files:
            out[stage] = sum(int(files[n]["bytes"]) for n in (name, weights_name(name)) if n in files)
    return out


def row_bytes(contract) -> int:
    """Estimated activation bytes of one row (one frame, one segment) of an encoder call: its input's
    bytes per row times `ACTIVATIONS_PER_INPUT`."""
    spec = contract.inputs[0]
    per_row = int(np.prod(spec.shape[1:], dtype=np.int64)) * np.dtype(spec.dtype).itemsize
    return per_row * ACTIVATIONS_PER_INPUT


def piece_rows(contracts: Mapping, activations: int) -> dict[str, int]:
    """Rows per call of each stage of `PIECE_STAGES` whose activations fit `activations` bytes (at
    least one, at most the contract's maximum)."""
    rows = {}
    for stage in PIECE_STAGES:
        contract = contracts[stage]
        most = contract.axes[contract.inputs[0].shape[0]][2]
        rows[stage] = int(max(1, min(most, activations // row_bytes(contract))))
    return rows


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """How the runtime keeps to a budget: the rows per call of each piecewise stage.

    `budget`: bytes (None: none given); `weights`: every stage's graph bytes; `rows`: rows per call
    of each stage of `PIECE_STAGES` (at most the contract's maximum); `activations`: what the
    pieces were sized to; `queue_windows`: the decoded windows `generate_many`'s workers may hold
    ahead of the model (`QUEUE_BYTES`, or what the budget leaves after the pieces; at least one);
    `low_memory`: one stage loaded at a time (`Backend.resident`), so the weights held are the
    largest stage's rather than every stage's; each window then loads its stages again.

    `low_memory` None (the default) chooses it where a budget is given that every stage's weights
    together do not fit and the largest stage's do."""

    budget: int | None
    weights: int
    activations: int
    rows: Mapping[str, int]
    queue_windows: int = 1
    low_memory: bool = False

    @classmethod
    def make(cls, folder, precision: str = "fp32", budget: int | str | None = None,
             low_memory: bool | None = None) -> MemoryPlan:
        host = host_budget(folder.manifest, folder.contracts, precision)
        budget = None if budget is None else parse_memory(budget)
        if low_memory is None:
            low_memory = budget is not None and budget < host["least"]
        weights = host["largest"] if low_memory else host["weights"]
        need = weights + RESERVE
        queue = QUEUE_BYTES
        if budget is None:
            activations = DEFAULT_ACTIVATIONS
        else:
            if need > budget:
                held = (f"its largest stage's weights alone take {format_bytes(weights)} (loaded one stage at a time, "
                        "--low-memory)" if low_memory else f"its weights alone take {format_bytes(weights)}")
                raise MemoryBudgetError(
                    f"--max-memory {format_bytes(budget)} cannot fit this model: {held}, and the runtime "
                    f"{format_bytes(RESERVE)} more; give at least {format_bytes(need)} (or use the FP16 graphs, "
                    "--precision fp16)")
            activations = min(DEFAULT_ACTIVATIONS, budget - need)
            queue = min(QUEUE_BYTES, budget - need - activations)
        rows = piece_rows(folder.contracts, activations)
        return cls(budget, host["weights"], activations, rows, max(1, queue // window_frame_bytes(folder.sizes)),
                   low_memory)

    def describe(self) -> str:
        budget = "no budget" if self.budget is None else f"budget {format_bytes(self.budget)}"
        pieces = ", ".join(f"{k} {v} rows" for k, v in self.rows.items())
        held = ", one stage loaded at a time" if self.low_memory else ""
        return (f"{budget}: weights {format_bytes(self.weights)}{held}, encoder calls of {pieces}, "
                f"at most {self.queue_windows} decoded window{'s' if self.queue_windows > 1 else ''} queued")


def engine_contract(contracts: Mapping, stage: str):
    """The contract a TensorRT engine of `stage` is built for: a stage of `PIECE_STAGES` never gets
    more rows per call than a piece of `DEFAULT_ACTIVATIONS` (the most any plan gives), so its
    profile stops there and its scratch (`device_memory_size`, at the profile's largest shapes) is
    sized to a piece instead of a whole window (30 Synchformer segments); the others as they are."""
    contract = contracts[stage]
    if stage not in PIECE_STAGES:
        return contract
    rows = piece_rows(contracts, DEFAULT_ACTIVATIONS)[stage]
    axis = contract.inputs[0].shape[0]
    lo, opt, _ = contract.axes[axis]
    return dataclasses.replace(contract, axes={**contract.axes, axis: (lo, min(opt, rows), rows)})


def window_frame_bytes(sizes) -> int:
    """The prepared uint8 frames of one window (CLIP's and the Synchformer's), as the batch's
    prefetch queue holds them."""
    return (C.CLIP.frames + C.SYNCH.frames) * 3 * sizes.image_size ** 2


def host_budget(manifest: Mapping, contracts: Mapping, precision: str = "fp32") -> dict[str, int]:
    """What a run of the folder's graphs at `precision` plans for on a host (ONNX Runtime): `weights`,
    `least` (the smallest `--max-memory` it accepts with every stage loaded: the weights and
    `RESERVE`; the encoders then run a row at a time), `largest` (the largest stage's weights) and
    `least_low` (the smallest with one stage loaded at a time, `--low-memory`), and `planned`
    (without a budget: the largest encoder call the default pieces make, `DEFAULT_ACTIVATIONS` at
    most). Estimates from the graphs' bytes and `row_bytes`; `python -m vssflow.benchmarks.memory`
    measures."""
    stages = weight_bytes(manifest, precision)
    weights, largest = sum(stages.values()), max(stages.values(), default=0)
    rows = piece_rows(contracts, DEFAULT_ACTIVATIONS)
    call = max(n * row_bytes(contracts[stage]) for stage, n in rows.items())
    return {"weights": weights, "least": weights + RESERVE, "largest": largest, "least_low": largest + RESERVE,
            "planned": weights + RESERVE + call}


def device_budget(manifest: Mapping, contracts: Mapping) -> dict[str, int] | None:
    """The device memory of the folder's TensorRT engines (the trt backend: every engine loaded,
    one scratch buffer shared by all of them): `weights` (the engines' bytes), `scratch` (the
    largest engine's, `device_memory_size` at its profile's largest shapes), `io` (each stage's
    inputs at their largest as its engine takes them, `engine_contract`, kept per stage) and
    `total`. None where no engine was built or its scratch size was not recorded (`vssflow-export` records both when it builds them)."""
    built = manifest.get("report", {}).get("tensorrt", {})
    if not built or "skipped" in built or any(e.get("scratch_bytes") is None for e in built.values()):
        return None
    weights = sum(int(e["bytes"]) for e in built.values())
    scratch = max(int(e["scratch_bytes"]) for e in built.values())
    engine_contracts = [engine_contract(contracts, name) for name in contracts if name in built]
    io = sum(int(np.prod(c.shape(spec, "max"), dtype=np.int64)) * np.dtype(spec.dtype).itemsize
             for c in engine_contracts for spec in c.inputs)
    return {"weights": weights, "scratch": scratch, "io": io, "total": weights + scratch + io}


def in_pieces(call, feed: Mapping[str, object], rows: int, concat=np.concatenate) -> dict[str, object]:
    """`call(feed)` on pieces of at most `rows` along the first axis of every input, the outputs
    joined along their first axis by `concat` (the backend's `Arrays.concat`): for stages whose
    rows are independent."""
    n = len(next(iter(feed.values())))
    if n <= rows:
        return call(feed)
    parts = [call({k: v[a:a + rows] for k, v in feed.items()}) for a in range(0, n, rows)]
    return {k: concat([p[k] for p in parts]) for k in parts[0]}
