"""Figures and a summary table from one or more run logs (`workbench report RUNLOG... --out DIR`).

Reads only what the run logs recorded; a run that was killed mid-way is reported up to its last flushed step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from workbench.experiment import RunSettings, RunState, json_safe
from workbench.plots import outcome_figure, save_figure, training_figure
from workbench.records import RunLog

COLUMNS = ("name", "status", "steps", "first_nonfinite_loss_step", "first_nonfinite_param_step", "skipped_steps",
           "max_global_grad_norm", "val_per", "tracer_verdict")


def _series_list(log: RunLog, key: str) -> list[float]:
    return log.series(key)[1].tolist() if key in log.series_names() else []


def _first_step(steps: np.ndarray, bad: np.ndarray) -> int | None:
    hits = steps[bad]
    return int(hits[0]) if hits.size else None


def read_run(path: str | Path) -> tuple[RunState, dict[str, Any]]:
    """The run's recorded traces (as a RunState, for the plots) and its summary row."""
    with RunLog(path) as log:
        settings = RunSettings(**log.attrs["settings"])
        names = log.series_names()
        state = RunState(settings=settings)
        for key in names:
            head, _, rest = key.partition("/")
            if head == "loss":
                state.losses[rest] = _series_list(log, key)
            elif head == "grad_norm" and rest != "global":
                state.group_norms[rest] = _series_list(log, key)
            elif head == "grad_nonfinite":
                state.group_nonfinite[rest] = [int(v) for v in _series_list(log, key)]
        state.scale = _series_list(log, "scaler/scale_before") or []
        state.events = log.table("events") if "events" in log.table_names() else []
        tracer = log.table("tracer") if "tracer" in log.table_names() else []
        steps, total = log.series("loss/total") if "loss/total" in names else (np.array([], int), np.array([]))
        p_steps, p_finite = (log.series("params_finite") if "params_finite" in names
                             else (np.array([], int), np.array([], bool)))
        skipped = _series_list(log, "skipped")
        norms = [v for v in _series_list(log, "grad_norm/global") if math.isfinite(v)]
        summary = log.attrs.get("summary") or {}
        row = {
            "name": settings.name, "log": str(path), "status": log.status, "steps": int(steps.size),
            "settings": settings.to_dict(),
            "first_nonfinite_loss_step": _first_step(steps, ~np.isfinite(total)),
            "first_nonfinite_param_step": _first_step(p_steps, ~p_finite.astype(bool)),
            "skipped_steps": int(sum(skipped)),
            "max_global_grad_norm": max(norms) if norms else None,
            "val_per": summary.get("val_per"),
            "tracer_verdict": tracer[0]["line"] if tracer else None,
        }
    return state, row


def write_report(paths: Sequence[str | Path], out: str | Path) -> list[Path]:
    """Write `training.png`, `outcomes.png`, `summary.json` and `summary.md` for the given run logs into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs, rows = {}, []
    for path in paths:
        state, row = read_run(path)
        runs[row["name"]] = state
        rows.append(row)
    written = [
        save_figure(training_figure(runs, title="joint stage", terms=None if len(runs) == 1 else ["total"]),
                    out / "training.png"),
        save_figure(outcome_figure(rows), out / "outcomes.png"),
    ]
    (out / "summary.json").write_text(json.dumps(json_safe({"runs": rows}), indent=2))
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join("-" if r[c] is None else str(r[c]) for c in COLUMNS) + " |" for r in rows]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return written + [out / "summary.json", out / "summary.md"]
