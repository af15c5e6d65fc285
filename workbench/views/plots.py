"""Figures from run records: live in a notebook (updated in place through a display handle, the fastprogress
pattern, which also leaves a static PNG in a headless papermill run) and saved as PNG files for the README.

Plots read only recorded values (`RunRecord`s, live or read back from run logs); they never touch a model or a
training step.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402  (the backend must be chosen first)

from workbench.records import RunRecord  # noqa: E402

TERM_STYLES = {"total": "-", "ctc": ":", "rnnt": "--", "mode": "-."}


def _finite_or_none(values: Sequence[float | None]) -> list[float]:
    """Non-finite points are not drawn (a line cannot show NaN); markers show where they were."""
    return [v if v is not None and math.isfinite(v) else math.nan for v in values]


def training_figure(runs: Mapping[str, RunRecord], *, title: str = "",
                    markers: Mapping[str, Sequence[int]] | None = None, groups: Sequence[str] | None = None,
                    terms: Sequence[str] | None = None) -> Figure:
    """Four panels over joint steps for one or more runs: loss per term, per-group gradient norm (first run's
    groups, or `groups`), GradScaler scale, and non-finite gradient entries per group.

    `runs` maps a label to a RunRecord. Vertical lines mark unfreeze events; crosses mark steps with a
    non-finite total loss. `terms` limits the loss terms drawn (default: all).
    """
    fig = Figure(figsize=(13, 7.5), layout="constrained")
    ax_loss, ax_norm, ax_scale, ax_nf = fig.subplots(2, 2).ravel()
    colors = matplotlib.colormaps["tab10"]
    for k, (label, run) in enumerate(runs.items()):
        color = colors(k % 10)
        steps = run.steps
        for term, values in run.losses.items():
            if terms is not None and term not in terms:
                continue
            ax_loss.plot(steps, _finite_or_none(values), TERM_STYLES.get(term, "-"), color=color,
                         label=f"{label} {term}" if len(runs) > 1 or term != "total" else label)
        bad = [s for s, v in zip(steps, run.losses.get("total", [])) if v is not None and not math.isfinite(v)]
        if bad:
            ax_loss.plot(bad, [0.0] * len(bad), "x", color=color, markersize=8)
        shown = groups or [g for g in run.group_norms if not g.startswith("encoder.layers")]
        for j, g in enumerate(shown):
            # one run: a colour per group; several runs: a colour per run and a line style per group
            group_color = colors(j % 10) if len(runs) == 1 else color
            style = "-" if len(runs) == 1 else ["-", "--", ":", "-."][j % 4]
            name = g if len(runs) == 1 else f"{label}: {g}"
            values = run.group_norms.get(g, [None] * len(steps))
            ax_norm.plot(steps, _finite_or_none(values), color=group_color, linestyle=style, label=name)
            nf = run.group_nonfinite.get(g, [])
            if any(nf):
                ax_nf.plot(steps, [v if v is not None else math.nan for v in nf], "o-", color=group_color,
                           markersize=3, label=name)
        scale = run.scale
        if any(s is not None for s in scale):
            ax_scale.plot(steps, [s if s is not None else math.nan for s in scale], color=color, label=label)
        for ev in run.events:
            if ev.get("event") != "unfreeze":
                continue
            for ax in (ax_loss, ax_norm, ax_scale, ax_nf):
                ax.axvline(ev["step"], color=color, alpha=0.4, linewidth=1)
        for step in (markers or {}).get(label, []):
            ax_loss.axvline(step, color=color, linestyle=":", alpha=0.6)
    ax_loss.set(title="loss per term (x: non-finite total)", xlabel="joint step")
    ax_norm.set(title="gradient L2 norm per group (before clipping)", xlabel="joint step", yscale="log")
    ax_scale.set(title="GradScaler scale (fp16 only)", xlabel="joint step", yscale="log")
    ax_nf.set(title="non-finite gradient entries per group", xlabel="joint step")
    for ax in (ax_loss, ax_norm, ax_scale, ax_nf):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    return fig


def ctc_warmup_figure(summary: Mapping) -> Figure:
    """CTC loss per step and validation PER over the CTC-warmup stage, from a training summary."""
    stage = summary["stages"][0]
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    ax_loss, ax_per = fig.subplots(1, 2)
    losses = [step["ctc"] for step in stage["losses"]]
    ax_loss.plot(range(1, len(losses) + 1), losses)
    ax_loss.set(title="CTC loss (training batches)", xlabel="CTC-warmup step", yscale="log")
    curve = [(0, summary["val_per_initial"])] + [tuple(p) for p in stage["val_curve"]]
    ax_per.plot([p[0] for p in curve], [p[1] for p in curve], "o-")
    ax_per.set(title="validation PER (greedy CTC)", xlabel="CTC-warmup step", ylim=(0, max(1.05, curve[0][1])))
    return fig


def outcome_figure(rows: Sequence[Mapping]) -> Figure:
    """One bar per run: steps completed with finite parameters, red where the run diverged."""
    fig = Figure(figsize=(9, 0.35 * len(rows) + 1.2), layout="constrained")
    ax = fig.subplots()
    names = [r["name"] for r in rows]
    steps = [r["steps"] for r in rows]
    first_bad = [r["first_nonfinite_param_step"] or r["first_nonfinite_loss_step"] for r in rows]
    finite = [(b - 1 if b else n) for b, n in zip(first_bad, steps)]
    ax.barh(names, finite, color=["tab:red" if b else "tab:green" for b in first_bad])
    for y, (r, b, n) in enumerate(zip(rows, first_bad, steps)):
        text = (f"parameters non-finite after step {r['first_nonfinite_param_step']}, loss at step "
                f"{r['first_nonfinite_loss_step']}" if b else "finite throughout")
        ax.text((b - 1 if b else n) + 0.2, y, text, va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="joint steps completed with finite parameters and loss", xlim=(0, max(steps) * 1.8))
    return fig


def figure_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def save_figure(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def display_slot():
    """An empty output slot updated in place through its display handle; None outside IPython."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return None
    return display(display_id=True) if get_ipython() is not None else None


class LiveFigure:
    """A figure slot in a notebook that is redrawn in place; outside IPython nothing is displayed."""

    def __init__(self) -> None:
        self.handle = display_slot()

    @property
    def active(self) -> bool:
        return self.handle is not None

    def show(self, fig: Figure) -> None:
        if self.handle is not None:
            from IPython.display import Image

            self.handle.update(Image(figure_png(fig)))
