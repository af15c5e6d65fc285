"""The explorer's widgets: derived from the settings schema, they drive the same Explorer without a frontend."""

from pathlib import Path

import pytest

from workbench.records import classify
from workbench.studies.explore import CONTROLS, Explorer
from workbench.views.explorer import build_controls

SAMPLE = Path(__file__).resolve().parents[2] / "data_samples"
FAST = dict(freeze_steps=0, lr=1e-4, policy="none", precision="fp32", semantics="corrected", steps=2, trace=False)


@pytest.fixture()
def checkpoint(ctc_checkpoint):
    return ctc_checkpoint


def test_controls_drive_the_explorer_without_a_frontend(checkpoint, tmp_path):
    explorer = Explorer(checkpoint, SAMPLE, tmp_path)
    ui = build_controls(explorer, dict(FAST, seed=0))
    assert set(ui.controls) == set(CONTROLS)
    ui.controls["lr"].value = 1e-3
    ui.controls["policy"].value = "freeze_params"
    ui.controls["freeze_steps"].value = 1
    assert explorer.history == []  # moving a control runs nothing
    ui.run_button.click()
    assert len(explorer.history) == 1, ui.messages.outputs
    settings = explorer.history[0].settings
    assert (settings["lr"], settings["policy"], settings["freeze_steps"], settings["trace"]) == (
        1e-3, "freeze_params", 1, False)
    assert not ui.run_button.disabled
    assert [o["data"].keys() for o in ui.plot.outputs] == [{"image/png", "text/plain"}]
    outcome = classify(explorer.history[0]).kind
    assert f": {outcome}; final loss" in "".join(o["text"] for o in ui.messages.outputs)

    ui.run_button.click()
    assert len(explorer.history) == 2 and len(explorer.overlay) == 2
    ui.clear_button.click()
    assert explorer.overlay == {} and ui.plot.outputs == () and ui.messages.outputs == ()


def test_controls_show_a_failing_run_in_their_messages(checkpoint, tmp_path):
    explorer = Explorer(checkpoint, SAMPLE, tmp_path)
    ui = build_controls(explorer, dict(FAST, seed=-1))
    ui.run_button.click()
    assert explorer.history == []
    assert "Traceback" in "".join(o["text"] for o in ui.messages.outputs)
    assert not ui.run_button.disabled
