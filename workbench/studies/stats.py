"""Effect sizes in errors with their uncertainty, and how many "in every seed" results chance alone gives.

A difference between two configurations is counted in errors (edit operations against the references), not in
PER points alone, so a reader sees whether it is one phoneme or fifty. Two configurations run with the same seeds
on the same validation utterances form pairs: `paired_effect` takes per seed and per utterance error counts of
both, and returns the mean over seeds of the difference in total errors (b - a) with a seeded bootstrap interval
that resamples both the seeds and the utterances (the two sources of chance in these studies).

With k seeds and no real effect, each two-way comparison comes out the same way in all k seeds with probability
2 * 0.5^k (`chance_all_same`); `Tally` counts a study's comparisons and states how many such results chance alone
would give.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

LEVEL = 0.95  # the bootstrap interval's coverage
RESAMPLES = 2000


def chance_all_same(seeds: int) -> float:
    """P(all `seeds` paired differences have the same sign | no effect, no ties) = 2 * 0.5^seeds."""
    if seeds < 1:
        raise ValueError(f"seeds: expected at least 1, got {seeds}")
    return 2 * 0.5 ** seeds


@dataclass(frozen=True)
class Effect:
    """b - a in errors: `diff` is the mean over seeds of (total errors of b - total errors of a) on the same
    utterances; [`low`, `high`] its bootstrap interval at `level`; `per_seed` the seeds' differences; `ref_tokens`
    the reference tokens one seed is scored on (so diff / ref_tokens is the PER difference)."""

    diff: float
    low: float
    high: float
    per_seed: tuple[int, ...]
    ref_tokens: int
    level: float = LEVEL

    @property
    def rate(self) -> float:
        """The difference as an error rate (PER points as a fraction)."""
        return self.diff / self.ref_tokens

    @property
    def resolved(self) -> bool:
        """The interval excludes zero."""
        return self.low > 0 or self.high < 0

    @property
    def same_direction(self) -> bool:
        """Every seed's difference is non-zero and of one sign."""
        return all(d > 0 for d in self.per_seed) or all(d < 0 for d in self.per_seed)

    def text(self, a: str = "a", b: str = "b") -> str:
        """One phrase: `b - a: +5.3 errors (95% interval -1.0 to +11.7; per seed +4, +6, +6) of 550 reference
        tokens (+0.010 PER)`."""
        seeds = ", ".join(f"{d:+d}" for d in self.per_seed)
        return (f"{b} - {a}: {self.diff:+.1f} errors ({self.level:.0%} interval {self.low:+.1f} to {self.high:+.1f}; "
                f"per seed {seeds}) of {self.ref_tokens} reference tokens ({self.rate:+.3f} PER)")

    def to_dict(self) -> dict:
        return {"diff_errors": self.diff, "low": self.low, "high": self.high, "per_seed": list(self.per_seed),
                "ref_tokens": self.ref_tokens, "diff_per": self.rate, "level": self.level,
                "resolved": self.resolved, "same_direction": self.same_direction}


def paired_effect(errors_a: Sequence[Sequence[int]], errors_b: Sequence[Sequence[int]],
                  ref_lengths: Sequence[int], *, seed: int = 0, resamples: int = RESAMPLES,
                  level: float = LEVEL) -> Effect:
    """The paired difference b - a in errors, with a bootstrap interval over seeds and utterances.

    Args:
        errors_a, errors_b: (seeds, utterances) error counts (edit distance per utterance), the same seeds in the
            same order and the same utterances for both.
        ref_lengths: (utterances,) reference tokens per utterance.
        seed: the bootstrap's generator seed (same inputs and seed give the same interval).

    Raises ValueError when the shapes disagree or there is nothing to compare.
    """
    a, b = np.asarray(errors_a, dtype=np.int64), np.asarray(errors_b, dtype=np.int64)
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"paired_effect: expected two equal (seeds, utterances) arrays of errors, got shapes "
                         f"{a.shape} and {b.shape}")
    if len(ref_lengths) != a.shape[1]:
        raise ValueError(f"paired_effect: {len(ref_lengths)} reference lengths for {a.shape[1]} utterances")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"paired_effect: expected 0 < level < 1 and resamples >= 1, got {level} and {resamples}")
    d = b - a  # (seeds, utterances)
    k, n = d.shape
    rng = np.random.default_rng(seed)
    seed_idx = rng.integers(0, k, size=(resamples, k))
    utt_idx = rng.integers(0, n, size=(resamples, n))
    # resample the seeds, then the utterances (shared by every seed: they are the same utterances)
    boot = np.array([d[s][:, u].sum(axis=1).mean() for s, u in zip(seed_idx, utt_idx)])
    tail = (1 - level) / 2
    low, high = np.quantile(boot, [tail, 1 - tail])
    per_seed = d.sum(axis=1)
    return Effect(float(per_seed.mean()), float(low), float(high), tuple(int(x) for x in per_seed),
                  int(sum(ref_lengths)), level)


@dataclass
class Tally:
    """A study's two-way comparisons across `seeds` seeds: how many it made, how many came out the same way in
    every seed, and how many of those chance alone would give (each comparison: `chance_all_same(seeds)`)."""

    seeds: int
    made: list[str] = field(default_factory=list)
    all_same: list[str] = field(default_factory=list)

    def add(self, name: str, per_seed: Sequence[float]) -> bool:
        """Count one comparison (its seeds' signed differences b - a); returns whether all are of one sign."""
        if len(per_seed) != self.seeds:
            raise ValueError(f"Tally.add({name!r}): expected {self.seeds} per-seed differences, got {len(per_seed)}")
        self.made.append(name)
        same = all(x > 0 for x in per_seed) or all(x < 0 for x in per_seed)
        if same:
            self.all_same.append(name)
        return same

    @property
    def expected_by_chance(self) -> float:
        return len(self.made) * chance_all_same(self.seeds)

    def sentence(self) -> str:
        return (f"{len(self.made)} two-way comparisons across {self.seeds} seeds; {len(self.all_same)} came out the "
                f"same way in every seed, where chance alone (no effect: 2 x 0.5^{self.seeds} = "
                f"{chance_all_same(self.seeds):.2f} per comparison) would give {self.expected_by_chance:.1f}.")

    def to_dict(self) -> dict:
        return {"seeds": self.seeds, "comparisons": len(self.made), "all_same_direction": len(self.all_same),
                "expected_by_chance": self.expected_by_chance, "chance_per_comparison": chance_all_same(self.seeds),
                "names": list(self.made), "all_same_names": list(self.all_same)}
