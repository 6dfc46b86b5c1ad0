"""Smoke test of `python -m vssflow.benchmarks`: tiny random model, one repetition, few steps.

Benchmarks are not part of the CI test run; this only checks that a run completes, that the
JSON holds every figure and that the table prints.
"""

import json
import math

import pytest
from click.testing import CliRunner

from vssflow.benchmarks.__main__ import main
from vssflow.benchmarks.report import snr_db
from vssflow.benchmarks.settings import BenchSettings

STAGES = ("decode", "clip_encoder", "synch_encoder", "condition", "flow_step", "sampling", "vae_decoder", "vocoder")


@pytest.fixture
def one_torch_thread():
    """The tiny model's many small ops crawl with two threads on a busy 2-core machine: use one."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow   # ~10 s on 2 cores: exports the tiny model, runs both ways once
def test_cli_tiny_writes_every_figure(tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.setenv("VSSFLOW_HOME", str(tmp_path / "home"))
    out = tmp_path / "results"
    # Whole-window encoders and a measured end to end (Session.generate / stream): the tiny model affords them.
    args = ["--size", "tiny", "--quick", "--repeats", "1", "--heavy-repeats", "1", "--seconds", "2",
            "--encoder-fraction", "1", "--end-to-end", "measured",
            "--steps", "4", "--sweep-solvers", "euler,heun", "--sweep-steps", "2", "--no-isolate",
            "--out", str(out), "--name", "smoke", "-q"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output

    data = json.loads((out / "smoke.json").read_text())
    for key in ("machine", "settings", "model", "stages", "end_to_end", "headline", "quality"):
        assert key in data, key
    assert data["machine"]["versions"]["numpy"] and data["machine"]["cpu_count"] >= 1
    for stage in STAGES:
        row = data["stages"][stage]
        assert row["ours"]["median"] > 0 and row["ours"]["n"] >= 1, stage
        assert row["theirs"]["median"] > 0, stage
        assert stage == "decode" or row["ratio"] == row["ours"]["median"] / row["theirs"]["median"], stage
    assert data["stages"]["sampling"]["nfe"] == {"ours": 4, "theirs": data["theirs"]["nfe"]}
    assert data["theirs"]["nfe"] >= 8                         # dopri5: at least one adaptive step's 6 + init 2
    e2e = data["end_to_end"]
    assert e2e["ours"]["total"]["median"] > 0 and e2e["theirs"]["total"]["median"] > 0
    assert math.isclose(e2e["rtf"]["ours"], e2e["ours"]["total"]["median"] / 2.0)   # the 2-second clip
    assert e2e["how"] == "measured" and e2e["ours"]["nfe"] == 4
    assert e2e["ours"]["first_chunk"]["median"] > 0
    assert e2e["theirs"]["first_chunk"] == e2e["theirs"]["total"]          # their audio comes at the end
    assert data["ours"]["peak_rss_bytes"] > 0 and data["theirs"]["peak_rss_bytes"] > 0

    sweep = {(r["solver"], r["steps"]): r for r in data["quality"]["sweep"]}
    assert set(sweep) == {("euler", 2), ("heun", 2), ("euler", 4)}      # the headline config is added
    assert [r["nfe"] for r in (sweep["euler", 2], sweep["heun", 2], sweep["euler", 4])] == [2, 4, 4]
    for r in sweep.values():
        assert math.isfinite(r["latent_snr_db"]) and math.isfinite(r["mel_snr_db"])
    # More steps of the same solver land closer to the dopri5 solution.
    assert sweep["euler", 4]["latent_snr_db"] > sweep["euler", 2]["latent_snr_db"]
    head = data["headline"]
    assert (head["solver"], head["steps"], head["nfe"]) == ("euler", 4, 4)
    assert head["latent_snr_db"] == sweep["euler", 4]["latent_snr_db"]
    # Same solver on both sides: only the folded/cached/batched rewrite differs, and it is exact.
    parity = data["quality"]["parity"]
    assert parity["nfe"]["ours"] == parity["nfe"]["theirs"] and parity["latent_snr_db"] > 80
    assert "skipped" in data["quality"]["fp16"] or "variants" in data["quality"]["fp16"]
    assert "random weights" in data["note"].lower()

    printed = result.stdout
    assert "| stage | ours | theirs | ours/theirs (speed-up) |" in printed
    assert "| **end to end**" in printed and "Quality against steps" in printed
    assert "random weights" in printed.lower()
    assert printed.strip() in (out / "smoke.md").read_text()
    plots = list(out.glob("smoke.png")) + list(out.glob("smoke.svg"))
    assert len(plots) == 1 and plots[0].stat().st_size > 500


def test_composed_end_to_end_and_snr():
    import numpy as np

    from vssflow.benchmarks.report import end_to_end
    stages = {k: {"median": v} for k, v in dict(clip_encoder=2.0, synch_encoder=3.0, condition=0.5, sampling=4.0,
                                                  vae_decoder=1.0, vocoder=0.8, vocoder_first_chunk=0.1).items()}
    e2e = end_to_end(stages, {"median": 0.25}, first_vocoder="vocoder_first_chunk")
    assert math.isclose(e2e["total"]["median"], 11.55) and math.isclose(e2e["first_chunk"]["median"], 10.85)
    assert end_to_end(stages, {"median": 0.25})["first_chunk"] == e2e["total"]     # no streaming: at the end
    ref = np.ones(100)
    assert math.isinf(snr_db(ref, ref))
    assert math.isclose(snr_db(ref, ref * 1.1), 20.0)                  # error 0.1 of amplitude 1: 20 dB
    s = BenchSettings.quick_variant(steps=25, sweep_steps=(4, 8))
    assert s.sweep()[-1] == ("euler", 25) and len(s.sweep()) == 9
    assert (s.clip_frames, s.synch_segments) == (5, 2)
