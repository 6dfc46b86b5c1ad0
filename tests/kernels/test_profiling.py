"""The profiler's flow-step report runs (CPU here; the same code reads CUDA kernel times on a GPU)."""

from __future__ import annotations

import pytest

from vssflow.kernels import profiling


@pytest.mark.parametrize("autocast", [None, "bf16"])
def test_flow_step_profile(tiny_model, autocast):
    r = profiling.flow_step_torch(tiny_model, calls=1, autocast=autocast)
    assert r["engine"] == f"torch eager {autocast or 'fp32'} (cpu)"
    assert r["gemm_s"] > 0 and r["attention_s"] > 0 and r["compute_ops_per_call"] > 20, r
    assert 0 < r["other_share"] < 1


def test_classify_cuda_kernel_names():
    """Fused attention kernels built on CUTLASS count as attention, not as matrix products."""
    r = profiling._classify({"fmha_cutlassF_f32_aligned_64x64": 2.0, "sm90_xmma_gemm_bf16bf16": 3.0,
                             "aten::mm": 1.0, "void at::native::vectorized_elementwise_kernel<4>": 4.0})
    assert (r["attention_s"], r["gemm_s"], r["other_s"]) == (2.0, 4.0, 4.0)
