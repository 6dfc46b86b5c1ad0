"""Model folders and checkpoints from strangers: altered, incomplete, newer, or carrying code.

Every file a backend loads is listed in manifest.json with its size and sha256 and checked when
the Session opens; weight files are read weights-only (a pickled object is refused, never run);
TensorRT engines are used only when their name says this GPU, this TensorRT and this ONNX file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import types

import numpy as np
import pytest

from tests.reliability.conftest import assert_one_line_error, listing, run_cli
from vssflow.runtime.backends import TrtBackend, create_backend
from vssflow.runtime import engines
from vssflow.runtime.engines import match_engines, parse_engine_name
from vssflow.runtime.errors import BackendError, ModelFolderError
from vssflow.runtime.model_folder import ModelFolder
from vssflow.runtime.session import Session


@pytest.fixture
def folder(tiny_model, tmp_path):
    """A private copy of the tiny model folder, to damage."""
    return shutil.copytree(tiny_model, tmp_path / "model")


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def _write_manifest(folder, manifest):
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _relist(folder, name):
    """Record `name`'s current size and hash in the manifest: an attacker who edits both."""
    m = _manifest(folder)
    data = (folder / name).read_bytes()
    m["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    _write_manifest(folder, m)


class Payload:
    """Unpickling this would run a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --- integrity --------------------------------------------------------------------------------

def test_missing_file(folder):
    (folder / "vocoder.onnx").unlink()
    with pytest.raises(ModelFolderError, match="vocoder.onnx is listed in manifest.json but missing"):
        Session(folder, backend="ort")


def test_altered_file_same_size(folder):
    data = bytearray((folder / "flow_step.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF                                  # one bit pattern in a weight
    (folder / "flow_step.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelFolderError, match="flow_step.onnx does not match its sha256 in manifest.json"):
        Session(folder, backend="ort")


def test_altered_file_other_size(folder):
    with open(folder / "weights.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelFolderError, match=r"weights.pt has \d+ bytes, manifest says \d+"):
        Session(folder, backend="ort")


def test_newer_format_is_refused_with_its_version(folder):
    m = _manifest(folder)
    m["format_version"] = 7
    _write_manifest(folder, m)
    with pytest.raises(ModelFolderError, match=r"format version 7 is newer than this vssflow reads \(1\)"):
        Session(folder, backend="ort")


@pytest.mark.parametrize("change,problem", [
    (lambda m: "{not json", "unreadable"),
    (lambda m: [m], "not a JSON object"),
    (lambda m: {**m, "format_version": "1"}, "no format_version"),
    (lambda m: {k: v for k, v in m.items() if k != "contracts"}, "malformed manifest"),
    (lambda m: {**m, "files": {**m["files"], "vocoder.onnx": 42}}, "malformed manifest"),
    (lambda m: {**m, "files": {"../manifest.json": m["files"]["vocoder.onnx"]}}, "not a file name inside"),
])
def test_malformed_manifest(folder, change, problem):
    new = change(_manifest(folder))
    (folder / "manifest.json").write_text(new if isinstance(new, str) else json.dumps(new))
    with pytest.raises(ModelFolderError, match=problem) as err:
        ModelFolder.open(folder)
    assert "\n" not in str(err.value)


def test_unlisted_file_is_not_loaded(folder):
    """A file the manifest does not list (so nothing checked) is never handed to a backend."""
    m = _manifest(folder)
    del m["files"]["weights.pt"]
    _write_manifest(folder, m)
    opened = ModelFolder.open(folder)
    with pytest.raises(ModelFolderError, match="weights.pt is not listed in manifest.json"):
        opened.file("weights.pt")
    with pytest.raises(BackendError, match="no weights.pt: .* re-export with vssflow-export --torch-weights"):
        Session(folder, backend="torch")


def test_weights_pt_only_when_asked(tiny_assets, tmp_path):
    """weights.pt repeats every weight (GBs at full size): written only with --torch-weights."""
    from vssflow.export.onnx_export import ExportOptions, export_model
    plain = export_model(tiny_assets["checkpoint"], tiny_assets["synchformer"], tmp_path / "plain",
                         options=ExportOptions(verify=False, precision="fp32"))
    assert "weights.pt" not in plain["files"] and not (tmp_path / "plain" / "weights.pt").exists()
    r = run_cli("vssflow.export.cli", "--checkpoint", tiny_assets["checkpoint"], "--synchformer",
                tiny_assets["synchformer"], "--out", tmp_path / "with", "--backend", "onnx", "--no-verify",
                "--torch-weights", "--precision", "fp32", "-q")
    assert r.returncode == 0, r.stderr
    assert "weights.pt" in _manifest(tmp_path / "with")["files"]
    assert Session(tmp_path / "with", backend="torch").backend.name == "torch"


def test_damaged_onnx_with_matching_manifest(folder, accepted_videos):
    """A file damaged before its hash was recorded: ONNX Runtime's refusal, as a one-line error."""
    (folder / "clip_encoder.onnx").write_bytes(b"\x08\x07" + np.random.default_rng(0).bytes(4000))
    _relist(folder, "clip_encoder.onnx")
    session = Session(folder, backend="ort")                      # stages load on first use
    with pytest.raises(ModelFolderError, match="clip_encoder.onnx: ONNX Runtime cannot load it") as err:
        session.generate(accepted_videos["one_frame"], steps=1)
    assert "\n" not in str(err.value)


# --- code in weight files ---------------------------------------------------------------------

def test_pickled_code_in_weights_is_refused_without_running(folder, tmp_path, accepted_videos):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "ran"
    obj = torch.load(folder / "weights.pt", weights_only=True)
    obj["hyper_parameters"] = Payload(marker)
    torch.save(obj, folder / "weights.pt")
    _relist(folder, "weights.pt")
    session = Session(folder, backend="torch")
    with pytest.raises(ModelFolderError, match=r"weights.pt: refused: the file holds a pickled posix.system"):
        session.generate(accepted_videos["one_frame"], steps=1)
    assert not marker.exists()
    # and through the command line: exit code 3, one line, nothing written, nothing run
    out = tmp_path / "out"
    out.mkdir()
    r = run_cli("vssflow.runtime.cli", accepted_videos["one_frame"], "--model", folder, "--backend", "torch",
                "-o", out / "x.wav", "--steps", "1", "-q")
    assert_one_line_error(r, 3, f"{folder / 'weights.pt'}: refused", "posix.system")
    assert not marker.exists() and listing(out) == []


def test_cli_altered_and_newer_folders(folder, tmp_path, accepted_videos):
    data = bytearray((folder / "condition.onnx").read_bytes())
    data[-10] ^= 1
    (folder / "condition.onnx").write_bytes(bytes(data))
    r = run_cli("vssflow.runtime.cli", accepted_videos["one_frame"], "--model", folder, "-o", tmp_path / "x.wav", "-q")
    assert_one_line_error(r, 3, f"{folder}: condition.onnx does not match its sha256")
    m = _manifest(folder)
    m["format_version"] = 2
    _write_manifest(folder, m)
    r = run_cli("vssflow.runtime.cli", accepted_videos["one_frame"], "--model", folder, "-o", tmp_path / "x.wav", "-q")
    assert_one_line_error(r, 3, "format version 2 is newer")
    assert not (tmp_path / "x.wav").exists()


def test_export_refuses_pickled_code_without_running(tiny_assets, tmp_path):
    """`vssflow-export` on a checkpoint, a Synchformer file and a RawNet3 file carrying code."""
    torch = pytest.importorskip("torch")
    marker = tmp_path / "ran"
    evil = {}
    for key in ("checkpoint", "rawnet"):
        obj = torch.load(tiny_assets[key], weights_only=True)
        obj["extra"] = Payload(marker)
        evil[key] = tmp_path / f"evil_{tiny_assets[key].name}"
        torch.save(obj, evil[key])
    for key, args in (("checkpoint", ["--checkpoint", evil["checkpoint"]]),
                      ("rawnet", ["--checkpoint", tiny_assets["checkpoint"], "--rawnet", evil["rawnet"]])):
        r = run_cli("vssflow.export.cli", *args, "--synchformer", tiny_assets["synchformer"],
                    "--out", tmp_path / "model", "--backend", "onnx", "-q")
        assert_one_line_error(r, 3, f"{evil[key]}: refused", "posix.system", tool="vssflow-export")
        assert not marker.exists() and not (tmp_path / "model").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model")]    # no half-built folder


# --- TensorRT engines -------------------------------------------------------------------------

ONNX_SHA = "ab" * 32


def _engine(stage, gpu="nvidia-h100-sm90", trt="10.3.0", onnx=ONNX_SHA[:12], precision="fp16"):
    return f"{stage}.{onnx}.{gpu}.trt{trt}.{precision}.p0123abcd.engine"


FP32_SHA = "cd" * 32


def _fake_folder(engines, stages=("flow_step", "vocoder"), half=("flow_step", "vocoder")):
    """Graphs of `stages` (FP16 ones of `half` too) and `engines`, as a manifest lists them."""
    files = {f"{s}.onnx": {"sha256": FP32_SHA, "bytes": 1} for s in stages}
    files.update({f"{s}.fp16.onnx": {"sha256": ONNX_SHA, "bytes": 1} for s in half})
    files.update({e: {"sha256": "0" * 64, "bytes": 1} for e in engines})
    return types.SimpleNamespace(path="models/m", manifest={"files": files}, contracts={s: None for s in stages})


def test_engines_for_this_machine_are_chosen():
    folder = _fake_folder([_engine("flow_step"), _engine("vocoder"), _engine("vocoder", gpu="nvidia-a100-sm80")])
    assert match_engines(folder, "nvidia-h100-sm90", "10.3.0", "fp16") == {
        "flow_step": _engine("flow_step"), "vocoder": _engine("vocoder")}


def test_engines_hash_the_graph_of_their_precision():
    """An FP16 engine names the hash of `<stage>.fp16.onnx`, an FP32 one that of `<stage>.onnx`; a
    stage without a half graph (the speaker encoder) runs its FP32 engine in an FP16 backend."""
    fp32 = [_engine(s, onnx=FP32_SHA[:12], precision="fp32") for s in ("flow_step", "speaker_encoder")]
    fp16 = [_engine("flow_step")]
    folder = _fake_folder(fp32 + fp16, stages=("flow_step", "speaker_encoder"), half=("flow_step",))
    assert match_engines(folder, "nvidia-h100-sm90", "10.3.0", "fp16") == {
        "flow_step": fp16[0], "speaker_encoder": fp32[1]}
    assert match_engines(folder, "nvidia-h100-sm90", "10.3.0", "fp32") == dict(zip(("flow_step", "speaker_encoder"), fp32))
    wrong = _fake_folder([_engine("flow_step", onnx=FP32_SHA[:12])], stages=("flow_step",))   # fp16 named for the fp32 graph
    with pytest.raises(BackendError, match="another ONNX file"):
        match_engines(wrong, "nvidia-h100-sm90", "10.3.0", "fp16")


BOTH = ("flow_step", "vocoder")


@pytest.mark.parametrize("engines,needle", [
    ([_engine(s, gpu="nvidia-a100-sm80") for s in BOTH], "its engines are for nvidia-a100-sm80 / TensorRT 10.3.0"),
    ([_engine(s, trt="10.0.1") for s in BOTH], "its engines are for nvidia-h100-sm90 / TensorRT 10.0.1"),
    ([_engine(s, trt="10.3") for s in BOTH], "TensorRT 10.3 / fp16:"),        # no prefix match
    ([_engine(s, onnx="0" * 12) for s in BOTH], "another ONNX file"),          # a stale engine
    ([_engine("flow_step")], "no fp16 TensorRT engine for vocoder built for this machine"),
    ([_engine(s, precision="fp32") for s in BOTH], "its engines are for nvidia-h100-sm90 / TensorRT 10.3.0 / fp32"),
    ([], "it has no TensorRT engines"),
])
def test_engines_for_another_machine_are_refused_with_the_reason(engines, needle):
    with pytest.raises(BackendError, match="no fp16 TensorRT engine for") as err:
        match_engines(_fake_folder(engines), "nvidia-h100-sm90", "10.3.0", "fp16")
    assert needle in str(err.value) and "(nvidia-h100-sm90 / TensorRT 10.3.0)" in str(err.value)
    assert "--precision fp16" in str(err.value)


def test_engine_names_written_by_the_exporter_parse(tmp_path, monkeypatch, tiny_model):
    """export/trt_build.engine_name and runtime/engines.parse_engine_name must agree on the format."""
    from vssflow.export import trt_build as export_trt
    from vssflow.runtime import engines
    from vssflow.runtime.contracts import ModelSizes, stage_contracts
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0.26"))
    monkeypatch.setattr(engines, "gpu_tag", lambda device=0: "nvidia-h100-80gb-hbm3-sm90")
    onnx = tmp_path / "flow_step.onnx"
    onnx.write_bytes(b"graph")
    contract = stage_contracts(ModelSizes(**ModelFolder.open(tiny_model).manifest["sizes"]))["flow_step"]
    name = export_trt.engine_name("flow_step", onnx, "fp16", contract)
    assert parse_engine_name(name) == {"stage": "flow_step", "onnx": hashlib.sha256(b"graph").hexdigest()[:12],
                                       "gpu": "nvidia-h100-80gb-hbm3-sm90", "trt": "10.3.0.26",
                                       "precision": "fp16", "profile": name.split(".p")[-1][:8]}


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_without_tensorrt_auto_falls_back_and_trt_says_why(tiny_model, monkeypatch):
    monkeypatch.setattr(engines, "cuda_gpu_visible", lambda: True)       # as on a machine with a CUDA GPU
    with pytest.raises(BackendError, match="the trt backend is unavailable: TensorRT is not installed"):
        TrtBackend(ModelFolder.open(tiny_model))
    auto = create_backend(ModelFolder.open(tiny_model), "auto")
    assert auto.name == "ort" and auto.passed_over[0].startswith("the trt backend is unavailable: TensorRT is not")


def test_without_a_gpu_auto_says_nothing_of_tensorrt(tiny_model, monkeypatch):
    """No CUDA GPU: `auto` goes to ONNX Runtime without a line about TensorRT; `--backend trt`
    says the GPU is missing, and gives no install advice."""
    monkeypatch.setattr(engines, "cuda_gpu_visible", lambda: False)
    assert create_backend(ModelFolder.open(tiny_model), "auto").passed_over == ()
    with pytest.raises(BackendError) as e:
        TrtBackend(ModelFolder.open(tiny_model))
    assert str(e.value) == "the trt backend is unavailable: no CUDA GPU is visible; TensorRT engines are built and run on one"


@pytest.mark.trt
@pytest.mark.gpu
def test_engine_that_lies_about_its_build_is_refused(tmp_path, tiny_assets):
    """A real engine whose bytes are damaged but whose name and manifest entry say this machine:
    TensorRT refuses to deserialize it and the backend says so, instead of crashing."""
    from vssflow.export.onnx_export import ExportOptions, export_model
    folder = tmp_path / "trt_model"
    export_model(tiny_assets["checkpoint"], tiny_assets["synchformer"], folder,
                 options=ExportOptions(precision="fp16", backend="trt", verify=False))
    engine = next(f for f in _manifest(folder)["files"] if f.startswith("vocoder.") and f.endswith(".engine"))
    data = bytearray((folder / engine).read_bytes())
    data[16:48] = bytes(32)
    (folder / engine).write_bytes(bytes(data))
    _relist(folder, engine)
    backend = create_backend(ModelFolder.open(folder), "trt")
    with pytest.raises(BackendError, match="cannot load this engine"):
        backend._load("vocoder")


# --- checking hashes only when something changed ---------------------------------------------------

def _flip_keeping_stat(path, at=-10):
    """Change one byte but keep the size, mtime and inode: what the stamp cannot see."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[at] ^= 1
    with open(path, "r+b") as f:
        f.write(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_ino == st.st_ino


def test_an_unchanged_folder_is_not_hashed_again_and_verify_hashes_everything(tiny_model, tmp_path, clip4):
    """A start trusts files unchanged since their stamp (it reads no gigabytes); `verify_hashes`
    (`vssflow-run --verify`) hashes every file regardless and finds what the stamp cannot see."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder, copy_function=shutil.copy2)      # new inodes: hashed once, stamped
    ModelFolder.open(folder)
    stamp = json.loads((folder / ".verified.json").read_text())
    assert set(stamp["files"]) == set(_manifest(folder)["files"])
    _flip_keeping_stat(folder / "condition.onnx")
    ModelFolder.open(folder)                                              # trusted: same size, mtime, inode
    with pytest.raises(ModelFolderError, match="condition.onnx does not match its sha256"):
        ModelFolder.open(folder, verify_hashes=True)
    out = tmp_path / "out.wav"
    r = run_cli("vssflow.runtime.cli", clip4, "--model", folder, "--verify", "-o", out, "--steps", "1", "-q")
    assert_one_line_error(r, 3, "condition.onnx does not match its sha256")
    assert not out.exists()
    r = run_cli("vssflow.runtime.cli", clip4, "--model", folder, "-o", out, "--steps", "1", "-q")
    assert r.returncode == 0 and out.exists(), r.stderr


def test_a_changed_or_copied_file_is_hashed_again(tiny_model, tmp_path):
    folder = shutil.copytree(tiny_model, tmp_path / "model")
    ModelFolder.open(folder)
    data = bytearray((folder / "vocoder.onnx").read_bytes())
    data[-10] ^= 1
    (folder / "vocoder.onnx").write_bytes(bytes(data))                   # an edit moves the mtime
    with pytest.raises(ModelFolderError, match="vocoder.onnx does not match"):
        ModelFolder.open(folder)
    copy = shutil.copytree(folder, tmp_path / "copy", copy_function=shutil.copy2)   # same mtimes, new inodes
    with pytest.raises(ModelFolderError, match="vocoder.onnx does not match"):
        ModelFolder.open(copy)


def test_a_folder_that_cannot_hold_its_stamp_keeps_it_in_the_cache(tiny_model, tmp_path, monkeypatch):
    """A read-only folder (a shared model on a cluster): the stamp goes to the user's cache."""
    monkeypatch.setenv("VSSFLOW_HOME", str(tmp_path / "home"))
    folder = shutil.copytree(tiny_model, tmp_path / "model")
    (folder / ".verified.json").unlink()
    (folder / ".verified.json").mkdir()            # the stamp cannot be written there (as if read-only)
    ModelFolder.open(folder)
    cached = list((tmp_path / "home" / "verified").iterdir())
    assert len(cached) == 1 and set(json.loads(cached[0].read_text())["files"]) == set(_manifest(folder)["files"])
    _flip_keeping_stat(folder / "vocoder.onnx")
    ModelFolder.open(folder)                       # the cached stamp is used
    with pytest.raises(ModelFolderError, match="vocoder.onnx does not match"):
        ModelFolder.open(folder, verify_hashes=True)
