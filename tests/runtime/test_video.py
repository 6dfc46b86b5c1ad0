"""Video windows against the authors' frame rules, Pillow and torch resizes, and bad files.

Expected frame indices are computed here from first principles (exact rationals, the fps
filter's closed form) and read back from the bar code every synthetic frame carries.
"""

from __future__ import annotations

import io
import os
from fractions import Fraction

import av
import numpy as np
import pytest

from vssflow.benchmarks.media import draw_frame, make_video, make_wav, read_index
from vssflow.runtime import resize, video
from vssflow.runtime.errors import VideoError

SIZE = (128, 96)                     # (width, height) of most test videos
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)[:, None, None]
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)[:, None, None]
RATES = {"24": 24, "25": 25, "29.97": 29.97, "30": 30, "60": 60, "vfr": 24}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """One 10.5 s video per frame rate (two windows each), written once, with its windows."""
    root = tmp_path_factory.mktemp("video")
    out = {}
    for name, fps in RATES.items():
        path = root / f"{name.replace('.', '_')}.mp4"
        make_video(path, 10.5, fps, SIZE, vfr=name == "vfr")
        out[name] = (path, list(video.windows(path)))
    return out


def decoded(path):
    """Every decoded frame (RGB) with its pts and time base, straight from PyAV."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [(f.to_ndarray(format="rgb24"), f.pts, f.duration)
                  for f in container.decode(stream)]
        return frames, stream.time_base, stream.average_rate


def expected_clip(n_frames: int, rate: Fraction, window: int) -> list[int]:
    """The authors' rule in exact arithmetic: round(j * fps / 10), ties to even; -1 past the end."""
    out = []
    for i in range(100):
        index = round(Fraction(100 * window + i) * rate / 10)
        out.append(index if index < n_frames else -1)
    return out


def expected_synch(pts: list[int], time_base: Fraction, eof_pts: int) -> list[int]:
    """Closed form of FFmpeg's fps=25 (round=near): tick t in [tick(first), tick(eof)) shows
    the last frame whose tick is <= t."""
    def tick(p):                                           # half away from zero (p >= 0 here)
        return int(Fraction(p) * time_base * 25 + Fraction(1, 2))
    ticks = [tick(p) for p in pts]
    return [max(j for j, q in enumerate(ticks) if q <= t) for t in range(ticks[0], tick(eof_pts))]


def clip_indices(window) -> list[int]:
    return [read_index(f.transpose(1, 2, 0), SIZE) for f in window.clip_frames]


def synch_indices(window) -> list[int]:
    return [read_index(f.transpose(1, 2, 0)) for f in window.synch_frames]


# --- frame picking --------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(RATES))
def test_clip_frames_follow_the_authors_rule(clips, name):
    path, wins = clips[name]
    frames, _, rate = decoded(path)
    assert len(wins) == 2
    for k, win in enumerate(wins):
        expected = expected_clip(len(frames), rate, k)
        assert clip_indices(win) == expected
        assert win.clip_count == sum(i >= 0 for i in expected)


@pytest.mark.parametrize("name", list(RATES))
def test_synch_frames_follow_the_fps_filter(clips, name):
    path, wins = clips[name]
    frames, time_base, _ = decoded(path)
    pts = [p for _, p, _ in frames]
    expected = expected_synch(pts, time_base, eof_pts=pts[-1])     # torchaudio on FFmpeg < 7
    got = synch_indices(wins[0]) + synch_indices(wins[1])
    assert got == expected + [-1] * (500 - len(expected))
    assert wins[0].synch_count + wins[1].synch_count == len(expected)


def test_fps_filter_matches_ffmpeg(clips):
    """The state machine against FFmpeg's own fps filter (this FFmpeg ends at pts + duration)."""
    path, _ = clips["vfr"]
    frames, time_base, _ = decoded(path)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        graph = av.filter.Graph()
        source, fps, sink = graph.add_buffer(template=stream), graph.add("fps", "25"), \
            graph.add("buffersink")
        source.link_to(fps)
        fps.link_to(sink)
        graph.configure()
        ffmpeg_picks = []

        def drain():
            while True:
                try:
                    ffmpeg_picks.append(read_index(graph.vpull().to_ndarray(format="rgb24")))
                except (av.BlockingIOError, av.EOFError):
                    return
        for frame in container.decode(stream):
            graph.vpush(frame)
            drain()
        graph.vpush(None)
        drain()
    ours = video.FpsFilter(time_base)
    picks = []
    for j, (_, pts, _) in enumerate(frames):
        picks += ours.push(pts, j)
    picks += ours.close(frames[-1][1] + frames[-1][2])
    assert picks == ffmpeg_picks
    assert len(picks) > 250


def test_fps_filter_rounding():
    fps = video.FpsFilter(Fraction(1, 1000))
    # 20 ms is half a tick: rounds up (away from zero), so frame 1 takes tick 1.
    out = [fps.push(p, j) for j, p in enumerate([0, 20, 100, 119])]
    out.append(fps.close(200))
    # ticks: 0, 1 (20 ms), 3 (100 ms), 3 (119 ms -> 2.975), eof 5
    assert out == [[], [0], [1, 1], [], [3, 3]]


def test_ten_seconds_at_25_fps_end_one_frame_short(tmp_path):
    """torchaudio (FFmpeg < 7) ends the resampling at the last frame's timestamp: 249 frames."""
    path = tmp_path / "ten.mp4"
    make_video(path, 10, 25, (64, 48))
    (win,) = video.windows(path)
    assert (win.clip_count, win.synch_count) == (100, 249)
    assert np.all(win.synch_frames[249] == -1.0)
    (win,) = video.windows(path, synch_eof="end")
    assert win.synch_count == 250


# --- resizing -------------------------------------------------------------------------------

def _frames_for_resize():
    rng = np.random.default_rng(0)
    smooth = np.clip(np.cumsum(rng.integers(-12, 13, (400, 500, 3)), 1) + 128, 0, 255)
    yield smooth.astype(np.uint8)[:123, :161]                   # odd size, upscale
    yield rng.integers(0, 256, (300, 401, 3), dtype=np.uint8)   # noise, mixed
    yield rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8)  # 1080p downscale
    yield np.ascontiguousarray(smooth.astype(np.uint8).transpose(1, 0, 2))   # portrait
    yield np.ascontiguousarray(smooth.astype(np.uint8)[:300, :100])   # taller than 224, narrower


def test_clip_resize_equals_pillow():
    PIL = pytest.importorskip("PIL")
    from PIL import Image
    for frame in _frames_for_resize():
        h, w = frame.shape[:2]
        ours = resize.clip_resizer(h, w)(frame).transpose(1, 2, 0)
        # Pillow <= 12 (the authors') resamples width, rounds to uint8, then height. One axis
        # per call pins that order on any Pillow: Pillow 13 sometimes goes height first, which
        # moves a frame by up to 2 levels (e.g. 100x300 -> 224x224).
        two_pass = Image.fromarray(frame).resize((224, h), Image.BICUBIC).resize(
            (224, 224), Image.BICUBIC)
        np.testing.assert_array_equal(ours, np.asarray(two_pass))
        if int(PIL.__version__.split(".")[0]) < 13:
            one_call = Image.fromarray(frame).resize((224, 224), Image.BICUBIC)
            np.testing.assert_array_equal(ours, np.asarray(one_call))


def test_synch_resize_equals_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    for frame in _frames_for_resize():
        h, w = frame.shape[:2]
        # torchvision v2.Resize(224): short side 224, long side int(224 * long / short)
        if w <= h:
            size = (int(224 * h / w), 224)
        else:
            size = (224, int(224 * w / h))
        x = torch.from_numpy(frame).permute(2, 0, 1)[None].contiguous()
        full = F.interpolate(x, size=size, mode="bicubic", antialias=True)[0]   # uint8 path
        top, left = int(round((size[0] - 224) / 2.0)), int(round((size[1] - 224) / 2.0))
        expected = full[:, top:top + 224, left:left + 224].numpy()
        ours = resize.synch_resizer(h, w)(frame)
        np.testing.assert_array_equal(ours, expected)


def test_window_frames_match_the_oracles(clips):
    """End to end, normalised: CLIP within one uint8 level of Pillow, Synchformer within 1e-2
    of torch's antialiased bicubic + centre crop."""
    Image = pytest.importorskip("PIL.Image")
    torch = pytest.importorskip("torch")
    path, wins = clips["30"]
    frames, _, _ = decoded(path)
    win = wins[0]
    for i in (0, 37, 99):                                        # CLIP frame i = decoded 3i
        pil = np.asarray(Image.fromarray(frames[3 * i][0]).resize((224, 224), Image.BICUBIC))
        expected = (pil.transpose(2, 0, 1).astype(np.float32) / 255 - CLIP_MEAN) / CLIP_STD
        assert np.abs(win.clip_frames[i] - expected).max() <= 1.01 / 255 / CLIP_STD.min()
    x = torch.from_numpy(np.stack([f for f, _, _ in frames[:6]])).permute(0, 3, 1, 2)
    full = torch.nn.functional.interpolate(x.contiguous(), size=(224, 298), mode="bicubic",
                                           antialias=True)
    expected = (full[..., 37:261].numpy() / 255.0 - 0.5) / 0.5
    picked = [0, 1, 2, 4, 5]                           # 30 -> 25 fps keeps 5 frames of 6
    err = np.abs(win.synch_frames[:5] - expected[picked]).max()
    assert err <= 1e-2 and np.abs(expected).max() > 0.5


# --- lengths, padding, layout ---------------------------------------------------------------

def test_short_clip_is_padded(tmp_path):
    path = tmp_path / "short.mp4"
    make_video(path, 3, 30, (64, 48))                  # 90 frames, last at 89/30 s
    (win,) = video.windows(path)
    assert win.clip_count == 30                        # round(i * 3) < 90  <=>  i < 30
    assert win.synch_count == 74                       # round(25 * 89/30) = 74 ticks
    black = (0.0 - CLIP_MEAN) / CLIP_STD
    assert np.allclose(win.clip_frames[30:], black[None], atol=1e-6)
    assert np.all(win.synch_frames[74:] == -1.0)       # zeros padded before normalising
    assert win.synch_frames[:74].max() > 0.5


def test_segments_are_views_of_the_frames(clips):
    win = clips["25"][1][0]
    frames = win.synch_frames
    seg = video.segments(frames)
    assert seg.shape == (30, 16, 3, 224, 224)
    for s in (0, 7, 29):
        np.testing.assert_array_equal(seg[s], frames[8 * s:8 * s + 16])
    assert np.shares_memory(seg, frames)
    np.testing.assert_array_equal(win.synch_segments()[29], frames[232:248])


def test_window_shapes_and_types(clips):
    win = clips["24"][1][1]
    assert win.index == 1 and win.start == 10.0
    assert win.clip_frames.shape == (100, 3, 224, 224) and win.clip_frames.dtype == np.float32
    assert win.synch_frames.shape == (250, 3, 224, 224) and win.synch_frames.dtype == np.float32
    assert win.clip_pixels.dtype == win.synch_pixels.dtype == np.uint8
    # torchvision's arithmetic: ToTensor divides by 255, v2.ToDtype multiplies by 1/255
    x = win.clip_pixels[:2].astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(win.clip_frames[:2], (x - CLIP_MEAN) / CLIP_STD)


def test_probe(tmp_path):
    path = tmp_path / "ntsc.mp4"
    make_video(path, 2, 29.97, (96, 64), audio=True)
    info = video.probe(path)
    assert info.fps == 30000 / 1001
    assert info.n_frames == 60 and info.duration == pytest.approx(60 * 1001 / 30000)
    assert (info.width, info.height, info.rotation, info.has_audio) == (96, 64, 0, True)
    assert video.count_windows(info.duration, 9.0) == 1
    mkv = tmp_path / "no_count.mkv"                    # Matroska has no frame count: packets
    make_video(mkv, 1, 25, (64, 48))
    assert video.probe(mkv).n_frames == 25


def test_rotated_video_is_turned_upright(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "rot.mp4"
    make_video(path, 1, 10, (160, 120), rotate=90)     # displayed 90 degrees counter-clockwise
    info = video.probe(path)
    assert (info.width, info.height, info.rotation) == (120, 160, 90)
    (raw, _, _), *_ = decoded(path)[0]
    upright = np.ascontiguousarray(np.rot90(raw))      # [160, 120, 3]: top edge now on the left
    x = torch.from_numpy(upright).permute(2, 0, 1)[None].contiguous()
    full = torch.nn.functional.interpolate(x, size=(298, 224), mode="bicubic", antialias=True)
    expected = (full[0, :, 37:261].numpy() / 255.0 - 0.5) / 0.5
    (win,) = video.windows(path)
    assert np.abs(win.synch_frames[0] - expected).max() <= 1e-6
    # the red square drawn at the top left of the coded picture is now at the bottom left
    red = (win.clip_frames[0, 0] > 1.0) & (win.clip_frames[0, 2] < -0.5)     # [224, 224]
    assert red[170:, :45].any() and not red[:170].any() and not red[:, 45:].any()


def test_odd_size_and_file_object(tmp_path):
    path = tmp_path / "odd.avi"
    make_video(path, 2, 15, (161, 121), codec="mpeg4")
    info = video.probe(path)
    assert (info.width, info.height) == (161, 121)
    from_path = list(video.windows(path))
    with open(path, "rb") as f:
        from_file = list(video.windows(io.BytesIO(f.read())))
    assert [read_index(f.transpose(1, 2, 0), (161, 121)) for f in from_path[0].clip_frames[:20]] \
        == [round(i * 1.5) for i in range(20)]
    np.testing.assert_array_equal(from_path[0].synch_frames, from_file[0].synch_frames)


# --- errors ---------------------------------------------------------------------------------

def test_bad_files_raise_video_error(tmp_path):
    good = tmp_path / "good.mp4"
    make_video(good, 2, 25, (64, 48))
    data = good.read_bytes()
    cases = {
        "empty.mp4": (b"", "not a readable video"),
        "random.mp4": (np.random.default_rng(0).bytes(4096), "not a readable video"),
        "truncated.mp4": (data[:len(data) // 2], "not a readable video"),    # index at the end
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
    make_wav(tmp_path / "speech.wav", 1.0, 16000, 1)
    cases["speech.wav"] = (None, "no video stream")
    make_video(tmp_path / "zero.mkv", 0, 25, (64, 48))
    cases["zero.mkv"] = (None, "before any video frame")
    make_video(tmp_path / "zero_with_audio.mkv", 0, 25, (64, 48), audio=True)
    cases["zero_with_audio.mkv"] = (None, "video stream has no frames")
    cases["missing.mp4"] = (None, "no such file")
    for name, (_, message) in cases.items():
        for call in (video.probe, lambda p: list(video.windows(p))):
            with pytest.raises(VideoError, match=message) as err:
                call(tmp_path / name)
            assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)
            assert err.value.exit_code == VideoError.exit_code


def test_truncated_file_with_index_first(tmp_path):
    path = tmp_path / "faststart.mp4"
    with av.open(str(path), "w", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(100):
            frame = av.VideoFrame.from_ndarray(draw_frame(i, 64, 48), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(path.read_bytes()[:int(os.path.getsize(path) * 0.6)])
    assert video.probe(cut).n_frames == 100            # the index still says 100
    with pytest.raises(VideoError, match="truncated"):
        list(video.windows(cut))


def test_overlapping_windows_share_frames(clips):
    """hop=9: window 1 starts at 9 s and holds what the non-overlapping picking gives from 9 s on."""
    path, wins = clips["25"]
    over = list(video.windows(path, hop=9.0))
    assert [w.index for w in over] == [0, 1] and over[1].start == 9.0
    assert clip_indices(over[0]) == clip_indices(wins[0])
    whole_clip = clip_indices(wins[0]) + clip_indices(wins[1])
    whole_synch = synch_indices(wins[0]) + synch_indices(wins[1])
    assert clip_indices(over[1])[:over[1].clip_count] == whole_clip[90:90 + over[1].clip_count]
    assert synch_indices(over[1])[:over[1].synch_count] == whole_synch[225:225 + over[1].synch_count]
    with pytest.raises(ValueError, match="hop"):
        next(video.windows(path, hop=0.3))


@pytest.mark.parametrize("frames, count", [(238, 1), (250, 1), (251, 2), (475, 2), (476, 3), (500, 3)])
def test_a_window_follows_only_where_the_video_runs_past_the_last(tmp_path, frames, count):
    """hop 9: window k >= 1 exists iff the decoded end > (k - 1) * 9 + 10 s. At 25 fps: 9.52 s and
    10.0 s are the authors' one window (their frames after 9 s used to open a second one); 10.04 s,
    one frame more, two; 19.0 s two, 19.04 s three. At 20 s the first two are handed over while
    decoding goes on. Resized frames and device frames (`upload`) alike."""
    seconds = frames / 25
    path = tmp_path / "clip.mp4"
    make_video(path, seconds, 25, (64, 48))
    for upload in (None, lambda rgb: rgb):
        wins = list(video.windows(path, hop=9.0, upload=upload))
        assert [w.index for w in wins] == list(range(count)), (seconds, upload)
        assert [w.last for w in wins] == [False] * (count - 1) + [True]
        assert wins[-1].end == pytest.approx(seconds)
    assert video.count_windows(seconds, 9.0) == count           # the container's side of the same rule
