"""Writing results: the sound track alone, or the input's video stream copied with the new sound.

`FORMATS` is the one table of output formats: for each extension, FFmpeg's muxer, the audio
encoder and its rate, and, for a video container, the video and audio codecs whose packets it can
hold (the video, and the input's own sound tracks, are copied, never re-encoded). `plan_output`
picks the format and the name before any model runs, refuses what cannot be written, and says in
its `notes` what becomes of the input's own sound; `write_output` writes the plan.

Every file is written through `atomic_output`: under a hidden temporary name beside the target,
renamed into place only when complete; on any error or interrupt the temporary file is removed,
so a partial output never appears.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import OutputError, VssflowInputError
from .files import atomic_output


@dataclass(frozen=True)
class Format:
    """How one output extension is written."""

    muxer: str                                  # FFmpeg's container name (PyAV's `format=`)
    audio_codec: str                            # FFmpeg's encoder of the sound track
    sample_rate: int | None = None              # the encoder's rate; None: the model's (16 kHz)
    video_codecs: frozenset[str] = frozenset()  # codecs it can hold, copied; empty: sound only
    audio_codecs: frozenset[str] = frozenset()  # the input's sound tracks it can hold, copied after ours
    media_type: str = "application/octet-stream"  # its MIME type, as vssflow-serve answers with it

    @property
    def has_video(self) -> bool:
        return bool(self.video_codecs)


# Video codecs (FFmpeg's canonical names) each container holds. From FFmpeg's muxers (libavformat
# movenc.c `codec_mp4_tags` and `mov_init`, which keeps VP9 and AV1 to MP4; matroska.c
# `ff_mkv_codec_tags`; matroskaenc.c's WebM check; riff.c `ff_codec_bmp_tags`; mpegtsenc.c's PMT
# stream types), kept to the common ones; tests/runtime/test_output.py muxes each with this FFmpeg.
MP4_VIDEO = frozenset({"h264", "hevc", "av1", "vp9", "mpeg4", "mpeg2video", "mjpeg"})
MOV_VIDEO = frozenset({"h264", "hevc", "mpeg4", "mpeg2video", "mjpeg", "prores"})
MKV_VIDEO = MP4_VIDEO | {"vp8", "prores", "ffv1", "theora"}
WEBM_VIDEO = frozenset({"vp8", "vp9", "av1"})
# AVI takes H.264 only as Annex B, and a copy from MP4 or MKV is not: FFmpeg's AVI muxer refuses it.
AVI_VIDEO = frozenset({"mpeg4", "msmpeg4v2", "msmpeg4v3", "mjpeg", "mpeg2video", "ffv1"})
# FFmpeg's TS muxer writes any other codec as "private data", which players do not recognise.
TS_VIDEO = frozenset({"h264", "hevc", "mpeg2video", "mpeg4"})

# Audio codecs (FFmpeg's canonical names) of an input's own sound tracks each video container takes
# as copied packets, as this FFmpeg muxes them (tests/runtime/test_output.py copies each): MP4 and
# MPEG-TS refuse PCM, MPEG-TS FLAC and ALAC too, WebM all but Opus and Vorbis; MP2 in MP4 reads back
# as MP3 (one object type for both), so it is left out there.
MP4_AUDIO = frozenset({"aac", "mp3", "opus", "flac", "alac", "ac3", "eac3"})
PCM_AUDIO = frozenset({"pcm_s16le", "pcm_s16be", "pcm_s24le", "pcm_f32le"})
MOV_AUDIO = frozenset({"aac", "mp3", "mp2", "alac", "ac3", "eac3"}) | PCM_AUDIO
MKV_AUDIO = MP4_AUDIO | PCM_AUDIO | {"mp2", "vorbis", "dts", "truehd"}
WEBM_AUDIO = frozenset({"opus", "vorbis"})
AVI_AUDIO = frozenset({"aac", "mp3", "mp2", "flac", "ac3", "eac3", "pcm_s16le", "pcm_s24le", "pcm_f32le"})
TS_AUDIO = frozenset({"aac", "mp3", "mp2", "opus", "ac3", "eac3"})
INPUT_AUDIO = ("keep", "drop")         # what becomes of the input's own sound in a video output

OPUS_RATE = 48_000   # Opus decoders always give 48 kHz (RFC 7845 §5.1): encode at the rate played

FORMATS: dict[str, Format] = {
    # the sound alone, for an editor
    ".wav": Format("wav", "pcm_f32le", media_type="audio/wav"),
    ".flac": Format("flac", "flac", media_type="audio/flac"),                   # 16-bit
    ".ogg": Format("ogg", "libopus", OPUS_RATE, media_type="audio/ogg"),
    ".opus": Format("opus", "libopus", OPUS_RATE, media_type="audio/ogg"),   # RFC 7845: Ogg Opus
    ".mp3": Format("mp3", "libmp3lame", media_type="audio/mpeg"),               # 16 kHz is MPEG-2 Layer III
    ".m4a": Format("ipod", "aac", media_type="audio/mp4"),
    # the input's video with the sound
    ".mp4": Format("mp4", "aac", video_codecs=MP4_VIDEO, audio_codecs=MP4_AUDIO, media_type="video/mp4"),
    ".m4v": Format("mp4", "aac", video_codecs=MP4_VIDEO, audio_codecs=MP4_AUDIO, media_type="video/mp4"),
    ".mov": Format("mov", "aac", video_codecs=MOV_VIDEO, audio_codecs=MOV_AUDIO, media_type="video/quicktime"),
    ".mkv": Format("matroska", "aac", video_codecs=MKV_VIDEO, audio_codecs=MKV_AUDIO, media_type="video/x-matroska"),
    ".webm": Format("webm", "libopus", OPUS_RATE, video_codecs=WEBM_VIDEO, audio_codecs=WEBM_AUDIO,
                    media_type="video/webm"),
    ".avi": Format("avi", "pcm_s16le", video_codecs=AVI_VIDEO, audio_codecs=AVI_AUDIO,  # PCM: exact, plays everywhere
                   media_type="video/x-msvideo"),
    ".ts": Format("mpegts", "aac", video_codecs=TS_VIDEO, audio_codecs=TS_AUDIO, media_type="video/mp2t"),
}
OUTPUT_FORMATS = tuple(ext[1:] for ext in FORMATS)      # "wav", "flac", ...: a click.Choice's choices
SOUND_EXTENSIONS = tuple(ext for ext, fmt in FORMATS.items() if not fmt.has_video)
VIDEO_EXTENSIONS = tuple(ext for ext, fmt in FORMATS.items() if fmt.has_video)
FALLBACK = ".mkv"                      # the default name's container when the input's cannot hold the video


@dataclass(frozen=True)
class OutputPlan:
    """Where and how a result is written: ``video`` is the input whose video packets are copied
    (None for a sound-only format); ``note`` says, in one line, why a default name is not the
    input's container. ``input_audio``: the codec of each of the input's own sound tracks;
    ``keep_input_audio``: copy those the container can hold (``copied_audio``) after the
    generated track; ``notes`` says, a line each, what became of them."""

    path: Path
    format: Format
    video: Path | None = None
    note: str | None = None
    input_audio: tuple[str, ...] = ()
    keep_input_audio: bool = True
    video_codec: str | None = None               # the input's, when it could be read

    @property
    def copied_audio(self) -> tuple[int, ...]:
        """Positions, among the input's sound tracks, of those copied into the output."""
        if self.video is None or not self.keep_input_audio:
            return ()
        return tuple(k for k, codec in enumerate(self.input_audio) if codec in self.format.audio_codecs)

    @property
    def notes(self) -> tuple[str, ...]:
        """What becomes of the input's own sound, one line per fate (none without it)."""
        copied = set(self.copied_audio)
        kept = [c for k, c in enumerate(self.input_audio) if k in copied]
        left = [c for k, c in enumerate(self.input_audio) if k not in copied]
        notes = []
        if kept:
            notes.append(f"the input's own {_tracks(kept)} kept in {self.path.name}, after the generated one")
        if left:
            ext = self.path.suffix.lower()
            if self.video is None:
                why = f": a {ext} file holds the generated sound only"
            elif not self.keep_input_audio:
                why = " (--input-audio drop)"
            else:
                holders = [e for e in _holders(self.video_codec) if set(left) <= FORMATS[e].audio_codecs]
                why = (f": a {ext} file cannot hold {' or '.join(sorted(set(left)))} (it is copied, not "
                       f"re-encoded)" + (f"; {' or '.join(holders[:2])} can" if holders else ""))
            notes.append(f"the input's own {_tracks(left)} left out of {self.path.name}{why}")
        return tuple(notes)


def _tracks(codecs: list[str]) -> str:
    return (f"sound track ({codecs[0]})" if len(codecs) == 1 else
            f"{len(codecs)} sound tracks ({', '.join(codecs)})")


def plan_output(video: str | os.PathLike, output: str | os.PathLike | None = None, *,
                format: str | None = None, folder: str | os.PathLike | None = None,
                relative: str | os.PathLike | None = None, input_audio: str = "keep") -> OutputPlan:
    """The output for ``video``: ``output`` as given (its extension names the format), or else a
    name in ``folder`` (default: beside the video) with the extension EXT: ``format`` (one of
    ``OUTPUT_FORMATS``) or, when that is None too, the input's own container if it can hold the
    video, else ``.mkv`` (and ``note`` says so).

    The name is ``VIDEO_with_sound.EXT`` (a single run), or, with ``relative`` (a batch: the
    input's path below the folder it was found in, or its file name), ``relative`` itself with
    the extension EXT: the input's stem, in the same subfolders of ``folder``. Those subfolders
    need not exist yet, nor ``folder`` itself: ``make_folder`` makes them before the write.

    ``input_audio`` (one of ``INPUT_AUDIO``): "keep" copies the input's own sound tracks that a
    video output's container can hold after the generated one; "drop" leaves them out. Either
    way the plan's ``notes`` say what became of them.

    Raises ``OutputError`` (exit 5) for a format that cannot be written, a video codec the
    container cannot hold, a missing folder, or the input itself; a video that cannot be read is
    left to the decoder to report.
    """
    if input_audio not in INPUT_AUDIO:
        raise VssflowInputError(f"input_audio must be one of {', '.join(INPUT_AUDIO)}, got {input_audio!r}")
    video = Path(video)
    codec, audio = _probe(video)
    note = None
    if output is not None:
        path = Path(output)
    else:
        base = Path(folder if folder is not None else video.parent)
        name = Path(relative) if relative is not None else Path(f"{video.stem}_with_sound")
        if format is not None:
            ext = f".{format.lstrip('.').lower()}"
        else:
            ext, why = _default_extension(video, codec)
            if why:
                note = f"{why}: writing {name.with_suffix(ext) if relative is not None else name.name + ext}"
        path = base / (name.with_suffix(ext) if relative is not None else Path(name.name + ext))
    fmt = _format(path)
    if fmt.has_video and codec is not None and codec not in fmt.video_codecs:
        holders = _holders(codec)
        instead = (f": use {' or '.join(holders[:2])}" if holders else
                   ", nor can any other video output here: write the sound alone (.wav, .flac, ...)")
        raise OutputError(f"{path}: {path.suffix.lower()} cannot hold the input's {codec} video "
                          f"(it is copied, not re-encoded){instead}")
    if (output is not None or relative is None) and not path.parent.is_dir():
        raise OutputError(f"{path}: the folder {path.parent} does not exist")
    if path.exists() and video.exists() and path.resolve() == video.resolve():
        raise OutputError(f"{path}: is the input video; choose another output name")
    return OutputPlan(path, fmt, video if fmt.has_video else None, note, audio, input_audio == "keep", codec)


def make_folder(plan: OutputPlan) -> None:
    """Make the subfolders a batch's output name keeps (``plan_output(..., relative=)``)."""
    try:
        plan.path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{plan.path}: could not make the folder {plan.path.parent} ({e.strerror or e})") from None


def _default_extension(video: Path, codec: str | None) -> tuple[str, str | None]:
    """The input's extension when its row holds the video, else .mkv (or, for a codec Matroska
    cannot hold, the first container that can), with the reason why, in words."""
    fmt = FORMATS.get(video.suffix.lower())
    if fmt is not None and fmt.has_video and (codec is None or codec in fmt.video_codecs):
        return video.suffix, None
    ext = next(iter(_holders(codec)), FALLBACK) if codec else FALLBACK
    if fmt is not None and fmt.has_video:
        why = f"{video.name} holds {codec} video, which a {video.suffix.lower()} file cannot"
    elif video.suffix:
        why = f"{video.name}: {video.suffix.lower()} is not a video output format here"
    else:
        why = f"{video.name} has no extension"
    return ext, why


def _holders(codec: str) -> list[str]:
    """Video extensions whose container holds ``codec``, Matroska's first."""
    exts = [ext for ext, fmt in FORMATS.items() if codec in fmt.video_codecs]
    return sorted(exts, key=lambda ext: ext != FALLBACK)


def _format(path: Path) -> Format:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise OutputError(f"{path}: unknown output type {path.suffix or '(none)'}: use "
                          f"{', '.join(SOUND_EXTENSIONS)}, or a video container ({', '.join(VIDEO_EXTENSIONS)})")
    return fmt


def _probe(video: Path) -> tuple[str | None, tuple[str, ...]]:
    """FFmpeg's canonical name of the first video stream's codec (None when it cannot be read),
    and of each sound track's."""
    import av
    try:
        with av.open(os.fspath(video)) as container:
            audio = tuple(_codec_name(s) for s in container.streams.audio)
            stream = container.streams.video[0]
            return (stream.codec_context.codec.canonical_name if stream.codec_context else None), audio
    except (av.FFmpegError, OSError, IndexError, ValueError):
        return None, ()


def _codec_name(stream) -> str:
    ctx = stream.codec_context
    return ctx.codec.canonical_name if ctx is not None else "unknown"


def write_output(plan: OutputPlan, chunks: Iterable[np.ndarray], sample_rate: int) -> int:
    """Encode float32 mono chunks into ``plan.path`` as they come (the first track, marked the
    default), then copy ``plan.video``'s video packets in, and its sound tracks the plan keeps
    (no re-encoding); returns the samples written (at ``sample_rate``)."""
    import av
    fmt, path = plan.format, plan.path
    n = start = 0
    try:
        with atomic_output(path) as tmp, _open_video(plan.video) as source, _muxer(tmp, fmt.muxer) as dst:
            audio = dst.add_stream(fmt.audio_codec, rate=fmt.sample_rate or sample_rate, layout="mono")
            copies = {}                                  # input stream index -> its copy in the output
            if source is not None:
                video_in = source.streams.video[0]
                # opaque: take the decoder's codec as it is (PyAV otherwise looks for an encoder of
                # the decoder's name, and there is none called libdav1d, AV1's decoder)
                copies[video_in.index] = dst.add_stream_from_template(video_in, opaque=True)
                if video_in.start_time is not None:      # the sound starts with the first frame
                    start = round(video_in.start_time * video_in.time_base * sample_rate)
                for k in plan.copied_audio:              # the input's own sound, after ours
                    track = source.streams.audio[k]
                    copies[track.index] = copy = dst.add_stream_from_template(track, opaque=True)
                    copy.disposition = 0                 # players start with the generated track
                    for key in ("language", "title"):
                        if key in track.metadata:
                            copy.metadata[key] = track.metadata[key]
                audio.disposition = av.stream.Disposition.default
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk, np.float32)
                if len(chunk):
                    frame = av.AudioFrame.from_ndarray(chunk[None, :], format="flt", layout="mono")
                    frame.sample_rate, frame.pts = sample_rate, start + n   # the encoder resamples if it must
                    dst.mux(audio.encode(frame))
                    n += len(chunk)
            dst.mux(audio.encode(None))
            if source is not None:
                # Every packet with data, those without a dts too: Matroska stores none, and
                # FFmpeg leaves it unset on the first frames of a stream with B-frames; the
                # muxer derives it from the pts. (demux ends with an empty packet: not one.)
                for packet in source.demux([source.streams[k] for k in copies]):
                    if packet.size:
                        packet.stream = copies[packet.stream.index]
                        dst.mux(packet)
    except OSError as e:
        raise OutputError(f"{path}: could not write ({e.strerror or e})") from None
    except av.FFmpegError as e:
        raise OutputError(f"{path}: could not write the {'video' if plan.video else 'sound'} ({e})") from None
    return n


@contextlib.contextmanager
def _open_video(video: Path | None):
    import av
    if video is None:
        yield None
        return
    with av.open(os.fspath(video)) as container:
        yield container


@contextlib.contextmanager
def _muxer(path: Path, muxer: str):
    """An output container, closed either way; closing after an error reports that error, not
    any failure to write the trailer of a file that is about to be deleted."""
    import av
    # max_interleave_delta 0: the sound is muxed first and held until the video catches up, so
    # the file is interleaved by time however long (FFmpeg's default gives up after 10 s)
    container = av.open(os.fspath(path), "w", format=muxer, options={"max_interleave_delta": "0"})
    try:
        yield container
    except BaseException:
        with contextlib.suppress(Exception):     # the error that brought us here is the one to report
            container.close()
        raise
    container.close()
