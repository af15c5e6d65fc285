"""Small helpers that keep the notebooks thin: output folders, live multi-run figures, JSON summaries.

The notebooks call the package for every computation; this module only wires results to the screen and disk.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from workbench.records import RunRecord, json_safe
from workbench.views.plots import LiveFigure, save_figure, training_figure



def _repo_root() -> Path:
    """The checkout the package is imported from (an editable install), else the current folder (a plain
    `pip install .` leaves the notebooks and data_samples/ in the checkout it was run from)."""
    checkout = Path(__file__).resolve().parents[2]
    return checkout if (checkout / "notebooks").is_dir() else Path.cwd()


REPO_ROOT = _repo_root()
KERNEL = "rnnt-workbench"  # the kernel the notebooks name (registered by `make install`)


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


class NotebookError(ValueError):
    """A notebook's parameters or kernel are wrong; one line naming the parameter or kernel."""


def declared_parameters(notebook: str | Path) -> dict[str, Any]:
    """name -> default value of the parameters `notebook`'s `parameters` cell declares (papermill's reading); a
    default that is not a literal reads as None (any value)."""
    import papermill as pm

    return {name: _literal(p["default"]) for name, p in pm.inspect_notebook(str(notebook)).items()}


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None


def check_parameters(notebook: str | Path, params: Mapping[str, Any]) -> None:
    """Every parameter in `params` declared by `notebook` and of the type it takes; NotebookError otherwise."""
    from workbench.run.settings import SettingsError, check_notebook_parameters

    try:
        check_notebook_parameters(Path(notebook).name, declared_parameters(notebook), params)
    except SettingsError as exc:
        raise NotebookError(str(exc)) from None


@contextlib.contextmanager
def notebook_kernel(name: str | None = None) -> Iterator[tuple[str, str]]:
    """(kernel name, a line saying which interpreter runs it) for executing the notebooks.

    `name` must be an installed kernel. Without it the notebooks' own `rnnt-workbench` kernel is used where it is
    registered; elsewhere (a plain `pip install`, conda) a kernelspec of that name for this interpreter is
    written to a temporary folder on JUPYTER_PATH for the duration, so the notebooks run unchanged."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    manager = KernelSpecManager()
    try:
        spec = manager.get_kernel_spec(name or KERNEL)
    except NoSuchKernel:
        if name is not None:
            installed = ", ".join(sorted(manager.find_kernel_specs()))
            raise NotebookError(f"--kernel: expected an installed Jupyter kernel ({installed}), got {name!r}") from None
    else:
        yield name or KERNEL, f"kernel: {name or KERNEL} ({spec.argv[0]})"
        return
    previous = os.environ.get("JUPYTER_PATH")
    with tempfile.TemporaryDirectory(prefix="workbench-kernel-") as folder:
        spec_dir = Path(folder) / "kernels" / KERNEL
        spec_dir.mkdir(parents=True)
        (spec_dir / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"RNN-T workbench ({sys.executable})", "language": "python"}))
        os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, (folder, previous)))
        try:
            yield KERNEL, (f"kernel: this interpreter, {sys.executable} (no {KERNEL} kernel is registered; "
                           f"`make install` registers one)")
        finally:
            if previous is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = previous
