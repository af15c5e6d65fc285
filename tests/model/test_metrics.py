"""Metrics: edit distance, aggregate PER/WER, CTC greedy decoding."""

from __future__ import annotations

import pytest
import torch

from workbench.model.metrics import ctc_greedy_decode, edit_distance, error_rate, word_error_rate


@pytest.mark.parametrize("a,b,expected", [
    ([], [], 0),
    ([1, 2, 3], [], 3),
    ([], [1, 2], 2),
    ([1, 2, 3], [1, 2, 3], 0),
    ([1, 2, 3], [1, 4, 3], 1),
    ([1, 2, 3], [2, 3], 1),
    ([1, 2, 3], [1, 2, 3, 4], 1),
    ([1, 2, 3, 4], [4, 3, 2, 1], 4),
    (list("kitten"), list("sitting"), 3),
    (list("flaw"), list("lawn"), 2),
])
def test_edit_distance(a, b, expected):
    assert edit_distance(a, b) == expected
    assert edit_distance(b, a) == expected


def test_error_rate_aggregates_over_utterances():
    refs = [[1, 2, 3, 4], [5, 6]]
    hyps = [[1, 2, 3, 4], [7]]
    # Aggregate: (0 + 2) / (4 + 2), not the mean of per-utterance rates (0 and 1).
    assert error_rate(refs, hyps) == pytest.approx(2 / 6)
    assert error_rate([[1]], [[2, 3, 4]]) == pytest.approx(3.0)


def test_error_rate_rejects_bad_inputs():
    with pytest.raises(ValueError):
        error_rate([[1]], [])
    with pytest.raises(ValueError):
        error_rate([[]], [[1]])


def test_word_error_rate():
    assert word_error_rate(["the cat sat", "hi"], ["the  cat sit", "hi there"]) == pytest.approx(2 / 4)


def test_ctc_greedy_decode_collapses_and_respects_lengths():
    frames = torch.tensor([
        [0, 3, 3, 0, 3, 5, 5, 0, 2, 2],
        [1, 1, 1, 0, 0, 1, 4, 4, 4, 4],
    ])
    logits = torch.nn.functional.one_hot(frames, 6).float()
    hyps = ctc_greedy_decode(logits, torch.tensor([10, 6]))
    assert hyps == [[3, 3, 5, 2], [1, 1]]
    assert ctc_greedy_decode(logits, torch.tensor([0, 1])) == [[], [1]]
    assert ctc_greedy_decode(logits, torch.tensor([10, 10]), blank=1) == [[0, 3, 0, 3, 5, 0, 2], [0, 4]]
