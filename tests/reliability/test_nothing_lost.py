"""Nothing lost: an output appears only complete (temporary name, then rename), an existing
output survives a failed run, the input video is never written, and an interrupted run
(SIGINT, SIGTERM, an error mid-stream, a full disk) leaves no partial or temporary file."""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
import textwrap

import av
import numpy as np
import pytest
import soundfile as sf

from vssflow.benchmarks.media import make_video
from tests.reliability import hostile
from tests.reliability.conftest import (CLI_TIMEOUT, assert_one_line_error, interrupt_when_paused, listing,
                                       run_cli)
from vssflow.runtime.output import plan_output, write_output

SR = 16000
OLD = b"an earlier result, which a failed run must leave as it was"


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _partials(folder):
    return [p for p in folder.iterdir() if p.name.startswith(".") and ".partial" in p.name]


@pytest.fixture(scope="module")
def clip12(media):
    """12 s (two windows) of 64x48: a run long enough to interrupt."""
    path = media / "twelve.mp4"
    make_video(path, 12, 25, hostile.SIZE)
    return path


# --- the writers, in-process -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["out.wav", "out.flac", "out.mp4"])
def test_output_appears_only_when_complete(name, tmp_path, accepted_videos):
    """While the result is written, the old file is intact and one hidden partial file exists."""
    out = tmp_path / name
    out.write_bytes(OLD)
    seen = []

    def chunks():
        for i in range(4):
            seen.append((out.read_bytes() == OLD, len(_partials(tmp_path))))
            yield np.full(4000, 0.1 * (i + 1), np.float32)

    n = write_output(plan_output(accepted_videos["rotated"], out), chunks(), SR)
    assert seen == [(True, 1)] * 4
    assert n == 16000 and listing(tmp_path) == [name]
    if name.endswith(".mp4"):
        with av.open(str(out)) as c:
            assert sum(f.samples for f in c.decode(c.streams.audio[0])) >= 16000 - 1024
    else:
        assert sf.read(out)[0].shape == (16000,)


@pytest.mark.parametrize("name", ["out.wav", "out.mp4"])
def test_error_mid_stream_keeps_the_old_output(name, tmp_path, accepted_videos):
    out = tmp_path / name
    out.write_bytes(OLD)

    def chunks():
        yield np.zeros(4000, np.float32)
        raise RuntimeError("the model failed half-way")

    with pytest.raises(RuntimeError, match="half-way"):
        write_output(plan_output(accepted_videos["rotated"], out), chunks(), SR)
    assert out.read_bytes() == OLD and listing(tmp_path) == [name]


_FULL_DISK_WRITER = textwrap.dedent("""
    import resource, signal, sys
    import numpy as np
    from vssflow.runtime.errors import OutputError
    from vssflow.runtime.output import plan_output, write_output
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)         # a failing write returns EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    out, video = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)                        # noise: FLAC cannot shrink it below the limit
    chunks = (rng.uniform(-0.5, 0.5, 16000).astype(np.float32) for _ in range(10))
    try:
        write_output(plan_output(video, out), chunks, 16000)
    except OutputError as e:
        print("OutputError", e)
""")


@pytest.mark.parametrize("name", ["out.wav", "out.flac", "out.mp4"])
def test_failing_writes_leave_nothing(name, tmp_path, accepted_videos):
    """Writes that fail half-way (a file-size limit makes write(2) fail, as a full disk does)."""
    folder = tmp_path / "out"
    folder.mkdir()
    r = subprocess.run([sys.executable, "-c", _FULL_DISK_WRITER, str(folder / name), str(accepted_videos["odd_size"])],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stdout.startswith(f"OutputError {folder / name}: could not write"), r.stdout
    assert listing(folder) == []


def test_full_disk_cli(tmp_path, accepted_videos, tiny_model):
    """A real full disk: a 16 KB tmpfs in a user namespace (skipped where those are not allowed)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=16k tmpfs {mnt}"], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs without privileges here")
    script = (f"mount -t tmpfs -o size=16k tmpfs {mnt} && {sys.executable} -m vssflow.runtime.cli "
              f"{accepted_videos['odd_size']} --model {tiny_model} -o {mnt}/out.wav --steps 1 -q; "
              f"echo rc=$?; ls -A {mnt}")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stdout.split() == ["rc=5"], r.stdout                     # exit 5 and the tmpfs left empty
    assert r.stderr.strip() == f"vssflow-run: error: {mnt}/out.wav: could not write (No space left on device)"


# --- the command line ----------------------------------------------------------------------------

def test_error_after_the_first_window_leaves_the_old_output(media, tiny_model, tmp_path):
    """A web video cut short: the first window is generated and streamed to the temporary file
    before the cut shows; the run fails with exit 10 and the earlier output stays."""
    cut = hostile.truncated(hostile.faststart_video(media / "fast12.mp4", 12), 0.95, media / "cut12.mp4")
    out = tmp_path / "out.wav"
    out.write_bytes(OLD)
    r = run_cli("vssflow.runtime.cli", cut, "--model", tiny_model, "-o", out, "--steps", "1", "-q")
    assert_one_line_error(r, 10, f"{cut}: truncated:", "of 300 frames decode")
    assert out.read_bytes() == OLD and listing(tmp_path) == ["out.wav"]


@pytest.mark.parametrize("sig,name", [(signal.SIGINT, "out.wav"), (signal.SIGTERM, "out.mp4")],
                         ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_leaves_nothing(sig, name, clip12, tiny_model, tmp_path):
    """SIGINT (Ctrl-C) or SIGTERM (kill, a container stopping) mid-run, while the temporary file
    is open: exit 130, one line, the folder as it was."""
    video = tmp_path / "clip.mp4"
    shutil.copy(clip12, video)
    out = tmp_path / name
    out.write_bytes(OLD)
    before, sha = listing(tmp_path), _sha(video)
    def stopped():                                                 # the first chunk is in the partial file
        assert len(_partials(tmp_path)) == 1, listing(tmp_path)
    rc, rest = interrupt_when_paused([video, "--model", tiny_model, "-o", out, "--steps", "1"], sig,
                                     while_stopped=stopped)
    assert rc == 130 and "Traceback" not in rest, rest
    assert rest.strip().splitlines()[-1] == "vssflow-run: interrupted; no output was written"
    assert listing(tmp_path) == before and out.read_bytes() == OLD and _sha(video) == sha


def test_successful_run_never_writes_the_input(accepted_videos, tiny_model, tmp_path):
    """Even when the output name is a hard link to the input, the input's bytes stay: the result
    is renamed over the name, never written into the existing file."""
    video = tmp_path / "clip.mp4"
    shutil.copy(accepted_videos["rotated"], video)
    sha = _sha(video)
    out = tmp_path / "clip_with_sound.mp4"
    out.hardlink_to(video)
    r = run_cli("vssflow.runtime.cli", video, "--model", tiny_model, "-o", out, "--steps", "1", "-q")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert _sha(video) == sha and listing(tmp_path) == ["clip.mp4", "clip_with_sound.mp4"]
    with av.open(str(out)) as c, av.open(str(video)) as src:
        assert [bytes(p) for p in c.demux(c.streams.video[0]) if p.size] == \
            [bytes(p) for p in src.demux(src.streams.video[0]) if p.size]
    with av.open(str(out)) as c:
        assert next(c.decode(video=0)).rotation == 90                   # still displayed upright
        assert c.streams.audio[0].codec_context.name == "aac"
