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

from workbench.records import RunRecord, read_record
from workbench.studies.criteria import MapPanel, Rule, stability_map
from workbench.studies.sweep import Sweep, evaluate_runs, families, log_status
from workbench.views.plots import LiveFigure, display_slot, training_figure

FIGURE_GROUPS = ("encoder", "rnnt_decoder.predictor", "rnnt_decoder.joint")


_STABLE, _EXPLODED, _MISSING = "#b7e4b0", "#fdb863", "#ffffff"


def stability_map_figure(panels: Sequence[MapPanel], *, title: str = "", max_step: int | None = None) -> Figure:
    """Heatmaps of freeze length N x lr, one per panel: green = stable, orange = finite but the loss rule broke, red
    shades = steps to the first non-finite value (darker = earlier); each cell is annotated with the final
    validation PER (or the divergence step) and the success criteria passed."""
    ncols = min(4, len(panels)) or 1
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = Figure(figsize=(3.6 * ncols + 1.2, 3.0 * nrows + 0.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    steps = [c["first_nonfinite_step"] for p in panels for row in p.cells for c in row
             if c and c["first_nonfinite_step"]]
    top = max_step or max(steps, default=1)
    cmap = matplotlib.colormaps["Reds_r"]
    norm = matplotlib.colors.Normalize(vmin=1, vmax=max(top, 2) * 1.3)
    for ax, panel in zip(axes, panels):
        image = np.ones((len(panel.freeze_lengths), len(panel.lrs), 4))
        for i, row in enumerate(panel.cells):
            for j, cell in enumerate(row):
                if cell is None:
                    color, text = _MISSING, "..."
                elif cell["outcome"] == "diverged":
                    color, text = cmap(norm(cell["first_nonfinite_step"])), f"NaN@{cell['first_nonfinite_step']}"
                else:
                    color = _STABLE if cell["outcome"] == "stable" else _EXPLODED
                    text = "PER -" if cell["val_per"] is None else f"PER {cell['val_per']:.2f}"
                if cell is not None:
                    text += f"\n{cell['passed']}/{cell['applicable']} ok"
                image[i, j] = matplotlib.colors.to_rgba(color)
                dark = cell is not None and cell["outcome"] == "diverged" and norm(cell["first_nonfinite_step"]) < 0.45
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
        ax.imshow(image, aspect="auto")
        ax.set_xticks(range(len(panel.lrs)), [f"{lr:g}" for lr in panel.lrs], fontsize=7)
        ax.set_yticks(range(len(panel.freeze_lengths)), [str(n) for n in panel.freeze_lengths], fontsize=7)
        ax.set(xlabel="learning rate", ylabel="freeze length N")
        ax.set_title(panel.title, fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes[:len(panels)].tolist(),
                 label="first non-finite step", shrink=0.8)
    fig.legend(handles=[Patch(color=_STABLE, label="stable"), Patch(color=_EXPLODED, label="loss exploded (finite)"),
                        Patch(color=cmap(0.3), label="non-finite")], loc="outside lower center", ncols=3, fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


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
            title=f"stability map ({done}/{len(self.sweep.plan.runs)} runs)",
            max_step=max(s.total_steps for s in self.sweep.grids)))
        self._drawn = time.monotonic()
