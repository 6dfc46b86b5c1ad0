"""Bicubic resizing of uint8 frames, bit-exact with the two resizers the authors' features saw.

Both are the same separable, antialiased convolution (Pillow's ``Resample.c``, which PyTorch's
uint8 path copied): a Keys cubic with ``a = -0.5`` whose support widens by the downscale factor,
taps normalised to sum 1 in double precision, then quantised to fixed point. The width is
resampled first and rounded to uint8, then the height; a dimension whose size does not change is
left untouched. Per output sample::

    out = clip((2**(p-1) + sum(w_int * in)) >> p, 0, 255)

They differ only in the fixed-point precision ``p``:

- ``"pillow"`` — ``PIL.Image.resize(..., BICUBIC)`` (CLIP frames): int32 weights, ``p = 22``.
- ``"torch"`` — ``torch.nn.functional.interpolate(uint8, mode="bicubic", antialias=True)`` on
  CPU, which torchvision's ``v2.Resize`` runs for uint8 tensors (Synchformer frames): int16
  weights, ``p`` the largest value (at most 22) keeping ``2 * max_weight * 2**p < 2**15``.

The sums run as float32 matrix products on banded blocks of the weight matrix; outputs too near
a rounding boundary for float32 to decide are redone exactly, so results are bit-exact. Weight
matrices are built once per (input size, output size).
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import numpy as np

FixedPoint = Literal["pillow", "torch"]

CUBIC_A = -0.5              # Keys' parameter in Pillow's (and torch's antialiasing) bicubic
CUBIC_SUPPORT = 2.0         # taps reach 2 input pixels either side, times the downscale factor
PILLOW_PRECISION = 22       # Resample.c: PRECISION_BITS = 32 - 8 - 2
_TORCH_MAX_PRECISION = 22   # UpSampleKernel.cpp searches precision in [0, 22)
_BLOCK = 16                 # outputs per banded matrix block


def cubic(x: np.ndarray, a: float = CUBIC_A) -> np.ndarray:
    """Keys' cubic convolution kernel, evaluated as Pillow's ``bicubic_filter`` does."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


class AxisResampler:
    """Resampling of one axis from ``in_size`` to ``out_size`` samples in fixed point.

    ``first[o]`` is the first input sample of output ``o`` and ``weights[o, k]`` the integer
    weight of input ``first[o] + k`` (zero past that output's taps). ``keep = (start, stop)``
    restricts the outputs to a range (a crop) without changing any of them.

    Applied as float32 matrix products on banded blocks of the weight matrix; the few outputs
    whose float32 sum lies too close to a rounding boundary to be sure of it are recomputed
    exactly in float64, so the result equals the integer arithmetic bit for bit.
    """

    def __init__(self, in_size: int, out_size: int, fixed_point: FixedPoint,
                 keep: tuple[int, int] | None = None):
        if in_size < 1 or out_size < 1:
            raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
        self.in_size, self.out_size = in_size, out_size
        first, taps = _pillow_taps(in_size, out_size)                  # [out], [out, K] float64
        if fixed_point == "pillow":
            self.precision = PILLOW_PRECISION
        elif fixed_point == "torch":
            self.precision = _torch_precision(float(taps.max()))
        else:
            raise ValueError(f"fixed_point must be 'pillow' or 'torch', got {fixed_point!r}")
        lo, hi = keep if keep is not None else (0, out_size)
        if not 0 <= lo < hi <= out_size:
            raise ValueError(f"keep={keep} outside 0..{out_size}")
        self.keep = (lo, hi)
        self.identity = in_size == out_size                            # Pillow/torch skip it
        self.first = first[lo:hi]                                      # [n]
        self.weights = _quantise(taps[lo:hi], self.precision)          # [n, K] int64
        self._blocks = [] if self.identity else self._banded_blocks()
        # Bound on |float32 sum - exact sum| in output levels (Higham's gamma_n on the block's
        # dot products, all terms <= 255 * |w|), plus the rounding of the +0.5.
        n = max((b[3] - b[2] for b in self._blocks), default=0)
        abs_sum = float(np.abs(self.weights).sum(1).max()) / (1 << self.precision)
        self._tol = 1.01 * n * 2.0 ** -24 * 255.0 * abs_sum + 2.0 ** -15

    @property
    def size(self) -> int:
        """Number of outputs kept."""
        return self.keep[1] - self.keep[0]

    @property
    def span(self) -> tuple[int, int]:
        """Input range ``[start, stop)`` the kept outputs read."""
        if self.identity:
            return self.keep
        return min(b[2] for b in self._blocks), max(b[3] for b in self._blocks)

    def matrix(self) -> np.ndarray:
        """Dense ``[size, in_size]`` float64 matrix of the fixed-point weights."""
        m = np.zeros((self.size, self.in_size))
        for o, (f, w) in enumerate(zip(self.first, self.weights)):
            n = min(len(w), self.in_size - f)
            m[o, f:f + n] = w[:n]
        return m

    def _banded_blocks(self) -> list[tuple[int, int, int, int, np.ndarray]]:
        """(out_start, out_stop, in_start, in_stop, float32 block) covering all kept outputs,
        each block ``[out, in]`` holding ``w / 2**p`` (exact in float32)."""
        m = self.matrix()
        blocks = []
        for o0 in range(0, self.size, _BLOCK):
            o1 = min(o0 + _BLOCK, self.size)
            cols = np.flatnonzero(m[o0:o1].any(0))
            i0, i1 = (int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, 1)
            block = m[o0:o1, i0:i1] / (1 << self.precision)
            blocks.append((o0, o1, i0, i1, np.ascontiguousarray(block, np.float32)))
        return blocks

    def __call__(self, x: np.ndarray, axis: int, offset: int = 0) -> np.ndarray:
        """Resample ``axis`` (-1 or -2) of float32 ``x`` holding inputs ``offset..offset+n``
        along it (integer values 0..255, covering ``span``). Returns float32 with that axis of
        length ``size``, holding uint8 values.
        """
        if self.identity:
            keep = slice(self.keep[0] - offset, self.keep[1] - offset)
            return x[..., keep] if axis == -1 else x[..., keep, :]
        shape = list(x.shape)
        shape[axis] = self.size
        y = np.empty(shape, np.float32)                                # sum(w * in) / 2**p
        for o0, o1, i0, i1, block in self._blocks:
            if axis == -1:
                np.matmul(x[..., i0 - offset:i1 - offset], block.T, out=y[..., o0:o1])
            else:
                np.matmul(block, x[..., i0 - offset:i1 - offset, :], out=y[..., o0:o1, :])
        # floor(y + 1/2) is rint(y) except where y is (nearly) a half-integer: redo those exactly.
        level = np.rint(y)
        np.subtract(y, level, out=y)
        np.abs(y, out=y)
        unsure = np.nonzero(y > np.float32(0.5 - self._tol))
        if unsure[0].size:
            level[unsure] = self._exact(x, axis, offset, unsure)
        np.clip(level, 0.0, 255.0, out=level)
        return level

    def _exact(self, x: np.ndarray, axis: int, offset: int,
               where: tuple[np.ndarray, ...]) -> np.ndarray:
        """Integer-exact ``floor((2**(p-1) + sum(w * in)) / 2**p)`` at positions ``where``."""
        out = where[axis]
        k = np.arange(self.weights.shape[1])
        src = np.minimum(self.first[out, None] + k - offset, x.shape[axis] - 1)      # [m, K]
        index = [w[:, None] for w in where]
        index[axis] = src
        total = (x[tuple(index)].astype(np.float64) * self.weights[out]).sum(1)
        return np.floor((total + float(1 << (self.precision - 1))) / float(1 << self.precision))


class FrameResizer:
    """Resize (and optionally crop) RGB frames ``[H, W, 3]`` uint8 to ``[3, h, w]`` uint8.

    ``size = (out_h, out_w)`` is the full resized size; ``crop = (top, left, height, width)``
    keeps a window of it, computed exactly as if the full image had been resized then cropped.
    """

    def __init__(self, in_hw: tuple[int, int], size: tuple[int, int], fixed_point: FixedPoint,
                 crop: tuple[int, int, int, int] | None = None):
        (in_h, in_w), (out_h, out_w) = in_hw, size
        top, left, ch, cw = crop if crop is not None else (0, 0, out_h, out_w)
        self.in_hw, self.out_hw = (in_h, in_w), (ch, cw)
        self.horizontal = AxisResampler(in_w, out_w, fixed_point, (left, left + cw))
        self.vertical = AxisResampler(in_h, out_h, fixed_point, (top, top + ch))

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """``frame [H, W, 3]`` uint8 (or its ``planar`` float32 form) → ``[3, h, w]`` uint8."""
        x = frame if frame.dtype == np.float32 else planar(frame)
        if x.shape[1:] != self.in_hw:
            raise ValueError(f"expected a frame of {self.in_hw}, got {frame.shape=}")
        r0, r1 = self.vertical.span                     # only the rows the vertical pass reads
        x = self.horizontal(x[:, r0:r1], axis=-1)                     # [3, rows, w]
        x = self.vertical(x, axis=-2, offset=r0)                      # [3, h, w]
        return x.astype(np.uint8)


def planar(frame: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` uint8 → float32 ``[3, H, W]``: the layout both resizers start from, so a
    frame feeding the CLIP and the Synchformer resize is converted once."""
    return frame.transpose(2, 0, 1).astype(np.float32, order="C")


@functools.lru_cache(maxsize=16)
def clip_resizer(in_h: int, in_w: int, size: int = 224) -> FrameResizer:
    """Pillow's ``resize((size, size), BICUBIC)``: no crop, aspect not kept (CLIP frames)."""
    return FrameResizer((in_h, in_w), (size, size), "pillow")


@functools.lru_cache(maxsize=16)
def synch_resizer(in_h: int, in_w: int, size: int = 224) -> FrameResizer:
    """torchvision ``v2.Resize(size, BICUBIC)`` then ``v2.CenterCrop(size)`` on uint8 tensors."""
    out_h, out_w = short_side_size(in_h, in_w, size)
    top, left = center_crop_offsets(out_h, out_w, size)
    return FrameResizer((in_h, in_w), (out_h, out_w), "torch", (top, left, size, size))


def short_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """torchvision's ``_compute_resized_output_size`` for one int: short side to ``size``,
    long side ``int(size * long / short)`` (truncated)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def center_crop_offsets(h: int, w: int, size: int) -> tuple[int, int]:
    """torchvision's ``center_crop``: ``int(round((dim - size) / 2.0))`` (round half to even)."""
    if h < size or w < size:
        raise ValueError(f"cannot crop {size}x{size} from {h}x{w}")
    return int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


def _pillow_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised float64 taps as ``precompute_coeffs`` computes them (box = whole input)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = CUBIC_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    first = np.empty(out_size, np.int64)
    taps = np.zeros((out_size, ksize))
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)       # C casts truncate toward zero
        xmax = min(int(center + support + 0.5), in_size) - xmin
        xmax = min(max(xmax, 0), ksize)
        w = cubic((np.arange(xmax) + xmin - center + 0.5) * (1.0 / filterscale))
        total = 0.0
        for v in w:                                      # C's left-to-right sum, bit for bit
            total += float(v)
        first[xx] = xmin
        taps[xx, :xmax] = w / total if total != 0.0 else w
    return first, taps


def _quantise(taps: np.ndarray, precision: int) -> np.ndarray:
    """``(int)(w * 2**p ± 0.5)``: round half away from zero, as both C sources do."""
    v = taps * float(1 << precision)
    return np.trunc(np.where(v < 0, v - 0.5, v + 0.5)).astype(np.int64)


def _torch_precision(max_weight: float) -> int:
    """Largest precision keeping the int16 weights in range, as torch's
    ``_compute_index_ranges_int16_weights`` chooses it."""
    p = 0
    while p < _TORCH_MAX_PRECISION:
        if int(0.5 + max_weight * (1 << (p + 1))) >= (1 << 15):
            break
        p += 1
    return p
