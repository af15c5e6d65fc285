"""The findings the notebooks report, guarded on the reference model at the tiny preset: the seed's loop diverges
through a guard it bypasses, the rebuilt optimizer trains, and a decoder left outside the optimizer is not healthy
even where nothing goes non-finite."""

from pathlib import Path

import pytest

from workbench.records import classify, summarize
from workbench.run.joint import run_joint
from workbench.run.settings import RunSettings

SAMPLE = Path(__file__).resolve().parents[2] / "data_samples"
STEPS = 20


@pytest.fixture(scope="module")
def runs(ctc_checkpoint):
    settings = {
        "seed": RunSettings(name="seed", steps=STEPS, lr=1e-3),
        "rebuilt": RunSettings(name="rebuilt", steps=STEPS, lr=1e-3, rebuild_at_stage_change=True),
        "outside_fp32": RunSettings(name="outside_fp32", steps=STEPS, lr=1e-3, precision="fp32"),
    }
    return {name: run_joint(ctc_checkpoint, SAMPLE, s) for name, s in settings.items()}


def test_the_seed_loop_diverges_through_an_escape(runs):
    s = summarize(runs["seed"])
    kinds = [link["kind"] for link in s["causal_chain"]]
    assert s["outcome"] == "diverged"
    assert kinds[0] == "producer" and "escape" in kinds and "contamination" in kinds and kinds[-1] == "loss"
    escape = next(k for k in s["causal_chain"] if k["kind"] == "escape")
    assert escape["step"] <= next(k["step"] for k in s["causal_chain"] if k["kind"] == "contamination")
    assert s["tracer_verdict"].startswith("step") and "escape" in s["tracer_verdict"]


def test_the_rebuilt_optimizer_trains(runs):
    s = summarize(runs["rebuilt"])
    assert s["outcome"] == "healthy", s["outcome_reasons"]
    assert all(link["kind"] in ("producer", "caught") for link in s["causal_chain"])


def test_a_decoder_outside_the_optimizer_is_not_healthy_even_when_finite(runs):
    outcome = classify(runs["outside_fp32"])
    assert runs["outside_fp32"].first_nonfinite_step() is None
    assert outcome.kind == "stalled"
    assert any(r.startswith("rnnt_decoder.") and "outside the optimizer" in r for r in outcome.reasons)


# ------------------------------------------------------------------ the README findings block (views/findings.py)

import json  # noqa: E402

from workbench.views import findings as fv  # noqa: E402

README = "# T\n\n## What it found\n\n<!-- findings:start -->\nold\n<!-- findings:end -->\n\n## Next\n"


def _nb01(tmp, val_per=0.3, healthy=3):
    s = {"scope": "preset tiny, 3 seeds", "wall_s": 42.0, "signature_by_seed": [True, True, False],
         "configs": [{"name": "seed_faithful", "outcomes": {"diverged": 3}, "val_per": [None] * 3,
                      "decisive": ["step 4 escape: the clip made it NaN"]},
                     {"name": "rebuild", "outcomes": {"healthy": healthy, "inconclusive": 3 - healthy},
                      "val_per": [val_per] * 3, "decisive": [None] * 3, "control_val_per": [0.25] * 3,
                      "val_rnnt_per": [0.9, 1.0, 1.1], "val_rnnt_length_ratio": [0.0, 1.2, 3.0],
                      "val_rnnt_functional": [False, True, False]}],
         "comparisons": {"comparisons": 11, "seeds": 3, "all_same_direction": 4, "expected_by_chance": 2.75},
         "conclusions": ["one long generated sentence"] * 30,
         "provenance": {"commit": "abc1234", "date": "2026-12-05 15:00 UTC", "machine": "m1 (2 CPUs)"}}
    (tmp / "01_reproduce_nan_explosion").mkdir(parents=True, exist_ok=True)
    (tmp / "01_reproduce_nan_explosion" / "01_summary.json").write_text(json.dumps(s))


def _nb02(tmp):
    from workbench.studies.boundary import Cell, CellState

    cells = []
    for n in (0, 6):
        state = CellState(Cell("freeze_params", n))
        state.probes = {1e-2: [{"seed": 0, "outcome": "healthy", "first_nonfinite_step": None, "decisive_link": None}],
                        1.0: [{"seed": 0, "outcome": "diverged", "first_nonfinite_step": 3,
                               "decisive_link": "step 3 escape"}]}
        cells.append(state.result())
    s = {"scope": "grid", "wall_s": 100.0, "conclusions": ["c"], "boundary": {
        "cells": cells, "answers": ["Scope: preset tiny", "freeze_params, corrected, fp16, equal steps after the unfreeze: N "
                                 "moved it in 0 of 1", "freeze_params, corrected, fp32, equal steps after the unfreeze: "
                                 "N in 0 of 1"], "scope": "tiny"}}
    (tmp / "02_compare_freeze_lengths").mkdir(parents=True, exist_ok=True)
    (tmp / "02_compare_freeze_lengths" / "02_summary.json").write_text(json.dumps(s))


def _paths(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    return readme, tmp_path / "docs" / "figures", tmp_path / "docs" / "findings.md"


def test_block_is_short_with_tables_provenance_and_the_full_conclusions_in_the_doc(tmp_path):
    readme, figures, doc = _paths(tmp_path)
    _nb01(tmp_path / "src")
    _nb02(tmp_path / "src")
    fv.regenerate(tmp_path / "src", readme, figures, doc)
    text = readme.read_text()
    block = fv.current_block(readme)
    assert len(block.splitlines()) <= fv.MAX_BLOCK_LINES and text.endswith("## Next\n")
    assert "| seed_faithful | 3/3 diverged | - (-) | - | step 4 escape" in block
    # the final CTC PER beside its step-matched control's; the RNN-T PER with its length ratio and functional seeds
    assert "| rebuild | 3/3 healthy | 0.3 (0.25) | 1 (ratio 1.2; 1/3 functional) | - |" in block
    assert "11 paired comparisons in errors over 3 seeds; 4 came out the same way in every seed, where chance alone " \
           "would give 2.8." in block
    assert "commit abc1234, 2026-12-05 15:00 UTC, m1 (2 CPUs)" in block
    assert "| freeze_params, corrected, fp16, after unfreeze | 0.01 .. 1, diverged 1 | 0.01 .. 1, diverged 1 |" \
        in block
    assert "freeze_params, corrected, fp16, equal steps after the unfreeze: N moved it" in block
    assert "fp32, equal steps after the unfreeze: N" not in block  # that answer is in the table and the doc
    assert "docs/findings.md" in block
    assert "one long generated sentence" not in block
    assert doc.read_text().count("one long generated sentence") == 30


def test_a_notebook_not_rerun_keeps_its_section(tmp_path):
    readme, figures, doc = _paths(tmp_path)
    _nb01(tmp_path / "both")
    _nb02(tmp_path / "both")
    fv.regenerate(tmp_path / "both", readme, figures, doc)
    nb02 = fv.sections(fv.current_block(readme))["02_compare_freeze_lengths"]
    _nb01(tmp_path / "only01", val_per=0.3)
    fv.regenerate(tmp_path / "only01", readme, figures, doc)
    assert fv.sections(fv.current_block(readme))["02_compare_freeze_lengths"] == nb02
    assert "02_compare_freeze_lengths" in fv.sections(doc.read_text())


def test_numbers_from_another_machine_are_compared_with_tolerance_and_never_overwritten_silently(tmp_path, capsys):
    readme, figures, doc = _paths(tmp_path)
    _nb01(tmp_path / "a", val_per=0.300)
    fv.regenerate(tmp_path / "a", readme, figures, doc)
    _nb01(tmp_path / "b", val_per=0.301)  # within tolerance: the same finding
    assert fv.regenerate(tmp_path / "b", readme, figures, doc) == []
    _nb01(tmp_path / "c", val_per=0.4, healthy=2)
    moved = fv.regenerate(tmp_path / "c", readme, figures, doc)
    assert "01_reproduce_nan_explosion: rebuild: healthy seeds: 3 -> 2" in moved
    assert any("median final CTC PER: 0.301 -> 0.4" in m for m in moved)
    assert "Numbers that moved beyond the tolerance" in doc.read_text()
    assert fv.compare_numbers({"x": 1.0}, {"x": 1.04}) == [] and fv.compare_numbers({"x": 1.0}, {"x": 1.2})


def test_a_block_from_before_sections_keeps_each_notebooks_findings_until_it_is_rerun(tmp_path):
    readme, figures, doc = _paths(tmp_path)
    readme.write_text(README.replace("old\n", "From `notebooks/01_reproduce_nan_explosion.ipynb` (x):\n\n- old 01\n\n"
                                              "From `notebooks/02_compare_freeze_lengths.ipynb` (1002 s):\n\n"
                                              "- old 02\n"))
    _nb02(tmp_path / "only02")
    fv.regenerate(tmp_path / "only02", readme, figures, doc)
    kept = fv.sections(fv.current_block(readme))
    assert "- old 01" in kept["01_reproduce_nan_explosion"] and "earlier regeneration" in \
        kept["01_reproduce_nan_explosion"]
    assert "old 02" not in fv.current_block(readme)


def test_a_notebook_summary_records_where_it_came_from(tmp_path):
    from workbench.views.notebook import write_summary

    written = json.loads(write_summary(tmp_path, "s.json", {"a": 1}).read_text())
    assert set(written["provenance"]) == {"commit", "date", "machine"} and written["a"] == 1
    assert written["provenance"]["commit"] != "unknown"  # the tests run from a checkout
    kept = {"commit": "abc1234", "date": "d", "machine": "m"}
    assert json.loads(write_summary(tmp_path, "t.json", {"provenance": kept}).read_text())["provenance"] == kept
