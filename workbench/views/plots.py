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
import matplotlib.lines
import matplotlib.patches
# Figures are drawn on `Figure` objects with their own canvas: no global backend is chosen, so importing this
# module leaves the user's pyplot (an inline notebook backend) as it was.
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from workbench.records import RunRecord

TERM_STYLES = {"total": "-", "ctc": ":", "rnnt": "--", "mode": "-."}
# One colour per records.OUTCOMES kind, from good to bad.
OUTCOME_COLORS = {"healthy": "#4daf4a", "inconclusive": "#a6d96a", "unknown": "#bdbdbd", "stalled": "#ff9f1c",
                  "overflow_skipped": "#984ea3", "diverged": "#d7301f"}
_COEF_FLOOR = 1e-8  # where a zero clip coefficient is drawn on the log axis
_CHAIN_MARGIN = 8  # steps shown after a causal chain's last link
LINK_STYLES = {"producer": ("o", "#6a3d9a"), "escape": ("X", "#d7301f"), "caught": ("s", "#4daf4a"),
               "contamination": ("D", "#000000"), "loss": ("v", "#1f78b4")}


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
        _legend_outside(ax)
    if title:
        fig.suptitle(title)
    return fig


def _legend_outside(ax: matplotlib.axes.Axes) -> None:
    """The legend to the right of the axes, never over the data."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)


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
    """One bar per row (a run, or a configuration over seeds) in the colour of its outcome: green healthy, orange
    stalled (finite, but something that should train did not), red diverged. Each row is a `summarize` dict, or a
    dict with "name", "outcomes" (outcome -> count) and "note"; the bar's text is the first reason or the note."""
    fig = Figure(figsize=(11, 0.38 * len(rows) + 1.4), layout="constrained")
    ax = fig.subplots()
    for y, row in enumerate(rows):
        counts = row.get("outcomes") or {row["outcome"]: 1}
        total, left = sum(counts.values()), 0.0
        for kind in OUTCOME_COLORS:
            share = counts.get(kind, 0) / total
            if share:
                ax.barh(y, share, left=left, color=OUTCOME_COLORS[kind])
                left += share
        note = row.get("note") or (row.get("outcome_reasons") or [""])[0]
        label = " ".join(f"{counts[k]}/{total} {k}" for k in OUTCOME_COLORS if counts.get(k))
        ax.text(1.02, y, f"{label}: {note}"[:150], va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [row["name"] for row in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xticks=[], xlabel="share of runs by outcome")
    ax.spines[["top", "right"]].set_visible(False)
    fig.legend(handles=[matplotlib.patches.Patch(color=c, label=k) for k, c in OUTCOME_COLORS.items()],
               loc="outside lower left", ncols=3, fontsize=8)
    return fig


def chain_figure(record: RunRecord, chain: Sequence[Mapping], *, title: str = "") -> Figure:
    """The causal chain of one run on a timeline: per step, the clip coefficient, the GradScaler scale and the
    non-finite gradient entries per group, with the chain's links marked (and listed) where they happened. The
    time axis ends a few steps after the last link (`_CHAIN_MARGIN`), so a chain of the first steps of a long run
    stays readable; without a chain it spans the run."""
    fig = Figure(figsize=(13, 7.2), layout="constrained")
    ax_coef, ax_scale, ax_nf, ax_text = fig.subplots(4, 1, sharex=False, height_ratios=[1, 1, 1, 0.9])
    steps = record.steps
    coef = list(zip(steps, record.values("clip/coefficient")))
    ax_coef.plot(steps, [c if c is not None and c > 0 else math.nan for _, c in coef], ".-", color="#333333",
                 label="clip coefficient")
    for label, marker, y, pick in (("coefficient 0", "v", _COEF_FLOOR, lambda c: c == 0),
                                   ("coefficient NaN", "x", 1.6, lambda c: math.isnan(c))):
        hits = [s for s, c in coef if c is not None and pick(c)]
        if hits:
            ax_coef.plot(hits, [y] * len(hits), marker, color=OUTCOME_COLORS["diverged"], label=label)
    ax_coef.set(yscale="log", ylabel="clip coefficient", ylim=(_COEF_FLOOR / 3, 8.0))
    scale = [v if v is not None else math.nan for v in record.scale]
    if any(math.isfinite(v) for v in scale):
        ax_scale.plot(steps, scale, ".-", color="#1f78b4", label="GradScaler scale")
    ax_scale.set(yscale="log", ylabel="scale")
    for g, values in record.group_nonfinite.items():
        if any(v for v in values if v is not None):
            ax_nf.plot(steps, [v if v is not None else math.nan for v in values], "o-", markersize=3, label=g)
    ax_nf.set(ylabel="non-finite\ngradient entries", xlabel="joint step")
    for ax in (ax_coef, ax_scale, ax_nf):
        for link in chain:
            marker, color = LINK_STYLES[link["kind"]]
            ax.axvline(link["step"], color=color, alpha=0.35, linewidth=1)
        last = steps[-1] if steps else 1
        if chain:
            last = max(max(k["step"] for k in chain), min(last, max(k["step"] for k in chain) + _CHAIN_MARGIN))
        ax.set_xlim(0.5, last + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for k, link in enumerate(chain):
        marker, color = LINK_STYLES[link["kind"]]
        # links of one step side by side rather than on top of each other
        same = [i for i, other in enumerate(chain) if other["step"] == link["step"]]
        x = link["step"] + 0.15 * (same.index(k) - (len(same) - 1) / 2)
        ax_coef.plot([x], [4.0], marker, color=color, markersize=8, label=link["kind"])
    for ax in (ax_coef, ax_scale, ax_nf):
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        if unique:
            ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                      borderaxespad=0.0, frameon=False)
    ax_text.axis("off")
    text = "\n".join(_wrap(link["line"], 170) for link in chain) or "nothing was non-finite"
    ax_text.text(0.0, 1.0, text, va="top", ha="left", fontsize=7, family="monospace", transform=ax_text.transAxes)
    if title:
        fig.suptitle(title)
    return fig


def boundary_figure(results: Sequence[Mapping], *, title: str = "") -> Figure:
    """The stability boundary as a picture: freeze length N on the x axis, lr (log) on the y axis, one panel per
    loop semantics, precision and budget, the policies side by side within each N.

    `results` are `studies.boundary` cell results. Each probed lr shows one dot per seed in its outcome's colour;
    a bar spans the cell's boundary interval, from the largest lr healthy in every seed to the smallest lr where
    some seed was not (the seeds' spread plus the search's resolution); a line joins the bars' lower ends per
    policy (the healthy frontier); a cross marks the smallest lr where some seed diverged.
    """
    keys = sorted({(r["semantics"], r["precision"], r["budget"]) for r in results})
    fig = Figure(figsize=(5.2 * max(1, len(keys)), 4.6), layout="constrained")
    axes = fig.subplots(1, max(1, len(keys)), squeeze=False)[0]
    policies = sorted({r["policy"] for r in results})
    markers = "os^Dv"
    for ax, key in zip(axes, keys):
        members = [r for r in results if (r["semantics"], r["precision"], r["budget"]) == key]
        ns = sorted({r["freeze_steps"] for r in members})
        for k, policy in enumerate(policies):
            offset = (k - (len(policies) - 1) / 2) * 0.18
            frontier = []
            for r in sorted((r for r in members if r["policy"] == policy), key=lambda r: r["freeze_steps"]):
                x = ns.index(r["freeze_steps"]) + offset
                for probe in r["probes"]:
                    for j, run in enumerate(probe["runs"]):
                        ax.plot(x + (j - 1) * 0.04, probe["lr"], markers[k % len(markers)], ms=5,
                                color=OUTCOME_COLORS.get(run["outcome"], "#000000"), mec="#333333", mew=0.4)
                lo, hi = r["lr_healthy_max"], r["lr_unhealthy_min"]
                if lo is not None and hi is not None:
                    ax.plot([x, x], [lo, hi], "-", color="#333333", lw=2.5, alpha=0.5)
                if lo is not None:
                    frontier.append((x, lo))
                if r["lr_diverged_min"] is not None:
                    ax.plot(x, r["lr_diverged_min"], "x", color="#d7301f", ms=11, mew=2)
            if frontier:
                ax.plot(*zip(*frontier), "-", color="#333333", lw=1, label=f"{policy}: healthy in every seed up to")
        ax.set_xticks(range(len(ns)), [f"N={n}" for n in ns])
        ax.set_yscale("log")
        ax.set_ylabel("learning rate")
        semantics, precision, budget = key
        loop = "seed_faithful (optimizer kept)" if semantics == "seed_faithful" else semantics
        ax.set_title(f"{loop}, {precision}\n{budget.replace('_', ' ')} budget", fontsize=9)
    handles = [matplotlib.lines.Line2D([], [], marker="o", ls="", color=c, label=k)
               for k, c in OUTCOME_COLORS.items()]
    handles += [matplotlib.lines.Line2D([], [], marker=markers[k % len(markers)], ls="", color="#777777", label=p)
                for k, p in enumerate(policies)]
    handles.append(matplotlib.lines.Line2D([], [], marker="x", ls="", color="#d7301f", label="smallest lr diverged"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def _wrap(line: str, width: int) -> str:
    return "\n    ".join(line[i:i + width] for i in range(0, len(line), width))


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
