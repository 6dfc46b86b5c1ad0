"""`python -m vssflow.benchmarks.memory`: the per-stage report's keys and its table, on the tiny model."""

import os

from vssflow.benchmarks.memory import PeakRss, caches_and_queues, high_water, measure_stages, table

KEYS = {"graph_bytes", "load_bytes", "load_peak_bytes", "call_peak_bytes", "call_kept_bytes", "call_mapped_bytes",
        "call_seconds", "load_seconds", "input_shapes", "rows_per_call"}


def test_stage_report_keys_and_table(tiny_model):
    report = measure_stages(tiny_model, "", "700M", stages=("clip_encoder", "condition", "flow_step"))
    assert set(report["stages"]) == {"clip_encoder", "condition", "flow_step"}
    for name, r in report["stages"].items():
        assert set(r) == KEYS, name
        assert r["graph_bytes"] > 0 and r["call_peak_bytes"] >= r["call_kept_bytes"] - (1 << 20)
    assert report["stages"]["clip_encoder"]["input_shapes"] == {"frames": [100, 3, 224, 224]}
    assert 1 <= report["stages"]["clip_encoder"]["rows_per_call"] <= 100
    assert report["stages"]["flow_step"]["rows_per_call"] is None
    assert report["ort_memory"] == "arena=auto,mem_pattern=auto,prepack=off"        # our defaults
    report.update(model="tiny", caches=caches_and_queues(tiny_model),
                  end_to_end={"command": "vssflow-run clip.mp4", "seconds": 2.0, "peak_bytes": 1 << 30,
                              "peak_anon_bytes": 1 << 29, "wall_seconds": 1.0})
    text = table(report)
    assert "| clip_encoder |" in text and "**1.00 GiB**" in text and "CLIP features" in text
    assert "at most 512 MiB of it anonymous" in text


def test_peak_rss_sees_an_allocation():
    """Freed before the block ends: seen by the kernel's high-water mark, or by a reading taken
    while it is alive (the sampling thread alone may never run in between: CI's first red). The
    memory is a fresh anonymous mapping, every page written: a numpy array may come from heap pages
    already resident (a worker that ran other tests holds GiBs freed but not returned: CI's second)."""
    import mmap
    with PeakRss() as p:
        block = mmap.mmap(-1, 64 << 20)
        for offset in range(0, len(block), mmap.PAGESIZE):
            block[offset] = 1
        if not p.exact:
            p.sample()
        block.close()
    assert p.peak - p.before >= 48 << 20 and p.seconds > 0
    # Two readings of the kernel's per-thread RSS counters, which lag by a few pages (seen: 20 KiB).
    assert high_water(os.getpid()) >= p.peak - (1 << 20)


def test_the_authors_way_per_stage_and_the_fp16_graphs(tiny_model, tmp_path):
    """The authors' way measured stage by stage in a process of its own, beside ours on the FP16 graphs."""
    from vssflow.benchmarks.memory import THEIR_STAGES, measure_theirs
    theirs = measure_theirs(tiny_model, tmp_path)
    assert set(theirs["stages"]) == set(THEIR_STAGES) and theirs["load_bytes"] > 0
    for r in theirs["stages"].values():
        assert r["resident_peak_bytes"] >= theirs["base_bytes"] and r["call_peak_bytes"] >= 0 and r["call_seconds"] > 0
    report = measure_stages(tiny_model, "", None, stages=("condition", "flow_step"), precision="fp16")
    assert report["precision"] == "fp16"
    report.update(model="tiny", caches=caches_and_queues(tiny_model), theirs=theirs)
    text = table(report)
    assert "FP16 graphs" in text and "the authors' way (eager torch FP32" in text
    flow = next(line for line in text.splitlines() if line.startswith("| flow_step |"))
    assert flow.count("|") == 11 and "| - | - |" not in flow            # the authors' figures beside ours


def test_without_weights_the_authors_way_is_skipped_with_its_reason(tmp_path):
    from vssflow.benchmarks.memory import measure_theirs
    assert "weights.pt" in measure_theirs(tmp_path, tmp_path)["skipped"]
