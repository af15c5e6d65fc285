"""Decoding and error-rate metrics: CTC greedy decoding, edit distance, aggregate PER and WER."""

from __future__ import annotations

from typing import Sequence

import torch


def ctc_greedy_decode(logits: torch.Tensor, lengths: torch.Tensor, blank: int = 0) -> list[list[int]]:
    """Best-path CTC decoding: argmax per frame within each length, collapse repeats, drop blanks.

    Args:
        logits (Tensor): (B, T, V) logits or log-probabilities.
        lengths (Tensor): (B,) valid frames.
        blank (int): blank index.

    Returns:
        list[list[int]]: one token list per utterance.
    """
    best = logits.argmax(dim=-1).cpu()
    hyps = []
    for row, n in zip(best, lengths.cpu().tolist()):
        collapsed = torch.unique_consecutive(row[:n])
        hyps.append(collapsed[collapsed != blank].tolist())
    return hyps


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (unit-cost substitutions, insertions, deletions) between two sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, start=1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def error_rate(refs: Sequence[Sequence], hyps: Sequence[Sequence]) -> float:
    """Aggregate error rate: sum of edit distances / sum of reference lengths (the baseline's PER).

    Raises ValueError when the lists differ in length or the references hold no tokens (the rate is undefined).
    """
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    total = sum(len(r) for r in refs)
    if total == 0:
        raise ValueError("error rate is undefined: the references contain no tokens")
    return sum(edit_distance(r, h) for r, h in zip(refs, hyps)) / total


def word_error_rate(ref_sentences: Sequence[str], hyp_sentences: Sequence[str]) -> float:
    """Aggregate WER over whitespace-separated words (sum of word edit distances / sum of reference words)."""
    return error_rate([s.split() for s in ref_sentences], [s.split() for s in hyp_sentences])
