"""The one summary of a run: the numbers every table, notebook summary, sweep index and report shows, computed
from its RunRecord only."""

from __future__ import annotations

from typing import Any

from workbench.records.record import RunRecord


def summarize(record: RunRecord) -> dict[str, Any]:
    """JSON-ready summary of one run (non-finite floats stay floats; `json_safe` them for strict JSON).

    Steps are the run's own 1-based step numbers. `outside_optimizer` names the trainable tensors that got a
    gradient outside the optimizer at the first step the coverage check found any; `tracer_verdict` is the first
    tracer verdict line (`tracer_verdicts` all of them).
    """
    total = record.losses.get("total", [])
    coverage = record.tables.get("coverage", [])
    outside = next((row["outside_optimizer"] for row in coverage if row.get("outside_optimizer")), [])
    tracer = [row["line"] for row in record.tables.get("tracer", [])]
    return {
        "name": record.name,
        "status": record.status,
        "steps": len(record.steps),
        "settings": record.settings,
        "log": record.path,
        "loss_step_1": total[0] if total else None,
        "final_loss": total[-1] if total else None,
        "final_losses": {term: values[-1] for term, values in record.losses.items() if values},
        "first_nonfinite_loss_step": record.first_nonfinite_loss_step(),
        "first_nonfinite_param_step": record.first_nonfinite_param_step(),
        "first_nonfinite_step": record.first_nonfinite_step(),
        "skipped_steps": record.skipped,
        "overflow_steps": record.overflow,
        "max_grad_norm": record.max_grad_norm,
        "outside_optimizer": [name for name, *_ in outside],
        "tracer_verdict": tracer[0] if tracer else None,
        "tracer_verdicts": tracer,
        "events": record.events,
        "val_per": record.attrs.get("val_per"),
        "val_rnnt_per": record.attrs.get("val_rnnt_per"),
        "wall_s": record.attrs.get("wall_s"),
        "error": record.attrs.get("error"),
    }
