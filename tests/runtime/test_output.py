"""Output formats: every row of `FORMATS` written in-process and read back with FFmpeg (video
packets, audio codec, rate, length and timing), the default output name, and the refusals."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from vssflow.benchmarks.media import make_video
from vssflow.runtime.errors import OutputError, VssflowInputError
from vssflow.runtime.output import (FORMATS, OUTPUT_FORMATS, SOUND_EXTENSIONS, VIDEO_EXTENSIONS, Format,
                                    plan_output, write_output)

SR = 16000                      # the model's rate
N = 2 * SR + 123                # samples written: not a whole number of any codec's frames
BURST = SR // 2                 # a 1 kHz burst peaks here (0.5 s): where the sound is, in time
SIZE = (64, 48)


def sound(n: int = N) -> np.ndarray:
    """A quiet 440 Hz tone with a loud 1 kHz burst of 50 ms centred on sample ``BURST``."""
    t = np.arange(n) / SR
    x = 0.1 * np.sin(2 * np.pi * 440 * t)
    burst = np.arange(BURST - 400, BURST + 400)
    x[burst] += 0.7 * np.hanning(800) * np.cos(2 * np.pi * 1000 * (burst - BURST) / SR)
    return x.astype(np.float32)


def burst_at(x: np.ndarray) -> float:
    """Sample on which the burst's energy is centred (only the burst passes 0.35)."""
    loud = np.flatnonzero(np.abs(x) > 0.35)
    energy = x[loud[0]:loud[-1] + 1].astype(np.float64) ** 2
    return loud[0] + float(np.sum(np.arange(len(energy)) * energy) / np.sum(energy))


def chunks(x: np.ndarray, size: int = 5000):
    """In pieces, as the model streams."""
    for a in range(0, len(x), size):
        yield x[a:a + size]


# Inputs people bring: file name -> (encoder, frame size, more make_video arguments). Two seconds
# each. The H.264 ones have B-frames, as most do (in Matroska their first packets have no dts).
INPUTS = {
    "vp9.webm": ("libvpx-vp9", SIZE, {}),
    "vp8.webm": ("libvpx", SIZE, {}),
    "av1.webm": ("libsvtav1", (64, 64), {}),          # SVT-AV1 wants sizes of at least 64
    "clip.avi": ("mpeg4", SIZE, {}),
    "clip.ts": ("libx264", SIZE, {"bframes": 2}),
    "clip.mkv": ("libx264", SIZE, {"bframes": 2}),
    "clip.mp4": ("libx264", SIZE, {"bframes": 2}),
    "clip.mov": ("libx264", SIZE, {}),
}
# For each video row, an input in the same container, so its packets come back byte for byte.
ROW_INPUT = {".mp4": "clip.mp4", ".m4v": "clip.mp4", ".mov": "clip.mov", ".mkv": "clip.mkv",
             ".webm": "vp9.webm", ".avi": "clip.avi", ".ts": "clip.ts"}


def _needs(encoder: str) -> None:
    if encoder not in av.codecs_available:
        pytest.skip(f"this PyAV's FFmpeg has no {encoder} encoder")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    for name, (encoder, size, more) in INPUTS.items():
        if encoder in av.codecs_available:
            make_video(folder / name, 2, 25, size, encoder, **more)
    return folder


def _input(inputs, name):
    _needs(INPUTS[name][0])
    return inputs / name


def video_packets(path) -> list[bytes]:
    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(c.streams.video[0]) if p.size]


def priming(fmt: Format) -> int:
    """Encoder priming samples the decoder gives back: MPEG-TS has no way to mark AAC's 1024
    (they carry earlier timestamps instead, so the sound stays in time with the video)."""
    return 1024 if fmt.audio_codec == "aac" and fmt.muxer == "mpegts" else 0


def padding(fmt: Format) -> range:
    """Samples decoded after the written ones. PCM, FLAC, Opus (end trimming in Ogg and WebM) and
    MP3 (the LAME header FFmpeg writes) end exactly; AAC codes whole frames of 1024 samples, and
    FFmpeg decodes the last one's padding (MP4's edit list marks it; FFmpeg applies only its start)."""
    return range(0, 1024) if fmt.audio_codec == "aac" else range(0, 1)


def decode_sound(path, fmt: Format) -> tuple[np.ndarray, float, float]:
    """The first audio stream decoded to float samples, the time of its first sample, and that of
    the first video frame (0 without video); checks the row's codec and rate on the way."""
    to_float = av.AudioResampler(format="flt", layout="mono")          # same rate: exact
    with av.open(str(path)) as c:
        video_start = next(c.decode(video=0)).time if c.streams.video else 0.0
    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        assert stream.codec_context.codec.canonical_name == av.Codec(fmt.audio_codec, "w").canonical_name
        assert stream.sample_rate == (fmt.sample_rate or SR)
        first, pieces = None, []
        for frame in c.decode(stream):
            first = frame.time if first is None else first
            pieces += [f.to_ndarray()[0] for f in to_float.resample(frame)]
        pieces += [f.to_ndarray()[0] for f in to_float.resample(None)]
    return np.concatenate(pieces), first, video_start


def assert_in_time(decoded: np.ndarray, first: float, video_start: float, rate: int) -> None:
    """The burst plays 0.5 s after the first video frame, by the timestamps a player goes by
    (within 2 ms: Matroska and WebM keep whole milliseconds)."""
    assert abs(first + burst_at(decoded) / rate - video_start - BURST / SR) < 2e-3, (first, video_start)


def assert_sound(path, fmt: Format, written: np.ndarray) -> None:
    """The row's codec and rate; the written length (plus what `priming` and `padding` allow);
    the burst in time with the picture or, in a sound-only file, 0.5 s from its first sample
    (nothing prepended; within 0.5 ms); the written samples back (lossless) or their loudness."""
    rate = fmt.sample_rate or SR
    decoded, first, video_start = decode_sound(path, fmt)
    expected, lead = len(written) * rate // SR, priming(fmt)
    assert len(decoded) - expected - lead in padding(fmt), (len(decoded), expected, lead)
    if fmt.has_video:
        assert_in_time(decoded, first, video_start, rate)
    else:                                                   # (MP3's timestamps count LAME's delay)
        assert abs(burst_at(decoded) / rate - BURST / SR) < 5e-4
    body = decoded[lead:lead + expected:rate // SR]                     # back at 16 kHz, roughly
    if av.Codec(fmt.audio_codec, "w").lossless:
        assert np.abs(body - written).max() <= 1 / 32768 + 1e-7
    else:                                                                # lossy: the same loudness
        rms = np.sqrt(np.mean(body ** 2) / np.mean(written ** 2))
        assert 0.85 < rms < 1.15, rms


# --- every row, written -----------------------------------------------------------------------

@pytest.mark.parametrize("ext", VIDEO_EXTENSIONS)
def test_video_rows_copy_the_packets_and_add_the_sound(ext, inputs, tmp_path):
    video = _input(inputs, ROW_INPUT[ext])
    plan = plan_output(video, tmp_path / f"out{ext}")
    x = sound()
    assert write_output(plan, chunks(x), SR) == N
    assert video_packets(plan.path) == video_packets(video)                  # bit-identical
    assert_sound(plan.path, FORMATS[ext], x)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"out{ext}"]      # no temporary left


@pytest.mark.parametrize("output", ["default name", *SOUND_EXTENSIONS])
@pytest.mark.parametrize("name", ["vp9.webm", "vp8.webm", "av1.webm", "clip.avi", "clip.ts", "clip.mkv"])
def test_each_input_with_the_default_name_and_each_sound_format(name, output, inputs, tmp_path):
    video = _input(inputs, name)
    if output == "default name":
        plan = plan_output(video, folder=tmp_path)
        assert plan.path == tmp_path / f"{video.stem}_with_sound{video.suffix}" and plan.note is None
    else:
        plan = plan_output(video, tmp_path / f"out{output}")
        assert plan.video is None                                   # the sound alone
    x = sound()
    write_output(plan, chunks(x), SR)
    if plan.video is not None:
        assert video_packets(plan.path) == video_packets(video)
    else:
        with av.open(str(plan.path)) as c:
            assert not c.streams.video
    assert_sound(plan.path, plan.format, x)


@pytest.mark.parametrize("name", ["clip.mp4", "vp9.webm", "clip.ts", "clip.mkv"])
def test_sound_starts_with_the_first_frame_of_a_late_starting_video(name, tmp_path):
    """A stream whose first frame is at 5 s (a cut from a broadcast, say): the sound starts there.
    (In MP4 the AAC priming then stays, in the 64 ms before the first frame: FFmpeg's muxer
    writes the delay as an empty edit and skips priming only at time 0.)"""
    encoder, size, more = INPUTS[name]
    _needs(encoder)
    video = tmp_path / name
    make_video(video, 1, 25, size, encoder, start=5.0, **more)
    plan = plan_output(video, folder=tmp_path)
    write_output(plan, chunks(sound(SR)), SR)
    decoded, first, video_start = decode_sound(plan.path, plan.format)
    assert video_start == 5.0
    assert_in_time(decoded, first, video_start, plan.format.sample_rate or SR)


@pytest.mark.parametrize("ext", [".mkv", ".ts"])
def test_long_output_is_interleaved_by_time(ext, tmp_path):
    """The sound is encoded first and the video copied after; in the file, sound and picture
    still alternate (a player streaming a 30 s file never reads far ahead in one of them)."""
    video = tmp_path / "long.mkv"
    make_video(video, 30, 25, SIZE)
    plan = plan_output(video, tmp_path / f"out{ext}")
    write_output(plan, chunks(np.zeros(30 * SR, np.float32), 20480), SR)
    latest, gap = {}, 0.0
    with av.open(str(plan.path)) as c:
        for packet in c.demux():
            if packet.size and packet.dts is not None:
                latest[packet.stream.type] = float(packet.dts * packet.time_base)
                gap = max(gap, abs(latest.get("audio", 0.0) - latest.get("video", 0.0)))
    assert gap < 0.5, gap


def test_table_agrees_with_ffmpeg(tmp_path):
    """Each video codec a row lists is muxed there by this FFmpeg, copied from a small clip (or,
    for a codec with no encoder here, accepted by avformat_query_codec)."""
    sources = {  # codec: (encoder, container of the clip, size, pixel format)
        "h264": ("libx264", ".mkv", SIZE, None), "hevc": ("libx265", ".mkv", SIZE, None),
        "av1": ("libsvtav1", ".mkv", (64, 64), None), "vp8": ("libvpx", ".mkv", SIZE, None),
        "vp9": ("libvpx-vp9", ".mkv", SIZE, None), "mpeg4": ("mpeg4", ".mkv", SIZE, None),
        "mpeg2video": ("mpeg2video", ".mkv", SIZE, None), "mjpeg": ("mjpeg", ".mkv", SIZE, None),
        "prores": ("prores", ".mkv", SIZE, "yuv422p10le"), "ffv1": ("ffv1", ".mkv", SIZE, None),
        "msmpeg4v2": ("msmpeg4v2", ".avi", SIZE, None), "msmpeg4v3": ("msmpeg4", ".avi", SIZE, None),
    }
    clips = {}
    for codec, (encoder, container, size, pix_fmt) in sources.items():
        if encoder in av.codecs_available:
            clips[codec] = tmp_path / f"{codec}{container}"
            make_video(clips[codec], 0.2, 25, size, encoder, pix_fmt=pix_fmt)
    x = np.zeros(SR // 5, np.float32)
    checked = []
    for ext in VIDEO_EXTENSIONS:
        for codec in sorted(FORMATS[ext].video_codecs):
            if codec in clips:
                plan = plan_output(clips[codec], tmp_path / f"{codec}_out{ext}")
                write_output(plan, chunks(x), SR)
                with av.open(str(plan.path)) as c:
                    assert c.streams.video[0].codec_context.codec.canonical_name == codec
                    assert len([p for p in c.demux(c.streams.video[0]) if p.size]) == 5, (codec, ext)
                checked.append((ext, codec))
            else:
                with av.open(str(tmp_path / f"query{ext}"), "w", format=FORMATS[ext].muxer) as c:
                    c.add_mux_stream(codec)                   # ValueError if FFmpeg says no
    assert len(checked) >= 35, checked                        # most rows muxed for real, not just asked


# --- names, and what is refused before any model runs --------------------------------------------

def test_default_name_falls_back_to_mkv_in_one_line(inputs, tmp_path):
    """H.264 in a file named .webm (WebM cannot hold it), and a file without an extension."""
    video = tmp_path / "clip.webm"
    shutil.copy(_input(inputs, "clip.mkv"), video)
    plan = plan_output(video)
    assert plan.path == tmp_path / "clip_with_sound.mkv" and plan.format is FORMATS[".mkv"]
    assert plan.note == "clip.webm holds h264 video, which a .webm file cannot: writing clip_with_sound.mkv"
    bare = tmp_path / "clip"
    shutil.copy(video, bare)
    plan = plan_output(bare)
    assert plan.path == tmp_path / "clip_with_sound.mkv" and "\n" not in plan.note
    for other in ("clip.flv", "clip.ogg"):       # not a video row here; .ogg is a sound-only row
        shutil.copy(video, tmp_path / other)
        assert plan_output(tmp_path / other).path == tmp_path / "clip_with_sound.mkv"


@pytest.mark.parametrize("name,ext,codec,instead", [
    ("clip.mp4", ".webm", "h264", "use .mkv or .mp4"),
    ("vp8.webm", ".mp4", "vp8", "use .mkv or .webm"),
    ("clip.mkv", ".avi", "h264", "use .mkv or .mp4"),
    ("vp9.webm", ".mov", "vp9", "use .mkv or .mp4"),
])
def test_a_codec_the_container_cannot_hold_is_refused(inputs, tmp_path, name, ext, codec, instead):
    out = tmp_path / f"out{ext}"
    with pytest.raises(OutputError) as e:
        plan_output(_input(inputs, name), out)
    assert e.value.exit_code == 5
    assert str(e.value) == (f"{out}: {ext} cannot hold the input's {codec} video "
                            f"(it is copied, not re-encoded): {instead}")
    assert list(tmp_path.iterdir()) == []


def test_batch_format_reads_the_same_table(inputs, tmp_path):
    """`format` (the batch's --format, a click.Choice of OUTPUT_FORMATS) names a row of FORMATS;
    a video row that cannot hold the input's H.264 is refused, as with -o."""
    assert OUTPUT_FORMATS == tuple(ext[1:] for ext in FORMATS)
    video = _input(inputs, "clip.mkv")
    for name in OUTPUT_FORMATS:
        fmt = FORMATS[f".{name}"]
        if fmt.has_video and "h264" not in fmt.video_codecs:
            with pytest.raises(OutputError, match="cannot hold the input's h264 video"):
                plan_output(video, format=name, folder=tmp_path)
        else:
            plan = plan_output(video, format=name, folder=tmp_path)
            assert plan.path == tmp_path / f"clip_with_sound.{name}" and plan.format is fmt
    assert plan_output(video, format="WAV", folder=tmp_path).path.name == "clip_with_sound.wav"
    with pytest.raises(OutputError, match="unknown output type .xyz"):
        plan_output(video, format="xyz", folder=tmp_path)


def test_missing_folder_and_the_input_itself_are_refused(inputs, tmp_path):
    video = _input(inputs, "clip.mkv")
    with pytest.raises(OutputError, match="does not exist"):
        plan_output(video, tmp_path / "nowhere" / "out.wav")
    with pytest.raises(OutputError, match="is the input video"):
        plan_output(video, video)



def test_readme_lists_every_format():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert [ext for ext in FORMATS if f"`{ext}`" not in readme] == []


# --- the input's own sound -------------------------------------------------------------------------

def audio_packets(path, track: int) -> list[bytes]:
    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(c.streams.audio[track]) if p.size]


def sound_tracks(path) -> list[tuple[str, int, bool]]:
    """(codec, channels, marked default) of each sound track, in order."""
    with av.open(str(path)) as c:
        return [(s.codec_context.codec.canonical_name, s.channels, bool(s.disposition & av.stream.Disposition.default))
                for s in c.streams.audio]


@pytest.mark.parametrize("name,encoder,layout,ext", [
    ("clip.mp4", "aac", "mono", ".mp4"),
    ("clip.mov", "aac", "stereo", ".mov"),
    ("clip.mkv", "aac", "stereo", ".mkv"),
    ("clip.mkv", "libopus", "stereo", ".mp4"),          # MP4 holds Opus
    ("clip.mov", "pcm_s16le", "stereo", ".mkv"),
])
def test_the_inputs_own_sound_is_kept_after_the_generated_track(name, encoder, layout, ext, tmp_path):
    """A clip with its own sound: the output holds the generated track first (the default one)
    and the input's after it, its packets byte for byte; the plan's note says so."""
    _needs(encoder)
    video = tmp_path / name
    make_video(video, 2, 25, SIZE, audio=encoder, audio_layout=layout)
    plan = plan_output(video, tmp_path / f"out{ext}")
    codec = av.Codec(encoder, "w").canonical_name
    assert plan.copied_audio == (0,)
    assert plan.notes == (f"the input's own sound track ({codec}) kept in out{ext}, after the generated one",)
    x = sound()
    write_output(plan, chunks(x), SR)
    channels = 1 if layout == "mono" else 2
    assert sound_tracks(plan.path) == [(FORMATS[ext].audio_codec.removeprefix("lib"), 1, True), (codec, channels, False)]
    assert audio_packets(plan.path, 1) == audio_packets(video, 0)           # copied, not re-encoded
    assert video_packets(plan.path) == video_packets(video)
    assert_sound(plan.path, FORMATS[ext], x)                                 # ours, first, unchanged


def test_two_sound_tracks_are_both_kept_in_order(tmp_path):
    video, out = tmp_path / "two.mkv", tmp_path / "out.mkv"
    make_video(tmp_path / "a.mkv", 1, 25, SIZE, audio="aac", audio_layout="stereo")
    make_video(tmp_path / "b.mkv", 1, 25, SIZE, audio="pcm_s16le")
    with av.open(str(tmp_path / "a.mkv")) as a, av.open(str(tmp_path / "b.mkv")) as b, av.open(str(video), "w") as c:
        pairs = [(s, c.add_stream_from_template(s)) for s in (a.streams.video[0], a.streams.audio[0], b.streams.audio[0])]
        for s, copy in pairs:
            for packet in s.container.demux(s):
                if packet.size:
                    packet.stream = copy
                    c.mux(packet)
    plan = plan_output(video, out)
    assert plan.notes == ("the input's own 2 sound tracks (aac, pcm_s16le) kept in out.mkv, after the generated one",)
    write_output(plan, chunks(sound()), SR)
    assert [t[0] for t in sound_tracks(out)] == ["aac", "aac", "pcm_s16le"]
    assert audio_packets(out, 1) == audio_packets(video, 0) and audio_packets(out, 2) == audio_packets(video, 1)


@pytest.mark.parametrize("name,encoder,ext,why", [
    ("clip.mov", "pcm_s16le", ".mp4", ": a .mp4 file cannot hold pcm_s16le (it is copied, not re-encoded); "
                                      ".mkv or .mov can"),
    ("vp9.mp4", "aac", ".webm", ": a .webm file cannot hold aac (it is copied, not re-encoded); .mkv or .mp4 can"),
    ("clip.mkv", "flac", ".ts", ": a .ts file cannot hold flac (it is copied, not re-encoded); .mkv or .mp4 can"),
    ("clip.mp4", "aac", ".wav", ": a .wav file holds the generated sound only"),
])
def test_sound_a_container_cannot_hold_is_left_out_in_one_line(name, encoder, ext, why, tmp_path):
    """Where the output cannot hold the input's sound (FFmpeg's muxer refuses the codec, or the
    output is sound only), the result is still written, with the generated track alone, and
    one line says what was left out and why."""
    video = tmp_path / name
    make_video(video, 1, 25, SIZE, "libvpx-vp9" if name.startswith("vp9") else "libx264", audio=encoder)
    plan = plan_output(video, tmp_path / f"out{ext}")
    assert plan.copied_audio == ()
    assert plan.notes == (f"the input's own sound track ({encoder}) left out of out{ext}{why}",)
    write_output(plan, chunks(sound()), SR)
    assert len(sound_tracks(plan.path)) == 1


def test_drop_leaves_the_inputs_sound_out_and_says_so(tmp_path):
    video = tmp_path / "clip.mp4"
    make_video(video, 1, 25, SIZE, audio=True)
    plan = plan_output(video, tmp_path / "out.mp4", input_audio="drop")
    assert plan.notes == ("the input's own sound track (aac) left out of out.mp4 (--input-audio drop)",)
    write_output(plan, chunks(sound()), SR)
    assert sound_tracks(plan.path) == [("aac", 1, True)]
    with pytest.raises(VssflowInputError, match="input_audio must be one of keep, drop"):
        plan_output(video, tmp_path / "out.mp4", input_audio="mix")


def test_a_silent_input_gets_no_note(inputs, tmp_path):
    assert plan_output(_input(inputs, "clip.mp4"), tmp_path / "out.mp4").notes == ()
    assert plan_output(_input(inputs, "clip.mp4"), tmp_path / "out.wav").notes == ()


def test_audio_table_agrees_with_ffmpeg(tmp_path):
    """Each audio codec a video row lists is copied there by this FFmpeg from a small clip (or,
    with no encoder here, accepted by avformat_query_codec); those it leaves out are refused by
    FFmpeg's muxer or not read back as written."""
    encoders = {"aac": "aac", "mp3": "libmp3lame", "mp2": "mp2", "opus": "libopus", "flac": "flac", "alac": "alac",
                "ac3": "ac3", "eac3": "eac3", "pcm_s16le": "pcm_s16le", "pcm_s16be": "pcm_s16be",
                "pcm_s24le": "pcm_s24le", "pcm_f32le": "pcm_f32le"}
    encoders = {c: e for c, e in encoders.items() if e in av.codecs_available}

    def clip(codec: str, ext: str) -> Path:                 # a video codec the row holds
        video = "libvpx-vp9" if ext == ".webm" else "mpeg4"
        path = tmp_path / f"{codec}-{video}.mkv"
        if not path.exists():
            make_video(path, 0.2, 25, SIZE, video, audio=encoders[codec], audio_layout="stereo")
        return path

    checked, refused = [], []
    for ext in VIDEO_EXTENSIONS:
        fmt = FORMATS[ext]
        for codec in sorted(fmt.audio_codecs):
            if codec in encoders:
                plan = plan_output(clip(codec, ext), tmp_path / f"{codec}_out{ext}")
                write_output(plan, chunks(np.zeros(SR // 5, np.float32)), SR)
                assert sound_tracks(plan.path)[1][0] == codec, (ext, codec)
                got, sent = audio_packets(plan.path, 1), audio_packets(clip(codec, ext), 0)
                if codec.startswith("pcm_"):        # demuxers cut PCM into packets of their own size
                    got, sent = b"".join(got), b"".join(sent)
                if codec == "aac" and fmt.muxer == "mpegts":      # MPEG-TS frames AAC in ADTS headers
                    got = [p[7 if p[1] & 1 else 9:] for p in got]
                assert got == sent, (ext, codec)
                checked.append((ext, codec))
            else:
                with av.open(str(tmp_path / f"query{ext}"), "w", format=fmt.muxer) as c:
                    c.add_mux_stream(codec)                   # ValueError if FFmpeg says no
        for codec in sorted(set(encoders) - fmt.audio_codecs):
            out = tmp_path / f"refused_{codec}{ext}"
            try:
                with av.open(str(clip(codec, ext))) as src, av.open(str(out), "w", format=fmt.muxer) as c:
                    copy = c.add_stream_from_template(src.streams.audio[0], opaque=True)
                    for packet in src.demux(src.streams.audio[0]):
                        if packet.size:
                            packet.stream = copy
                            c.mux(packet)
                assert sound_tracks(out)[0][0] != codec or audio_packets(out, 0) != audio_packets(clip(codec, ext), 0)
            except (av.FFmpegError, ValueError, IndexError):
                pass
            refused.append((ext, codec))
    assert len(checked) >= 40 and len(refused) >= 20, (checked, refused)
