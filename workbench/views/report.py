"""Figures and a summary table from one or more run logs (`workbench report RUNLOG... --out DIR`).

Reads only what the run logs recorded, verified against their checksums; a run that was killed mid-way is reported
up to its last flushed step. A run interrupted before its first step, and one still being written (read with
`--partial`), are reported without an outcome (`records.unjudged`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from workbench.records import RunRecord, json_safe, read_record, summarize
from workbench.records.unjudged import no_outcome, unjudged
from workbench.views.plots import outcome_figure, save_figure, training_figure

COLUMNS = ("name", "status", "steps", "outcome", "first_nonfinite_loss_step", "first_nonfinite_param_step",
           "skipped_steps", "max_grad_norm", "val_per", "tracer_verdict")


def labelled(records: Sequence[RunRecord]) -> dict[str, RunRecord]:
    """Records keyed by a label unique among them: the run's name, with its log's file name where names repeat."""
    names = [r.name for r in records]
    out = {}
    for record, name in zip(records, names):
        label = name if names.count(name) == 1 else f"{name} ({Path(record.path or '').name})"
        out[label] = record
    return out


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return str(len(value))
    return str(value)


def _summary(record: RunRecord, in_progress: bool) -> dict[str, Any]:
    line = no_outcome(record, in_progress=in_progress)
    return summarize(record) if line is None else unjudged(summarize(record), line)


def write_report(paths: Sequence[str | Path], out: str | Path, *,
                 in_progress: Sequence[str | Path] = ()) -> list[Path]:
    """Write `training.png`, `outcomes.png`, `summary.json` and `summary.md` for the given run logs into `out`;
    the logs in `in_progress` are still being written (reported without an outcome)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    busy = {str(path) for path in in_progress}
    runs = labelled([read_record(path) for path in paths])
    rows = [{**_summary(record, record.path in busy), "name": label} for label, record in runs.items()]
    written = [
        save_figure(training_figure(runs, title="joint stage", terms=None if len(runs) == 1 else ["total"]),
                    out / "training.png"),
        save_figure(outcome_figure(rows), out / "outcomes.png"),
    ]
    (out / "summary.json").write_text(json.dumps(json_safe({"runs": rows}), indent=2))
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r[c] if c != "outcome" or r[c] else r["outcome_reasons"][0]) for c in COLUMNS)
              + " |" for r in rows]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return written + [out / "summary.json", out / "summary.md"]
