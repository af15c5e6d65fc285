"""What a sweep found, computed from its run logs: per-run summaries and verdicts, the report notebook 02 shows
and 02_summary.json holds, the table rows, and the families of runs worth a figure."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from workbench.records import RunRecord, read_record
from workbench.studies.criteria import (
    Rule, conclusions, per_tolerances, run_summary, slice_label, varying_axes, verdict,
)
from workbench.studies.sweep.grid import Plan
from workbench.studies.sweep.runner import Sweep, log_status


def records(sweep: Sweep) -> dict[str, RunRecord]:
    """The records of the planned runs whose logs are finished."""
    return {rid: read_record(sweep.log_path(rid)) for rid in sweep.plan.runs
            if log_status(sweep.log_path(rid)) == "finished"}


def evaluate_runs(plan: Plan, recs: Mapping[str, RunRecord],
                  rule: Rule) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(summaries, verdicts) of every finished run; a joint run's verdict uses its cell's control, and the PER
    tolerance against it is the spread of that control's PER over the seeds (`criteria.per_tolerances`)."""
    controls = {c["run"]: c["control"] for c in plan.cells}
    tolerance = per_tolerances({rid: recs[rid] for rid in plan.controls if rid in recs})
    summaries = {rid: run_summary(rec, rule) for rid, rec in recs.items()}
    verdicts = {}
    for rid, rec in recs.items():
        control = controls.get(rid)
        verdicts[rid] = verdict(rec, recs.get(control) if control else None, rule,
                                per_tolerance=tolerance.get(control, 0.0))
    return summaries, verdicts


TABLE_COLUMNS = ("run", "freeze_steps", "lr", "first_nonfinite_step", "steps_skipped", "max_grad_norm",
                 "nonfinite_grad_steps", "loss_ratio_k_after", "val_per", "val_rnnt_per", "outcome", "wall_s")
VERDICT_COLUMNS = ("run", "no_nonfinite", "clean_unfreeze", "stable_after_unfreeze", "per_vs_control",
                   "all_steps_complete", "all")


def report(sweep: Sweep, rule: Rule = Rule()) -> dict[str, Any]:
    """Everything the notebook shows and 02_summary.json holds, computed from the run logs."""
    recs = records(sweep)
    summaries, verdicts = evaluate_runs(sweep.plan, recs, rule)
    control_of = {c["run"]: c["control"] for c in sweep.plan.cells}
    runs = []
    for rid, settings in sweep.plan.runs.items():
        if rid not in recs:
            continue
        runs.append({"id": rid, "kind": "control" if settings.ctc_only else "joint", "settings": settings.to_dict(),
                     "log": str(sweep.log_path(rid)), "control": control_of.get(rid),
                     "summary": summaries[rid], "verdict": verdicts[rid]})
    missing = [rid for rid in sweep.plan.runs if rid not in recs]
    cells = [c for c in sweep.plan.cells if c["run"] in recs]
    return {
        "checkpoint": str(sweep.checkpoint), "data": str(sweep.data), "grids": [g.to_dict() for g in sweep.grids],
        "rule": dataclasses.asdict(rule), "criteria": rule.describe(), "runs": runs, "missing": missing,
        "cells": sweep.plan.cells, "conclusions": conclusions(cells, summaries, verdicts) if cells else [],
    }


def table_rows(rep: Mapping[str, Any], kind: str = "joint") -> list[dict[str, Any]]:
    """One flat row per run of `kind` for `criteria.format_table`: the axes, the summary and the verdict."""
    rows = []
    for run in rep["runs"]:
        if run["kind"] != kind:
            continue
        s = run["settings"]
        rows.append({"run": run["id"].rsplit("-", 1)[0], "freeze_steps": s["freeze_steps"], "lr": s["lr"],
                     **run["summary"], **{k: v for k, v in run["verdict"].items() if k != "reasons"}})
    return rows


def families(plan: Plan) -> dict[str, list[dict[str, Any]]]:
    """Grid cells grouped by everything but N (one training figure each), keyed by a readable label."""
    varied = [a for a in varying_axes(plan.cells) if a != "freeze_steps"]
    out: dict[str, list[dict[str, Any]]] = {}
    for cell in plan.cells:
        out.setdefault(slice_label(cell["axes"], varied), []).append(cell)
    return out


def notable_families(plan: Plan, summaries: Mapping[str, Mapping[str, Any]], limit: int = 4) -> list[str]:
    """Up to `limit` family labels worth a figure, most telling first: families where N changed whether a run
    went non-finite, then families with any non-finite run, then the rest by decreasing lr."""
    def rank(item: tuple[str, list[dict[str, Any]]]) -> tuple:
        cells = [c for c in item[1] if c["run"] in summaries]
        diverged = {summaries[c["run"]]["first_nonfinite_step"] is not None for c in cells}
        return (len(diverged) < 2, True not in diverged, -max(c["axes"]["lr"] for c in item[1]))
    return [label for label, _ in sorted(families(plan).items(), key=rank)[:limit]]
