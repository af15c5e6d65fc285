"""The one summary of a run: the numbers every table, notebook summary, sweep index and report shows, computed
from its RunRecord only."""

from __future__ import annotations

from typing import Any

from workbench.records.chain import causal_chain, decisive_link
from workbench.records.outcome import OutcomeRules, classify
from workbench.records.record import RunRecord
from workbench.records.unjudged import no_outcome, unjudged


def summarize(record: RunRecord, rules: OutcomeRules = OutcomeRules()) -> dict[str, Any]:
    """JSON-ready summary of one run (non-finite floats stay floats; `json_safe` them for strict JSON).

    Steps are the run's own 1-based step numbers. `outcome` (one of `records.OUTCOMES`),
    `outcome_reasons` and `outcome_warnings` come from `records.outcome.classify`; `causal_chain` is the list of
    links of `records.chain.causal_chain`, and `tracer_verdict` the line of its decisive link. `outside_optimizer`
    names the trainable tensors that got a gradient outside the optimizer at the first step the coverage check
    found any; `tracer_verdicts` lists the first non-finite tensor of every step the tracer replayed. A run that
    ended before its first step gets no outcome: `outcome` None, its reason "no outcome: interrupted before its
    first step" (`records.unjudged`).
    """
    total = record.losses.get("total", [])
    coverage = record.tables.get("coverage", [])
    outside = next((row["outside_optimizer"] for row in coverage if row.get("outside_optimizer")), [])
    tracer = [row["line"] for row in record.tables.get("tracer", [])]
    chain = causal_chain(record)
    decisive = decisive_link(chain)
    outcome = classify(record, rules)
    summary = {
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
        "outcome": outcome.kind,
        "outcome_reasons": outcome.reasons,
        "outcome_warnings": outcome.warnings,
        "causal_chain": chain,
        "tracer_verdict": decisive["line"] if decisive else None,
        "tracer_verdicts": tracer,
        "events": record.events,
        "val_per": record.attrs.get("val_per"),
        "val_rnnt_per": record.attrs.get("val_rnnt_per"),
        # whether the RNN-T PER measures quality (a decoder emitting nothing or several times the reference does not)
        "val_rnnt_length_ratio": record.attrs.get("val_rnnt_length_ratio"),
        "val_rnnt_functional": record.attrs.get("val_rnnt_functional"),
        "val_rnnt_sdi": record.attrs.get("val_rnnt_sdi"),
        # per validation utterance, for paired comparisons (workbench.studies.stats)
        "val_ctc_errors": record.attrs.get("val_ctc_errors"),
        "val_rnnt_errors": record.attrs.get("val_rnnt_errors"),
        "val_ref_lengths": record.attrs.get("val_ref_lengths"),
        "wall_s": record.attrs.get("wall_s"),
        "error": record.attrs.get("error"),
    }
    missing = no_outcome(record)
    return summary if missing is None else unjudged(summary, missing)
