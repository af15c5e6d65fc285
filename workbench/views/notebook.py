"""Small helpers that keep the notebooks thin: output folders, live multi-run figures, JSON summaries.

The notebooks call the package for every computation; this module only wires results to the screen and disk.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from workbench.records import RunRecord, json_safe
from workbench.views.plots import LiveFigure, save_figure, training_figure



def _repo_root() -> Path:
    """The checkout the package is imported from (an editable install), else the current folder: relative paths
    in the notebooks (their outputs, runs/cache) are under it."""
    checkout = Path(__file__).resolve().parents[2]
    return checkout if (checkout / "notebooks").is_dir() else Path.cwd()


REPO_ROOT = _repo_root()
# The wheel's copy of the checkout's notebooks/ and data_samples/ (written by setup.py's build step); absent in a
# checkout, where the originals are used.
SHIPPED = Path(__file__).resolve().parents[1] / "shipped"
SHIPPED_FOLDERS = ("notebooks", "data_samples")
KERNEL = "rnnt-workbench"  # the kernel the notebooks name (`make install` registers it for JupyterLab)


def _installed(folder: str) -> Path:
    """`folder` (one of SHIPPED_FOLDERS) as this package has it: the installed copy, else the checkout's."""
    return SHIPPED / folder if (SHIPPED / folder).is_dir() else REPO_ROOT / folder


def notebooks_dir() -> Path:
    """The folder of the notebooks this package runs."""
    return _installed("notebooks")


def copy_notebooks(dest: str | Path) -> list[Path]:
    """Write the notebooks and the sample data (data_samples/) into `dest`, to open in JupyterLab there (their
    relative paths then resolve in `dest`); returns the folders written. Refuses a `dest` that already holds
    either folder, so nothing there is replaced."""
    dest = Path(dest)
    sources, targets = [_installed(n) for n in SHIPPED_FOLDERS], [dest / n for n in SHIPPED_FOLDERS]
    present = [str(t) for t in targets if t.exists()]
    if present:
        raise FileExistsError(f"{present[0]} exists; choose another folder (nothing was copied)")
    missing = [str(src) for src in sources if not src.is_dir()]
    if missing:
        raise FileNotFoundError(f"{missing[0]} is missing: this installation has no notebooks to copy")
    dest.mkdir(parents=True, exist_ok=True)
    for src, target in zip(sources, targets):
        shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    return targets


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
    """Relative paths in parameter cells are relative to the repository root (outside a checkout, the current
    folder), wherever the kernel started; one that is not there but was installed with the package (the sample
    data, "data_samples") is the installed copy."""
    path = Path(path)
    if path.is_absolute():
        return path
    here, shipped = REPO_ROOT / path, SHIPPED / path
    return shipped if not here.exists() and path.parts[0] in SHIPPED_FOLDERS and shipped.exists() else here


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


def provenance(when: float | None = None) -> dict[str, str]:
    """Where results come from: the commit of the checkout this package runs from ("unknown" outside one), the
    date (`when`, seconds since the epoch; default now) and this machine."""
    import platform
    import subprocess
    import time

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(when))
    machine = f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()})"
    return {"commit": commit, "date": date, "machine": machine}


def write_summary(output_dir: str | Path, name: str, summary: Mapping[str, Any]) -> Path:
    """Write `<output_dir>/<name>` as strict JSON (non-finite floats become strings), with its `provenance`
    (commit, date, machine) unless the summary carries one."""
    path = Path(output_dir) / name
    path.write_text(json.dumps(json_safe({"provenance": provenance(), **summary}), indent=2, default=str))
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

    `name` must be an installed kernel. Without it the notebooks run on this interpreter (the one running the
    workbench, so the installed package is the one they import): a kernelspec named as the notebooks' own
    (`rnnt-workbench`) for `sys.executable` is written to a temporary folder put first on JUPYTER_PATH for the
    duration, ahead of any registered kernel of that name."""
    if name is not None:
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

        manager = KernelSpecManager()
        try:
            spec = manager.get_kernel_spec(name)
        except NoSuchKernel:
            installed = ", ".join(sorted(manager.find_kernel_specs()))
            raise NotebookError(f"--kernel: expected an installed Jupyter kernel ({installed}), got {name!r}") from None
        yield name, f"kernel: {name} ({spec.argv[0]})"
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
            yield KERNEL, f"kernel: this interpreter, {sys.executable} (--kernel NAME runs another)"
        finally:
            if previous is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = previous
