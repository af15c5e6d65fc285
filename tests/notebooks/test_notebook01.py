"""Notebook 01 runs headless with the tiny preset alone (its parameters say only preset, seed, output_dir and the
session's checkpoint cache); its JSON summary carries every run's outcome and causal chain and agrees with the run
logs."""

import json
import time
from pathlib import Path

import numpy as np
import papermill as pm
import pytest

from workbench.records import OUTCOMES, RunLog, read_record, summarize
from workbench.studies.reproduce import SIZES, SINGLE_CHANGES

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = {"name", "config", "seed", "settings", "outcome", "outcome_reasons", "causal_chain", "tracer_verdict",
            "first_nonfinite_loss_step", "first_nonfinite_param_step", "overflow_steps", "outside_optimizer", "log"}


@pytest.fixture(scope="module")
def summary(tmp_path_factory, ctc_cache, ctc_warmup):
    assert ctc_warmup["steps"] == SIZES["tiny"].ctc_steps  # the preset's checkpoint is the session's
    out = tmp_path_factory.mktemp("nb01")
    t0 = time.perf_counter()
    pm.execute_notebook(
        str(ROOT / "notebooks" / "01_reproduce_nan_explosion.ipynb"), str(out / "01_executed.ipynb"),
        parameters=dict(preset="tiny", seed=0, output_dir=str(out), cache_dir=str(ctc_cache)),
        kernel_name="rnnt-workbench", cwd=str(ROOT), progress_bar=False)
    return json.loads((out / "01_summary.json").read_text()), out, time.perf_counter() - t0


def test_every_configuration_runs_with_every_seed(summary):
    data, _, _ = summary  # its time is a benchmark figure (the summary's wall_s), not a test: load varies
    assert data["seeds"] == [0, 1, 2]
    configs = {r["config"] for r in data["runs"]}
    assert {"seed_faithful", *SINGLE_CHANGES, "freeze_and_mute_N3", "rebuild_decoder_lr_0.001"} <= configs
    for n in SIZES["tiny"].freeze_steps:
        assert {f"freeze_params_N{n}_rebuild", f"freeze_params_N{n}_no_rebuild"} <= configs
    assert len(data["runs"]) == 3 * len(configs)
    for run in data["runs"]:
        assert REQUIRED <= set(run), run["name"]
        assert run["outcome"] in OUTCOMES and run["outcome_reasons"]
        assert all(link["kind"] in ("producer", "escape", "caught", "contamination", "loss")
                   for link in run["causal_chain"])


def test_summary_agrees_with_the_run_logs(summary):
    data, _, _ = summary
    for run in data["runs"]:
        record = read_record(run["log"])
        again = summarize(record)
        assert (again["outcome"], again["tracer_verdict"]) == (run["outcome"], run["tracer_verdict"]), run["name"]
        with RunLog(run["log"]) as log:
            steps, total = log.series("loss/total")
            first_bad = next((int(s) for s, v in zip(steps, total) if not np.isfinite(v)), None)
            assert first_bad == run["first_nonfinite_loss_step"], run["name"]


def test_the_seed_run_reproduces_the_signature_through_an_escape(summary):
    """On CPU with torch's fp16 kernels the seed's loop diverges at the tiny preset: these regression checks pin
    the measured mechanism (they fail if it or the instruments change)."""
    data, _, _ = summary
    seed_runs = [r for r in data["runs"] if r["config"] == "seed_faithful"]
    assert data["signature_reproduced"] is all(data["signature_by_seed"])
    for run in seed_runs:
        kinds = [link["kind"] for link in run["causal_chain"]]
        assert run["outcome"] == "diverged" and "escape" in kinds and "contamination" in kinds
        assert run["outside_optimizer"], "a stale-optimizer divergence must show parameters outside the optimizer"
    assert data["seed_causal_chain"] == seed_runs[0]["causal_chain"]
    assert any("signature reproduced" in line for line in data["conclusions"])


def test_only_healthy_changes_are_called_fixes(summary):
    data, _, _ = summary
    configs = {c["name"]: c for c in data["configs"]}
    fixes = next((line for line in data["conclusions"] if line.startswith("Changing one of these alone")), "")
    for name in SINGLE_CHANGES:
        named = f"{name} (" in fixes
        assert named == (configs[name]["outcomes"].get("healthy", 0) == 3), name
    for name in ("fp32", "bf16"):  # the decoder stays outside the stale optimizer: finite, not fixed
        assert configs[name]["outcomes"].get("healthy", 0) == 0, name


def test_every_run_has_a_step_matched_control_and_its_rnnt_per_says_whether_the_decoder_works(summary):
    data, _, _ = summary
    for run in data["runs"]:
        control = read_record(Path(run["log"]).with_name(run["control"] + ".h5"))
        assert control.settings["ctc_only"] and control.settings["seed"] == run["seed"]
        assert (control.settings["steps"], control.settings["precision"]) == (
            run["settings"]["steps"], run["settings"]["precision"])
        assert run["control_val_per"] == control.attrs.get("val_per")
        if run["val_rnnt_per"] is not None:
            assert run["val_rnnt_functional"] == (0.5 <= run["val_rnnt_length_ratio"] <= 2.0)
            assert len(run["val_rnnt_errors"]) == len(run["val_ref_lengths"]) == 80  # the larger validation split
    made = [e for e in data["effects"] if e["effect"] is not None]
    assert data["comparisons"]["comparisons"] == len(made) > 0
    assert all(e["reason"].startswith("not compared") for e in data["effects"] if e["effect"] is None)
    assert any(line.startswith("Paired comparisons: ") for line in data["conclusions"])


def test_figures_are_written(summary):
    data, out, _ = summary
    assert {"01_ctc_warmup.png", "01_seed_chain.png", "01_seed_run.png", "01_outcomes.png"} <= set(data["figures"])
    assert all((out / f).stat().st_size > 10_000 for f in data["figures"])


def test_a_second_run_into_the_same_folder_is_refused(summary, ctc_cache):
    _, out, _ = summary
    before = (out / "01_summary.json").read_bytes()
    with pytest.raises(pm.PapermillExecutionError, match="overwrite=True"):
        pm.execute_notebook(
            str(ROOT / "notebooks" / "01_reproduce_nan_explosion.ipynb"), str(out / "again.ipynb"),
            parameters=dict(preset="tiny", seed=0, output_dir=str(out), cache_dir=str(ctc_cache)),
            kernel_name="rnnt-workbench", cwd=str(ROOT), progress_bar=False)
    assert (out / "01_summary.json").read_bytes() == before


def test_the_notebook_ends_with_diagnose_finding_a_fix_on_its_own(summary):
    """Notebook 01's last section: `workbench diagnose` on the seed's run, reusing the sweep's runs."""
    data, _, _ = summary
    diagnosis = data["diagnosis"]
    seed_outcomes = [r["outcome"] for r in data["runs"] if r["config"] == "seed_faithful"]
    assert diagnosis["control"]["outcomes"] == seed_outcomes and diagnosis["scope"]["seeds"] == data["seeds"]
    assert diagnosis["scope"]["reused_runs"] > 0  # the configurations' runs are not run twice
    best = next(c for c in diagnosis["candidates"] if c["name"] == diagnosis["recommended"])
    assert best["healthy"] == best["seeds"] == 3 and best["coverage"]
    finite_outside = [c for c in diagnosis["candidates"] if c["outside_seeds"] and "diverged" not in c["outcomes"]]
    assert finite_outside and all(c["outcomes"] == ["stalled"] * 3 for c in finite_outside)
    assert isinstance(diagnosis["same_as_notebook"], bool) and "notebook" in diagnosis["lines"][-1]
