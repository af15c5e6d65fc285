"""Decoding and error-rate metrics: CTC greedy decoding, edit distance, the substitution / deletion / insertion
split, aggregate PER and WER, and whether a decoder is functional enough for its PER to be compared."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torchaudio

# A decoder whose hypotheses hold fewer than half or more than twice the reference tokens (emits nothing, or
# garbage several times the reference) is not functional: its PER measures its length, and is never ranked.
FUNCTIONAL_RATIO: tuple[float, float] = (0.5, 2.0)


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


@dataclass(frozen=True)
class ErrorCounts:
    """The edit operations of one minimum-cost alignment (or a sum of them) and the tokens on each side."""

    substitutions: int
    deletions: int
    insertions: int
    ref_tokens: int
    hyp_tokens: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    def __add__(self, other: "ErrorCounts") -> "ErrorCounts":
        return ErrorCounts(self.substitutions + other.substitutions, self.deletions + other.deletions,
                           self.insertions + other.insertions, self.ref_tokens + other.ref_tokens,
                           self.hyp_tokens + other.hyp_tokens)


def align_counts(ref: Sequence, hyp: Sequence) -> ErrorCounts:
    """S, D, I along one minimum-cost alignment of `hyp` to `ref` (their sum is `edit_distance(ref, hyp)`).

    Ties between paths of equal cost prefer a substitution, then a deletion, then an insertion (the usual
    scoring convention); the total never depends on the tie-break.
    """
    n, m = len(ref), len(hyp)
    # Row i holds, for ref[:i] against hyp[:j] (j = 0..m), the cost and the S and D counts of the chosen path
    # (I = cost - S - D), as plain int lists: a tuple per cell made scoring a validation set take seconds.
    cost, subs, dels = list(range(m + 1)), [0] * (m + 1), [0] * (m + 1)
    for i in range(1, n + 1):
        token = ref[i - 1]
        row_cost, row_subs, row_dels = [i], [0], [i]
        for j in range(1, m + 1):
            miss = token != hyp[j - 1]
            sub, dele, ins = cost[j - 1] + miss, cost[j] + 1, row_cost[j - 1] + 1
            if sub <= dele and sub <= ins:
                row_cost.append(sub)
                row_subs.append(subs[j - 1] + miss)
                row_dels.append(dels[j - 1])
            elif dele <= ins:
                row_cost.append(dele)
                row_subs.append(subs[j])
                row_dels.append(dels[j] + 1)
            else:
                row_cost.append(ins)
                row_subs.append(row_subs[j - 1])
                row_dels.append(row_dels[j - 1])
        cost, subs, dels = row_cost, row_subs, row_dels
    return ErrorCounts(subs[m], dels[m], cost[m] - subs[m] - dels[m], n, m)


@dataclass(frozen=True)
class Score:
    """A decoder's hypotheses scored against the references: the summed counts and, per utterance, the errors
    and reference lengths (so two decoders can be compared utterance by utterance)."""

    counts: ErrorCounts
    errors: tuple[int, ...]
    ref_lengths: tuple[int, ...]

    @property
    def per(self) -> float:
        return self.counts.errors / self.counts.ref_tokens

    @property
    def length_ratio(self) -> float:
        """Hypothesis tokens / reference tokens over every utterance."""
        return self.counts.hyp_tokens / self.counts.ref_tokens

    @property
    def functional(self) -> bool:
        """The length ratio lies within FUNCTIONAL_RATIO: only then is the PER a measure of quality."""
        return FUNCTIONAL_RATIO[0] <= self.length_ratio <= FUNCTIONAL_RATIO[1]

    def to_dict(self) -> dict[str, Any]:
        c = self.counts
        return {"per": self.per, "length_ratio": self.length_ratio, "functional": self.functional,
                "sdi": [c.substitutions, c.deletions, c.insertions], "ref_tokens": c.ref_tokens,
                "hyp_tokens": c.hyp_tokens, "errors": list(self.errors), "ref_lengths": list(self.ref_lengths)}


def score(refs: Sequence[Sequence], hyps: Sequence[Sequence]) -> Score:
    """Align every hypothesis to its reference; raises ValueError like `error_rate` (mismatched lists, no
    reference tokens)."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    per_utt = [align_counts(r, h) for r, h in zip(refs, hyps)]
    total = sum(per_utt, ErrorCounts(0, 0, 0, 0, 0))
    if total.ref_tokens == 0:
        raise ValueError("error rate is undefined: the references contain no tokens")
    return Score(total, tuple(c.errors for c in per_utt), tuple(c.ref_tokens for c in per_utt))


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (unit-cost substitutions, insertions, deletions) between two sequences: torchaudio's.
    `align_counts` computes its own, as it also needs the S/D/I split along one alignment."""
    return torchaudio.functional.edit_distance(a, b)


def error_rate(refs: Sequence[Sequence], hyps: Sequence[Sequence]) -> float:
    """Aggregate error rate: sum of edit distances / sum of reference lengths (the baseline's PER).

    Raises ValueError when the lists differ in length or the references hold no tokens (the rate is undefined).
    """
    return score(refs, hyps).per


def word_error_rate(ref_sentences: Sequence[str], hyp_sentences: Sequence[str]) -> float:
    """Aggregate WER over whitespace-separated words (sum of word edit distances / sum of reference words)."""
    return error_rate([s.split() for s in ref_sentences], [s.split() for s in hyp_sentences])
