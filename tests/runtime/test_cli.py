"""`vssflow-run` and `vssflow-export` as a user runs them."""

import hashlib
import importlib.metadata
import importlib.util
import os
import json
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest
import soundfile as sf

from vssflow.benchmarks.media import make_video
from vssflow.runtime import engines
from vssflow.runtime.errors import EXIT_INTERNAL


def run(*args, timeout=600, **kw):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, **kw)


def _video_packets(path):
    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(c.streams.video[0]) if p.size]


def test_mp4_output_copies_the_video_stream_and_adds_12s_of_audio(tiny_model, clip12, tmp_path):
    before = hashlib.sha256(clip12.read_bytes()).hexdigest()
    out = tmp_path / "with_sound.mp4"
    r = run("vssflow.runtime.cli", str(clip12), "--model", str(tiny_model), "-o", str(out), "--steps", "2",
            "--json", "--transcript", "hello", "--speech-start", "1", "--speech-end", "2")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["seconds"] == 12.0 and summary["nfe"] == 4 and summary["windows"] == 2
    assert _video_packets(out) == _video_packets(clip12)            # bit-identical video stream
    with av.open(str(out)) as c:
        a = c.streams.audio[0]
        assert a.codec_context.name == "aac" and a.sample_rate == 16000
        samples = sum(f.samples for f in c.decode(a))
    assert abs(samples - 12 * 16000) <= 2048                         # AAC frames of 1024 samples
    assert hashlib.sha256(clip12.read_bytes()).hexdigest() == before  # input untouched
    assert [p.name for p in tmp_path.iterdir()] == ["with_sound.mp4"]  # no temporary left


def test_webm_without_output_name_writes_webm_with_opus(tiny_model, tmp_path):
    """`vssflow-run clip.webm`: clip_with_sound.webm beside it, the VP9 packets copied, Opus
    audio of the clip's length (exactly: WebM marks Opus's pre-skip and end padding)."""
    video = tmp_path / "clip.webm"
    make_video(video, 2, 25, (64, 48), "libvpx-vp9")
    r = run("vssflow.runtime.cli", str(video), "--model", str(tiny_model), "--steps", "1", "--json", "-q")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    out = tmp_path / "clip_with_sound.webm"
    assert json.loads(r.stdout)["output"] == str(out) and json.loads(r.stdout)["seconds"] == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.webm", "clip_with_sound.webm"]
    assert _video_packets(out) == _video_packets(video)
    with av.open(str(out)) as c:
        a = c.streams.audio[0]
        assert c.streams.video[0].codec_context.codec.canonical_name == "vp9"
        assert a.codec_context.codec.canonical_name == "opus" and a.sample_rate == 48000
        assert sum(f.samples for f in c.decode(a)) == 2 * 48000


def test_default_output_falls_back_to_mkv_and_says_so(tiny_model, clip4, tmp_path):
    """H.264 in a file named .webm (WebM cannot hold it): clip_with_sound.mkv, said in one line."""
    video = tmp_path / "clip.webm"
    shutil.copy(clip4, video)
    r = run("vssflow.runtime.cli", str(video), "--model", str(tiny_model), "--steps", "1")
    assert r.returncode == 0, r.stderr
    assert "[vssflow-run] clip.webm holds h264 video, which a .webm file cannot: writing clip_with_sound.mkv" \
        in r.stderr.splitlines()
    assert engines.cuda_gpu_visible() or "TensorRT" not in r.stderr     # no GPU: no word of TensorRT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.webm", "clip_with_sound.mkv"]
    assert _video_packets(tmp_path / "clip_with_sound.mkv") == _video_packets(video)


@pytest.mark.parametrize("ext", [".wav", ".flac"])
def test_audio_outputs_have_rate_and_length(tiny_model, clip4, tmp_path, ext):
    out = tmp_path / f"out{ext}"
    r = run("vssflow.runtime.cli", str(clip4), "--model", str(tiny_model), "-o", str(out), "--steps", "2", "-q")
    assert r.returncode == 0, r.stderr
    data, sr = sf.read(out, dtype="float32")
    assert sr == 16000 and data.shape == (4 * 16000,)
    assert np.abs(data).max() > 0


def test_noise_file_and_intermediates_reproduce_a_run(tiny_model, clip4, tmp_path):
    noise = np.random.default_rng(0).standard_normal((128, 250), dtype=np.float32)
    np.save(tmp_path / "noise.npy", noise)
    outs = []
    for i, backend in enumerate(("ort", "torch")):
        out = tmp_path / f"a{i}.wav"
        r = run("vssflow.runtime.cli", str(clip4), "--model", str(tiny_model), "-o", str(out), "--steps", "2",
                "--noise", str(tmp_path / "noise.npy"), "--backend", backend, "-q",
                "--dump-intermediates", str(tmp_path / f"dump{i}.npz"))
        assert r.returncode == 0, r.stderr
        outs.append(sf.read(out, dtype="float32")[0])
    assert np.abs(outs[0] - outs[1]).max() <= 1e-4
    dump = np.load(tmp_path / "dump0.npz")
    assert {"clip_features", "synch_features", "phone_ids", "initial_latent", "final_latent", "mel",
            "audio"} <= set(dump.files)
    assert np.array_equal(dump["initial_latent"][0], noise)
    assert np.array_equal(dump["audio"], outs[0])


@pytest.mark.parametrize("args,code,message", [
    (["missing.mp4"], 10, "no such file"),                  # the video's code, as in a batch's row
    (["{clip}", "-o", "{tmp}/out.xyz"], 5, "unknown output type"),
    # refused before the model loads (that would fail with 3)
    (["{clip}", "-o", "{tmp}/out.webm", "--model", "{tmp}/nomodel"], 5,
     "out.webm: .webm cannot hold the input's h264 video (it is copied, not re-encoded): use .mkv or .mp4"),
    (["{clip}", "--model", "{tmp}/nomodel"], 3, "no such model folder"),
    (["{clip}", "--transcript", "hi", "--speech-start", "3", "--speech-end", "2"], 11, "speech"),
    (["{clip}", "--cfg", "nan"], 2, "cfg"),
    # a negative seed (numpy's generators take none): refused before the model loads
    (["{clip}", "--seed", "-5", "--model", "{tmp}/nomodel"], 2, "seed must be a whole number from 0 up"),
    (["{clip}", "--backend", "ort", "--preprocess", "device"], 4, "takes frames from the host"),
])
def test_bad_input_gives_one_line_and_exit_code(tiny_model, clip4, tmp_path, args, code, message):
    args = [a.format(clip=clip4, tmp=tmp_path) for a in args]
    if "--model" not in args:
        args += ["--model", str(tiny_model)]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "out.wav")]
    r = run("vssflow.runtime.cli", *args)
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and message in r.stderr.lower()
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_the_input(tiny_model, clip4, tmp_path):
    copy = tmp_path / "clip.mp4"
    copy.write_bytes(clip4.read_bytes())
    r = run("vssflow.runtime.cli", str(copy), "--model", str(tiny_model), "-o", str(copy))
    assert r.returncode == 5 and "input" in r.stderr
    assert copy.read_bytes() == clip4.read_bytes()


def test_export_demo_is_complete_and_atomic(tmp_path):
    out = tmp_path / "demo"
    r = run("vssflow.export.cli", "--demo", "--out", str(out), "--backend", "onnx", "-q")
    assert r.returncode == 0, r.stderr
    assert "random weights" in r.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["demo"] is True
    assert set(manifest["files"]) >= {f"{s}.onnx" for s in ("clip_encoder", "synch_encoder", "speaker_encoder",
                                                             "condition", "flow_step", "vae_decoder", "vocoder")}
    assert "TensorRT" not in r.stdout                         # --backend onnx: no engines, no TensorRT line
    for precision in ("FP32", "FP16"):                        # what a run of each graph set plans for
        assert f"host memory, {precision} graphs (ONNX Runtime; planned): weights " in r.stdout
    assert "weights.pt" not in manifest["files"] and not (out / "weights.pt").exists()   # opt-in, as documented
    again = run("vssflow.export.cli", "--demo", "--out", str(out), "--backend", "onnx")
    assert again.returncode == 5 and "already exists; pass --force" in again.stderr
    assert "random-weight checkpoint" not in again.stderr    # refused before anything was written
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_export_refuses_a_bad_checkpoint(tmp_path, tiny_assets):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    r = run("vssflow.export.cli", "--checkpoint", str(bad), "--synchformer", str(tiny_assets["synchformer"]),
            "--out", str(tmp_path / "m"))
    assert r.returncode == 3 and "bad.ckpt" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "m").exists()


def test_help_explains():
    for module in ("vssflow.runtime.cli", "vssflow.export.cli"):
        r = run(module, "--help")
        assert r.returncode == 0 and "Example" in r.stdout


@pytest.mark.parametrize("error,message", [(RuntimeError("boom"), "internal error: runtimeerror: boom"),
                                           (MemoryError(), "out of memory")])
def test_unexpected_error_is_one_line_and_exit_1(tiny_model, clip4, tmp_path, monkeypatch, error, message):
    from click.testing import CliRunner

    from vssflow.runtime import cli, session

    def fail(*args, **kw):
        raise error
    monkeypatch.setattr(session.Session, "stream", fail)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    out = tmp_path / "out.wav"
    r = CliRunner().invoke(cli.main, [str(clip4), "--model", str(tiny_model), "-o", str(out)])
    assert r.exit_code == EXIT_INTERNAL, r.output
    assert message in r.output.lower() and "Traceback" not in r.output and not out.exists()
    monkeypatch.setenv(cli.DEBUG_ENV, "1")                     # debugging: the traceback comes back
    r = CliRunner().invoke(cli.main, [str(clip4), "--model", str(tiny_model), "-o", str(out)])
    assert r.exception is error


def test_export_unexpected_error_is_one_line_and_exit_1(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from vssflow.export import cli as export_cli
    from vssflow.runtime import cli

    def fail(*args, **kw):
        raise RuntimeError("boom")
    monkeypatch.setattr(export_cli, "export_demo", fail)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    r = CliRunner().invoke(export_cli.main, ["--demo", "--out", str(tmp_path / "m")])
    assert r.exit_code == EXIT_INTERNAL, r.output
    assert "internal error: runtimeerror: boom" in r.output.lower() and "nothing was written" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "m").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_export_without_tensorrt_says_it_skipped_the_engines(tmp_path):
    r = run("vssflow.export.cli", "--demo", "--out", str(tmp_path / "demo"), "--backend", "all", "--no-verify", "-q",
            "--precision", "fp32")                       # FP16 graphs are not the point: half the export
    assert r.returncode == 0, r.stderr
    trt = [line for line in r.stdout.splitlines() if line.startswith("TensorRT")]
    if engines.cuda_gpu_visible():
        assert trt == ["TensorRT: skipped: TensorRT is not installed: `pip install tensorrt` (x86-64), or on a "
                       "Jetson use the one JetPack ships; ONNX files were written and run on ONNX Runtime"], r.stdout
    else:                                                    # no advice to install what cannot run here
        assert trt == ["TensorRT: skipped: no CUDA GPU is visible; TensorRT engines are built and run on one"]


def _audio_packets(path, track):
    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(c.streams.audio[track]) if p.size]


def test_the_inputs_own_sound_track_is_kept_and_said(tiny_model, tmp_path):
    """`vssflow-run clip.mp4 -o out.mp4` on a clip with its own AAC track: both tracks, the
    generated one first, the clip's packets as they were; a line and --json's notes say so.
    `--input-audio drop` leaves one track and says that; a .wav output says it was left out."""
    clip = tmp_path / "clip.mp4"
    make_video(clip, 2, 25, (64, 48), audio=True)
    out = tmp_path / "out.mp4"
    r = run("vssflow.runtime.cli", str(clip), "--model", str(tiny_model), "-o", str(out), "--steps", "1")
    assert r.returncode == 0, r.stderr
    assert "[vssflow-run] the input's own sound track (aac) kept in out.mp4, after the generated one" \
        in r.stderr.splitlines()
    with av.open(str(out)) as c:
        assert [(s.sample_rate, s.disposition & av.stream.Disposition.default != 0) for s in c.streams.audio] == \
            [(16000, True), (16000, False)]
    assert _audio_packets(out, 1) == _audio_packets(clip, 0) and _video_packets(out) == _video_packets(clip)

    r = run("vssflow.runtime.cli", str(clip), "--model", str(tiny_model), "-o", str(tmp_path / "drop.mp4"),
            "--steps", "1", "--input-audio", "drop", "--json")
    assert r.returncode == 0, r.stderr
    note = "the input's own sound track (aac) left out of drop.mp4 (--input-audio drop)"
    assert f"[vssflow-run] {note}" in r.stderr.splitlines() and json.loads(r.stdout)["notes"] == [note]
    with av.open(str(tmp_path / "drop.mp4")) as c:
        assert len(c.streams.audio) == 1

    r = run("vssflow.runtime.cli", str(clip), "--model", str(tiny_model), "-o", str(tmp_path / "out.wav"),
            "--steps", "1")
    assert r.returncode == 0, r.stderr
    assert "[vssflow-run] the input's own sound track (aac) left out of out.wav: a .wav file holds the generated " \
           "sound only" in r.stderr.splitlines()


def test_a_batch_row_says_what_became_of_the_inputs_sound(tiny_model, tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    make_video(clips / "a.mp4", 1, 25, (64, 48), audio=True)
    make_video(clips / "b.mp4", 1, 25, (64, 48))
    r = run("vssflow.runtime.cli", str(clips), "--model", str(tiny_model), "--output-dir", str(tmp_path / "out"),
            "--steps", "1", "--input-audio", "drop", "--report", str(tmp_path / "report.jsonl"))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "report.jsonl").read_text().splitlines()][:2]
    assert [row["notes"] for row in rows] == [["the input's own sound track (aac) left out of a.mp4 (--input-audio drop)"], []]
    assert any(line.startswith("[vssflow-run] ok ") and line.endswith("left out of a.mp4 (--input-audio drop)")
               for line in r.stderr.splitlines()), r.stderr
    with av.open(str(tmp_path / "out" / "a.mp4")) as c:
        assert len(c.streams.audio) == 1


def test_json_into_a_closed_pipe_ends_quietly(tiny_model, clip4, tmp_path):
    """`vssflow-run ... --json | head -c1` with the reader gone before the summary is written:
    exit 141 (as a Unix tool killed by SIGPIPE), nothing on stderr but the run's own lines, the
    output complete."""
    out = tmp_path / "out.wav"
    p = subprocess.Popen([sys.executable, "-m", "vssflow.runtime.cli", str(clip4), "--model", str(tiny_model),
                          "-o", str(out), "--steps", "1", "--json", "-q"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()                  # the reader leaves before the run writes anything
    stderr = p.stderr.read()
    assert p.wait(timeout=600) == 141, stderr
    assert stderr == ""
    assert sf.info(str(out)).frames == 4 * 16000


@pytest.mark.parametrize("tool", ["vssflow.runtime.cli", "vssflow.export.cli"])
def test_version_is_the_installed_packages(tool):
    r = run(tool, "--version")
    name = "vssflow-run" if "runtime" in tool else "vssflow-export"
    assert r.returncode == 0 and r.stdout == f"{name} {importlib.metadata.version('vssflow')}\n"


def test_export_checks_out_before_writing_anything(tmp_path):
    """An --out whose parent is a file (or not writable) is refused before the demo's random
    checkpoint is written."""
    (tmp_path / "file").write_text("x")
    r = run("vssflow.export.cli", "--demo", "--out", str(tmp_path / "file" / "m"), "--backend", "onnx")
    assert r.returncode == 5, r.stderr
    assert r.stderr.strip().splitlines() == [f"vssflow-export: error: {tmp_path / 'file' / 'm'}: cannot be made: "
                                             f"{tmp_path / 'file'} is not a folder"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder")
def test_export_refuses_an_unwritable_parent_at_once(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    r = run("vssflow.export.cli", "--demo", "--out", str(locked / "m"), "--backend", "onnx")
    assert r.returncode == 5 and "is not writable" in r.stderr and "random-weight" not in r.stderr


def test_demo_writes_torch_weights_when_asked(tmp_path):
    """weights.pt is opt-in for the demo as for any model (the test above: not without it)."""
    r = run("vssflow.export.cli", "--demo", "--out", str(tmp_path / "w"), "--backend", "onnx", "--no-verify", "-q",
            "--torch-weights", "--precision", "fp32")
    assert r.returncode == 0, r.stderr
    assert "weights.pt" in json.loads((tmp_path / "w" / "manifest.json").read_text())["files"]


def test_run_without_model_exports_torch_weights_only_for_the_torch_backend(clip4, tmp_path):
    """`vssflow-run` without --model exports the demo into $VSSFLOW_HOME: with ONNX Runtime here,
    no weights.pt for `auto`; `--backend torch` exports it again, with them, and runs."""
    env = {**os.environ, "VSSFLOW_HOME": str(tmp_path / "home")}
    demo = tmp_path / "home" / "demo-model"
    r = run("vssflow.runtime.cli", str(clip4), "-o", str(tmp_path / "a.wav"), "--steps", "1", "-q", env=env)
    assert r.returncode == 0, r.stderr
    assert "weights.pt" not in json.loads((demo / "manifest.json").read_text())["files"]
    r = run("vssflow.runtime.cli", str(clip4), "-o", str(tmp_path / "b.wav"), "--steps", "1", "-q",
            "--backend", "torch", env=env)
    assert r.returncode == 0, r.stderr
    assert "weights.pt" in json.loads((demo / "manifest.json").read_text())["files"]
