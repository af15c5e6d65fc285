"""The explorer behind notebook 03: runs fork from one checkpoint, overlay, clear, and a failed run is not kept."""

from pathlib import Path

import pytest

from workbench.records import RunLog, classify
from workbench.studies.explore import Explorer, settings_from
from workbench.views.explorer import OverlayView

SAMPLE = Path(__file__).resolve().parents[2] / "data_samples"
FAST = dict(freeze_steps=0, lr=1e-4, policy="none", precision="fp32", semantics="corrected", steps=2, trace=False)


@pytest.fixture()
def checkpoint(ctc_checkpoint):
    return ctc_checkpoint


class Shown:
    """A figure target that keeps what it was asked to show."""

    def __init__(self):
        self.figures = []

    def show(self, fig):
        self.figures.append(fig)


def test_runs_overlay_and_clear(checkpoint, tmp_path):
    explorer = Explorer(checkpoint, SAMPLE, tmp_path, every=1)
    shown, lines = Shown(), []
    view = OverlayView(shown.show)
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
    assert len(shown.figures) == 2 * (FAST["steps"] + 1)
    labels = {line.get_label() for line in shown.figures[-1].axes[0].get_lines()}
    assert any(label.startswith("#1 ") for label in labels) and any(label.startswith("#2 ") for label in labels)
    assert any(line.startswith(f"{second.name}: {classify(second).kind}; final loss") for line in lines)
    for result in (first, second):
        with RunLog(result.path) as log:
            assert log.series("loss/total")[1].tolist() == result.losses["total"]

    explorer.clear()
    assert explorer.history == [] and explorer.overlay == {}
    third = explorer.run(settings_from(FAST))
    assert third.name.startswith("#3 ") and list(explorer.overlay) == [third.name]


class BrokenView:
    def draw(self, runs):
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
