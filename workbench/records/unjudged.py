"""Runs that get no outcome: one interrupted before its first step (there is nothing to judge), and one still being
written (read as far as it was flushed: judged once it has ended). Every view that shows an outcome asks here."""

from __future__ import annotations

from typing import Any

from workbench.records.record import RunRecord

INTERRUPTED = "no outcome: interrupted before its first step"
IN_PROGRESS = "no outcome: in progress"


def no_outcome(record: RunRecord, *, in_progress: bool = False) -> str | None:
    """The line a view shows instead of an outcome, or None when the run is to be judged. `in_progress`: the log
    is still being written (the caller knows: `workbench.views.logstate.check_readable`)."""
    if in_progress:
        return f"{IN_PROGRESS} ({len(record.steps)} steps flushed so far)"
    if not record.steps and record.status != "finished":
        return INTERRUPTED
    return None


def unjudged(summary: dict[str, Any], line: str) -> dict[str, Any]:
    """A `summarize` dict without an outcome: `outcome` None, the line as its only reason, no warnings."""
    return {**summary, "outcome": None, "outcome_reasons": [line], "outcome_warnings": []}
