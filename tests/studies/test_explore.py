"""Notebook 03's explorer: runs overlay and clear, the widgets drive the same function, and the notebook runs
headless with papermill and writes a summary that agrees with its run log."""

import json
import math
from pathlib import Path

import numpy as np
import papermill as pm
import pytest

from workbench.experiment import ctc_warm_checkpoint
from workbench.explore import CONTROLS, Explorer, build_controls, settings_from
from workbench.records import RunLog

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data_samples"
FAST = dict(warmup=0, lr=1e-4, policy="none", precision="fp32", semantics="corrected", steps=2, trace=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path, _ = ctc_warm_checkpoint(SAMPLE, "tiny", seed=0, steps=8, lr=3e-3,
                                  cache_dir=tmp_path_factory.mktemp("cache"), log=lambda s: None)
    return path


class Recorder:
    """A figure view that keeps what it was asked to show."""

    def __init__(self):
        self.figures = []

    def show(self, fig):
        self.figures.append(fig)


def test_runs_overlay_and_clear(checkpoint, tmp_path):
    explorer = Explorer(checkpoint, SAMPLE, tmp_path, every=1)
    view, lines = Recorder(), []
    first = explorer.run(settings_from(FAST), view=view, log=lines.append)
    second = explorer.run(settings_from(dict(FAST, lr=1e-3)), view=view, log=lines.append)
    assert first.name.startswith("#1 ") and second.name.startswith("#2 ")
    assert [r.name for r in explorer.history] == [first.name, second.name]
    assert list(explorer.overlay) == [first.name, second.name]
    assert explorer.overlay[second.name].losses["total"] == second.losses["total"]
    # same checkpoint and batches: the two forks agree at step 1 and differ after the first update
    assert first.losses["total"][0] == second.losses["total"][0]
    assert first.losses["total"][1] != second.losses["total"][1]
    # one redraw per step and one at each run's end; the last shows both runs
    assert len(view.figures) == 2 * (FAST["steps"] + 1)
    labels = {line.get_label() for line in view.figures[-1].axes[0].get_lines()}
    assert any(label.startswith("#1 ") for label in labels) and any(label.startswith("#2 ") for label in labels)
    assert any(line.startswith(f"{second.name}: finite throughout") for line in lines)
    for result in (first, second):
        with RunLog(result.log_path) as log:
            assert log.series("loss/total")[1].tolist() == result.losses["total"]

    explorer.clear()
    assert explorer.history == [] and explorer.overlay == {}
    third = explorer.run(settings_from(FAST))
    assert third.name.startswith("#3 ") and list(explorer.overlay) == [third.name]
    assert explorer.figure().axes[0].get_lines()


class BrokenView:
    def show(self, fig):
        raise RuntimeError("display failed")


def test_a_run_interrupted_mid_way_is_not_kept(checkpoint, tmp_path):
    explorer = Explorer(checkpoint, SAMPLE, tmp_path, every=1)
    kept = explorer.run(settings_from(FAST), log=lambda line: None)
    with pytest.raises(RuntimeError, match="display failed"):
        explorer.run(settings_from(FAST), view=BrokenView(), log=lambda line: None)
    assert explorer.history == [kept] and list(explorer.overlay) == [kept.name]


def test_settings_from_rejects_unknown_or_missing_values():
    with pytest.raises(ValueError, match="'warmpu'"):
        settings_from(dict(FAST, warmpu=3))
    with pytest.raises(ValueError, match="'semantics'"):
        settings_from({k: v for k, v in FAST.items() if k != "semantics"})


def test_controls_drive_the_explorer_without_a_frontend(checkpoint, tmp_path):
    explorer = Explorer(checkpoint, SAMPLE, tmp_path)
    ui = build_controls(explorer, dict(FAST, seed=0))
    assert set(ui.controls) == set(CONTROLS)
    ui.controls["lr"].value = 1e-3
    ui.controls["policy"].value = "freeze_params"
    ui.controls["warmup"].value = 1
    assert explorer.history == []  # moving a control runs nothing
    ui.run_button.click()
    assert len(explorer.history) == 1, ui.messages.outputs
    settings = explorer.history[0].settings
    assert (settings["lr"], settings["policy"], settings["warmup"], settings["trace"]) == (1e-3, "freeze_params", 1,
                                                                                          False)
    assert not ui.run_button.disabled
    assert [o["data"].keys() for o in ui.plot.outputs] == [{"image/png", "text/plain"}]
    assert "finite throughout" in "".join(o["text"] for o in ui.messages.outputs)

    ui.run_button.click()
    assert len(explorer.history) == 2 and len(explorer.overlay) == 2
    ui.clear_button.click()
    assert explorer.overlay == {} and ui.plot.outputs == () and ui.messages.outputs == ()


def test_controls_show_a_failing_run_in_their_messages(checkpoint, tmp_path):
    explorer = Explorer(checkpoint, SAMPLE, tmp_path)
    ui = build_controls(explorer, dict(FAST, batch_size=0))
    ui.run_button.click()
    assert explorer.history == []
    assert "Traceback" in "".join(o["text"] for o in ui.messages.outputs)
    assert not ui.run_button.disabled


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    out = tmp_path_factory.mktemp("nb03")
    parameters = dict(preset="tiny", seed=0, output_dir=str(out), ctc_steps=8, steps=6, warmup=0, lr=1e-5,
                      policy="none", precision="fp16", semantics="seed_faithful")
    pm.execute_notebook(str(ROOT / "notebooks" / "03_interactive_explorer.ipynb"), str(out / "03_executed.ipynb"),
                        parameters=parameters, kernel_name="rnnt-workbench", cwd=str(ROOT), progress_bar=False)
    return json.loads((out / "03_summary.json").read_text()), out, parameters


def test_notebook_summary_holds_the_parameter_run(executed):
    data, out, parameters = executed
    assert data["preset"] == "tiny" and data["seed"] == 0
    run = data["run"]
    for key in ("steps", "lr", "policy", "warmup", "precision", "semantics"):
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
        assert (tracer[0]["line"] if tracer else None) == run["tracer_verdict"]
    if run["first_nonfinite_loss_step"] is not None:
        # the tracer checks every step until its first replay, so a non-finite loss cannot go unexplained
        assert run["tracer_verdict"] is not None
        assert tracer[0]["step"] <= run["first_nonfinite_loss_step"]


def test_notebook_is_committed_without_outputs():
    nb = json.loads((ROOT / "notebooks" / "03_interactive_explorer.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code)
    assert "parameters" in code[0]["metadata"].get("tags", [])
