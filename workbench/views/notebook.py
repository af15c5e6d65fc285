"""Small helpers that keep the notebooks thin: output folders, live multi-run figures, JSON summaries.

The notebooks call the package for every computation; this module only wires results to the screen and disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from workbench.records import RunRecord, json_safe
from workbench.views.plots import LiveFigure, save_figure, training_figure

REPO_ROOT = Path(__file__).resolve().parents[2]


def setup(output_dir: str | Path, *, summary: str | None = None, overwrite: bool = False,
          threads: int | None = None) -> Path:
    """Create `output_dir`; with `threads`, also set torch's CPU threads (`torch.set_num_threads`), which holds
    for the whole kernel session. Without it the session's thread count is left alone (a sweep's worker processes
    set their own).

    A notebook that finished in `output_dir` before left its `summary` there: without `overwrite` the notebook
    stops here, before any work, rather than replace that summary and its figures."""
    out = Path(output_dir)
    if summary is not None and (out / summary).exists() and not overwrite:
        raise FileExistsError(f"output_dir {out}: a finished run of this notebook is there ({summary}); choose "
                              f"another output_dir, or set overwrite=True to replace its summary and figures")
    out.mkdir(parents=True, exist_ok=True)
    if threads is not None:
        torch.set_num_threads(threads)
    return out


def resolve(path: str | Path) -> Path:
    """Relative paths in parameter cells are relative to the repository root, wherever the kernel started."""
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


class LiveRuns:
    """One live figure that overlays every run recorded so far and redraws in place as steps arrive.

    Use `callback(name)` as `run_joint(..., on_step=...)`; the figure is redrawn every `every` steps (drawing
    costs about a quarter of a second) and at `redraw()`; `save(path)` writes the final figure as PNG.
    """

    def __init__(self, title: str = "", every: int = 1, groups: list[str] | None = None,
                 terms: list[str] | None = None) -> None:
        self.title, self.groups, self.terms, self.every = title, groups, terms, every
        self.runs: dict[str, RunRecord] = {}
        self.live = LiveFigure()

    def callback(self, name: str):
        def on_step(i: int, run: RunRecord) -> None:
            self.runs[name] = run
            if i % self.every == 0:
                self.redraw()
        return on_step

    def redraw(self) -> None:
        if self.runs and self.live.active:
            self.live.show(training_figure(self.runs, title=self.title, groups=self.groups, terms=self.terms))

    def clear(self) -> None:
        self.runs.clear()

    def save(self, path: str | Path) -> Path:
        return save_figure(training_figure(self.runs, title=self.title, groups=self.groups, terms=self.terms), path)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]):
    """An HTML table of `columns` from `rows` for display in a notebook (plain text outside IPython)."""
    from html import escape

    from IPython.display import HTML

    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{escape(_cell(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows)
    return HTML(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return f"{len(value)}: " + ", ".join(map(str, value[:3])) + (" ..." if len(value) > 3 else "")
    return str(value)


def write_summary(output_dir: str | Path, name: str, summary: Mapping[str, Any]) -> Path:
    """Write `<output_dir>/<name>` as strict JSON (non-finite floats become strings)."""
    path = Path(output_dir) / name
    path.write_text(json.dumps(json_safe(dict(summary)), indent=2, default=str))
    return path
