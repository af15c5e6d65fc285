"""Sweeps of joint-stage runs forked from one CTC-warm checkpoint: the grid (`grid`), its parallel resumable
execution (`runner`) and what it found (`report`). Figures and the live dashboard are in
`workbench.views.sweep`."""

from workbench.studies.sweep.grid import Plan, SweepError, SweepGrid, make_plan, run_id
from workbench.studies.sweep.report import (
    TABLE_COLUMNS, VERDICT_COLUMNS, evaluate_runs, families, notable_families, records, report, table_rows,
)
from workbench.studies.sweep.runner import Sweep, SweepOutcome, log_status

__all__ = ["Plan", "Sweep", "SweepError", "SweepGrid", "SweepOutcome", "TABLE_COLUMNS", "VERDICT_COLUMNS",
           "evaluate_runs", "families", "log_status", "make_plan", "notable_families", "records", "report", "run_id",
           "table_rows"]
