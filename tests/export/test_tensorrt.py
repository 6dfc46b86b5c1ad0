"""TensorRT: skipped with a reason where it cannot run; engines checked against ONNX Runtime where it can."""

import sys

import numpy as np
import pytest

from vssflow.runtime import engines


def test_missing_tensorrt_is_reported(monkeypatch):
    monkeypatch.setattr(engines, "cuda_gpu_visible", lambda: True)       # as on a machine with a CUDA GPU
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    ok, reason = engines.availability()
    assert not ok and "TensorRT is not installed" in reason and "JetPack" in reason


def test_export_without_tensorrt_still_writes_onnx(tiny_assets, tmp_path, monkeypatch):
    from vssflow.export.onnx_export import ExportOptions, export_model
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    manifest = export_model(tiny_assets["checkpoint"], tiny_assets["synchformer"], tmp_path / "m",
                            options=ExportOptions(backend="trt", verify=False, torch_weights=False))
    assert "skipped" in manifest["report"]["tensorrt"]
    assert "flow_step.onnx" in manifest["files"] and not any(f.endswith(".engine") for f in manifest["files"])


@pytest.mark.trt
@pytest.mark.gpu
def test_fp16_engines_match_onnx_runtime(tiny_assets, tmp_path):
    """FP16 engines for every stage; SNR of the final audio against the fp32 ONNX Runtime path."""
    from vssflow.export.onnx_export import ExportOptions, export_model
    from vssflow.runtime.session import Session
    from vssflow.benchmarks.media import make_video

    out = tmp_path / "m"
    manifest = export_model(tiny_assets["checkpoint"], tiny_assets["synchformer"], out, rawnet=tiny_assets["rawnet"],
                            options=ExportOptions(precision="fp16", backend="all"))
    assert all(k in manifest["report"]["tensorrt"] for k in ("flow_step", "vae_decoder", "vocoder"))
    clip = tmp_path / "clip.mp4"
    make_video(clip, seconds=4, fps=25, size=(96, 64))
    noise = np.random.default_rng(0).standard_normal((1, 128, 250), dtype=np.float32)
    ref = Session(out, backend="ort").generate(clip, steps=8, noise=noise).audio
    got = Session(out, backend="trt").generate(clip, steps=8, noise=noise).audio
    snr = 10 * np.log10(np.sum(ref ** 2) / np.sum((got - ref) ** 2))
    print(f"TensorRT fp16 vs ORT fp32 waveform SNR: {snr:.1f} dB")
    assert snr > 20
