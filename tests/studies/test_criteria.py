"""The seed's success criteria, the stability map and the tables on hand-made run records."""

import math

from workbench.records import RunRecord
from workbench.run.settings import RunSettings
from workbench.studies.criteria import (
    AXES, Rule, attach_step, explosion, format_table, run_summary, stability_map, verdict,
)


def record(losses, *, policy="freeze_params", n=2, events=(), coverage=(), params_bad=(), val_per=0.3,
           ctc_only=False, status="finished", seed=0) -> RunRecord:
    settings = RunSettings(name="r", steps=len(losses), policy=policy, freeze_steps=n if policy != "none" else 0,
                           ctc_only=ctc_only, seed=seed).to_dict()
    rec = RunRecord(settings, status=status, tables={"events": list(events), "coverage": list(coverage)},
                    attrs={"val_per": val_per})
    for k, (ctc, rnnt) in enumerate(losses):
        step = k + 1
        row = {"loss/ctc": ctc, "loss/total": ctc + (rnnt or 0.0), "params_finite": step not in params_bad}
        if rnnt is not None:
            row["loss/rnnt"] = rnnt
        rec.append(step, row)
    return rec


STEADY = [(1.0, 5.0)] * 6
UNFREEZE = [{"step": 3, "event": "unfreeze", "message": "Unfroze"}]


def test_attach_step_follows_the_policy():
    assert attach_step(record(STEADY).settings) == 3
    assert attach_step(record(STEADY, policy="loss_ramp").settings) == 1
    assert attach_step(record(STEADY, policy="none").settings) == 1
    assert attach_step(record(STEADY, ctc_only=True).settings) == 1


def test_every_criterion_holds_for_a_clean_run():
    v = verdict(record(STEADY, events=UNFREEZE), record(STEADY, ctc_only=True, val_per=0.3), Rule())
    assert v["all"] and v["passed"] == v["applicable"] == 5 and not v["reasons"]


def test_a_missing_unfreeze_and_a_decoder_outside_the_optimizer_break_the_clean_unfreeze():
    outside = [{"step": 4, "line": "x", "outside_optimizer": [["rnnt_decoder.joint.w", 1.0]]}]
    v = verdict(record(STEADY, coverage=outside), None, Rule())
    assert v["clean_unfreeze"] is False
    assert "unfreeze events at steps [], expected [3]" in v["reasons"]["clean_unfreeze"]
    assert "outside the optimizer at 1 step(s) from step 4" in v["reasons"]["clean_unfreeze"]


def test_the_explosion_reference_is_a_window_up_to_the_first_trainable_step_for_every_n():
    # the RNN-T term is 2 while frozen (steps 1-2) and 5 at the unfreeze: the reference is the median of 2, 2, 5
    losses = [(1.0, 2.0), (1.0, 2.0), (1.0, 5.0), (1.0, 45.0), (1.0, 60.0)]
    boom = explosion(record(losses), Rule(explode_factor=10.0, explode_window=3))
    assert boom == {"step": 4, "term": "rnnt", "value": 45.0, "reference": 2.0}
    # N = 0: no step before the first update but step 1; the window fills up with the steps after it
    late = [(1.0, 2.0), (1.0, 6.0), (1.0, 5.0), (1.0, 45.0), (1.0, 60.0)]
    assert explosion(record(late, policy="none"), Rule(explode_window=3)) == {
        "step": 5, "term": "rnnt", "value": 60.0, "reference": 5.0}


def test_one_small_batch_loss_is_not_an_explosion_reference():
    # a healthy small run: CTC 0.0098 at the unfreeze, 0.103 two steps later (10.5x one batch; below the floor's 10x)
    losses = [(0.012, 5.0), (0.011, 5.0), (0.0098, 5.0), (0.05, 4.0), (0.103, 4.0), (0.02, 3.5)]
    assert explosion(record(losses), Rule()) is None
    # the old one-batch reference would have called it one
    assert explosion(record(losses), Rule(explode_floor=0.0, explode_window=1))["value"] == 0.103
    # a real explosion clears the floor
    assert explosion(record(losses[:4] + [(5.0, 4.0)]), Rule())["step"] == 5


def test_per_against_the_control_uses_the_given_tolerance():
    run, control = record(STEADY, events=UNFREEZE, val_per=0.35), record(STEADY, ctc_only=True, val_per=0.3)
    assert verdict(run, control, Rule())["per_vs_control"] is False
    assert verdict(run, control, Rule(), per_tolerance=0.06)["per_vs_control"] is True
    assert "the seeds' spread 0.000" in verdict(run, control, Rule())["reasons"]["per_vs_control"]


def test_a_diverged_run_fails_no_nonfinite_and_has_no_per():
    losses = STEADY[:3] + [(math.nan, math.nan)] * 3
    v = verdict(record(losses, events=UNFREEZE, params_bad=(4, 5, 6), val_per=None), None, Rule())
    assert not v["no_nonfinite"] and not v["stable_after_unfreeze"] and not v["all_steps_complete"]
    assert v["reasons"]["no_nonfinite"] == "first non-finite loss or parameter at step 4"


def test_a_control_has_no_unfreeze_and_no_control():
    v = verdict(record(STEADY, ctc_only=True), None, Rule())
    assert v["clean_unfreeze"] is None and v["per_vs_control"] is None and v["applicable"] == 3


def test_run_summary_extends_the_one_summary():
    s = run_summary(record(STEADY, events=UNFREEZE), Rule(k_after=2))
    assert s["outcome"] == "unknown" and s["attach_step"] == 3  # no update ratios recorded: not measured
    assert s["loss_at_attach"] == 6.0 and s["loss_ratio_k_after"] == 1.0 and s["steps_skipped"] == 0


def test_the_stability_map_keeps_the_seeds_of_a_point_in_one_cell():
    cells, summaries, verdicts = [], {}, {}
    for seed, outcome in ((0, "healthy"), (1, "healthy"), (2, "diverged")):
        rid = f"run{seed}"
        cells.append({"axes": {"freeze_steps": 2, "lr": 1e-3, "seed": seed, "policy": "freeze_params"},
                      "run": rid, "control": None})
        summaries[rid] = {"outcome": outcome, "first_nonfinite_step": 4 if outcome == "diverged" else None,
                          "val_per": 0.1 * (seed + 1) if outcome == "healthy" else None}
        verdicts[rid] = {"passed": 5, "applicable": 5}
    [panel] = stability_map(cells, summaries, verdicts)
    [[cell]] = panel.cells
    assert cell["outcomes"] == {"healthy": 2, "diverged": 1} and cell["first_nonfinite_steps"] == [4]
    assert math.isclose(cell["val_per"], 0.15) and (cell["passed"], cell["applicable"]) == (15, 15)


def test_format_table():
    text = format_table([{"a": 1.23456, "b": None, "c": True}], ["a", "b", "c"])
    assert text.splitlines()[2].split() == ["1.235", "-", "yes"]


def test_median_final_per_by_n_is_set_against_controls_of_the_same_length():
    from workbench.studies.criteria import conclusions

    recs = {"n0": record(STEADY, policy="none", val_per=0.4), "n2": record(STEADY, events=UNFREEZE, val_per=0.2),
            "c4": record(STEADY[:4], ctc_only=True, val_per=0.5), "c6": record(STEADY, ctc_only=True, val_per=0.1)}
    summaries = {k: run_summary(r, Rule()) for k, r in recs.items()}
    verdicts = {k: verdict(r, None, Rule()) for k, r in recs.items()}
    cells = [{"axes": {**{a: None for a in AXES}, "freeze_steps": 0, "lr": 1e-3}, "run": "n0", "control": "c4"},
             {"axes": {**{a: None for a in AXES}, "freeze_steps": 2, "lr": 1e-3}, "run": "n2", "control": "c6"}]
    line = next(x for x in conclusions(cells, summaries, verdicts) if x.startswith("Median final"))
    assert "N=0: 0.400 (control of the same length 0.500), N=2: 0.200 (control of the same length 0.100)" in line
