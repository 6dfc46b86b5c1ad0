"""The video corpus through `Session`: every broken file is a one-line `VideoError` naming it and
the problem (exit code 10 in the CLI); every odd but valid one gives a sound track of its length."""

from __future__ import annotations

import numpy as np
import pytest

from vssflow.benchmarks.media import make_video, make_wav
from tests.reliability import hostile
from vssflow.runtime.errors import VideoError

SR = 16000


@pytest.fixture(scope="module")
def sources(media):
    folder = media / "video_sources"
    folder.mkdir()
    return {"moov_last": hostile.good_video(folder, 4),                   # index written after the frames
            "moov_first": hostile.faststart_video(folder / "faststart.mp4", 4)}


def _build(case: str, folder, sources):
    """The file of one broken case."""
    kind, _, arg = case.partition(":")
    path = folder / f"{case.replace(':', '_').replace('.', '_')}.mp4"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(1).bytes(64 * 1024))
    elif kind in ("cut", "cut_faststart"):
        hostile.truncated(sources["moov_last" if kind == "cut" else "moov_first"], float(arg), path)
    elif kind == "corrupt":
        hostile.corrupt_mdat(sources["moov_last"], path, int(arg))
    elif kind == "audio_only":
        path = hostile.audio_only(folder)
    elif kind == "wav":
        path = folder / "speech.wav"
        make_wav(path, 1.0)
    elif kind == "image":
        path = hostile.image(folder, arg)
    elif kind == "png_named_mp4":
        path = hostile.image(folder, "png", name="holiday.mp4")
    elif kind == "zero_frames":
        path = path.with_suffix(f".{arg}")
        make_video(path, 0, 25, hostile.SIZE, audio=arg == "mkv")
    else:
        raise ValueError(case)
    return path


# case -> the problem the message states. Where the check happens is part of the outcome:
# "probe" cases fail in `stream()` before any model runs, "decode" cases while the frames stream.
BROKEN = {
    "empty": ("probe", "not a readable video file"),
    "random": ("probe", "not a readable video file"),
    # index at the end: any cut loses it, so the file does not open
    "cut:0.01": ("probe", "not a readable video file"),
    "cut:0.25": ("probe", "not a readable video file"),
    "cut:0.5": ("probe", "not a readable video file"),
    "cut:0.9": ("probe", "not a readable video file"),
    "cut:0.99": ("probe", "not a readable video file"),
    # index first: the file opens; the cut shows as missing frames or a damaged index
    "cut_faststart:0.01": ("probe", "no video stream"),
    "cut_faststart:0.1": ("probe", "corrupt video data"),
    "cut_faststart:0.5": ("decode", "truncated: 44 of 100 frames decode"),
    "cut_faststart:0.9": ("decode", "truncated: 88 of 100 frames decode"),
    "corrupt:512": ("decode", "corrupt video data"),
    "corrupt:4096": ("decode", "corrupt video data"),
    "audio_only": ("probe", "no video stream (has audio)"),
    "wav": ("probe", "no video stream (has audio)"),
    "image:png": ("probe", "a still image (png), not a video"),
    "image:jpg": ("probe", "a still image (mjpeg), not a video"),
    "png_named_mp4": ("probe", "a still image (png), not a video"),
    "zero_frames:mp4": ("probe", "no video stream"),
    "zero_frames:mkv": ("probe", "the video stream has no frames"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_video_is_a_one_line_video_error(case, session, media, sources):
    where, problem = BROKEN[case]
    path = _build(case, media, sources)
    before = path.read_bytes()
    with pytest.raises(VideoError) as err:
        chunks, _ = session.stream(path, steps=1)
        assert where == "decode", "stream() accepted a file its probe should refuse"
        next(chunks)                       # a one-window clip: the error comes before any audio
    message = str(err.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message, message
    assert err.value.exit_code == 10
    assert path.read_bytes() == before     # read, never written


def test_nearly_complete_files_give_full_length_audio(session, media, sources):
    """Decoders conceal a few damaged bytes, and a file missing its last frame or two is
    padded like a short clip: both are accepted, with audio of the container's duration."""
    concealed = hostile.corrupt_mdat(sources["moov_last"], media / "corrupt64.mp4", 64)
    tail_cut = hostile.truncated(sources["moov_first"], 0.99, media / "tail_cut.mp4")
    for path in (concealed, tail_cut):
        result = session.generate(path, steps=1)
        assert result.audio.shape == (4 * SR,) and np.isfinite(result.audio).all(), path


def _check_track(result, seconds: float):
    assert result.audio.dtype == np.float32 and result.audio.shape == (round(seconds * SR),)
    assert np.isfinite(result.audio).all() and np.abs(result.audio).max() > 0
    assert result.nfe == 1 and result.info.n_windows == 1


def test_one_frame_video(sequential_results):
    r = sequential_results["one_frame"]
    _check_track(r, 1 / 25)
    kept = r.intermediates
    assert kept["clip_features"].shape[1] == 100                 # 1 frame + 99 black ones


def test_odd_size(sequential_results):
    r = sequential_results["odd_size"]
    assert (r.info.video.width, r.info.video.height) == (63, 47)
    _check_track(r, 1.0)


def test_variable_frame_rate(sequential_results):
    r = sequential_results["vfr"]
    # make_video's VFR: 50 frames alternately 0.5 and 1.5 frame periods apart, last at 1.96 s
    assert r.info.video.n_frames == 50 and r.info.duration == pytest.approx(1.98, abs=0.02)
    _check_track(r, r.info.duration)


def test_rotated(sequential_results):
    r = sequential_results["rotated"]
    v = r.info.video
    assert (v.width, v.height, v.rotation) == (48, 64, 90)      # displayed upright
    _check_track(r, 1.0)


def test_8k_frames_decode_within_memory(media, tiny_model):
    """Two 7680x4320 frames are decoded one at a time and shrunk at once: correct audio, and at
    most 800 MB more peak memory than a 64x48 clip through the same process (one float copy of
    a frame is 400 MB; measured in a child process, which runs the small clip, then the 8K one)."""
    import json
    import subprocess
    import sys

    big = hostile.video_8k(media)
    small = media / "small.mp4"
    make_video(small, 2 / 25, 25, hostile.SIZE)
    script = """if True:
        import json, resource, sys
        from vssflow.runtime.session import Session
        session = Session(sys.argv[1], backend="ort")
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        small = session.generate(sys.argv[2], steps=1)
        small_peak = peak()
        r = session.generate(sys.argv[3], steps=1)
        print(json.dumps({"samples": len(r.audio), "finite": bool(abs(r.audio).max() < 1e9),
                          "size": [r.info.video.width, r.info.video.height],
                          "small_peak_mb": small_peak, "peak_mb": peak()}))"""
    r = subprocess.run([sys.executable, "-c", script, str(tiny_model), str(small), str(big)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["size"] == [7680, 4320] and out["samples"] == round(0.08 * SR) and out["finite"]
    assert out["peak_mb"] - out["small_peak_mb"] < 800, out
