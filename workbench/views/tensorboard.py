"""Run logs as TensorBoard event files (`workbench export LOG.h5 ... --tensorboard DIR`), so `tensorboard --logdir
DIR` shows runs side by side. Needs the `tensorboard` extra (`pip install 'rnnt-workbench[tensorboard]'`).

Each run log becomes one folder `DIR/<run name>` (a run's name is its settings' `name`, else its file's stem; runs
that share a name are told apart by their file, `<name>__<file stem>`, then by a number) holding one event file,
written through `torch.utils.tensorboard.SummaryWriter`:

- every per-step scalar series of the log as a scalar with the series key as its tag, at the run's step
  (`loss/total`, `loss/<term>`, `grad_norm/<group>`, `clip/coefficient`, `update_ratio/<group>`,
  `scaler/scale_before`, `outside_optimizer/<group>`, ...; a boolean series as 0/1); each vector series as one
  scalar per column, `<key>/<column label>` (`param_grad_norm/encoder.layers.0.in_proj.weight`); a step without a
  value (a series that starts later, a step skipped before its backward) has no point. TensorBoard keeps scalars
  as float32, so the values are the log's rounded to float32. The wall time of step k is the log's `created` time
  plus the steps' `step_ms` up to k.
- as text: `run` (file, status, error, attributes) and `settings` at the first step; `outcome` (diverged, stalled
  or healthy with its reasons and warnings, `records.classify`) and `causal_chain` (one line per link,
  `records.chain.causal_chain`) at the last step; every event table row (`events/<table>`: stage changes,
  unfreezes, coverage findings, tracer traces, validations) at its step, as its `line` or `message` when it has
  one, else as JSON.

A run log still being written is refused unless `partial` is set (`workbench.views.logstate`); with `partial`, what
was flushed so far is exported, the run text says so, and its outcome text is "no outcome: in progress". A run
interrupted before its first step gets "no outcome: interrupted before its first step". Every log is verified
against its checksums first (`records.runlog`): a damaged one is one error naming the file and the series.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from workbench.records import RunLog, json_safe, read_record, summarize
from workbench.records.unjudged import no_outcome, unjudged
from workbench.views.logstate import check_readable


class ExportError(ValueError):
    """An export folder in the way; one line saying what to do."""


@dataclass
class Exported:
    """What one run log became: its folder and how many scalar tags, points and text entries it holds."""

    log: Path
    folder: Path
    tags: int
    points: int
    texts: int


def folder_names(paths: Sequence[str | Path], names: Sequence[str]) -> list[str]:
    """One folder name per run: its name made safe for a path, then `<name>__<file stem>` for runs sharing a
    name, `<name>__<folder>_<file stem>` where the stems clash too, then a number for what still clashes."""
    def clean(text: str) -> str:
        return re.sub(r"[^\w.\-]+", "_", text).strip("._") or "run"

    safe = [clean(name) for name in names]
    stems = [clean(Path(p).stem) for p in paths]
    out = []
    for path, name, stem in zip(paths, safe, stems):
        if safe.count(name) > 1:
            clash = sum(s == stem for s, n in zip(stems, safe) if n == name) > 1
            name = f"{name}__{clean(Path(path).resolve().parent.name)}_{stem}" if clash else f"{name}__{stem}"
        out.append(name)
    seen: dict[str, int] = {}
    unique = []
    for name in out:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if out.count(name) == 1 else f"{name}__{seen[name]}")
    return unique


def _walltimes(created: Any, steps: list[int], step_ms: list[Any]) -> dict[int, float]:
    try:
        start = datetime.fromisoformat(str(created)).timestamp()
    except ValueError:
        start = time.time()
    out, elapsed = {}, 0.0
    for step, ms in zip(steps, step_ms):
        elapsed += (ms or 0.0) / 1000.0
        out[step] = start + elapsed
    return out


def _row_text(row: dict[str, Any]) -> str:
    for key in ("line", "message"):
        if isinstance(row.get(key), str):
            return row[key]
    return "    " + json.dumps(json_safe(row), sort_keys=True)  # indented: shown as code


def export_run(path: str | Path, folder: str | Path, *, in_progress: bool = False) -> Exported:
    """Write the run log at `path` into TensorBoard events in `folder` (see the module docstring); `in_progress`:
    the log is still being written (no outcome)."""
    from torch.utils.tensorboard import SummaryWriter

    path, folder = Path(path), Path(folder)
    record = read_record(path)
    summary = summarize(record)
    line = no_outcome(record, in_progress=in_progress)
    if line is not None:
        summary = unjudged(summary, line)
    with RunLog(path) as log:
        vectors = {}
        for key in log.series_names():
            steps, values = log.series(key)
            if values.ndim == 2:
                labels = log.labels(key) or [str(k) for k in range(values.shape[1])]
                vectors[key] = (steps.tolist(), values, labels)
        created = log.attrs.get("created")
    wall = _walltimes(created, record.steps, record.values("step_ms"))
    first = record.steps[0] if record.steps else 0
    last = record.steps[-1] if record.steps else 0
    tags = points = texts = 0
    writer = SummaryWriter(log_dir=str(folder))
    try:
        for key, values in sorted(record.series.items()):
            wrote = False
            for step, value in zip(record.steps, values):
                if value is None:
                    continue
                writer.add_scalar(key, float(value), step, walltime=wall.get(step))
                points += 1
                wrote = True
            tags += wrote
        for key, (steps, values, labels) in sorted(vectors.items()):
            for column, label in enumerate(labels):
                tag = f"{key}/{label}"
                for step, value in zip(steps, values[:, column].tolist()):
                    writer.add_scalar(tag, float(value), step, walltime=wall.get(step))
                    points += 1
                tags += 1
        interrupted = record.status == "running"
        attrs = {k: v for k, v in record.attrs.items() if k not in ("error",)}
        run_text = (f"**{path}**: status {record.status}"
                    + (" (still being written or killed: the steps flushed so far)" if interrupted else "")
                    + (f"; error: {record.attrs['error']}" if record.attrs.get("error") else "")
                    + f"; {len(record.steps)} steps\n\n    " + json.dumps(json_safe(attrs), sort_keys=True))
        writer.add_text("run", run_text, first)
        writer.add_text("settings", "    " + json.dumps(json_safe(record.settings), sort_keys=True, indent=1)
                        .replace("\n", "\n    "), first)
        outcome = ([f"**{summary['outcome']}**"] if summary["outcome"] else []) + \
            [f"- {r}" for r in summary["outcome_reasons"]] + [f"- warning: {w}" for w in summary["outcome_warnings"]]
        writer.add_text("outcome", "\n".join(outcome), last)
        chain = summary["causal_chain"]
        writer.add_text("causal_chain", "\n".join(f"- {link['line']}" for link in chain) if chain else
                        "nothing was ever non-finite", last)
        texts += 4
        for table, rows in sorted(record.tables.items()):
            for row in rows:
                step = row.get("step", first)
                writer.add_text(f"events/{table}", _row_text(row), int(step) if isinstance(step, (int, float)) and
                                not isinstance(step, bool) and np.isfinite(step) else first)
                texts += 1
    finally:
        writer.close()
    return Exported(path, folder, tags, points, texts)


def export_tensorboard(paths: Sequence[str | Path], out: str | Path, *, partial: bool = False,
                       overwrite: bool = False) -> list[Exported]:
    """Export every run log in `paths` into its own folder under `out`. Every log is checked first
    (`logstate.check_readable`), and a run's folder that already holds files is an ExportError unless `overwrite`,
    so a refusal writes nothing. Each run is written into a temporary folder and renamed into place."""
    paths = [Path(p) for p in paths]
    states = [check_readable(path, partial=partial) for path in paths]
    names = []
    for path in paths:
        with RunLog(path) as log:
            settings = log.attrs.get("settings") or {}
        names.append(str(settings.get("name") or path.stem) if isinstance(settings, dict) else path.stem)
    out = Path(out)
    folders = [out / name for name in folder_names(paths, names)]
    taken = [str(f) for f in folders if f.exists() and (not f.is_dir() or any(f.iterdir()))]
    if taken and not overwrite:
        one = len(taken) == 1
        raise ExportError(f"--tensorboard: {', '.join(taken)} already hold{'s' if one else ''} an export; "
                          f"choose another folder, or pass --overwrite to replace {'it' if one else 'them'}")
    out.mkdir(parents=True, exist_ok=True)
    done = []
    for path, folder, state in zip(paths, folders, states):
        work = out / f".{folder.name}.{os.getpid()}.tmp"
        shutil.rmtree(work, ignore_errors=True)
        try:
            exported = export_run(path, work, in_progress=state == "in_progress")
            if folder.is_dir():
                shutil.rmtree(folder)
            elif folder.exists():
                folder.unlink()
            os.replace(work, folder)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        exported.folder = folder
        done.append(exported)
    return done
