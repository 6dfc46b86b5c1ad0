"""The FP16 policy (export/precision.py): graphs, the torch half mode, and the overflow check."""

import numpy as np
import pytest
import torch

from vssflow.export import onnx_export as E
from vssflow.export import precision as P
from vssflow.runtime.precision import FP16_STAGES, graph_name, weights_name
from vssflow.export.checkpoint import SYNCHFORMER, atomic_torch_save, read_aux, read_checkpoint, safe_load
from vssflow.export.synchformer import load_synchformer
from vssflow.runtime.contracts import stage_contracts

SIZES = {"N": 3, "S": 2, "B": 1, "T": 40, "T1": 41, "M": 80}   # the export check's
# The feed-forward output weight of block 0 scaled by this passes FP16's 65504 (up to 8.6e4), so
# the FP16 graph holds infinities and its velocity is not finite, while FP32's peaks near 2.5e6 and
# stays finite through the whole pipeline. (Activations alone no longer do it on ONNX Runtime's CPU
# provider: it computes a run of FP16 nodes in FP32 and rounds only at the graph's Cast nodes; the
# SwiGLU product at 1.1e6 stayed finite there once the graph lost the stray casts of the former
# Python mode. On a GPU the runtime's guard catches such a window.)
OVERFLOW_KEY, OVERFLOW_SCALE = "vaflow.transformer_blocks.0.ff.net.2.weight", 3e5


def _stages(checkpoint, synchformer):
    ckpt = read_checkpoint(checkpoint)
    dims, sd, _ = read_aux(SYNCHFORMER, synchformer)
    return E.stage_modules(ckpt, load_synchformer(sd)), stage_contracts(E.model_sizes(ckpt, dims))


@pytest.fixture(scope="module")
def tiny(tiny_assets):
    return _stages(tiny_assets["checkpoint"], tiny_assets["synchformer"])


@pytest.fixture(scope="module")
def graphs(tiny, tmp_path_factory):
    """fp32 and fp16 graphs of every FP16 stage of the tiny model."""
    modules, contracts = tiny
    folder = tmp_path_factory.mktemp("fp16")
    for name in FP16_STAGES:
        E.export_onnx(modules[name], contracts[name], folder / graph_name(name))
        E.export_onnx(P.half_stage(modules[name]), contracts[name], folder / graph_name(name, "fp16"))
    return folder


@pytest.mark.parametrize("stage", FP16_STAGES)
def test_fp16_graph_follows_the_policy_and_matches_fp32(stage, tiny, graphs):
    import onnx
    contract = tiny[1][stage]
    p32, p16 = graphs / graph_name(stage), graphs / graph_name(stage, "fp16")
    assert P.policy_violations(p16) == []
    m32, m16 = onnx.load(str(p32), load_external_data=False), onnx.load(str(p16), load_external_data=False)
    io = lambda m: [(v.name, v.type.tensor_type.elem_type) for v in list(m.graph.input) + list(m.graph.output)]  # noqa: E731
    assert io(m16) == io(m32)                                  # the contract is the same at both precisions
    stored = lambda p: sum(f.stat().st_size for f in (p, p.with_name(weights_name(p.name))) if f.exists())  # noqa: E731
    assert stored(p16) < 0.65 * stored(p32)                  # the graph and its weights file
    report = P.compare_graphs(p32, p16, contract, sizes=SIZES)
    assert set(report) == {s.name for s in contract.outputs}
    for name, a in report.items():
        assert a.finite and a.snr_db > 40, f"{stage}.{name}: {a}"
    P.check_fp16(stage, report)                                # no error


def test_flow_step_keeps_its_fp32_islands(graphs):
    ops = P.op_precisions(graphs / graph_name("flow_step", "fp16"))
    assert set(ops["MatMul"]) == {"float16"}
    for op in ("LayerNormalization", "Softmax", "Sin", "Cos", "Sub"):   # Sub: the guidance mix
        assert set(ops[op]) == {"float32"}, (op, ops[op])


@pytest.mark.parametrize("precision,min_snr", [("fp16", 50), ("bf16", 30)])
def test_torch_half_mode(tiny, precision, min_snr):
    modules, contracts = tiny
    step, c = modules["flow_step"], contracts["flow_step"]
    feed = [torch.from_numpy(x) for x in c.sample("opt", seed=1, **SIZES).values()]
    half = P.half_stage(step, precision)
    with torch.inference_mode():
        ref, got = step(*feed), half(*feed)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert P.agreement(ref.numpy(), got.numpy()).snr_db > min_snr
    assert all(p.dtype == torch.float32 for p in step.parameters())   # the FP32 module is untouched
    dtypes = {n: p.dtype for n, p in half.named_parameters()}
    assert dtypes["module.flow.time_proj.weight"] == torch.float32
    assert dtypes["module.flow.transformer_blocks.0.norm1.weight"] == torch.float32
    assert dtypes["module.flow.transformer_blocks.0.ff.net.0.proj.weight"] == P.HALF_DTYPES[precision]


def _python_events(fn) -> int:
    """Python-level calls made while `fn()` runs (sys.setprofile events): Python overhead, counted."""
    import sys
    n = 0

    def count(frame, event, arg):
        nonlocal n
        n += 1
    sys.setprofile(count)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return n


def test_half_forward_runs_without_a_python_mode(tiny):
    """The policy is in the modules: no TorchFunctionMode is active inside a half flow step, and it
    makes about as many Python calls as the FP32 one (the former mode made 62x as many: 79421 vs 1273)."""
    modules, contracts = tiny
    step = modules["flow_step"]
    feed = [torch.from_numpy(x) for x in contracts["flow_step"].sample("opt", seed=1, **SIZES).values()]
    half = P.half_stage(step)
    seen = []
    hook = half.module.flow.transformer_blocks[0].attn1.register_forward_pre_hook(
        lambda m, args: seen.append((torch._C._is_torch_function_mode_enabled(),
                                     len(torch.overrides._get_current_function_mode_stack()))))
    with torch.inference_mode():
        half(*feed)                                            # warm: first calls build caches
        step(*feed)
        events32 = _python_events(lambda: step(*feed))
        events16 = _python_events(lambda: half(*feed))
    hook.remove()
    assert seen == [(False, 0)] * len(seen) and seen
    assert events16 <= 1.5 * events32, (events16, events32)


@pytest.mark.parametrize("stage", FP16_STAGES)
def test_half_modules_match_fp32(stage, tiny):
    """Every stage's torch half module (what the torch backend runs and the exporter traces) against
    its FP32 module on the CPU, at the FP16 graphs' bound."""
    modules, contracts = tiny
    feed = [torch.from_numpy(x) for x in contracts[stage].sample("opt", seed=1, **SIZES).values()]
    with torch.inference_mode():
        ref, got = modules[stage](*feed), P.half_stage(modules[stage])(*feed)
    ref, got = (ref, got) if isinstance(ref, tuple) else ((ref,), (got,))
    for spec, r, g in zip(contracts[stage].outputs, ref, got):
        assert g.dtype == torch.float32, spec.name                        # the contract at every precision
        a = P.agreement(r.numpy(), g.numpy())
        assert a.finite and a.snr_db > 40, f"{stage}.{spec.name}: {a}"


def test_overflowing_checkpoint_is_caught(tiny_assets, tmp_path):
    """The authors' layout with one feed-forward weight scaled up: FP32 finite, FP16 not."""
    sd = dict(safe_load(tiny_assets["checkpoint"])["state_dict"])
    sd[OVERFLOW_KEY] = sd[OVERFLOW_KEY] * OVERFLOW_SCALE
    atomic_torch_save({"state_dict": sd}, tmp_path / "scaled.ckpt")
    modules, contracts = _stages(tmp_path / "scaled.ckpt", tiny_assets["synchformer"])
    c = contracts["flow_step"]
    E.export_onnx(modules["flow_step"], c, tmp_path / "flow_step.onnx")
    E.export_onnx(P.half_stage(modules["flow_step"]), c, tmp_path / "flow_step.fp16.onnx")
    feed = c.sample("opt", seed=1, **SIZES)
    with torch.inference_mode():
        ref = modules["flow_step"](*(torch.from_numpy(x) for x in feed.values()))
    assert torch.isfinite(ref).all() and ref.abs().max() > 65504     # FP32: large but finite
    report = P.compare_graphs(tmp_path / "flow_step.onnx", tmp_path / "flow_step.fp16.onnx", c, feed=feed)
    assert not report["velocity"].finite
    with pytest.raises(E.ExportError, match=r"^flow_step: the FP16 graph gives non-finite values in velocity.*"
                                            r"not written; export with --precision fp32$"):
        P.check_fp16("flow_step", report)


# The former recipe: block 0's SwiGLU input weight x300 makes the product peak near 1.1e6 (17x FP16's
# 65504) in the activations alone, every weight in range: ONNX Runtime's CPU run of the FP16 graph stays
# finite (it computes runs of FP16 nodes in FP32), a GPU and the torch half mode overflow.
ACTIVATION_KEY, ACTIVATION_SCALE = "vaflow.transformer_blocks.0.ff.net.0.proj.weight", 300.0


def test_an_activation_overflow_is_caught_by_the_export_check(tiny_assets, tmp_path):
    """The export's FP16 check runs the half module beside the graphs: an overflow in the activations
    stops the stage although ONNX Runtime's CPU provider computes it finite."""
    sd = dict(safe_load(tiny_assets["checkpoint"])["state_dict"])
    sd[ACTIVATION_KEY] = sd[ACTIVATION_KEY] * ACTIVATION_SCALE
    atomic_torch_save({"state_dict": sd}, tmp_path / "scaled.ckpt")
    modules, contracts = _stages(tmp_path / "scaled.ckpt", tiny_assets["synchformer"])
    c, step = contracts["flow_step"], modules["flow_step"]
    E.export_onnx(step, c, tmp_path / "flow_step.onnx")
    E.export_onnx(P.half_stage(step), c, tmp_path / "flow_step.fp16.onnx")
    with pytest.raises(E.ExportError, match=r"^flow_step: the FP16 graph gives non-finite values in velocity"):
        E.check_half(c, tmp_path / "flow_step.onnx", tmp_path / "flow_step.fp16.onnx",
                     E.nonfinite_outputs(P.half_stage(step), c))
    E.check_half(c, tmp_path / "flow_step.onnx", tmp_path / "flow_step.fp16.onnx")   # the graphs alone: finite


def test_agreement():
    ref = np.ones(100, np.float32)
    assert P.agreement(ref, ref).snr_db == float("inf")
    a = P.agreement(ref, ref + 0.01)
    assert a.finite and a.snr_db == pytest.approx(40.0) and a.max_abs_err == pytest.approx(0.01)
    assert not P.agreement(ref, np.full(100, np.inf, np.float32)).finite


def test_export_refuses_an_overflowing_fp16_graph_naming_the_stage(tiny_assets, tmp_path):
    """vssflow-export --precision fp16 on the overflowing checkpoint: one line naming the stage, exit 4,
    no model folder (nothing half-written)."""
    import subprocess
    import sys
    sd = dict(safe_load(tiny_assets["checkpoint"])["state_dict"])
    sd[OVERFLOW_KEY] = sd[OVERFLOW_KEY] * OVERFLOW_SCALE
    atomic_torch_save({"state_dict": sd}, tmp_path / "scaled.ckpt")
    r = subprocess.run([sys.executable, "-m", "vssflow.export.cli", "--checkpoint", str(tmp_path / "scaled.ckpt"),
                        "--synchformer", str(tiny_assets["synchformer"]), "--backend", "onnx", "--out",
                        str(tmp_path / "m"), "-q"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 4
    assert r.stderr.strip().splitlines() == [
        "vssflow-export: error: flow_step: the FP16 graph gives non-finite values in velocity on the contract's "
        "sample inputs (FP16 overflows past 65504), so it is not written; export with --precision fp32"]
    assert not (tmp_path / "m").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".m.")]


def test_summary_shows_the_fp16_snr_per_stage(tiny_model):
    import json

    from vssflow.export.cli import _summary
    manifest = json.loads((tiny_model / "manifest.json").read_text())
    assert manifest["precisions"] == ["fp32", "fp16"] and manifest["options"]["precision"] == "fp16"
    lines = _summary(manifest, tiny_model).splitlines()
    assert lines[0].split() == ["stage", "file", "MB", "export", "s", "ORT", "vs", "torch", "FP16", "MB", "FP16", "s",
                                "FP16", "vs", "FP32"]
    rows = {line.split()[0]: line for line in lines[1:8]}
    for stage in FP16_STAGES:
        snrs = [float(x) for x in rows[stage].split("SNR ")[1].removesuffix(" dB").split(" / ")]
        assert min(snrs) > 40 and f"{stage}.fp16.onnx" in manifest["files"], rows[stage]
    assert rows["speaker_encoder"].split()[-3:] == ["-", "-", "-"]             # stays FP32
    assert "precisions: fp32, fp16" in lines


def test_fp32_export_writes_no_half_graph(tiny_assets, tmp_path):
    manifest = E.export_model(tiny_assets["checkpoint"], tiny_assets["synchformer"], tmp_path / "m",
                              options=E.ExportOptions(precision="fp32", verify=False, torch_weights=False))
    assert manifest["precisions"] == ["fp32"] and not [f for f in manifest["files"] if ".fp16." in f]
