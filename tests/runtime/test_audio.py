"""Reference voice loading and crops against the authors' path (soundfile, librosa's soxr, a
16-bit WAV round trip, extract_speaker_embd), and audio writing."""

import io
import math
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from vssflow.runtime import audio
from vssflow.runtime.errors import AudioError, VssflowInputError


def _tone(sr, seconds, channels=1, seed=0, top=7000):
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    tones = [sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6))
                 for f in rng.uniform(80, min(top, 0.4 * sr), 8)) / 10 for _ in range(channels)]
    return np.stack(tones, axis=1)                                     # [n, channels]


def _authors_reference(path):
    """infer.py extract_ref_audio_embedding up to the crops: sf.read, mean, librosa.resample
    (soxr_hq, fix_length), sf.write to a 16 kHz WAV, sf.read again."""
    soxr = pytest.importorskip("soxr")
    data, sr = sf.read(path)
    if data.ndim > 1:
        data = data.mean(axis=1)
    if sr != 16000:
        n = int(np.ceil(data.shape[-1] * float(16000) / sr))
        y = soxr.resample(data, sr, 16000, quality="soxr_hq")
        data = np.pad(y[:n], (0, max(0, n - y.size)))
        buffer = io.BytesIO()
        sf.write(buffer, data, 16000, format="WAV")
        buffer.seek(0)
        data, _ = sf.read(buffer)
    return data


def _authors_crops(audio_f64, n_samples=48000, n_segments=10):
    """feature/extract_rawnet.py extract_speaker_embd before the model."""
    if len(audio_f64) < n_samples:
        shortage = n_samples - len(audio_f64) + 1
        audio_f64 = np.pad(audio_f64, (0, shortage), "wrap")
    audios = []
    startframe = np.linspace(0, len(audio_f64) - n_samples, num=n_segments)
    for asf in startframe:
        audios.append(audio_f64[int(asf): int(asf) + n_samples])
    return np.stack(audios, axis=0).astype(np.float32)


def test_16k_mono_is_read_as_is(tmp_path):
    x = _tone(16000, 2.0)[:, 0] * 0.5
    sf.write(tmp_path / "v.wav", x, 16000, subtype="FLOAT")
    got = audio.load_reference(tmp_path / "v.wav")
    assert got.dtype == np.float32 and np.array_equal(got, x.astype(np.float32))


@pytest.mark.parametrize("sr,channels,fmt", [(44100, 2, "wav"), (48000, 1, "flac"),
                                             (22050, 1, "wav"), (8000, 1, "wav"),
                                             (96000, 6, "flac")])
def test_resampled_like_the_authors(tmp_path, sr, channels, fmt):
    x = _tone(sr, 1.3, channels) * 0.7
    path = tmp_path / f"v.{fmt}"
    sf.write(path, x, sr, subtype="PCM_24")
    got = audio.load_reference(path)
    expected = _authors_reference(path)
    assert got.shape == (math.ceil(x.shape[0] * 16000 / sr),)
    assert np.array_equal(got, expected.astype(np.float32))
    assert np.allclose(audio.speaker_crops(got), _authors_crops(expected))


def test_pcm16_round_trip_is_libsndfile():
    x = np.concatenate([np.random.default_rng(0).uniform(-1.5, 1.5, 50_000),
                        np.arange(-70_000, 70_000) / 65536.0, [1.0, -1.0, 0.0, 1e-9]])
    buffer = io.BytesIO()
    sf.write(buffer, x, 16000, format="WAV")
    buffer.seek(0)
    assert np.array_equal(sf.read(buffer)[0], audio._pcm16_round_trip(x))


@pytest.mark.parametrize("sr", [44100, 22050, 11025, 8000, 48000, 96000, 44056])
def test_numpy_resampler_close_to_soxr(sr):
    soxr = pytest.importorskip("soxr")
    x = _tone(sr, 1.0)[:, 0]
    ours = audio._resample_sinc(x, sr, 16000)
    ref = soxr.resample(x, sr, 16000, quality="soxr_hq")
    n = min(ours.size, ref.size)
    assert abs(ours.size - ref.size) <= 1 and ours.size == math.ceil(x.size * 16000 / sr)
    err, sig = (ours[:n] - ref[:n])[800:-800], ref[800:n - 800]
    assert 10 * np.log10(np.sum(sig ** 2) / np.sum(err ** 2)) > 60


def test_resampler_without_soxr(monkeypatch):
    monkeypatch.setitem(sys.modules, "soxr", None)  # import soxr -> ImportError
    x = _tone(44100, 0.5)[:, 0]
    y = audio.resample(x, 44100, 16000)
    assert y.shape == (math.ceil(x.size * 16000 / 44100),)
    t = np.arange(y.size) / 16000  # a pure tone stays a pure tone
    tone = audio.resample(np.sin(2 * np.pi * 1000 * np.arange(22050) / 44100), 44100, 16000)
    assert np.abs(tone - np.sin(2 * np.pi * 1000 * t[:tone.size]))[200:-200].max() < 1e-3


def _write_aac(path, x, sr):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=sr)
        stream.layout = "stereo"
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x.T, np.float32), format="fltp",
                                           layout="stereo")
        frame.sample_rate = sr
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def test_formats_soundfile_cannot_read_go_through_av(tmp_path):
    x = _tone(44100, 1.0, channels=2, top=1000) * 0.5  # low: the AAC delay is a fractional lag
    _write_aac(tmp_path / "v.m4a", x, 44100)
    got = audio.load_reference(tmp_path / "v.m4a")
    assert got.dtype == np.float32 and abs(got.size - 16000) < 2048  # AAC adds priming frames
    ref = audio.resample(x.mean(axis=1), 44100, 16000)
    lag = int(np.argmax(np.correlate(got[:4000], ref[1000:3000], "valid"))) - 1000
    aligned = got[max(lag, 0):][:12000]
    corr = np.corrcoef(aligned, ref[max(-lag, 0):][:aligned.size])[0, 1]
    assert corr > 0.98
    with open(tmp_path / "v.m4a", "rb") as f:  # file objects too
        assert np.array_equal(audio.load_reference(f), got)


def test_file_object_and_multichannel_16k(tmp_path):
    x = _tone(16000, 1.0, channels=3) * 0.3
    buffer = io.BytesIO()
    sf.write(buffer, x, 16000, format="WAV", subtype="FLOAT")
    buffer.seek(0)
    got = audio.load_reference(buffer)
    expected = x.astype(np.float32).astype(np.float64).mean(axis=1).astype(np.float32)
    assert np.array_equal(got, expected)  # averaged, not refused as the authors' crop code does


@pytest.mark.parametrize("n", [1, 1600, 47_999, 48_000, 48_001, 100_000, 160_037])
def test_crops_like_the_authors(n):
    wav = np.random.default_rng(n).uniform(-1, 1, n)
    crops = audio.speaker_crops(wav.astype(np.float32))
    assert crops.shape == (10, 48_000) and crops.dtype == np.float32
    assert np.array_equal(crops, _authors_crops(wav.astype(np.float32)))


def test_short_reference_is_wrap_padded(tmp_path):
    x = _tone(16000, 0.1)[:, 0]
    sf.write(tmp_path / "short.wav", x, 16000, subtype="FLOAT")
    crops = audio.speaker_crops(audio.load_reference(tmp_path / "short.wav"))
    assert crops.shape == (10, 48_000)
    assert np.array_equal(crops[0, :1600], x.astype(np.float32))
    assert np.array_equal(crops[0, 1600:3200], x.astype(np.float32))


def _video_without_audio(path):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def test_errors(tmp_path, monkeypatch):
    with pytest.raises(AudioError, match="does not exist"):
        audio.load_reference(tmp_path / "missing.wav")
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really" + bytes(200))
    with pytest.raises(AudioError, match="cannot read"):
        audio.load_reference(tmp_path / "corrupt.wav")
    with pytest.raises(AudioError, match="cannot read"):
        audio.load_reference(io.BytesIO(np.random.default_rng(0).bytes(5000)))
    sf.write(tmp_path / "empty.wav", np.zeros(0), 16000)
    with pytest.raises(AudioError, match="no samples"):
        audio.load_reference(tmp_path / "empty.wav")
    sf.write(tmp_path / "silent.flac", np.zeros((4800, 2)), 48000)
    with pytest.raises(AudioError, match="silent"):
        audio.load_reference(tmp_path / "silent.flac")
    sf.write(tmp_path / "nan.wav", np.array([0.1, np.nan, 0.2]), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN"):
        audio.load_reference(tmp_path / "nan.wav")
    _video_without_audio(tmp_path / "video.mp4")
    with pytest.raises(AudioError, match="no audio stream"):
        audio.load_reference(tmp_path / "video.mp4")
    monkeypatch.setattr(audio, "MAX_REFERENCE_SECONDS", 1.0)
    sf.write(tmp_path / "long.wav", _tone(16000, 2.0), 16000)
    with pytest.raises(AudioError, match="at most 1 s"):
        audio.load_reference(tmp_path / "long.wav")
    with pytest.raises(AudioError, match="mono"):
        audio.speaker_crops(np.zeros((10, 2)))
    assert issubclass(AudioError, VssflowInputError)


def test_no_torch_import():
    code = "import sys, vssflow.runtime.audio; assert 'torch' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
