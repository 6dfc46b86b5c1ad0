"""Frames resized on the device (``kernels.frames``) against the host path of ``runtime/video.py``.

Exact comparisons: the device path must give the encoders the same float32 values bit for bit,
padding included, so a Session gives the same audio whichever path prepares its frames. The
Triton kernels run on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1`` before
triton is imported), the reference on CPU tensors as it is.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from tests.kernels.support import require_interpreted  # noqa: E402
from vssflow.benchmarks.media import make_video  # noqa: E402
from vssflow.kernels import dispatch  # noqa: E402
from vssflow.kernels import frames as KF  # noqa: E402
from vssflow.kernels import preprocess as P  # noqa: E402
from vssflow.runtime import video  # noqa: E402
from vssflow.runtime.contracts import STREAMS  # noqa: E402
from vssflow.runtime.errors import BackendError, VssflowInputError  # noqa: E402
from vssflow.runtime.session import Session  # noqa: E402


@pytest.fixture
def kernel_forced(monkeypatch):
    """Every ``preprocess`` call runs the Triton kernels (through the interpreter, on CPU)."""
    require_interpreted(P._rows_kernel, "vssflow.kernels.preprocess")
    calls = []

    def forced(device, requested=None):
        calls.append(device)
        return requested is not False
    monkeypatch.setattr(dispatch, "use_kernel", forced)
    return calls


def pairs(path, hop: float = 9.0):
    """(host VideoWindow, device FrameWindow) for each window of the video."""
    host = list(video.windows(path, hop=hop))
    device = list(video.windows(path, hop=hop, upload=KF.uploader("cpu")))
    assert [w.index for w in host] == [w.index for w in device]
    return list(zip(host, device))


def assert_same_inputs(host: video.VideoWindow, device: video.FrameWindow, **kw) -> None:
    assert (host.clip_count, host.synch_count) == (device.clip_count, device.synch_count)
    clip, segments = KF.window_inputs(device, **kw)
    want_segments = host.synch_segments()
    assert clip.shape == (100, 3, 224, 224) and segments.shape == (30, 16, 3, 224, 224), f"{segments.shape=}"
    assert clip.is_contiguous() and segments.is_contiguous()
    np.testing.assert_array_equal(clip.numpy(), host.clip_frames)
    np.testing.assert_array_equal(segments.numpy(), want_segments)


@pytest.mark.parametrize("hw", [(64, 96), (120, 90)])
def test_reference_gives_the_host_inputs(tmp_path, hw):
    """Two windows 9 s apart (frames shared between them and between streams), 12 s of video."""
    path = tmp_path / "clip.mp4"
    make_video(path, 12, 25, (hw[1], hw[0]))
    windows = pairs(path)
    assert len(windows) == 2
    for host, device in windows:
        assert_same_inputs(host, device, use_kernel=False)
    # Window 1 starts at 9 s: its first 25 Synchformer frames are window 0's last 25, the same uploads.
    w0, w1 = windows[0][1], windows[1][1]
    assert all(a is b for a, b in zip(w0.synch[225:], w1.synch[:25]))


def test_padding_short_and_rotated_clip(tmp_path):
    """4 s displayed rotated: 40 CLIP and 100 Synchformer frames, the rest padding (black, -1)."""
    path = tmp_path / "short.mp4"
    make_video(path, 4, 25, (96, 64), rotate=90)
    [(host, device)] = pairs(path)
    assert device.clip[0].shape == (96, 64, 3)                # upright
    assert host.clip_count < 100 and host.synch_count < 250
    assert_same_inputs(host, device, use_kernel=False)
    clip, segments = KF.window_inputs(device, use_kernel=False)
    assert float(segments[-1, -1].min()) == float(segments[-1, -1].max()) == -1.0


def test_frames_of_two_sizes_and_shared_frames():
    """A stream that changes size mid-window: each frame is resized by its own size, as on the host."""
    rng = np.random.default_rng(0)
    a = [torch.from_numpy(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)) for _ in range(3)]
    b = [torch.from_numpy(rng.integers(0, 256, (80, 40, 3), dtype=np.uint8)) for _ in range(2)]
    clip = (a[0], b[0], a[1], b[1], a[0])
    synch = (a[2], a[0], b[0]) * 5
    window = video.FrameWindow(0, clip, synch)
    got_clip, got_segments = KF.window_inputs(window, use_kernel=False)

    def host(frames, stream, length):
        out = np.zeros((length, 3, 224, 224), np.uint8)
        for i, f in enumerate(frames):
            x = f.numpy().transpose(2, 0, 1).astype(np.float32)
            out[i] = STREAMS[stream].resizer(*x.shape[1:])(x)
        return out
    want = video.VideoWindow(0, host(clip, "clip", 100), host(synch, "synch", 250), len(clip), len(synch))
    np.testing.assert_array_equal(got_clip.numpy(), want.clip_frames)
    np.testing.assert_array_equal(got_segments.numpy(), want.synch_segments())


def test_kernel_gives_the_host_inputs(tmp_path, kernel_forced):
    # One second (10 CLIP, 25 Synchformer frames, the rest padding): the Triton interpreter runs
    # each frame row as a program, so every second of video costs about ten seconds here.
    path = tmp_path / "clip.mp4"
    make_video(path, 1, 25, (96, 64))
    [(host, device)] = pairs(path)
    assert_same_inputs(host, device)
    assert kernel_forced, "the kernel path was not taken"


def test_bad_frames_are_refused():
    with pytest.raises(ValueError, match="uint8 RGB"):
        KF.window_inputs(video.FrameWindow(0, (torch.zeros(8, 8, 4, dtype=torch.uint8),), ()))


# --- through the Session ---------------------------------------------------------------------

def test_session_device_preprocessing_gives_the_same_audio(tiny_model, clip12):
    host = Session(tiny_model, backend="torch", device="cpu", preprocess="host")
    device = Session(tiny_model, backend="torch", device="cpu", preprocess="device")
    assert host.frames_device is None and device.frames_device == "cpu"
    assert "frames on cpu" in device.describe()
    a = host.generate(clip12, steps=2, keep_intermediates=True)
    b = device.generate(clip12, steps=2, keep_intermediates=True)
    assert a.info.n_windows == 2 and "preprocess" in b.timings and "preprocess" not in a.timings
    for name in ("clip_features", "synch_features", "final_latent"):
        np.testing.assert_array_equal(a.intermediates[name], b.intermediates[name], err_msg=name)
    np.testing.assert_array_equal(a.audio, b.audio)


def test_session_with_the_kernel_gives_the_same_audio(tiny_model, tmp_path, kernel_forced):
    clip = tmp_path / "clip1.mp4"                  # one second: see test_kernel_gives_the_host_inputs
    make_video(clip, 1, 25, (96, 64))
    a = Session(tiny_model, backend="torch", device="cpu", preprocess="host").generate(clip, steps=2)
    b = Session(tiny_model, backend="torch", device="cpu", preprocess="device").generate(clip, steps=2)
    assert kernel_forced
    np.testing.assert_array_equal(a.audio, b.audio)


def test_session_preprocess_choices(tiny_model):
    assert Session(tiny_model, backend="torch", device="cpu").frames_device is None    # auto: GPU only
    assert Session(tiny_model, backend="ort").frames_device is None
    with pytest.raises(BackendError, match="takes frames from the host"):
        Session(tiny_model, backend="ort", preprocess="device")
    with pytest.raises(VssflowInputError, match="preprocess must be one of"):
        Session(tiny_model, backend="ort", preprocess="gpu")


@pytest.mark.gpu
def test_cuda_kernels_give_the_host_inputs(tmp_path):
    """On a GPU: the compiled kernels (chosen automatically), 720p and portrait, bit for bit."""
    for i, size in enumerate([(1280, 720), (360, 640)]):
        path = tmp_path / f"clip{i}.mp4"
        make_video(path, 3, 25, size)
        host = next(video.windows(path))
        device = next(video.windows(path, upload=KF.uploader("cuda")))
        clip, segments = KF.window_inputs(device)
        assert clip.is_cuda
        np.testing.assert_array_equal(clip.cpu().numpy(), host.clip_frames)
        np.testing.assert_array_equal(segments.cpu().numpy(), host.synch_segments())
