"""A representative part of the corpus through `vssflow-run` as a user runs it: one line on
stderr naming the input and the problem, the exit code of the input's kind, no traceback, no
output and nothing else left in the output folder, no hang."""

from __future__ import annotations

import importlib.util
import os

import pytest

from tests.reliability import hostile
from tests.reliability.conftest import assert_one_line_error, listing, run_cli
from vssflow.runtime import engines

CASES = {
    # name: (arguments, exit code, what the message says); {x} are filled from `inputs`
    "empty_video": (["{empty}"], 10, ["{empty}: ", "not a readable video file"]),
    "still_image": (["{png}"], 10, ["{png}: ", "a still image (png), not a video"]),
    "audio_only": (["{song}"], 10, ["{song}: ", "no video stream (has audio)"]),
    "broken_packets": (["{corrupt}"], 10, ["{corrupt}: ", "corrupt video data"]),
    "emoji_transcript": (["{clip}", "--transcript", "🎉🎉"], 11, ["transcript '🎉🎉' has nothing speakable"]),
    "nan_start": (["{clip}", "--transcript", "hi", "--speech-start", "nan"], 11, ["speech_start is nan"]),
    "negative_start": (["{clip}", "--transcript", "hi", "--speech-start", "-1"], 11, ["starts before 0"]),
    "end_past_clip": (["{clip}", "--transcript", "hi", "--speech-end", "30"], 11, ["ends after the video (1 s)"]),
    "silent_voice": (["{clip}", "--ref-audio", "{silent}"], 12, ["{silent}", "is silent"]),
    "corrupt_voice": (["{clip}", "--ref-audio", "{header_cut}"], 12, ["{header_cut}", "cannot read"]),
    "zero_steps": (["{clip}", "--steps", "0"], 2, ["steps must be between 1 and 1000"]),
    "bad_noise_file": (["{clip}", "--noise", "{png}"], 2, ["{png}: not a readable .npy array"]),
    "no_output_folder": (["{clip}", "-o", "{tmp}/nowhere/out.wav"], 5, ["the folder {tmp}/nowhere does not exist"]),
    "output_is_input_by_symlink": (["{clip}", "-o", "{link}"], 5, ["is the input video"]),
}


@pytest.fixture(scope="module")
def inputs(media, accepted_videos, tmp_path_factory):
    folder = media / "cli_inputs"
    folder.mkdir()
    (folder / "empty.mp4").write_bytes(b"")
    good = hostile.good_video(folder, 2)
    voices = hostile.corrupt_wavs(folder)
    link = tmp_path_factory.mktemp("links") / "link.mp4"
    os.symlink(accepted_videos["odd_size"], link)
    return {"empty": folder / "empty.mp4", "png": hostile.image(folder, "png"), "song": hostile.audio_only(folder),
            "corrupt": hostile.corrupt_mdat(good, folder / "corrupt.mp4", 4096),
            "clip": accepted_videos["odd_size"], "silent": hostile.silent_wav(folder),
            "header_cut": voices["header_cut"], "link": link}


@pytest.mark.parametrize("case", list(CASES))
def test_cli_bad_input(case, inputs, tiny_model, tmp_path):
    args, code, needles = CASES[case]
    fill = {**inputs, "tmp": tmp_path}
    args = [a.format(**fill) for a in args]
    if "-o" not in args:
        args += ["-o", tmp_path / "out.wav"]
    before = {p: p.stat().st_mtime_ns for p in inputs.values()}
    steps = [] if "--steps" in args else ["--steps", "1"]
    r = run_cli("vssflow.runtime.cli", *args, *steps, "--model", tiny_model, "-q")
    assert_one_line_error(r, code, *(n.format(**fill) for n in needles))
    assert listing(tmp_path) == []                                  # no output, no temporary file
    assert {p: p.stat().st_mtime_ns for p in inputs.values()} == before


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_cli_trt_backend_without_tensorrt(inputs, tiny_model, tmp_path):
    r = run_cli("vssflow.runtime.cli", inputs["clip"], "--model", tiny_model, "--backend", "trt",
                "-o", tmp_path / "out.wav", "-q")
    assert_one_line_error(r, 4, "the trt backend is unavailable: " + (
        "TensorRT is not installed" if engines.cuda_gpu_visible() else engines.NO_GPU))
    assert listing(tmp_path) == []
