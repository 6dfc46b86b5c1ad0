"""Decoded uint8 frames -> normalised encoder input, a whole window per launch: Triton and reference.

Bit for bit the CPU path (each stream's ``StreamSpec`` in ``runtime/contracts.py``: its resizer
from ``runtime/resize.py``, then its normalisation): the same fixed-point taps (CLIP: Pillow's
bicubic, int32 weights, 22 bits; Synchformer: torch's antialiased bicubic, int16 weights, short
side 224 + centre crop),
summed in int32 as Pillow's and torch's C code do, rounded and clipped to uint8 after the
horizontal pass and again after the vertical one. The normalisation is a 256-entry table per
channel computed by the runtime's own function, so it matches too, in float32 or float16.

Two launches per stream and window (one per pass)::

    frames [F, H, W, 3] uint8 (any strides), index [N] --_rows_kernel-->  mid [N, 3, R, 224] uint8
    mid --_columns_kernel--> out [N, 3, 224, 224] float32 | float16

``R`` is the run of input rows the vertical taps read. ``index`` picks the frames of a stream
from one uploaded batch, so the CLIP (10 fps) and Synchformer (25 fps) streams can share it.

``preprocess()`` picks the kernel for CUDA tensors when Triton imports, the reference elsewhere
(see ``dispatch``). The reference runs both passes as float64 matrix products with the integer
weights: exact, since every partial sum is an integer below 2**53; it is a check and a fallback,
not a fast CPU path (``runtime/resize.py`` is that).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch

from vssflow.runtime.contracts import STREAMS
from vssflow.runtime.resize import AxisResampler

from . import dispatch
from ._triton import jit as _jit
from ._triton import tl, triton


Stream = Literal["clip", "synch"]
FRAME_SIZE = STREAMS["clip"].size      # 224, both streams
assert all(spec.size == FRAME_SIZE for spec in STREAMS.values()), "one output size for both streams"
LEVELS = 256                           # uint8 values a normalisation table maps
_REFERENCE_CHUNK = 1 << 25             # float64 elements per reference chunk (256 MB)
_ROWS_BLOCK = (16, 32)                 # (rows, columns) of one horizontal-pass program (untuned)
_COLUMNS_BLOCK = (32, 32)              # (rows, columns) of one vertical-pass program (untuned)
_INTERPRETER_BLOCK = 1024              # the interpreter runs programs one by one: few, large ones


@dataclass(frozen=True, eq=False)
class AxisTaps:
    """One pass: output ``o`` is ``sum_k weights[o, k] * in[first[o] + k]`` in fixed point."""

    first: np.ndarray        # [n] int32, first input sample of each output (in the pass's input)
    weights: np.ndarray      # [n, K] int32, zero past each output's taps
    precision: int           # out = clip((2**(p-1) + sum) >> p, 0, 255)

    @property
    def size(self) -> int:
        return len(self.first)

    @property
    def taps(self) -> int:
        return self.weights.shape[1]

    def matrix(self, in_size: int) -> np.ndarray:
        """Dense ``[size, in_size]`` float64 matrix of the integer weights (taps past the end dropped)."""
        m = np.zeros((self.size, in_size))
        cols = self.first[:, None] + np.arange(self.taps)                  # [n, K]
        ok = cols < in_size
        m[np.nonzero(ok)[0], cols[ok]] = self.weights[ok]
        return m


@dataclass(frozen=True, eq=False)
class ResizePlan:
    """Everything both passes need for one stream and one input size."""

    stream: Stream
    in_hw: tuple[int, int]
    rows: tuple[int, int]            # input rows [r0, r1) the vertical pass reads
    horizontal: AxisTaps             # input columns -> 224 columns
    vertical: AxisTaps               # rows r0.. -> 224 rows (first[] relative to r0)
    table: np.ndarray                # [3, 256] float32: normalised value of each uint8 level

    @property
    def n_rows(self) -> int:
        return self.rows[1] - self.rows[0]


@functools.lru_cache(maxsize=16)
def plan(stream: Stream, in_h: int, in_w: int) -> ResizePlan:
    """The taps of the stream's resizer for frames of ``in_h x in_w``, as tables."""
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {tuple(STREAMS)}, got {stream!r}")
    resizer = STREAMS[stream].resizer(in_h, in_w)
    horizontal, vertical = _axis_taps(resizer.horizontal), _axis_taps(resizer.vertical)
    r0 = int(vertical.first.min())
    r1 = min(in_h, int((vertical.first + vertical.taps).max()))
    vertical = replace(vertical, first=(vertical.first - r0).astype(np.int32))
    return ResizePlan(stream, (in_h, in_w), (r0, r1), horizontal, vertical, _level_table(stream))


def _axis_taps(axis: AxisResampler) -> AxisTaps:
    """The resampler's kept outputs as (first, weights); an unchanged size is one tap of 1.0."""
    p = max(axis.precision, 1)
    if axis.identity:                     # Pillow/torch skip this pass: out = in exactly
        first = np.arange(*axis.keep)
        weights = np.full((axis.size, 1), 1 << p)
    else:
        first, weights = axis.first, axis.weights
        used = np.flatnonzero(weights.any(0))
        weights = weights[:, :used[-1] + 1 if len(used) else 1]
    # int32 sums as in the C sources: check they cannot overflow for any uint8 input.
    worst = 255 * int(np.clip(weights, 0, None).sum(1).max()) + (1 << (p - 1))
    assert worst < 2 ** 31 and 255 * int(np.clip(weights, None, 0).sum(1).min()) > -2 ** 31, f"{worst=}"
    return AxisTaps(first.astype(np.int32), np.ascontiguousarray(weights, np.int32), p)


def _level_table(stream: Stream) -> np.ndarray:
    """``[3, 256]`` float32: the runtime's normalisation of each uint8 level, per channel."""
    levels = np.broadcast_to(np.arange(LEVELS, dtype=np.uint8), (1, 3, 1, LEVELS))
    return np.ascontiguousarray(STREAMS[stream].normalise(levels)[0, :, 0])     # [3, 256]


# --- entry points ------------------------------------------------------------------------------

def preprocess(frames, stream: Stream, *, index=None, dtype: torch.dtype = torch.float32,
               out: torch.Tensor | None = None, use_kernel: bool | None = None) -> torch.Tensor:
    """uint8 RGB frames ``[F, H, W, 3]`` -> encoder input ``[N, 3, 224, 224]`` of ``stream``.

    ``frames``: a torch tensor on any device (any strides) or a numpy array. ``index [N]``: the
    frames to take, in order (default: all). ``out``: a contiguous ``[N, 3, 224, 224]`` tensor to
    fill (e.g. the first rows of a window buffer). ``use_kernel``: None picks the Triton kernel
    for CUDA tensors (unless ``VSSFLOW_KERNELS=0``), True/False forces it on/off.
    """
    frames = _as_frames(frames)
    run = preprocess_triton if dispatch.use_kernel(frames.device, use_kernel) else preprocess_reference
    return run(frames, stream, index=index, dtype=dtype, out=out)


def preprocess_reference(frames, stream: Stream, *, index=None, dtype: torch.dtype = torch.float32,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: exact float64 matrix products, rounding, and the runtime's normalisation."""
    frames = _as_frames(frames)
    p = plan(stream, frames.shape[1], frames.shape[2])
    idx = _index(index, frames)
    out = _output(out, len(idx), dtype, frames.device)
    (r0, r1), dev = p.rows, frames.device
    mh = torch.from_numpy(p.horizontal.matrix(p.in_hw[1])).to(dev)          # [224, W]
    mv = torch.from_numpy(p.vertical.matrix(p.n_rows)).to(dev)              # [224, R]
    spec = STREAMS[stream]
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=dev)[:, None, None]
    std = torch.tensor(spec.std, dtype=torch.float32, device=dev)[:, None, None]
    per_frame = 3 * p.n_rows * max(p.in_hw[1], FRAME_SIZE)
    step = max(1, _REFERENCE_CHUNK // per_frame)
    for a in range(0, len(idx), step):
        x = frames[idx[a:a + step], r0:r1].permute(0, 3, 1, 2).double()     # [n, 3, R, W]
        x = _round_shift(x @ mh.T, p.horizontal.precision)                  # [n, 3, R, 224]
        x = _round_shift(mv @ x, p.vertical.precision).float()              # [n, 3, 224, 224]
        x = x / 255 if spec.divide else x * float(np.float32(1 / 255))      # as StreamSpec.normalise
        out[a:a + step] = ((x - mean) / std).to(dtype)
    return out


def preprocess_triton(frames, stream: Stream, *, index=None, dtype: torch.dtype = torch.float32,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernels: one launch per pass for the whole batch."""
    if triton is None:
        raise RuntimeError("preprocess_triton needs Triton: pip install triton")
    frames = _as_frames(frames)
    p = plan(stream, frames.shape[1], frames.shape[2])
    idx = _index(index, frames).to(torch.int32)
    out = _output(out, len(idx), dtype, frames.device)
    if len(idx) == 0:
        return out
    t = _device_tables(stream, *p.in_hw, frames.device, dtype)
    n, (r0, _), width, height = len(idx), p.rows, p.horizontal.size, p.vertical.size
    mid = torch.empty((n, 3, p.n_rows, width), dtype=torch.uint8, device=frames.device)
    (br, bw), (bh, bw2) = _blocks(p)
    grid = (3 * n, triton.cdiv(p.n_rows, br), triton.cdiv(width, bw))
    _rows_kernel[grid](frames, idx, mid, t["h_first"], t["h_weights"], p.horizontal.taps,
                       p.n_rows, r0, p.in_hw[1], width, *frames.stride(),
                       p.horizontal.precision, br, bw)
    grid = (3 * n, triton.cdiv(height, bh), triton.cdiv(width, bw2))
    _columns_kernel[grid](mid, out, t["v_first"], t["v_weights"], t["table"], p.vertical.taps,
                          p.n_rows, width, height, p.vertical.precision, bh, bw2)
    return out


# --- kernels -----------------------------------------------------------------------------------

@_jit
def _rows_kernel(src, index, mid, first, weights, n_taps, rows, row0, in_w, out_w,
                 stride_n, stride_h, stride_w, stride_c,
                 PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """Horizontal pass of rows ``row0 + r`` of plane (frame ``index[n]``, channel) -> ``mid`` uint8."""
    plane = tl.program_id(0)                                            # n * 3 + channel
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)              # [BR] rows of mid
    o = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)              # [BW] output columns
    r_ok, o_ok = r < rows, o < out_w
    frame = tl.load(index + plane // 3).to(tl.int64)
    start = tl.load(first + o, mask=o_ok, other=0)                      # [BW]
    row = src + frame * stride_n + (plane % 3) * stride_c \
        + (row0 + r).to(tl.int64)[:, None] * stride_h                   # [BR, 1] pointers
    acc = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.int32)
    for k in range(n_taps):
        col = start + k
        w = tl.load(weights + o * n_taps + k, mask=o_ok, other=0)       # [BW]
        ok = r_ok[:, None] & (o_ok & (col < in_w))[None, :]
        x = tl.load(row + col[None, :].to(tl.int64) * stride_w, mask=ok, other=0)
        acc += x.to(tl.int32) * w[None, :]
    level = tl.minimum(tl.maximum((acc + (1 << (PRECISION - 1))) >> PRECISION, 0), 255)
    dst = mid + plane.to(tl.int64) * rows * out_w + r[:, None] * out_w + o[None, :]
    tl.store(dst, level.to(tl.uint8), mask=r_ok[:, None] & o_ok[None, :])


@_jit
def _columns_kernel(mid, out, first, weights, table, n_taps, rows, width, out_h,
                    PRECISION: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """Vertical pass of one plane of ``mid``, then the level -> normalised value table."""
    plane = tl.program_id(0)
    o = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)              # [BH] output rows
    j = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)              # [BW] columns
    o_ok, j_ok = o < out_h, j < width
    start = tl.load(first + o, mask=o_ok, other=0)                      # [BH]
    src = mid + plane.to(tl.int64) * rows * width
    acc = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.int32)
    for k in range(n_taps):
        row = start + k
        w = tl.load(weights + o * n_taps + k, mask=o_ok, other=0)       # [BH]
        ok = (o_ok & (row < rows))[:, None] & j_ok[None, :]
        x = tl.load(src + row[:, None] * width + j[None, :], mask=ok, other=0)
        acc += x.to(tl.int32) * w[:, None]
    level = tl.minimum(tl.maximum((acc + (1 << (PRECISION - 1))) >> PRECISION, 0), 255)
    y = tl.load(table + (plane % 3) * 256 + level)                      # already out's dtype
    dst = out + plane.to(tl.int64) * out_h * width + o[:, None] * width + j[None, :]
    tl.store(dst, y, mask=o_ok[:, None] & j_ok[None, :])


# --- helpers -----------------------------------------------------------------------------------

def _blocks(p: ResizePlan) -> tuple[tuple[int, int], tuple[int, int]]:
    """Program tiles of the two passes; whole planes under the interpreter (seconds, not minutes)."""
    if not dispatch.interpreting():
        return _ROWS_BLOCK, _COLUMNS_BLOCK
    rows = min(_INTERPRETER_BLOCK, triton.next_power_of_2(p.n_rows))
    width = triton.next_power_of_2(p.horizontal.size)
    return (rows, width), (triton.next_power_of_2(p.vertical.size), width)


def _round_shift(total: torch.Tensor, precision: int) -> torch.Tensor:
    """``clip((2**(p-1) + total) >> p, 0, 255)`` on exact float64 integer sums."""
    return torch.floor((total + float(1 << (precision - 1))) / float(1 << precision)).clamp_(0, 255)


@functools.lru_cache(maxsize=32)
def _device_tables(stream: Stream, in_h: int, in_w: int, device: torch.device,
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
    p = plan(stream, in_h, in_w)
    put = functools.partial(torch.as_tensor, device=device)
    return {"h_first": put(p.horizontal.first), "h_weights": put(p.horizontal.weights),
            "v_first": put(p.vertical.first), "v_weights": put(p.vertical.weights),
            "table": put(p.table).to(dtype).contiguous()}


def _as_frames(frames) -> torch.Tensor:
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB frames [N, H, W, 3], got {tuple(frames.shape)} {frames.dtype}")
    return frames


def _index(index, frames: torch.Tensor) -> torch.Tensor:
    if index is None:
        return torch.arange(len(frames), device=frames.device)
    idx = torch.as_tensor(index, device=frames.device).reshape(-1).long()
    if len(idx) and not bool(((idx >= 0) & (idx < len(frames))).all()):
        raise IndexError(f"index outside 0..{len(frames) - 1}")
    return idx


def _output(out: torch.Tensor | None, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    shape = (n, 3, FRAME_SIZE, FRAME_SIZE)
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of {shape} on {device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    return out
