"""Audio in: the reference voice, as the authors prepare it for RawNet3 (results are written by `output.py`).

Reference voice, as infer.py `extract_ref_audio_embedding` + feature/extract_rawnet.py
`extract_speaker_embd`: `soundfile.read` (float64), channels averaged, resampled to 16 kHz with
`librosa.resample`'s default (soxr "HQ", length fixed to ceil(n * 16000 / sr)) and - only when it
was resampled - round-tripped through a 16-bit WAV file; then wrap-padded to 3 s and cut into 10
crops of 3 s at `linspace` start points. RawNet3 embeds each crop; the mean is the speaker vector.

Differences from the authors, all where theirs fails or cannot apply:
  * files `soundfile` cannot read (AAC, M4A, video containers) are decoded with PyAV;
  * a 16 kHz file with several channels is averaged (theirs raises in `extract_speaker_embd`);
  * without the `soxr` package the resampler is a Kaiser-windowed sinc in numpy (`_resample_sinc`,
    >= 60 dB SNR against soxr on speech-band signals);
  * empty, silent, non-finite or over-long (MAX_REFERENCE_SECONDS) audio is an `AudioError`.
"""

from __future__ import annotations

import io
import math
import os
from typing import BinaryIO

import numpy as np
import soundfile as sf

from .contracts import SAMPLE_RATE, SPEAKER_CROPS, SPEAKER_SAMPLES
from .errors import AudioError
MAX_REFERENCE_SECONDS = 600.0    # a voice sample, not a recording session: caps memory


def _name(source) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "<file object>"


def _read_soundfile(source) -> tuple[np.ndarray, int]:
    with sf.SoundFile(source) as f:
        if f.frames / f.samplerate > MAX_REFERENCE_SECONDS:
            raise AudioError(f"reference voice {_name(source)} is {f.frames / f.samplerate:.0f} s "
                             f"long; at most {MAX_REFERENCE_SECONDS:.0f} s are used")
        return f.read(dtype="float64", always_2d=True), f.samplerate   # [n, channels]


def _read_av(source) -> tuple[np.ndarray, int]:
    import av

    with av.open(source, "r") as container:
        if not container.streams.audio:
            raise AudioError(f"reference voice {_name(source)} has no audio stream")
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate or stream.rate
        to_double = av.AudioResampler(format="dblp")  # planar float64, same layout and rate
        chunks, samples = [], 0
        for packet in container.demux(stream):
            for frame in packet.decode():
                for converted in to_double.resample(frame):
                    chunks.append(converted.to_ndarray())  # [channels, n]
                    samples += chunks[-1].shape[1]
            if samples > MAX_REFERENCE_SECONDS * rate:
                raise AudioError(f"reference voice {_name(source)} is longer than "
                                 f"{MAX_REFERENCE_SECONDS:.0f} s")
        for converted in to_double.resample(None):
            chunks.append(converted.to_ndarray())
    if not chunks:
        return np.zeros((0, 1)), rate
    return np.concatenate(chunks, axis=1).T, rate


def _resample_sinc(x: np.ndarray, sr_in: int, sr_out: int, zeros: int = 64,
                   rolloff: float = 0.945, beta: float = 14.77) -> np.ndarray:
    """Band-limited resampling with a Kaiser-windowed sinc (polyphase), x [n] -> [ceil(n*out/in)]."""
    g = math.gcd(sr_in, sr_out)
    up, down = sr_out // g, sr_in // g
    n_out = math.ceil(x.size * sr_out / sr_in)
    cutoff = rolloff * min(1.0, up / down)             # of the input's Nyquist
    half = int(math.ceil(zeros / cutoff))              # filter half-width in input samples
    k = np.arange(-half + 1, half + 1)                 # [taps]
    t = k[None, :] - np.arange(up)[:, None] / up       # [up, taps] input time minus output time
    h = cutoff * np.sinc(cutoff * t) * np.i0(beta * np.sqrt(np.clip(1 - (t / half) ** 2, 0, 1)))
    h /= np.i0(beta)
    padded = np.pad(x, (half, half + 1))
    out = np.empty(n_out)
    for lo in range(0, n_out, 4096):                   # blocks keep the gather small
        m = np.arange(lo, min(lo + 4096, n_out))
        base, phase = np.divmod(m * down, up)          # output m sits at input base + phase/up
        taps = padded[base[:, None] + k[None, :] + half]
        out[lo:lo + m.size] = np.einsum("mk,mk->m", taps, h[phase])
    return out


def resample(x: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE) -> np.ndarray:
    """librosa.resample(x, orig_sr=sr_in, target_sr=sr_out) with its defaults (soxr "HQ", fix)."""
    if sr_in == sr_out:
        return x
    n_out = math.ceil(x.shape[-1] * float(sr_out) / sr_in)
    try:
        import soxr
    except ImportError:
        y = _resample_sinc(x, sr_in, sr_out)
    else:
        y = soxr.resample(x, sr_in, sr_out, quality="soxr_hq")
    return np.pad(y[:n_out], (0, max(0, n_out - y.size)))


def _pcm16_round_trip(x: np.ndarray) -> np.ndarray:
    """What sf.write(float64, 16-bit WAV) then sf.read gives with libsndfile 1.2: the sample is
    rounded to 32 bits, clipped, and its low 16 bits dropped (floor); read back / 32768."""
    wide = np.clip(np.rint(x * 2.0 ** 31), -2.0 ** 31, 2.0 ** 31 - 1)
    return np.floor(wide / 2.0 ** 16) / 32768.0


def load_reference(source: str | os.PathLike | BinaryIO) -> np.ndarray:
    """A reference-voice file (any format soundfile or PyAV reads) -> float32 [n] mono 16 kHz."""
    if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
        raise AudioError(f"reference voice {_name(source)} does not exist")
    try:
        data, rate = _read_soundfile(source)
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError) as sf_error:
        if isinstance(source, io.IOBase) and source.seekable():
            source.seek(0)
        try:
            data, rate = _read_av(source)
        except AudioError:
            raise
        except Exception as av_error:  # PyAV raises many types for damaged input
            raise AudioError(f"cannot read reference voice {_name(source)}: {sf_error}; "
                             f"{type(av_error).__name__}: {av_error}") from av_error
    except OSError as error:
        raise AudioError(f"cannot read reference voice {_name(source)}: {error}") from error
    if data.size == 0:
        raise AudioError(f"reference voice {_name(source)} holds no samples")
    mono = data.mean(axis=1)                                             # [n] float64
    if not np.isfinite(mono).all():
        raise AudioError(f"reference voice {_name(source)} has NaN or infinite samples")
    if rate != SAMPLE_RATE:
        mono = _pcm16_round_trip(resample(mono, rate, SAMPLE_RATE))
    if not np.any(mono):
        raise AudioError(f"reference voice {_name(source)} is silent")
    return mono.astype(np.float32)


def speaker_crops(wav: np.ndarray, n_samples: int = SPEAKER_SAMPLES,
                  n_segments: int = SPEAKER_CROPS) -> np.ndarray:
    """wav [n] -> [n_segments, n_samples] float32, as the authors' `extract_speaker_embd`.

    Shorter than n_samples: wrap-padded to n_samples + 1. Crops start at
    int(linspace(0, len - n_samples, n_segments)).
    """
    audio = np.asarray(wav)
    if audio.ndim != 1 or audio.size == 0:
        raise AudioError(f"reference voice must be mono with samples, got shape {audio.shape}")
    if audio.size < n_samples:
        audio = np.pad(audio, (0, n_samples - audio.size + 1), "wrap")
    starts = np.linspace(0, audio.size - n_samples, num=n_segments)
    return np.stack([audio[int(s):int(s) + n_samples] for s in starts]).astype(np.float32)
