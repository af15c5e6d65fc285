"""The 41-class B2T phoneme vocabulary and sentence -> id conversion."""

import pytest

from workbench.data import BLANK, PHONEMES, SIL, VOCAB_SIZE, ids_to_symbols, sentence_to_ids

ARPABET = ("AA AE AH AO AW AY B CH D DH EH ER EY F G HH IH IY JH K L M N NG OW OY P R S SH T TH UH UW V W Y Z "
           "ZH").split()


def test_size_order_and_special_ids():
    assert (BLANK, SIL, VOCAB_SIZE) == (0, 40, 41)
    assert len(PHONEMES) == VOCAB_SIZE
    assert PHONEMES[BLANK] == "BLANK" and PHONEMES[SIL] == " | "
    assert PHONEMES[1:40] == ARPABET == sorted(ARPABET)
    assert ids_to_symbols([0, 1, 9, 39, 40]) == ["BLANK", "AA", "D", "ZH", " | "]


def test_ids_to_symbols_rejects_out_of_range():
    with pytest.raises(ValueError, match="41"):
        ids_to_symbols([1, 41])


def test_real_data_example_do_you_need_help():
    # b2t_format.md 2.2: seq_class_ids[:15] of trial 287, t15.2023.08.11 train.
    assert sentence_to_ids("Do you need help?") == [9, 34, 40, 37, 34, 40, 23, 18, 9, 40, 16, 11, 21, 27, 40]


@pytest.mark.parametrize("sentence, n_words", [("Bring it closer.", 3), ("I", 1), ("Good morning, Doctor Smith!", 4)])
def test_sil_after_every_word_and_no_blank(sentence, n_words):
    ids = sentence_to_ids(sentence)
    assert ids.count(SIL) == n_words and ids[-1] == SIL and ids[0] != SIL
    assert BLANK not in ids and all(1 <= i <= SIL for i in ids)


def test_cleaning_matches_baseline_rules():
    # Hyphen = space, apostrophes kept inside words, case and punctuation ignored.
    assert sentence_to_ids("Well-known.") == sentence_to_ids("well known")
    assert sentence_to_ids("DON'T, \"stop\"!") == sentence_to_ids("don't stop")
    assert ids_to_symbols(sentence_to_ids("don't")) == ["D", "OW", "N", "T", " | "]
    assert sentence_to_ids("?!") == [SIL]


def test_unknown_word_names_the_word():
    with pytest.raises(ValueError, match="'blorfquex'"):
        sentence_to_ids("I like blorfquex.")
