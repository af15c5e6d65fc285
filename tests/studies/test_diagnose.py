"""`workbench diagnose`: the candidates a failing run's evidence calls for, their runs from the same fork over
seeds, and a recommendation only where the control reproduces the failure and a candidate is healthy in every
seed (finite is not fixed)."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.cli import main
from workbench.records import RunRecord, read_record
from workbench.run.joint import run_joint
from workbench.studies import reproduce
from workbench.studies.diagnose import CANDIDATES, Candidate, DiagnoseError, diagnose, notebook_section
from workbench.studies.diagnose.candidates import changed, derive
from workbench.studies.diagnose.report import recommend
from workbench.studies.diagnose.runner import same_run

SAMPLE = Path(__file__).resolve().parents[2] / "data_samples"
SEED_KINDS = {"outside_optimizer": "", "stale_gradients": "", "clip_nonfinite": "", "fp16_overflow": ""}


def test_the_seed_runs_evidence_calls_for_notebook_01s_single_changes_each_changing_one_thing():
    control = dataclasses.replace(reproduce.seed_run(12), name="control")
    picked = {cls.name: settings for cls, settings in derive(SEED_KINDS, control)}
    assert list(picked) == ["rebuild_at_stage_change", "freeze_then_rebuild", "clip_optimizer_params",
                            "zero_grad_model", "bf16", "fp32", "init_scale_4096"]
    notebook = {c.name: c for c in reproduce.configurations(control, [1])}
    for name, settings in picked.items():  # the same runs as notebook 01's configurations: one place for each
        assert settings == notebook[CANDIDATES[name].config], name
    # a loss that falls too slowly once the optimizer is rebuilt: the decoder's own lr, notebook 01's run again
    (cls, then), = derive({"slow_loss": ""}, picked["rebuild_at_stage_change"])
    assert cls.name == "decoder_lr"
    assert same_run(then) == same_run(notebook["rebuild_decoder_lr_0.001"])  # the same training, so reused
    assert set(changed(control, picked["fp32"])) == {"precision"}
    # a change the run already has is no candidate: an fp32 run that rebuilds gets neither
    fixed = dataclasses.replace(control, precision="fp32", rebuild_at_stage_change=True)
    names = [cls.name for cls, _ in derive(SEED_KINDS, fixed)]
    assert "fp32" not in names and "rebuild_at_stage_change" not in names and "bf16" in names


def test_a_policy_that_keeps_the_optimizer_at_the_unfreeze_gets_the_rebuild_there():
    control = reproduce.configurations(reproduce.seed_run(12), [3], only=["freeze_params_N3_no_rebuild"])[0]
    picked = {cls.name: s for cls, s in derive({"outside_optimizer": "", "kept_at_unfreeze": ""}, control)}
    assert changed(control, picked["rebuild_at_unfreeze"]) == {"rebuild_at_unfreeze": (False, True)}
    assert "freeze_then_rebuild" not in picked  # it freezes already


def test_named_candidates_replace_the_derived_ones_and_unknown_names_are_refused():
    control = reproduce.seed_run(12)
    assert [c.name for c, _ in derive({}, control, ("fp32",))] == ["fp32"]
    with pytest.raises(ValueError, match="unknown fp64; expected some of rebuild_at_stage_change"):
        derive({}, control, ("fp64",))


def test_the_registry_is_open_and_checks_what_a_candidate_answers():
    class HalfLr(Candidate, name="test_half_lr", answers=("clip_nonfinite",)):
        """Half the learning rate."""

        code = "lr / 2"

        def settings(self, control):
            return dataclasses.replace(control, lr=control.lr / 2)

    try:
        picked = derive({"clip_nonfinite": ""}, reproduce.seed_run(12))
        assert "test_half_lr" in [c.name for c, _ in picked] and HalfLr.describe() == "Half the learning rate."
        with pytest.raises(ValueError, match="already registered"):
            type("Again", (Candidate,), {}, name="test_half_lr", answers=())
        with pytest.raises(ValueError, match="answers 'nan_loss'"):
            type("Wrong", (Candidate,), {}, name="test_wrong", answers=("nan_loss",))
    finally:
        CANDIDATES.pop("test_half_lr", None)


def _row(name, outcomes, changed=("x",)):
    return {"name": name, "outcomes": list(outcomes), "healthy": outcomes.count("healthy"), "seeds": len(outcomes),
            "label": name, "changed": list(changed), "changes": name, "reasons": ["why"], "code": f"code {name}"}


def test_the_recommendation_is_the_smallest_change_healthy_in_every_seed():
    control = _row("control", ["diverged"] * 3)
    rows = [_row("big", ["healthy"] * 3, ("a", "b")), _row("finite", ["stalled"] * 3),
            _row("small", ["healthy"] * 3), _row("two_of_three", ["healthy", "healthy", "stalled"])]
    name, lines = recommend(control, rows, "diverged", "scope")
    assert name == "small" and "also healthy in every seed: big" in lines[1] and lines[2] == "In code: code small."
    name, lines = recommend(control, rows[1:2] + rows[3:], "diverged", "scope")
    assert name is None and "No candidate made this run healthy" in lines[-1] and "two_of_three" in lines[-1]


def test_no_recommendation_when_the_control_does_not_reproduce_the_failure():
    control = _row("control", ["diverged", "healthy", "diverged"])
    name, lines = recommend(control, [_row("small", ["healthy"] * 3)], "diverged", "scope")
    assert name is None and "reproduced in only 2/3 seeds" in lines[-1]


def test_a_log_without_a_checkpoint_is_refused_in_one_line(tmp_path):
    record = RunRecord(settings={"name": "lightning"}, status="finished", attrs={}, path=str(tmp_path / "l.h5"))
    with pytest.raises(DiagnoseError, match="l.h5: expected the log of a joint-stage run forked from a CTC-warm"):
        diagnose(record)


@pytest.fixture(scope="module")
def seed_log(tmp_path_factory, ctc_checkpoint):
    """The seed's joint stage at tiny (12 steps, seed 0), logged."""
    log = tmp_path_factory.mktemp("diagnose") / "seed.h5"
    run_joint(ctc_checkpoint, SAMPLE, reproduce.seed_run(reproduce.SIZES["tiny"].steps), log_path=log)
    return log


@pytest.mark.slow
def test_diagnose_of_the_seeds_run_recommends_an_optimizer_coverage_fix_healthy_in_every_seed(seed_log, capsys):
    out = seed_log.with_name("diag.json")
    assert main(["diagnose", str(seed_log), "--seeds", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert set(data) >= {"control", "candidates", "recommended", "scope"}
    assert data["control"]["outcomes"] == ["diverged"] * 3
    for c in data["candidates"]:
        assert {"name", "changes", "outcomes", "healthy", "seeds", "reasons"} <= set(c) and c["seeds"] == 3
    by = {c["name"]: c for c in data["candidates"]}
    best = by[data["recommended"]]
    assert best["healthy"] == 3 and best["coverage"] and best["outside_seeds"] == 0
    # finite but the decoder left outside the optimizer: stalled, never recommended
    outside = [c for c in data["candidates"] if c["outside_seeds"] and "diverged" not in c["outcomes"]]
    assert {"fp32", "bf16", "clip_optimizer_params"} <= {c["name"] for c in outside}
    assert all(c["outcomes"] == ["stalled"] * 3 for c in outside)
    assert data["scope"]["seeds"] == [0, 1, 2] and data["scope"]["steps"] == reproduce.SIZES["tiny"].steps
    assert f"Recommended: {data['recommended']}" in printed and "3/3 diverged" in printed
    # notebook 01's way: every run already made is reused, nothing runs again
    made = {p.stem: read_record(p) for p in (seed_log.parent / "seed_diagnose" / "runs").glob("*.h5")}
    healthy = [{"name": best["name"], "outcomes": {"healthy": 3}}, {"name": "fp32", "outcomes": {"stalled": 3}}]
    rows, lines, summary = notebook_section(read_record(seed_log), made, seeds=3, out=seed_log.with_name("nb"),
                                            configs=healthy)
    assert summary["scope"]["reused_runs"] == summary["scope"]["runs"] == 3 * len(rows)
    assert summary["recommended"] == data["recommended"] and not (seed_log.with_name("nb") / "runs").exists()
    assert summary["same_as_notebook"] and lines[-1].endswith(f"every seed ({best['name']}).")


@pytest.mark.slow
# a stalled and a diverged configuration at tiny; benchmarks/bench_diagnose.py --configs all diagnoses every
# notebook-01 configuration that is not healthy
@pytest.mark.parametrize("config", ["fp32", "freeze_params_N1_no_rebuild"])
def test_a_notebook_configuration_that_is_not_healthy_gets_a_recommendation_healthy_in_every_seed(
        config, ctc_checkpoint, tmp_path):
    settings = reproduce.configurations(reproduce.seed_run(reproduce.SIZES["tiny"].steps), [1], only=[config])[0]
    log = tmp_path / f"{config}.h5"
    record = run_joint(ctc_checkpoint, SAMPLE, settings, log_path=log)
    found = diagnose(read_record(log), seeds=3)
    assert found.scope["run_outcome"] != "healthy" and found.control["reproduced"], found.lines
    best = next(c for c in found.candidates if c["name"] == found.recommended)
    assert best["healthy"] == 3 and record.name == config


def test_the_readmes_candidate_example_runs_as_written(tmp_path):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "class TenthLr(Candidate" in b]
    (tmp_path / "example.py").write_text(code)
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['clip_optimizer_params', 'zero_grad_model', 'tenth_lr']"


@pytest.mark.slow
def test_a_validation_changes_no_training_number_so_diagnose_reuses_runs_that_measured_one(ctc_checkpoint):
    settings = dataclasses.replace(reproduce.seed_run(6), rebuild_at_stage_change=True, decoder_lr=1e-3)
    measured = run_joint(ctc_checkpoint, SAMPLE, dataclasses.replace(settings, eval_at_start=True,
                                                                     eval_after_attach=2, eval_at_end=True))
    bare = run_joint(ctc_checkpoint, SAMPLE, same_run(settings))
    assert measured.tables.get("validation") and not bare.tables.get("validation")
    assert measured.losses == bare.losses and measured.prefixed("update_ratio") == bare.prefixed("update_ratio")
