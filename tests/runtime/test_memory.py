"""The memory plan (`runtime/memory.py`): budgets, encoder pieces (the same bits), `--max-memory`."""

import numpy as np
import pytest
from click.testing import CliRunner

from vssflow.runtime import cli
from vssflow.runtime.backends import OrtBackend, OrtMemory
from vssflow.runtime.errors import BackendError, VssflowInputError
from vssflow.runtime.memory import (DEFAULT_ACTIVATIONS, GIB, MIB, PIECE_STAGES, RESERVE, MemoryBudgetError,
                                    MemoryPlan, device_budget, host_budget, in_pieces, parse_memory, row_bytes,
                                    weight_bytes)
from vssflow.runtime.model_folder import ModelFolder


@pytest.mark.parametrize("text, n", [("4G", 4 * GIB), ("4GiB", 4 * GIB), ("3500M", 3500 * MIB), ("1.5g", 3 * GIB // 2),
                                     ("4096", 4096), (123, 123)])
def test_parse_memory(text, n):
    assert parse_memory(text) == n


@pytest.mark.parametrize("text", ["four", "4X", "-1G", "0"])
def test_parse_memory_refuses_what_is_not_a_size(text):
    with pytest.raises(VssflowInputError) as e:
        parse_memory(text)
    assert e.value.exit_code == 2


def test_plan_pieces_follow_the_budget(tiny_model):
    folder = ModelFolder.open(tiny_model)
    weights = sum(weight_bytes(folder.manifest).values())
    files = folder.manifest["files"]                  # each graph and the weights file beside it
    assert weights == sum(files[n]["bytes"] for s in folder.contracts for n in (f"{s}.onnx", f"{s}.onnx.data")
                          if n in files)
    assert "flow_step.onnx.data" in files
    free = MemoryPlan.make(folder)
    most = {s: folder.contracts[s].axes[folder.contracts[s].inputs[0].shape[0]][2] for s in PIECE_STAGES}
    assert free.rows == {s: min(most[s], DEFAULT_ACTIVATIONS // row_bytes(folder.contracts[s])) for s in PIECE_STAGES}
    synch_row = row_bytes(folder.contracts["synch_encoder"])
    tight = MemoryPlan.make(folder, budget=weights + RESERVE + 3 * synch_row)
    assert tight.rows["synch_encoder"] == 3 and 1 <= tight.rows["clip_encoder"] <= 100
    assert MemoryPlan.make(folder, budget=weights + RESERVE).rows == {s: 1 for s in PIECE_STAGES}


def test_plan_bounds_the_prefetch_queue_in_bytes(tiny_model, clip4, monkeypatch):
    """The decoded windows a batch's workers hold ahead: `QUEUE_BYTES` of them without a budget, what
    the budget leaves after the pieces with one (at least one window); `generate_many` keeps to it."""
    from vssflow.runtime import batch
    from vssflow.runtime.memory import QUEUE_BYTES, window_frame_bytes
    from vssflow.runtime.session import Session
    folder = ModelFolder.open(tiny_model)
    window = window_frame_bytes(folder.sizes)
    assert MemoryPlan.make(folder).queue_windows == QUEUE_BYTES // window
    least = host_budget(folder.manifest, folder.contracts)["least"]
    assert MemoryPlan.make(folder, budget=least).queue_windows == 1
    assert MemoryPlan.make(folder, budget=least + DEFAULT_ACTIVATIONS + 3 * window).queue_windows == 3
    seen = []

    class Recorded(batch._Prefetch):
        def __init__(self, *args):
            seen.append(args[-1])                       # capacity
            super().__init__(*args)
    monkeypatch.setattr(batch, "_Prefetch", Recorded)
    with Session(tiny_model, backend="ort", max_memory=least + DEFAULT_ACTIVATIONS + 3 * window) as s:
        assert not isinstance(next(s.generate_many([clip4], steps=1, batch=4)), Exception)
    assert seen == [3]                                  # not 2 x batch = 8


def test_plan_refuses_a_budget_the_weights_do_not_fit(tiny_model):
    folder = ModelFolder.open(tiny_model)
    with pytest.raises(MemoryBudgetError) as e:
        MemoryPlan.make(folder, budget="1M")
    assert e.value.exit_code == 4 and "weights alone" in str(e.value) and "\n" not in str(e.value)


def test_in_pieces_concatenates_along_the_first_axis():
    calls = []

    def call(feed):
        calls.append(len(feed["x"]))
        return {"y": feed["x"] * 2}
    x = np.arange(10.0)
    assert np.array_equal(in_pieces(call, {"x": x}, 4)["y"], x * 2) and calls == [4, 4, 2]
    assert in_pieces(call, {"x": x}, 10)["y"].shape == (10,) and calls[-1] == 10


@pytest.mark.parametrize("stage, rows, pieces", [("clip_encoder", 10, 3), ("synch_encoder", 5, 2)])
def test_encoder_pieces_give_the_same_bits(tiny_model, stage, rows, pieces):
    folder = ModelFolder.open(tiny_model)
    backend = OrtBackend(folder, "cpu", "fp32")
    feed = folder.contracts[stage].sample("opt", seed=1, N=rows, S=rows)
    whole = backend.run(stage, feed)["features"]
    backend.pieces = {stage: pieces}
    assert np.array_equal(backend.run(stage, feed)["features"], whole)
    backend.close()


@pytest.mark.parametrize("setting", ["", "ort", "arena=shared", "arena=session,mem_pattern=on,prepack=off",
                                     "arena=off,mem_pattern=off"])
def test_ort_memory_settings_give_the_same_bits(tiny_model, setting):
    folder = ModelFolder.open(tiny_model)
    feed = folder.contracts["vae_decoder"].sample("opt", seed=2, T=50)
    with OrtBackend(folder, "cpu", "fp32") as ref, OrtBackend(folder, "cpu", "fp32", OrtMemory.parse(setting)) as b:
        assert np.array_equal(b.run("vae_decoder", feed)["mel"], ref.run("vae_decoder", feed)["mel"])


def test_ort_memory_parse():
    assert OrtMemory.parse("") == OrtMemory()
    assert OrtMemory.parse("ort") == OrtMemory(arena="session", mem_pattern=True, prepack=True)
    assert OrtMemory.parse("arena=shared,prepack=on") == OrtMemory(arena="shared", prepack=True)
    with pytest.raises(BackendError):
        OrtMemory.parse("arena=big")


def test_ort_memory_per_stage():
    """By default an arena and planned patterns for the stages called with one shape per window
    only; what is set explicitly holds for every stage."""
    auto = OrtMemory()
    assert auto.for_stage("flow_step") == OrtMemory(arena="session", mem_pattern=True)
    assert auto.for_stage("vae_decoder") == auto.for_stage("condition") == auto.for_stage("flow_step")
    for stage in ("clip_encoder", "synch_encoder", "speaker_encoder", "vocoder"):
        assert auto.for_stage(stage) == OrtMemory(arena="off", mem_pattern=False)
    assert auto.for_stage("flow_step", half=True) == OrtMemory(arena="off", mem_pattern=False)   # FP16 graph
    off = OrtMemory.parse("arena=off,mem_pattern=off")
    assert off.for_stage("flow_step") == off and OrtMemory.parse("mem_pattern=auto") == auto
    assert auto.describe() == "arena=auto,mem_pattern=auto,prepack=off"


def test_cli_max_memory_too_small_is_one_line_and_exit_4(tiny_model, clip4, tmp_path):
    r = CliRunner().invoke(cli.main, [str(clip4), "--model", str(tiny_model), "-o", str(tmp_path / "o.wav"),
                                      "--backend", "ort", "--max-memory", "1M", "-q"])
    assert r.exit_code == 4, r.output
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "--max-memory 1 MiB cannot fit this model" in lines[0]
    assert not (tmp_path / "o.wav").exists()


def test_cli_max_memory_not_a_size_is_exit_2(tiny_model, clip4, tmp_path):
    r = CliRunner().invoke(cli.main, [str(clip4), "--model", str(tiny_model), "-o", str(tmp_path / "o.wav"),
                                      "--backend", "ort", "--max-memory", "lots", "-q"])
    assert r.exit_code == 2 and "expected a size" in r.output


def test_session_plans_for_max_memory(tiny_model):
    from vssflow.runtime.session import Session
    folder = ModelFolder.open(tiny_model)
    weights = sum(weight_bytes(folder.manifest).values())
    synch_row = row_bytes(folder.contracts["synch_encoder"])
    with Session(tiny_model, backend="ort", device="cpu", max_memory=weights + RESERVE + 2 * synch_row) as s:
        assert s.memory.budget == weights + RESERVE + 2 * synch_row
        assert s.backend.pieces == dict(s.memory.rows) and s.backend.pieces["synch_encoder"] == 2
    with Session(tiny_model, backend="ort", device="cpu") as s:
        assert s.memory.budget is None and s.backend.pieces == dict(MemoryPlan.make(folder).rows)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_budget_the_export_prints_is_the_one_the_runtime_keeps(tiny_model, precision):
    """`vssflow-export`'s host memory line: the least --max-memory it names is the least the runtime
    accepts, and its plan without a budget is the one a run makes (FP16: half the weights)."""
    folder = ModelFolder.open(tiny_model)
    b = host_budget(folder.manifest, folder.contracts, precision)
    assert not MemoryPlan.make(folder, precision, b["least"]).low_memory
    assert MemoryPlan.make(folder, precision, b["least"] - 1).low_memory       # one stage at a time
    assert MemoryPlan.make(folder, precision, b["least_low"]).low_memory
    with pytest.raises(MemoryBudgetError):
        MemoryPlan.make(folder, precision, b["least_low"] - 1)
    with pytest.raises(MemoryBudgetError):
        MemoryPlan.make(folder, precision, b["least"] - 1, low_memory=False)
    plan = MemoryPlan.make(folder, precision)
    assert b["planned"] == plan.weights + RESERVE + max(n * row_bytes(folder.contracts[s]) for s, n in plan.rows.items())
    if precision == "fp16":
        assert b["weights"] < 0.75 * host_budget(folder.manifest, folder.contracts)["weights"]


def test_device_budget_of_the_engines_built(tiny_model):
    """Engines' bytes, the largest scratch (shared), the inputs at their largest; none without a
    scratch size recorded."""
    folder = ModelFolder.open(tiny_model)
    manifest = dict(folder.manifest)
    assert device_budget(manifest, folder.contracts) is None                 # no engines (no TensorRT here)
    built = {s: {"bytes": 1000, "scratch_bytes": 10 * (i + 1)} for i, s in enumerate(folder.contracts)}
    manifest["report"] = {"tensorrt": built}
    d = device_budget(manifest, folder.contracts)
    frames = 100 * 3 * 224 * 224 * 4
    assert d["weights"] == 1000 * len(built) and d["scratch"] == 10 * len(built) and d["io"] > frames
    assert d["total"] == d["weights"] + d["scratch"] + d["io"]
    built["vocoder"]["scratch_bytes"] = None                                 # not read at build time
    assert device_budget(manifest, folder.contracts) is None


def test_a_run_in_pieces_gathers_no_more_than_a_piece_and_gives_the_same_audio(tiny_model, clip4):
    """The encoders' float inputs are made a piece at a time (a window's 30 segments never at once),
    and the sound is the same bits as a run with whole calls."""
    from vssflow.runtime.session import Session
    folder = ModelFolder.open(tiny_model)
    weights = sum(weight_bytes(folder.manifest).values())
    budget = weights + RESERVE + 2 * row_bytes(folder.contracts["synch_encoder"])
    seen = {}
    outs = []
    for max_memory in (None, budget):
        with Session(tiny_model, backend="ort", device="cpu", max_memory=max_memory) as s:
            run = s.backend.run

            def spy(stage, feed, run=run, rows=seen.setdefault(max_memory, {})):
                rows.setdefault(stage, []).append(len(next(iter(feed.values()))))
                return run(stage, feed)
            s.backend.run = spy
            outs.append(s.generate(clip4, steps=2, seed=3).audio)
    assert max(seen[budget]["synch_encoder"]) == 2 and max(seen[None]["synch_encoder"]) > 2
    assert max(seen[budget]["clip_encoder"]) <= MemoryPlan.make(folder, budget=budget).rows["clip_encoder"]
    assert np.array_equal(outs[0], outs[1])


def test_feature_cache_is_bounded_in_bytes():
    from vssflow.runtime.features import FeatureCache
    cache = FeatureCache(10_000)
    for key in "abc":
        cache.put(key, np.zeros(1000, np.float32))                  # 4000 bytes each
    assert cache.get("a") is None and cache.get("b") is not None and cache.nbytes == 8000
    cache.put("b", np.zeros(2000, np.float32))                      # replaced by 8000 bytes: c goes
    assert cache.nbytes == 8000 and cache.get("c") is None and cache.get("b") is not None
    cache.put("d", np.zeros(5000, np.float32))                      # more than the cache holds: not kept
    assert cache.get("b") is None and cache.get("d") is None and cache.nbytes == 0


def test_fp16_graphs_on_the_cpu_run_without_graph_optimizations(tiny_model):
    """Their weights' FP32 copies (folded casts) would take twice the FP16 graph; FP32 graphs keep
    ONNX Runtime's optimizations."""
    import onnxruntime as ort
    folder = ModelFolder.open(tiny_model)
    feed = folder.contracts["vae_decoder"].sample("opt", seed=2, T=50)
    with OrtBackend(folder, "cpu", "fp16") as half, OrtBackend(folder, "cpu", "fp32") as full:
        assert np.isfinite(half.run("vae_decoder", feed)["mel"]).all()
        full.run("vae_decoder", feed)
        level = {b.precision: b._stage("vae_decoder").get_session_options().graph_optimization_level
                 for b in (half, full)}
    assert level == {"fp16": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "fp32": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def test_low_memory_holds_one_stage_and_gives_the_same_audio(tiny_model, clip12):
    """`low_memory`: at most one stage loaded at any time; a 12-s clip (two windows) loads its
    window stages once per window; the audio is the same bits as with every stage loaded."""
    from vssflow.runtime.session import Session
    outs, loads = [], []
    for low in (False, True):
        with Session(tiny_model, backend="ort", device="cpu", low_memory=low) as s:
            assert s.memory.low_memory is low and (s.backend.resident == 1) is low
            held = []
            load = s.backend._load

            def spy(name, load=load, backend=s.backend):
                held.append(len(backend._stages))             # loaded beside the one coming in
                return load(name)
            s.backend._load = spy
            outs.append(s.generate(clip12, steps=2, seed=3).audio)
            loads.append(s.backend.loads)
            assert max(held) == (0 if low else 5)
    assert np.array_equal(outs[0], outs[1])
    assert loads == [6, 2 * 6]            # six stages (no reference voice: no speaker encoder), per window


def test_a_budget_below_every_stage_chooses_low_memory(tiny_model, clip4, tmp_path):
    folder = ModelFolder.open(tiny_model)
    b = host_budget(folder.manifest, folder.contracts)
    plan = MemoryPlan.make(folder, budget=b["least_low"])
    assert plan.low_memory and "one stage loaded at a time" in plan.describe()
    with pytest.raises(MemoryBudgetError) as e:
        MemoryPlan.make(folder, budget=b["least_low"] - 1)
    assert "largest stage's weights alone" in str(e.value) and "\n" not in str(e.value)
    r = CliRunner().invoke(cli.main, [str(clip4), "--model", str(tiny_model), "-o", str(tmp_path / "o.wav"),
                                      "--backend", "ort", "--max-memory", str(b["least_low"]), "--steps", "2"])
    assert r.exit_code == 0, r.output
    assert "one stage loaded at a time" in r.output and (tmp_path / "o.wav").is_file()


def test_cli_low_memory_gives_the_same_file(tiny_model, clip4, tmp_path):
    args = [str(clip4), "--model", str(tiny_model), "--backend", "ort", "--steps", "2", "-q"]
    for name, extra in (("a.wav", []), ("b.wav", ["--low-memory"])):
        r = CliRunner().invoke(cli.main, args + ["-o", str(tmp_path / name)] + extra)
        assert r.exit_code == 0, r.output
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()


def test_low_memory_on_the_torch_backend_is_one_line_and_exit_4(tiny_model, clip4, tmp_path):
    r = CliRunner().invoke(cli.main, [str(clip4), "--model", str(tiny_model), "-o", str(tmp_path / "o.wav"),
                                      "--backend", "torch", "--low-memory", "-q"])
    assert r.exit_code == 4, r.output
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "torch backend loads every stage's weights together" in lines[0]
