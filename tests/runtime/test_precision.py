"""Precision at run time: FP16 graphs on ONNX Runtime (CPU), the torch half mode, the choice of
precision and its refusals, and the guard that generates a window again in FP32 when FP16 is not
finite, tested with real overflows (checkpoints in the authors' layout with one weight scaled up)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from vssflow.export.checkpoint import atomic_torch_save, safe_load
from vssflow.export.onnx_export import ExportOptions, export_model
from vssflow.export.precision import agreement
from vssflow.runtime.backends import create_backend
from vssflow.runtime.errors import BackendError, ModelFolderError
from vssflow.runtime.model_folder import ModelFolder
from vssflow.runtime.session import Session

# The feed-forward output weight of block 0 scaled by 3e5: its weights pass FP16's 65504 (as in
# tests/export/test_precision.py), so FP16 is not finite, while FP32 (velocity peak ~2.5e6) stays
# finite through sampling, the VAE and the vocoder.
FLOW_OVERFLOW = {"vaflow.transformer_blocks.0.ff.net.2.weight": 3e5}
# The vocoder's first convolution scaled by 1e6: its weights (up to 2e5) pass FP16's range, so the
# FP16 graph's convolution holds infinities and gives NaN; FP32 stays finite (the output's tanh
# saturates). Activations alone do not do it here: ONNX Runtime's CPU FP16 vocoder stayed finite
# up to 1e5, and the flow and the VAE are untouched.
VOCODER_OVERFLOW = {"vocoder.conv_pre.weight": 1e6}
STEPS = 4


def _scaled_model(tiny_assets, folder, scales: dict[str, float]):
    """The tiny checkpoint with weights scaled, exported with FP16 graphs. Without the export's
    check (`verify=False`): that check refuses an FP16 graph that overflows on its sample inputs
    (tested in tests/export), and the guard is for inputs the check did not see."""
    sd = dict(safe_load(tiny_assets["checkpoint"])["state_dict"])
    for key, scale in scales.items():
        sd[key] = sd[key] * scale
    ckpt = folder.parent / f"{folder.name}.ckpt"
    atomic_torch_save({"state_dict": sd}, ckpt)
    export_model(ckpt, tiny_assets["synchformer"], folder,
                 options=ExportOptions(precision="fp16", backend="onnx", verify=False, torch_weights=True))
    return folder


@pytest.fixture(scope="module")
def flow_overflow(tiny_assets, tmp_path_factory):
    return _scaled_model(tiny_assets, tmp_path_factory.mktemp("overflow") / "flow", FLOW_OVERFLOW)


@pytest.fixture(scope="module")
def fp32_only(tiny_assets, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp32") / "m"
    export_model(tiny_assets["checkpoint"], tiny_assets["synchformer"], folder,
                 options=ExportOptions(precision="fp32", verify=False, torch_weights=False))
    return folder


def _noise(windows: int) -> np.ndarray:
    return np.random.default_rng(3).standard_normal((windows, 128, 250), dtype=np.float32)


# --- FP16 reproduces FP32 ---------------------------------------------------------------------------

def test_fp16_graphs_on_the_cpu_reproduce_the_fp32_reference(tiny_model, clip4):
    """`--precision fp16 --backend ort` on the CPU against the PyTorch FP32 modules (the authors'
    model, same noise and solver): the audio within 30 dB, no fallback."""
    folder = ModelFolder.open(tiny_model)
    assert ModelFolder.open(tiny_model).manifest["precisions"] == ["fp32", "fp16"]
    ref = Session(tiny_model, backend="torch", precision="fp32").generate(clip4, steps=STEPS, noise=_noise(1),
                                                                          keep_intermediates=True)
    got = Session(tiny_model, backend="ort", precision="fp16").generate(clip4, steps=STEPS, noise=_noise(1),
                                                                        keep_intermediates=True)
    assert got.info.precision == "fp16" and "fp16" in got.info.backend and got.fallbacks == ()
    assert create_backend(folder, "ort", precision="fp16").stage_precision("speaker_encoder") == "fp32"
    for name in ("final_latent", "mel"):
        assert agreement(ref.intermediates[name], got.intermediates[name]).snr_db > 40, name
    a = agreement(ref.audio, got.audio)
    assert a.finite and a.snr_db > 30, a
    assert not np.array_equal(ref.audio, got.audio)                  # it did run in half


def test_cpu_defaults_to_fp32(tiny_model):
    for backend in ("ort", "torch"):
        assert create_backend(ModelFolder.open(tiny_model), backend, "cpu").precision == "fp32"


def test_gpu_default_is_fp16_for_the_graph_runtimes_only(tiny_model):
    """On a GPU `auto` takes the FP16 graphs (ORT, TensorRT), but not the torch backend's eager
    half mode, measured slower there. (The choice itself, as a GPU would make it.)"""
    ort = create_backend(ModelFolder.open(tiny_model), "ort", "cpu")
    ort.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]       # as on a GPU
    torch = create_backend(ModelFolder.open(tiny_model), "torch", "cpu")
    torch.device = "cuda"
    for backend, want in ((ort, "fp16"), (torch, "fp32")):
        assert backend.on_gpu
        backend._set_precision(None)
        assert backend.precision == want, backend.name


# --- refusals ---------------------------------------------------------------------------------------

def test_fp16_without_fp16_graphs_says_how_to_reexport(fp32_only):
    folder = ModelFolder.open(fp32_only)
    with pytest.raises(ModelFolderError, match="exported without FP16 graphs: re-export with vssflow-export "
                                               "--precision fp16") as e:
        create_backend(folder, "ort", precision="fp16")
    assert e.value.exit_code == 3
    with pytest.raises(ModelFolderError, match="exported without FP16 graphs"):
        create_backend(folder, "auto", precision="fp16")


def test_precision_the_backend_cannot_run(tiny_model):
    with pytest.raises(BackendError, match="the ort backend cannot run bf16: bf16 is the torch backend's") as e:
        create_backend(ModelFolder.open(tiny_model), "ort", precision="bf16")
    assert e.value.exit_code == 4


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "vssflow.runtime.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def test_cli_refusals_exit_3_and_4(fp32_only, tiny_model, clip4, tmp_path):
    r = _cli(clip4, "--model", fp32_only, "--precision", "fp16", "--backend", "ort", "-o", tmp_path / "a.wav")
    assert r.returncode == 3 and r.stderr.strip().splitlines() == [
        f"vssflow-run: error: {fp32_only}: exported without FP16 graphs: re-export with vssflow-export "
        "--precision fp16"]
    r = _cli(clip4, "--model", tiny_model, "--precision", "bf16", "--backend", "ort", "-o", tmp_path / "b.wav")
    assert r.returncode == 4 and r.stderr.strip().splitlines() == [
        "vssflow-run: error: the ort backend cannot run bf16: bf16 is the torch backend's (FP16 and FP32 "
        "graphs only)"]
    assert not list(tmp_path.iterdir())


# --- the guard ----------------------------------------------------------------------------------------

def test_overflowing_windows_are_generated_again_in_fp32(flow_overflow, clip12):
    """Every window overflows in FP16 (the flow's feed-forward): each is generated again in FP32,
    whole, so the result is the FP32 run's exactly; one note, and the fallbacks name both windows."""
    noise = _noise(2)
    fp32 = Session(flow_overflow, backend="ort", precision="fp32").generate(clip12, steps=STEPS, noise=noise,
                                                                            keep_intermediates=True)
    assert fp32.fallbacks == () and np.isfinite(fp32.audio).all()
    chunks, info = Session(flow_overflow, backend="ort", precision="fp16").stream(clip12, steps=STEPS, noise=noise,
                                                                                 keep_intermediates=True)
    assert info.precision == "fp16"
    first = next(chunks)                                   # nothing of window 1 went out before its check
    assert len(chunks.fallbacks) == 1 and chunks.fallbacks[0] == {"window": 0, "found": ["latent"],
                                                                   "redone": "window"}
    got = chunks.result()
    assert np.isfinite(first).all() and np.isfinite(got.audio).all()
    np.testing.assert_allclose(np.concatenate([first, got.audio]), fp32.audio, atol=1e-6)
    assert got.fallbacks == ({"window": 0, "found": ["latent"], "redone": "window"},
                             {"window": 1, "found": ["latent"], "redone": "window"})
    assert [n for n in got.notes if "FP16" in n] == [
        "FP16 gave non-finite values (latent) in window 1: the window was generated again in FP32 (every later "
        "fallback is listed in the result's fallbacks)"]
    for name in ("final_latent", "mel", "clip_features"):      # one copy per window: the FP32 one
        assert len(got.intermediates[name]) == 2
        np.testing.assert_allclose(got.intermediates[name], fp32.intermediates[name], atol=1e-6)


def test_guard_in_the_cli_json(flow_overflow, clip12, tmp_path):
    out = tmp_path / "out.wav"
    r = _cli(clip12, "--model", flow_overflow, "--precision", "fp16", "--backend", "ort", "--steps", STEPS,
             "--json", "-o", out)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["precision"] == "fp16" and [f["window"] for f in summary["fallbacks"]] == [0, 1]
    warnings = [line for line in r.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "generated again in FP32" in warnings[0]
    assert out.is_file()


@pytest.mark.parametrize("batch", [1, 2])
def test_batched_windows_are_guarded_too(flow_overflow, clip12, clip4, batch):
    """generate_many at FP16 with every window overflowing: each item's result is its FP32 run's,
    whether the windows went through the stages alone or two at a time, and says what fell back."""
    from vssflow.runtime.batch import Item
    items = [Item(clip12, seed=1), Item(clip4, seed=2)]
    fp32 = list(Session(flow_overflow, backend="ort", precision="fp32").generate_many(items, steps=STEPS, batch=batch))
    got = list(Session(flow_overflow, backend="ort", precision="fp16").generate_many(items, steps=STEPS, batch=batch))
    for ref, r, windows in zip(fp32, got, (2, 1)):
        assert not isinstance(r, BaseException), r
        assert ref.fallbacks == () and np.isfinite(r.audio).all()
        np.testing.assert_allclose(r.audio, ref.audio, atol=1e-5)
        assert [f["window"] for f in r.fallbacks] == list(range(windows))


def test_torch_half_mode_overflows_and_its_fp32_twin_does_not(flow_overflow):
    """The torch backend at fp16 runs the same policy: the same overflow, and `fp32()` (loaded only
    then) is finite."""
    backend = create_backend(ModelFolder.open(flow_overflow), "torch", "cpu", precision="fp16")
    feed = backend.folder.contracts["flow_step"].sample("opt", seed=1, B=1, T=40, T1=41)
    assert backend._fp32 is None
    assert not np.isfinite(backend.run("flow_step", feed)["velocity"]).all()
    v32 = backend.fp32().run("flow_step", feed)["velocity"]
    assert np.isfinite(v32).all() and backend.fp32().precision == "fp32" and backend.fp32().lock is backend.lock


def test_overflowing_vocoder_chunks_are_decoded_again_alone(tiny_assets, tmp_path, clip4):
    """The window's latent and mel are finite in FP16, its vocoder chunks are not: each chunk is
    decoded again alone, in FP32, from the FP16 mel, before it goes out."""
    from vssflow.runtime import window
    folder = _scaled_model(tiny_assets, tmp_path / "vocoder", VOCODER_OVERFLOW)
    session = Session(folder, backend="ort", precision="fp16")
    got = session.generate(clip4, steps=STEPS, noise=_noise(1), keep_intermediates=True)
    from vssflow.runtime.contracts import SAMPLES_PER_MEL, VOCODER_CHUNK
    n_chunks = -(-len(got.audio) // (VOCODER_CHUNK * SAMPLES_PER_MEL))    # the stream ends with the clip
    assert got.fallbacks == tuple({"window": 0, "found": ["audio"], "redone": "chunk", "chunk": i}
                                  for i in range(n_chunks))
    assert np.isfinite(got.audio).all() and len([n for n in got.notes if "FP16" in n]) == 1
    assert session.backend.fp32().precision == "fp32"
    fp32_chunks = window.vocode(session.backend.fp32(), window.Run(), got.intermediates["mel"])
    np.testing.assert_array_equal(got.audio, np.concatenate(list(fp32_chunks))[:len(got.audio)])
