"""The profiler's reports run (CPU here; the same code reads CUDA kernel times on a GPU), through
public hooks only: the Session's timings and progress events, the stage modules."""

from __future__ import annotations

import pytest

from vssflow.benchmarks import profile
from vssflow.benchmarks.media import make_video


@pytest.mark.parametrize("autocast", [None, "bf16"])
def test_flow_step_profile(tiny_model, autocast):
    r = profile.flow_step_torch(tiny_model, calls=1, autocast=autocast)
    assert r["engine"] == f"torch eager {autocast or 'fp32'} (cpu)"
    assert r["gemm_s"] > 0 and r["attention_s"] > 0 and r["compute_ops_per_call"] > 20, r
    assert 0 < r["other_share"] < 1


def test_classify_cuda_kernel_names():
    """Fused attention kernels built on CUTLASS count as attention, not as matrix products."""
    r = profile._classify({"fmha_cutlassF_f32_aligned_64x64": 2.0, "sm90_xmma_gemm_bf16bf16": 3.0,
                           "aten::mm": 1.0, "void at::native::vectorized_elementwise_kernel<4>": 4.0})
    assert (r["attention_s"], r["gemm_s"], r["other_s"]) == (2.0, 4.0, 4.0)


def test_session_profile_reads_the_sessions_own_record(tiny_model, tmp_path):
    clip = tmp_path / "clip.mp4"
    make_video(clip, 4, 25, (96, 64), texture=32)
    r = profile.session_profile(tiny_model, "ort", clip, steps=2, solver="euler")
    assert r["nfe"] == 2 and r["frames_s"] > 0 and set(r["per_window_s"]) == {0}
    assert {"clip_encoder", "synch_encoder", "condition", "vae_decoder", "vocoder"} <= set(r["timings_s"])
    assert r["per_window_s"][0]["vocoder"] == pytest.approx(r["timings_s"]["vocoder"])


def test_launch_counts_of_a_flow_step():
    """Counted on the meta device: per block the same, and every kind present."""
    r = profile.launch_report(("tiny",), frames=25)["tiny"]
    assert r["total"] == r["outside_blocks"] + r["per_block"] * r["blocks"]
    assert all(r[kind] > 0 for kind in profile.LAUNCH_KINDS)
    assert r["attention"] == 2 * r["blocks"]                  # self- and cross-attention, fused
    euler = profile.solver_launches(shape=(1, 8, 25), frozen_channels=4, steps=3)["euler"]
    assert euler["nfe"] == euler["accepted_steps"] == 3 and euler["syncs"] == 0
