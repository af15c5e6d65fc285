"""Figures and live views of a sweep: the stability map, the training figure of a family of runs, and the
dashboard notebook 02 redraws in place while the sweep runs."""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from workbench.records import OUTCOMES, RunRecord, read_record
from workbench.studies.criteria import MapPanel, Rule, stability_map
from workbench.studies.sweep import Sweep, evaluate_runs, families, log_status
from workbench.views.plots import OUTCOME_COLORS, LiveFigure, display_slot, training_figure

FIGURE_GROUPS = ("encoder", "rnnt_decoder.predictor", "rnnt_decoder.joint")


_MISSING = "#ffffff"


def stability_map_figure(panels: Sequence[MapPanel], *, title: str = "") -> Figure:
    """Heatmaps of freeze length N x lr, one per panel, a cell per point over its seeds: the colour is the share of
    its runs that were healthy (green), stalled (orange) or diverged (red), mixed in that proportion; the text gives
    the counts, the earliest divergence step, the median final validation PER and the success criteria passed."""
    ncols = min(4, len(panels)) or 1
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = Figure(figsize=(3.8 * ncols + 0.6, 3.1 * nrows + 0.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, panel in zip(axes, panels):
        image = np.ones((len(panel.freeze_lengths), len(panel.lrs), 4))
        for i, row in enumerate(panel.cells):
            for j, cell in enumerate(row):
                image[i, j] = _cell_color(cell)
                ax.text(j, i, _cell_text(cell), ha="center", va="center", fontsize=6.5)
        ax.imshow(image, aspect="auto")
        ax.set_xticks(range(len(panel.lrs)), [f"{lr:g}" for lr in panel.lrs], fontsize=7)
        ax.set_yticks(range(len(panel.freeze_lengths)), [str(n) for n in panel.freeze_lengths], fontsize=7)
        ax.set(xlabel="learning rate", ylabel="freeze length N")
        ax.set_title(panel.title, fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.legend(handles=[Patch(color=OUTCOME_COLORS[k], label=k) for k in OUTCOMES], loc="outside lower center",
               ncols=3, fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def _cell_color(cell: Mapping[str, Any] | None) -> tuple[float, ...]:
    if cell is None:
        return matplotlib.colors.to_rgba(_MISSING)
    total = sum(cell["outcomes"].values())
    mixed = sum(np.array(matplotlib.colors.to_rgba(OUTCOME_COLORS[k])) * n / total for k, n in cell["outcomes"].items())
    return tuple(mixed)


def _cell_text(cell: Mapping[str, Any] | None) -> str:
    if cell is None:
        return "..."
    n = len(cell["runs"])
    lines = [" ".join(f"{cell['outcomes'][k]}/{n} {k[0]}" for k in OUTCOMES if cell["outcomes"].get(k))]
    if cell["first_nonfinite_steps"]:
        lines.append(f"NaN@{min(cell['first_nonfinite_steps'])}")
    lines.append("PER -" if cell["val_per"] is None else f"PER {cell['val_per']:.2f}")
    lines.append(f"{cell['passed']}/{cell['applicable']} ok")
    return "\n".join(lines)


def family_figure(cells: Sequence[Mapping[str, Any]], recs: Mapping[str, RunRecord], *, title: str = "") -> Figure:
    """The training figure of one family, one run per N overlaid: loss per term, per-group gradient norms,
    GradScaler scale and non-finite gradient entries; unfreeze events as vertical lines, a dotted line at each
    run's first non-finite step."""
    runs, markers = {}, {}
    for cell in sorted(cells, key=lambda c: c["axes"]["freeze_steps"]):
        rec = recs.get(cell["run"])
        label = f"N={cell['axes']['freeze_steps']}"
        if rec is None or label in runs:
            continue
        runs[label] = rec
        bad = rec.first_nonfinite_step()
        markers[label] = [] if bad is None else [bad]
    return training_figure(runs, title=title, markers=markers, groups=list(FIGURE_GROUPS))


class DisplayLine:
    """A file-like target for a tqdm bar in a notebook: the latest bar line is shown in place through a display
    handle, so a long sweep leaves one line in the saved notebook instead of thousands of stream outputs.
    Outside IPython it writes to stderr."""

    def __init__(self) -> None:
        self.handle = display_slot()

    def write(self, text: str) -> int:
        if self.handle is None:
            return sys.stderr.write(text)
        line = text.rsplit("\r", 1)[-1].strip()
        if line:
            self.handle.update({"text/plain": line}, raw=True)
        return len(text)

    def flush(self) -> None:
        if self.handle is None:
            sys.stderr.flush()


class RunsDashboard:
    """A progress line and one figure, redrawn in place, that overlays the chosen runs of a sweep as they finish
    (notebook 01). `labels` maps the run ids to draw to their labels. Pass it as
    `Sweep.run(progress=dashboard.progress, on_run_done=dashboard)`; outside IPython nothing is drawn."""

    def __init__(self, labels: Mapping[str, str], *, title: str = "", terms: Sequence[str] | None = None,
                 groups: Sequence[str] | None = None, min_interval_s: float = 3.0) -> None:
        self.labels, self.title, self.min_interval_s = dict(labels), title, min_interval_s
        self.terms = None if terms is None else list(terms)
        self.groups = None if groups is None else list(groups)
        self.runs: dict[str, RunRecord] = {}
        self.progress = DisplayLine()
        self.live = LiveFigure()
        self._drawn = 0.0

    def __call__(self, rid: str, record: RunRecord) -> None:
        if rid in self.labels:
            self.runs[self.labels[rid]] = record
            if time.monotonic() - self._drawn >= self.min_interval_s:
                self.draw()

    def draw(self) -> None:
        """Redraw the overlay of every chosen run finished so far (call once more after the sweep)."""
        if self.runs and self.live.active:
            ordered = {label: self.runs[label] for label in self.labels.values() if label in self.runs}
            self.live.show(training_figure(ordered, title=self.title, terms=self.terms, groups=self.groups))
            self._drawn = time.monotonic()


class SweepDashboard:
    """Live figures of a running sweep in a notebook, redrawn in place (display handles) from the parent process
    as runs finish: a progress line, the training figure of the family of the run that finished last, and the
    stability map filling in. Outside IPython nothing is drawn. Pass it as
    `Sweep.run(progress=dashboard.progress, on_run_done=dashboard)`."""

    def __init__(self, sweep: Sweep, rule: Rule = Rule(), *, min_interval_s: float = 3.0) -> None:
        self.sweep, self.rule, self.min_interval_s = sweep, rule, min_interval_s
        self.recs: dict[str, RunRecord] = {}
        self.family_of = {c["run"]: label for label, cells in families(sweep.plan).items() for c in cells}
        self.progress = DisplayLine()
        self.family_live, self.map_live = LiveFigure(), LiveFigure()
        self.latest: str | None = None
        self._drawn = 0.0
        self._loaded_existing = False

    def __call__(self, rid: str, record: RunRecord) -> None:
        self.recs[rid] = record
        if not record.settings.get("ctc_only"):
            self.latest = rid
        if time.monotonic() - self._drawn >= self.min_interval_s:
            self.draw()

    def draw(self) -> None:
        """Redraw both figures from every record seen so far (call once more after the sweep)."""
        if not self.family_live.active:
            return
        if not self._loaded_existing:
            # runs a previous (interrupted) sweep finished are part of the picture too
            for rid in self.sweep.plan.runs:
                if rid not in self.recs and log_status(self.sweep.log_path(rid)) == "finished":
                    self.recs[rid] = read_record(self.sweep.log_path(rid))
            self._loaded_existing = True
        latest = self.latest or next((r for r in self.recs if r in self.family_of), None)
        if latest is not None:
            label = self.family_of[latest]
            self.family_live.show(family_figure(families(self.sweep.plan)[label], self.recs, title=label))
        summaries, verdicts = evaluate_runs(self.sweep.plan, self.recs, self.rule)
        done = sum(r in self.recs for r in self.sweep.plan.runs)
        self.map_live.show(stability_map_figure(
            stability_map(self.sweep.plan.cells, summaries, verdicts),
            title=f"stability map ({done}/{len(self.sweep.plan.runs)} runs)"))
        self._drawn = time.monotonic()
