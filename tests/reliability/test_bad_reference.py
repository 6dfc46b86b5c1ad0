"""Reference voices through `Session`: unusable files are a one-line `AudioError` raised by
`stream()` before any model runs (exit code 12 in the CLI); short and multichannel high-rate
recordings give a speaker embedding and a sound track."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.reliability import hostile
from vssflow.runtime.errors import AudioError, VssflowInputError


@pytest.fixture(scope="module")
def voices(media):
    folder = media / "voices"
    folder.mkdir()
    return {"silent": hostile.silent_wav(folder), "short": hostile.short_wav(folder),
            "multichannel_96k": hostile.multichannel_96k(folder), **hostile.corrupt_wavs(folder),
            "missing": folder / "missing.wav"}


@pytest.fixture(scope="module")
def clip(accepted_videos):
    return accepted_videos["one_frame"]


REFUSED = {
    "silent": "is silent",
    "random": "cannot read reference voice",
    "header_cut": "cannot read reference voice",
    "empty": "cannot read reference voice",
    "missing": "does not exist",
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_reference(case, session, clip, voices):
    with pytest.raises(AudioError) as err:
        session.stream(clip, ref_audio=voices[case], steps=1)
    message = str(err.value)
    assert str(voices[case]) in message and REFUSED[case] in message and "\n" not in message, message
    assert err.value.exit_code == 12


def test_a_video_without_sound_as_reference(session, clip):
    with pytest.raises(AudioError, match="has no audio stream") as err:
        session.stream(clip, ref_audio=clip, steps=1)
    assert str(clip) in str(err.value)


@pytest.mark.parametrize("case", ["short", "multichannel_96k"])
def test_accepted_reference_conditions_the_sound(case, session, clip, voices, sequential_results):
    """0.1 s is wrap-padded to RawNet3's 3 s crops; six channels at 96 kHz are averaged and
    resampled. Either gives a finite speaker embedding that changes the sound."""
    r = session.generate(clip, ref_audio=voices[case], steps=1, seed=0, keep_intermediates=True)
    speaker = r.intermediates["speaker"][0]
    assert speaker.shape == (session.sizes.speaker_dim,) and np.isfinite(speaker).all() and np.abs(speaker).max() > 0
    assert r.audio.shape == (640,) and np.isfinite(r.audio).all()
    unconditioned = sequential_results["one_frame"].audio                   # same clip, seed 0, no voice
    assert not np.allclose(r.audio, unconditioned)


def test_model_without_speaker_stage_refuses_a_reference(tiny_model, tmp_path, clip, voices):
    from vssflow.runtime.session import Session
    folder = tmp_path / "no_speaker"
    shutil.copytree(tiny_model, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["contracts"]["speaker_encoder"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VssflowInputError, match="no speaker stage; re-export with --rawnet"):
        Session(folder, backend="ort").stream(clip, ref_audio=voices["short"], steps=1)
