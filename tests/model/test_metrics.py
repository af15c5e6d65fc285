"""Metrics: edit distance and its S/D/I split, PER/WER, the length ratio and functional flag, CTC decoding."""

from __future__ import annotations

import random

import pytest
import torch

from workbench.model.metrics import (
    FUNCTIONAL_RATIO, align_counts, ctc_greedy_decode, edit_distance, error_rate, score, word_error_rate,
)


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


@pytest.mark.parametrize("ref,hyp,sdi", [
    ([1, 2, 3], [1, 2, 3], (0, 0, 0)),
    ([1, 2, 3], [1, 4, 3], (1, 0, 0)),
    ([1, 2, 3], [], (0, 3, 0)),
    ([], [7, 8], (0, 0, 2)),
    ([1, 2, 3], [2, 3], (0, 1, 0)),
    ([1, 2, 3], [1, 2, 3, 4, 4], (0, 0, 2)),
    ([1, 2], [9, 1, 2, 9], (0, 0, 2)),
    (list("kitten"), list("sitting"), (2, 0, 1)),
])
def test_alignment_splits_errors_into_substitutions_deletions_insertions(ref, hyp, sdi):
    counts = align_counts(ref, hyp)
    assert (counts.substitutions, counts.deletions, counts.insertions) == sdi
    assert counts.errors == edit_distance(ref, hyp)
    assert (counts.ref_tokens, counts.hyp_tokens) == (len(ref), len(hyp))


def _align_by_tuples(ref, hyp):
    """The alignment written out cell by cell as (errors, S, D, I), ties to S, then D, then I: the oracle."""
    n, m = len(ref), len(hyp)
    cost = [[(j, 0, 0, j) for j in range(m + 1)]]
    for i in range(1, n + 1):
        row = [(i, 0, i, 0)]
        for j in range(1, m + 1):
            miss = int(ref[i - 1] != hyp[j - 1])
            e, s, d, k = cost[i - 1][j - 1]
            sub = (e + miss, s + miss, d, k)
            e, s, d, k = cost[i - 1][j]
            dele = (e + 1, s, d + 1, k)
            e, s, d, k = row[j - 1]
            ins = (e + 1, s, d, k + 1)
            row.append(min((sub, dele, ins), key=lambda c: c[0]))
        cost.append(row)
    return cost[n][m][1:]


def test_alignment_equals_the_cell_by_cell_oracle_on_random_pairs():
    rng = random.Random(0)
    for _ in range(400):
        ref = [rng.randrange(4) for _ in range(rng.randrange(12))]
        hyp = [rng.randrange(4) for _ in range(rng.randrange(12))]
        counts = align_counts(ref, hyp)
        assert (counts.substitutions, counts.deletions, counts.insertions) == _align_by_tuples(ref, hyp), (ref, hyp)
        assert counts.errors == edit_distance(ref, hyp)


def test_score_carries_per_utterance_errors_and_the_length_ratio():
    refs = [[1, 2, 3, 4], [5, 6]]
    s = score(refs, [[1, 2, 3, 4], [7]])
    assert s.errors == (0, 2) and s.ref_lengths == (4, 2) and s.per == pytest.approx(2 / 6)
    assert s.length_ratio == pytest.approx(5 / 6) and s.functional
    d = s.to_dict()
    assert d["sdi"] == [1, 1, 0] and d["hyp_tokens"] == 5 and d["ref_tokens"] == 6


def test_a_decoder_that_emits_nothing_or_garbage_is_not_functional():
    refs = [[1, 2, 3, 4], [5, 6, 7, 8]]
    silent = score(refs, [[], []])
    assert silent.per == 1.0 and silent.length_ratio == 0 and not silent.functional
    assert silent.to_dict()["sdi"] == [0, 8, 0]
    babbling = score(refs, [[1] * 12, [5] * 12])  # three times the reference
    assert babbling.length_ratio == 3.0 and not babbling.functional and babbling.counts.insertions == 16
    lo, hi = FUNCTIONAL_RATIO
    assert score([[1, 2]], [[1]]).length_ratio == lo and score([[1, 2]], [[1]]).functional
    assert score([[1, 2]], [[1, 2, 3, 4]]).length_ratio == hi and score([[1, 2]], [[1, 2, 3, 4]]).functional
    assert not score([[1, 2, 3]], [[1]]).functional
