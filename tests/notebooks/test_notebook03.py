"""Notebook 03 runs headless with papermill and writes a summary that agrees with its run log."""

import json
import math
from pathlib import Path

import numpy as np
import papermill as pm
import pytest

from workbench.records import RunLog, read_record, summarize

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def executed(tmp_path_factory, ctc_cache, ctc_warmup):
    out = tmp_path_factory.mktemp("nb03")
    parameters = dict(preset="tiny", seed=0, output_dir=str(out), cache_dir=str(ctc_cache),
                      ctc_steps=ctc_warmup["steps"], ctc_lr=ctc_warmup["lr"], steps=6, freeze_steps=0, lr=1e-5,
                      policy="none", precision="fp16", semantics="seed_faithful")
    pm.execute_notebook(str(ROOT / "notebooks" / "03_interactive_explorer.ipynb"), str(out / "03_executed.ipynb"),
                        parameters=parameters, kernel_name="rnnt-workbench", cwd=str(ROOT), progress_bar=False)
    return json.loads((out / "03_summary.json").read_text()), out, parameters


def test_notebook_summary_holds_the_parameter_run(executed):
    data, out, parameters = executed
    assert data["preset"] == "tiny" and data["seed"] == 0
    run = data["run"]
    for key in ("steps", "lr", "policy", "freeze_steps", "precision", "semantics"):
        assert run["settings"][key] == parameters[key], key
    assert set(run["final_losses"]) >= {"total", "ctc", "rnnt"}
    assert {"first_nonfinite_loss_step", "first_nonfinite_param_step", "tracer_verdict", "val_per"} <= set(run)
    assert (out / data["figure"]).stat().st_size > 10_000


def test_notebook_summary_agrees_with_its_run_log(executed):
    data, _, _ = executed
    run = data["run"]
    with RunLog(run["log"]) as log:
        steps, total = log.series("loss/total")
        assert steps.tolist() == list(range(1, run["settings"]["steps"] + 1))
        first_bad = next((int(s) for s, v in zip(steps, total) if not np.isfinite(v)), None)
        assert first_bad == run["first_nonfinite_loss_step"]
        final = run["final_losses"]["total"]
        assert (math.isnan(total[-1]) and final == "nan") or total[-1] == final
        tracer = log.table("tracer") if "tracer" in log.table_names() else []
        assert run["tracer_verdict"] == summarize(read_record(run["log"]))["tracer_verdict"]
        assert run["outcome"] in ("diverged", "stalled", "healthy") and run["outcome_reasons"]
    if run["first_nonfinite_loss_step"] is not None:
        # the tracer checks every step until its first replay, so a non-finite loss cannot go unexplained
        assert run["tracer_verdict"] is not None
        assert tracer[0]["step"] <= run["first_nonfinite_loss_step"]


def test_notebook_is_committed_without_outputs():
    nb = json.loads((ROOT / "notebooks" / "03_interactive_explorer.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code)
    assert "parameters" in code[0]["metadata"].get("tags", [])
