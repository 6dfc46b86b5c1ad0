"""Rotary position embedding applied in place to query/key heads: Triton kernel and reference.

The semantics of ``export/transformer.apply_rope`` (Stable Audio's non-interleaved RoPE): the
first ``R = cos.shape[-1]`` channels of each head are split in halves ``x1 | x2`` and become
``x1 cos1 - x2 sin1 | x2 cos2 + x1 sin2``, computed in float32 and stored in ``x``'s dtype;
channels past ``R`` are left alone. In torch eager that is about ten operators per call (slices,
neg, two cats, two muls, an add, casts), three calls per transformer block; here it is one
launch, and ``apply_rope_pair_`` rotates the self-attention queries and keys in the same launch.

``x [B, H, N, Dh]`` may have any strides: q/k are transposed views of a ``[B, N, H*Dh]``
projection output, rotated where they lie. ``cos``/``sin [N, R]`` are the tables of
``rope_tables``. Float32, float16 and bfloat16 ``x``.

Same rounding as the reference, so the same bits: every product and sum is one float32 operation
(the launch turns off FMA contraction, ``enable_fp_fusion=False``), and the final cast rounds to
nearest even as torch's does.
"""

from __future__ import annotations

import torch

from . import dispatch
from ._triton import jit as _jit
from ._triton import tl, triton


DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK_N = 64                          # positions per program (untuned: no GPU to tune on)
_INTERPRETER_BLOCK_N = 1024            # the interpreter runs programs one by one: few, large ones


# --- entry points ------------------------------------------------------------------------------

def apply_rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                use_kernel: bool | None = None) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of every head of ``x [B, H, N, Dh]`` in place.

    ``cos``/``sin``: ``[N, R]``, R even and at most Dh. ``use_kernel``: None picks the Triton
    kernel for CUDA tensors (unless ``VSSFLOW_KERNELS=0``), True/False forces it on/off.
    Returns ``x``.
    """
    _check(x, cos, sin)
    run = apply_rope_triton_ if dispatch.use_kernel(x.device, use_kernel) else apply_rope_reference_
    return run(x, cos, sin)


def apply_rope_pair_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                     use_kernel: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rope_`` on queries ``q [B, Hq, N, Dh]`` and keys ``k [B, Hk, N, Dh]``, one launch."""
    _check(q, cos, sin)
    _check(k, cos, sin)
    if k.shape[0] != q.shape[0] or k.shape[-1] != q.shape[-1] or k.dtype != q.dtype or k.device != q.device:
        raise ValueError(f"q {tuple(q.shape)} {q.dtype} and k {tuple(k.shape)} {k.dtype} differ in "
                         "batch, head size, dtype or device")
    if dispatch.use_kernel(q.device, use_kernel):
        return apply_rope_pair_triton_(q, k, cos, sin)
    return apply_rope_reference_(q, cos, sin), apply_rope_reference_(k, cos, sin)


def apply_rope_reference_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The reference, in torch: both halves computed in float32, then written back into ``x``."""
    half = cos.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:2 * half].float()      # [B, H, N, R/2]
    c1, c2 = cos[..., :half].float(), cos[..., half:].float()           # [N, R/2]
    s1, s2 = sin[..., :half].float(), sin[..., half:].float()
    y1 = x1 * c1 - x2 * s1
    y2 = x2 * c2 + x1 * s2                                              # both before any write:
    x[..., :half] = y1                                                  # x1 may be a view of x
    x[..., half:2 * half] = y2
    return x


def apply_rope_triton_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The Triton kernel: one launch for all of ``x``."""
    _launch(x, x, cos, sin, pair=False)
    return x


def apply_rope_pair_triton_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel on q and k: one launch, q's heads then k's."""
    _launch(q, k, cos, sin, pair=True)
    return q, k


# --- kernel ------------------------------------------------------------------------------------

def _launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pair: bool) -> None:
    if triton is None:
        raise RuntimeError("the RoPE kernel needs Triton: pip install triton")
    b, hq, n, _ = q.shape
    heads_q, heads_k = b * hq, (b * k.shape[1] if pair else 0)
    if n == 0 or heads_q + heads_k == 0:
        return
    half = cos.shape[-1] // 2
    block_n = min(_INTERPRETER_BLOCK_N, triton.next_power_of_2(n)) if dispatch.interpreting() else _BLOCK_N
    grid = (triton.cdiv(n, block_n), heads_q + heads_k)
    _rope_kernel[grid](q, k, cos, sin, n, heads_q, hq, k.shape[1], *q.stride(), *k.stride(),
                       *cos.stride(), *sin.stride(), half, triton.next_power_of_2(half), block_n,
                       enable_fp_fusion=False)


@_jit
def _rotate(x, bh, heads, rows, cols, ok, cos, sin, stride_b, stride_h, stride_n, stride_d,
            cos_n, cos_d, sin_n, sin_d, HALF: tl.constexpr):
    """Rotate rows ``rows`` (channels ``cols`` of each half) of head ``bh`` (= b * heads + h)."""
    head = x + (bh // heads).to(tl.int64) * stride_b + (bh % heads).to(tl.int64) * stride_h
    p1 = head + rows.to(tl.int64)[:, None] * stride_n + cols[None, :] * stride_d   # [BN, BD]
    p2 = p1 + HALF * stride_d
    x1 = tl.load(p1, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=ok, other=0.0).to(tl.float32)
    c = cos + rows[:, None] * cos_n + cols[None, :] * cos_d
    s = sin + rows[:, None] * sin_n + cols[None, :] * sin_d
    c1 = tl.load(c, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(c + HALF * cos_d, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(s, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(s + HALF * sin_d, mask=ok, other=0.0).to(tl.float32)
    y1 = x1 * c1 - x2 * s1
    y2 = x2 * c2 + x1 * s2
    tl.store(p1, y1.to(x.dtype.element_ty), mask=ok)
    tl.store(p2, y2.to(x.dtype.element_ty), mask=ok)


@_jit
def _rope_kernel(q, k, cos, sin, n, heads_q, hq, hk,
                 qs_b, qs_h, qs_n, qs_d, ks_b, ks_h, ks_n, ks_d, cos_n, cos_d, sin_n, sin_d,
                 HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (i, j): positions ``i*BLOCK_N..`` of head j of q (j < heads_q), else of k."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)           # [BN] positions
    cols = tl.arange(0, BLOCK_D)                                        # [BD] channels of a half
    ok = (rows < n)[:, None] & (cols < HALF)[None, :]
    j = tl.program_id(1)
    if j < heads_q:
        _rotate(q, j, hq, rows, cols, ok, cos, sin, qs_b, qs_h, qs_n, qs_d, cos_n, cos_d, sin_n, sin_d, HALF)
    else:
        _rotate(k, j - heads_q, hk, rows, cols, ok, cos, sin, ks_b, ks_h, ks_n, ks_d,
                cos_n, cos_d, sin_n, sin_d, HALF)


# --- helpers -----------------------------------------------------------------------------------

def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if x.ndim != 4 or x.dtype not in DTYPES:
        raise ValueError(f"expected x [B, H, N, Dh] in float32/float16/bfloat16, got {tuple(x.shape)} {x.dtype}")
    n, dh = x.shape[2], x.shape[3]
    if cos.shape != sin.shape or cos.ndim != 2 or cos.shape[0] != n or cos.shape[1] % 2 or cos.shape[1] > dh:
        raise ValueError(f"expected cos, sin [N={n}, R] with R even and at most {dh}, "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.device != x.device or sin.device != x.device:
        raise ValueError(f"x on {x.device}, cos on {cos.device}, sin on {sin.device}")
