"""Effect sizes in errors with a seeded bootstrap interval, and the chance count of "in every seed" results."""

import pytest

from workbench.studies.stats import Tally, chance_all_same, paired_effect


def test_chance_of_all_seeds_agreeing():
    assert chance_all_same(1) == 1.0
    assert chance_all_same(3) == 0.25
    assert chance_all_same(5) == pytest.approx(0.0625)
    with pytest.raises(ValueError):
        chance_all_same(0)


def test_a_consistent_difference_of_several_errors_is_resolved():
    refs = [10] * 20
    a = [[1] * 20 for _ in range(3)]
    b = [[1] * 15 + [2] * 5 for _ in range(3)]  # 5 more errors in every seed
    effect = paired_effect(a, b, refs)
    assert effect.diff == 5 and effect.per_seed == (5, 5, 5) and effect.ref_tokens == 200
    assert effect.rate == pytest.approx(0.025)
    assert 0 < effect.low <= 5 <= effect.high and effect.resolved and effect.same_direction
    assert "+5.0 errors" in effect.text("a", "b")


def test_a_one_error_difference_is_not_resolved():
    refs = [10] * 20
    a = [[1] * 20 for _ in range(3)]
    b = [[2] + [1] * 19, [1] * 20, [0] + [1] * 19]  # +1, 0, -1
    effect = paired_effect(a, b, refs)
    assert effect.diff == 0 and effect.per_seed == (1, 0, -1)
    assert effect.low < 0 < effect.high and not effect.resolved and not effect.same_direction


def test_the_interval_is_seeded_and_pairing_matters():
    refs = [12] * 30
    a = [[u % 4 for u in range(30)] for _ in range(3)]
    b = [[u % 4 + 1 for u in range(30)] for _ in range(3)]  # one more error on every utterance
    one, two = paired_effect(a, b, refs, seed=3), paired_effect(a, b, refs, seed=3)
    assert (one.low, one.high) == (two.low, two.high)
    # the utterances' shared spread cancels in the pairs: every resample gives the same +30
    assert one.low == one.high == one.diff == 30


def test_bad_shapes_name_what_was_expected():
    with pytest.raises(ValueError, match="seeds, utterances"):
        paired_effect([[1, 2]], [[1, 2], [3, 4]], [5, 5])
    with pytest.raises(ValueError, match="reference lengths"):
        paired_effect([[1, 2]], [[1, 2]], [5])


def test_tally_counts_comparisons_and_chance():
    tally = Tally(seeds=3)
    assert tally.add("x", [1, 2, 3]) and tally.add("y", [-1, -2, -0.5])
    assert not tally.add("z", [1, -1, 2]) and not tally.add("w", [0, 1, 1])
    d = tally.to_dict()
    assert d["comparisons"] == 4 and d["all_same_direction"] == 2 and d["expected_by_chance"] == 1.0
    assert "4 two-way comparisons" in tally.sentence() and "would give 1.0" in tally.sentence()
    with pytest.raises(ValueError, match="expected 3"):
        tally.add("v", [1, 2])
