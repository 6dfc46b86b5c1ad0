"""The in-place RoPE kernel against its reference and ``export/transformer.apply_rope``; the model's
kernel path against its reference path.

The Triton kernel runs on CPU tensors through Triton's interpreter; ``TRITON_INTERPRET`` must be
set before triton is imported. In float32 and float16 the kernel, the reference and
``apply_rope`` agree bit for bit (same float32 products and sums, no FMA, round to nearest even).
The interpreter casts float32 to bfloat16 by truncation where the compiled kernel rounds to
nearest even, so bfloat16 is checked within one bfloat16 ulp here and exactly on a GPU.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import functools  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.kernels.support import require_interpreted, run_compiled  # noqa: E402
from vssflow.export import transformer as T  # noqa: E402
from vssflow.export.flow_step import FlowStep  # noqa: E402
from vssflow.kernels import dispatch  # noqa: E402
from vssflow.kernels import rope as R  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ULP = {torch.float32: 0.0, torch.float16: 0.0, torch.bfloat16: 2.0 ** -7}   # relative, interpreter


@pytest.fixture
def interpreted():
    """Triton present, and our kernel built for its interpreter (skip otherwise)."""
    return require_interpreted(R._rope_kernel, "vssflow.kernels.rope")


def heads(b=2, n=37, h=3, dh=64, dtype=torch.float32, seed=0, extra=0):
    """q as the model has it: a transposed view ``[B, H, N, Dh]`` of a ``[B, N, H*Dh]`` projection
    (with ``extra`` more columns after it, as in a fused qkv output). Returns (view, buffer)."""
    g = torch.Generator().manual_seed(seed)
    buf = (3 * torch.randn(b, n, h * dh + extra, generator=g)).to(dtype)
    return buf[..., :h * dh].view(b, n, h, dh).transpose(1, 2), buf


def assert_close_ulp(got, want, dtype):
    """Equal in float32/float16; within one bfloat16 ulp (of the larger magnitude) in bfloat16."""
    if ULP[dtype] == 0:
        assert torch.equal(got, want), (got.float() - want.float()).abs().max()
        return
    g, w = got.float(), want.float()
    assert ((g - w).abs() <= ULP[dtype] * torch.maximum(g.abs(), w.abs())).all(), (g - w).abs().max()
    assert (g != w).float().mean() < 0.5                      # most values round the same way


# --- the reference (no triton needed) -----------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rotary_dim", [32, 64])
def test_reference_equals_apply_rope(dtype, rotary_dim):
    x, _ = heads(dtype=dtype)
    cos, sin = T.rope_tables(x.shape[2], rotary_dim)
    want = T.apply_rope(x, cos, sin)
    got = R.apply_rope_reference_(x.clone(), cos, sin)
    assert got.dtype == dtype and torch.equal(got, want)
    assert (want.float() - x.float())[..., :rotary_dim].abs().max() > 1    # it did rotate


def test_dispatch_picks_reference(monkeypatch):
    """CPU tensors, ``use_kernel=False`` and ``VSSFLOW_KERNELS=0`` select the reference."""
    def boom(*a, **k):
        raise AssertionError("kernel chosen")
    monkeypatch.setattr(R, "apply_rope_triton_", boom)
    monkeypatch.setattr(R, "apply_rope_pair_triton_", boom)
    x, _ = heads()
    cos, sin = T.rope_tables(37, 32)
    want = T.apply_rope(x, cos, sin)
    assert torch.equal(R.apply_rope_(x.clone(), cos, sin), want)                    # CPU: reference
    assert torch.equal(R.apply_rope_(x.clone(), cos, sin, use_kernel=False), want)  # even interpreted
    q, k = R.apply_rope_pair_(x.clone(), x.clone(), cos, sin, use_kernel=False)
    assert torch.equal(q, want) and torch.equal(k, want)
    monkeypatch.setenv(dispatch.ENV_SWITCH, "0")
    assert not dispatch.use_kernel(torch.device("cuda"))


def test_model_uses_kernel_only_on_eager_cuda(monkeypatch):
    """``_rope_kernels``: CUDA, no autograd, not tracing, and dispatch agrees (a stand-in tensor)."""
    pytest.importorskip("triton")
    cuda = types.SimpleNamespace(is_cuda=True, requires_grad=False, device=torch.device("cuda"))
    monkeypatch.delenv(dispatch.ENV_SWITCH, raising=False)
    assert T._rope_kernels(cuda) is R
    assert T._rope_kernels(torch.zeros(1)) is None                                  # CPU
    assert T._rope_kernels(types.SimpleNamespace(**{**vars(cuda), "requires_grad": True})) is None
    seen = []
    torch.jit.trace(lambda t: seen.append(T._rope_kernels(cuda)) or t + 1, torch.zeros(1), check_trace=False)
    assert seen == [None]                                                           # tracing
    monkeypatch.setenv(dispatch.ENV_SWITCH, "0")
    assert T._rope_kernels(cuda) is None                                            # switched off


def test_bad_inputs():
    x, _ = heads()
    cos, sin = T.rope_tables(37, 32)
    with pytest.raises(ValueError, match="R even"):
        R.apply_rope_(x, *T.rope_tables(36, 32))
    with pytest.raises(ValueError, match="R even"):
        R.apply_rope_(x, cos[:, :31], sin[:, :31])
    with pytest.raises(ValueError, match="float32"):
        R.apply_rope_(x.double(), cos, sin)
    with pytest.raises(ValueError, match="differ"):
        R.apply_rope_pair_(x, x.half(), cos, sin)


# --- rope tables ---------------------------------------------------------------------------------

def test_tables_cached_in_eager_computed_when_tracing():
    a = T.rope_tables(51, 32)
    assert T.rope_tables(51, 32, torch.device("cpu"))[0] is a[0]                   # one cached pair
    fresh = T._rope_tables(51, 32)
    assert torch.equal(a[0], fresh[0]) and torch.equal(a[1], fresh[1])
    with torch.inference_mode():
        T._cached_rope_tables.cache_clear()
        cos, _ = T.rope_tables(13, 32)
    assert not cos.is_inference()                 # usable by autograd later
    traced = torch.jit.trace(lambda z: T.rope_tables(z.shape[-1], 32)[0] * z.mean(), torch.ones(1, 1, 9))
    assert torch.equal(traced(torch.ones(1, 1, 20)), T._rope_tables(20, 32)[0])   # T stays dynamic


# --- the kernel through the interpreter ---------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,n,h,dh,r", [(2, 37, 3, 64, 32), (2, 1, 2, 64, 64), (1, 251, 4, 32, 16)],
                         ids=["half", "full-n1", "n251"])
def test_kernel_equals_reference(interpreted, dtype, b, n, h, dh, r):
    x, buf = heads(b, n, h, dh, dtype, extra=2 * dh)              # q of a fused [q | k v] output
    before = buf.clone()
    cos, sin = T.rope_tables(n, r)
    want = T.apply_rope(x, cos, sin)
    got = R.apply_rope_(x, cos, sin, use_kernel=True)
    assert got.data_ptr() == x.data_ptr() and got.stride() == x.stride()             # in place
    assert_close_ulp(got, want, dtype)
    assert_close_ulp(got, R.apply_rope_reference_(heads(b, n, h, dh, dtype, extra=2 * dh)[0], cos, sin), dtype)
    assert torch.equal(got[..., r:], want[..., r:])                  # pass-through channels: same bits
    assert torch.equal(buf[..., h * dh:], before[..., h * dh:])      # nothing outside the view written


@pytest.mark.parametrize("dtype", DTYPES)
def test_pair_kernel_one_launch(interpreted, dtype, monkeypatch):
    """Queries and keys with different head counts and strides, one launch; positions split over
    three programs per head (the last one partly masked), as on a GPU."""
    monkeypatch.setattr(R, "_INTERPRETER_BLOCK_N", 8)
    q, _ = heads(2, 19, 4, 64, dtype, seed=1)
    k = heads(2, 19, 2, 64, dtype, seed=2)[0].contiguous()          # contiguous [B, H, N, Dh]
    cos, sin = T.rope_tables(19, 32)
    want_q, want_k = T.apply_rope(q, cos, sin), T.apply_rope(k, cos, sin)
    launches = []
    launch = R._launch
    monkeypatch.setattr(R, "_launch", lambda *a, **kw: launches.append(1) or launch(*a, **kw))
    got_q, got_k = R.apply_rope_pair_(q, k, cos, sin, use_kernel=True)
    assert launches == [1] and got_q is q and got_k is k
    assert_close_ulp(q, want_q, dtype)
    assert_close_ulp(k, want_k, dtype)


# --- the model ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    """Tiny FlowTransformer and FlowStep, their inputs, and their outputs on the default CPU path."""
    dims = T.FlowDims.preset("tiny")
    flow = T.load_flow(T.authors_state_dict(dims, generator=torch.Generator().manual_seed(0)))
    step = FlowStep(flow, 128).eval()
    g = torch.Generator().manual_seed(1)
    kv = (dims.num_layers, 2, dims.num_kv_heads, 22, dims.head_dim)
    flow_in = (torch.randn(2, dims.in_channels, 21, generator=g), torch.tensor([0.3, 0.8]),
               torch.randn(2, 9, dims.cross_dim, generator=g))
    step_in = (torch.randn(2, 128, 21, generator=g), torch.tensor([0.3]), torch.randn(2, 21, dims.width, generator=g),
               torch.randn(kv, generator=g), torch.randn(kv, generator=g), torch.tensor([3.0]))
    with torch.no_grad():
        out = flow(*flow_in), step(*step_in)
    assert out[0].abs().max() > 0.5 and out[1].abs().max() > 0.5
    return flow, step, flow_in, step_in, out


def test_model_on_cpu_unchanged(tiny, monkeypatch):
    """The CPU forward equals the code before the kernel path, bit for bit: tables recomputed
    on every call, and ``apply_rope`` on every q and k."""
    flow, step, flow_in, step_in, now = tiny
    monkeypatch.setattr(T, "rope_tables", T._rope_tables)
    monkeypatch.setattr(sys.modules[FlowStep.__module__], "rope_tables", T._rope_tables)
    monkeypatch.setattr(T, "_rope_kernels", lambda x: None)
    with torch.no_grad():
        before = flow(*flow_in), step(*step_in)
    assert torch.equal(now[0], before[0]) and torch.equal(now[1], before[1])


def test_model_kernel_path(interpreted, tiny, monkeypatch):
    """The model with the kernel path forced on CPU (the interpreter): the same velocity."""
    flow, step, flow_in, step_in, want = tiny
    launches = []
    launch = R._launch
    monkeypatch.setattr(R, "_launch", lambda *a, **kw: launches.append(kw["pair"]) or launch(*a, **kw))
    forced = types.SimpleNamespace(apply_rope_=functools.partial(R.apply_rope_, use_kernel=True),
                                   apply_rope_pair_=functools.partial(R.apply_rope_pair_, use_kernel=True))
    monkeypatch.setattr(T, "_rope_kernels", lambda x: forced)
    with torch.no_grad():
        got_flow = flow(*flow_in)
        assert launches == [True, False] * 2                 # per block: self-attn q+k, cross-attn q
        got_step = step(*step_in)
    assert launches[4:] == [True, False] * 2                  # FlowStep's blocks: the same two
    for got, ref in zip((got_flow, got_step), want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


# --- compiled -----------------------------------------------------------------------------------

def test_kernel_compiles_for_cuda():
    """Ahead-of-time sm_90 compile (no GPU needed; a fresh process without the interpreter):
    no FMA contraction anywhere, and bfloat16 stores round to nearest even."""
    run_compiled("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from vssflow.kernels import rope as R
        for dt in ("fp32", "fp16", "bf16"):
            sig = {"q": "*" + dt, "k": "*" + dt, "cos": "*fp32", "sin": "*fp32",
                   **{a: "i32" for a in ("n", "heads_q", "hq", "hk", "qs_b", "qs_h", "qs_n", "qs_d",
                                         "ks_b", "ks_h", "ks_n", "ks_d", "cos_n", "cos_d", "sin_n", "sin_d")},
                   "HALF": "constexpr", "BLOCK_D": "constexpr", "BLOCK_N": "constexpr"}
            src = ASTSource(R._rope_kernel, sig, {"HALF": 16, "BLOCK_D": 16, "BLOCK_N": 64})
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False})
            ptx = k.asm["ptx"]
            assert k.asm["cubin"] and "fma.rn" not in ptx, dt
            assert dt != "bf16" or "cvt.rn.bf16" in ptx, ptx
        print("ok")
    """)


@pytest.mark.gpu
def test_cuda_kernel_equals_reference():
    """The compiled kernel on a GPU, bit for bit in every dtype, and the model's kernel path."""
    run_compiled("""
        import torch
        from vssflow.export import transformer as T
        from vssflow.kernels import rope as R
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            buf = (3 * torch.randn(2, 251, 24 * 64 + 64, device="cuda")).to(dt)
            x = buf[..., :24 * 64].view(2, 251, 24, 64).transpose(1, 2)
            k = torch.randn(2, 12, 251, 64, device="cuda").to(dt)
            cos, sin = T.rope_tables(251, 32, x.device)
            want, want_k, tail = T.apply_rope(x, cos, sin), T.apply_rope(k, cos, sin), buf[..., -64:].clone()
            R.apply_rope_pair_(x, k, cos, sin, use_kernel=True)
            assert torch.equal(x, want) and torch.equal(k, want_k) and torch.equal(buf[..., -64:], tail), dt
        flow = T.load_flow(T.authors_state_dict(T.FlowDims.preset("tiny"))).cuda()
        x, t, c = torch.randn(1, flow.dims.in_channels, 250, device="cuda"), torch.rand(1, device="cuda"), \\
            torch.randn(1, 20, flow.dims.cross_dim, device="cuda")
        with torch.no_grad():
            assert T._rope_kernels(x) is R
            got = flow(x, t, c)
            T._rope_kernels = lambda x: None
            want = flow(x, t, c)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        print("ok")
    """, timeout=600)
