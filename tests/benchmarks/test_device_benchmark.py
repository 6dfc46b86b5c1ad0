"""`python -m vssflow.benchmarks.device` in its CPU mode on the tiny model: that the one GPU command
works (CI has no GPU; on one it also runs the fp16/kernel/ORT/TensorRT variants)."""

import json

import pytest
from click.testing import CliRunner

from vssflow.benchmarks.device import HEADLINE_KEYS, STAGES, main


@pytest.mark.slow   # ~1-3 min on 2 cores: a tiny model, two variants, the authors' way (dopri5), a batch of 2
def test_cpu_mode_writes_every_figure(tmp_path):
    args = ["--device", "cpu", "--size", "tiny", "--precisions", "bf16", "--steps", "2", "--repeats", "1",
            "--batch-clips", "2",
            "--warmup", "0", "--seconds", "2", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
            "--name", "ci", "-q"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "out" / "ci.json").read_text())
    assert [(v["backend"], v["precision"], v["kernels"]) for v in data["variants"]] == [
        ("torch", "fp32", "n/a"), ("torch", "bf16", "n/a")]
    for v in data["variants"]:
        assert all(v["stages"][s]["median"] > 0 for s in STAGES)
        e2e = v["end_to_end"]
        assert 0 < e2e["first_chunk"]["median"] <= e2e["total"]["median"] and e2e["nfe"] == 2
        assert e2e["fallbacks"] == []
    fp32, bf16 = (v["snr_vs_torch_fp32_db"] for v in data["variants"])
    assert fp32 == {"latent": None, "mel": None, "audio": None}          # itself: an infinite SNR
    assert bf16["latent"] > 20 and bf16["audio"] > 10                  # half precision, not noise
    assert set(data["skipped"]) == {"ort", "trt", "compiled"}
    h = data["headline"]                                               # issue #19's figures, each measured
    assert set(HEADLINE_KEYS) <= set(h) and h["gpu"] == "cpu" and h["clip_seconds"] == 2
    assert all(h[k] > 0 for k in HEADLINE_KEYS if k not in ("gpu", "clip_seconds", "audio_snr_db"))
    assert h["audio_snr_db"] is None or h["audio_snr_db"] >= 30         # None: the reference itself
    assert 0 < h["ours_after_decode_s"] < h["ours_end_to_end_s"]
    assert h["speedup_end_to_end"] == pytest.approx(h["theirs_end_to_end_s"] / h["ours_end_to_end_s"])
    assert h["variants"]["ours"] in {v["label"] for v in data["variants"]} and "dopri5" in h["variants"]["theirs"]
    assert data["batch"]["clips"] == 2 and data["batch"]["failed"] == []
    md = (tmp_path / "out" / "ci.md").read_text()
    assert "| torch bf16 |" in md and "trt: not run:" in md and "| speedup end to end |" in md


def test_a_failed_engine_build_is_reported_and_the_rest_runs(monkeypatch, tmp_path):
    """TensorRT 11 with an old Polygraphy: the build raises AttributeError; the benchmark says so
    and keeps every other variant instead of producing nothing."""
    import sys

    from tests.export import fake_trt
    from vssflow.benchmarks.device import Variant, prepare_engines

    def build(network, config, save_timing_cache):
        raise AttributeError("'IBuilderConfig' object has no attribute 'int8_calibrator'")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt.tensorrt("11.4.0.106"))
    fake_trt.polygraphy(monkeypatch, build=build)
    fake_trt.a_gpu(monkeypatch)
    folder = fake_trt.model_folder(tmp_path / "m")
    todo = [Variant("torch", "fp32", "off"), Variant("trt", "fp16", "n/a"), Variant("ort", "fp16", "n/a")]
    skipped, said = {}, []
    left, report = prepare_engines(folder, todo, skipped, said.append)
    assert left == [todo[0], todo[2]] and report == {}
    assert skipped["trt"].startswith("engine build failed: BackendError: clip_encoder: TensorRT could not build")
    assert "int8_calibrator" in skipped["trt"] and any("engine build failed" in m for m in said)


def test_engines_are_built_first_and_timed(monkeypatch, tmp_path):
    import sys

    from tests.export import fake_trt
    from vssflow.benchmarks.device import Variant, prepare_engines
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt.tensorrt("10.3.0"))
    fake_trt.polygraphy(monkeypatch)
    fake_trt.a_gpu(monkeypatch)
    todo = [Variant("torch", "fp32", "off"), Variant("trt", "fp16", "n/a")]
    left, report = prepare_engines(fake_trt.model_folder(tmp_path / "m"), todo, {}, lambda m: None)
    assert left == todo and all(v["seconds"] >= 0 for v in report.values()) and "flow_step" in report
