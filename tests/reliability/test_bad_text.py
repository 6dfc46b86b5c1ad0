"""Transcripts and speech intervals through `Session`: refused in `stream()` before any model runs
(a one-line `TranscriptError`, exit code 11 in the CLI), or phoneme ids that the model accepts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vssflow.runtime import text
from vssflow.runtime.errors import TranscriptError, VssflowInputError

N_TOKENS = len(text.token_table())

REFUSED = {
    "empty": ("", "has nothing speakable"),
    "whitespace": ("  \n\t ", "has nothing speakable"),
    "punctuation": ("?!.,;:-'\"()[]... --", "has nothing speakable"),
    "emoji": ("😀🎉🔥👍🏽", "has nothing speakable"),
    "huge_100kb": ("hello world " * 8534, "at most 10000 are accepted"),
}

ACCEPTED = {
    "digits": "0123456789 42 3.14 1,000,000 2024",
    "many_digits": "9" * 200,
    "emoji_and_words": "hello 😀 world 🎉",
    "cyrillic": "Привет, как дела?",
    "chinese": "你好世界",
    "arabic": "مرحبا بالعالم",
    "devanagari": "नमस्ते दुनिया",
    "greek": "Καλημέρα κόσμε",
    "control_characters": "bell\x07 nul\x00 escape\x1b[31m red",
}


@pytest.fixture(scope="module")
def clip(accepted_videos):
    return accepted_videos["odd_size"]          # 1.0 s


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_transcript(case, session, clip):
    transcript, problem = REFUSED[case]
    if case == "huge_100kb":
        assert len(transcript.encode()) >= 100_000
    with pytest.raises(TranscriptError) as err:
        session.stream(clip, transcript=transcript, steps=1)
    message = str(err.value)
    assert message.startswith("transcript ") and problem in message and "\n" not in message
    assert len(message) < 200 and err.value.exit_code == 11


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_accepted_transcript_makes_phonemes(case, session, clip):
    """Numbers are spelled out, other scripts transliterated (unidecode), emoji and control
    characters dropped; the ids fill the speech interval and index the phoneme table."""
    transcript = ACCEPTED[case]
    _, info = session.stream(clip, transcript=transcript, steps=1)
    assert (info.options.speech_start, info.options.speech_end) == (0.0, 1.0)   # defaults: the whole clip
    ids = text.phoneme_ids(transcript, 0.0, 1.0, clip_seconds=1.0)
    assert ids.shape == (250,) and ids.dtype == np.int64
    assert np.all(ids[:25] > 0) and np.all(ids[25:] == 0)                     # 25 ids per second
    assert ids.max() < N_TOKENS and np.any((ids > 0) & (ids != text.BLANK_ID))


def test_digits_are_read_as_words():
    assert text.phonemize("42") == text.phonemize("forty two")
    assert text.phonemize("2024") == text.phonemize("twenty twenty four")


def test_mixed_script_transcript_generates(session, clip):
    """One full generation with every accepted oddity at once."""
    transcript = " ".join(ACCEPTED.values())
    r = session.generate(clip, transcript=transcript, speech_start=0.2, speech_end=0.8, steps=1,
                         keep_intermediates=True)
    ids = r.intermediates["phone_ids"][0]
    assert np.all(ids[5:20] > 0) and np.all(ids[:5] == 0) and np.all(ids[20:] == 0)
    assert r.audio.shape == (16000,) and np.isfinite(r.audio).all()


INTERVALS = {
    "negative": ((-1.0, 0.5), "starts before 0"),
    "inverted": ((0.8, 0.2), "ends at or before its start"),
    "empty": ((0.5, 0.5), "ends at or before its start"),
    "past_the_end": ((0.5, 3.0), "ends after the video (1 s)"),
    "past_the_window": ((0.0, 11.0), "ends after the video (1 s)"),
    "nan_start": ((math.nan, 0.5), "speech_start is nan"),
    "nan_end": ((0.0, math.nan), "speech_end is nan"),
    "inf_end": ((0.0, math.inf), "speech_end is inf"),
    "shorter_than_a_frame": ((0.5, 0.51), "shorter than one frame"),
}


@pytest.mark.parametrize("case", list(INTERVALS))
def test_refused_speech_interval(case, session, clip):
    (start, end), problem = INTERVALS[case]
    with pytest.raises(TranscriptError) as err:
        session.stream(clip, transcript="hello", speech_start=start, speech_end=end, steps=1)
    message = str(err.value)
    assert problem in message and "\n" not in message and err.value.exit_code == 11


def test_interval_defaults(session, clip):
    """A start alone ends at the clip's end (at most 10 s); an end alone starts at 0."""
    _, info = session.stream(clip, transcript="hello", speech_start=0.5, steps=1)
    assert (info.options.speech_start, info.options.speech_end) == (0.5, 1.0)
    _, info = session.stream(clip, transcript="hello", speech_end=0.6, steps=1)
    assert (info.options.speech_start, info.options.speech_end) == (0.0, 0.6)


def test_interval_without_transcript_is_an_input_error(session, clip):
    with pytest.raises(VssflowInputError, match="without a transcript") as err:
        session.stream(clip, speech_start=0.1, speech_end=0.5, steps=1)
    assert err.value.exit_code == 2
