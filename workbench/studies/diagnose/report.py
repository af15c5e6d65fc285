"""What a diagnosis found, computed from the candidate runs: one row per candidate (and the control), the
recommendation and its sentences, as a text table and as the JSON layout of `workbench diagnose --json`."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from workbench.records import OUTCOMES, OutcomeRules, RunRecord, classify
from workbench.records.outcome import loss_trend, update_shares

COLUMNS = ("candidate", "changes", "outcomes", "loss change", "wall s")


def label(outcomes: Sequence[str]) -> str:
    """Outcome counts over the seeds, best first: "2/3 healthy 1/3 stalled"."""
    n = len(outcomes)
    kinds = [k for k in reversed(OUTCOMES) if k in outcomes] + (["failed"] if "failed" in outcomes else [])
    return " ".join(f"{outcomes.count(k)}/{n} {k}" for k in kinds) or "no runs"


def row(name: str, changes: Mapping[str, tuple[Any, Any]], records: Mapping[int, RunRecord],
        errors: Mapping[int, str], seeds: Sequence[int], rules: OutcomeRules, **extra: Any) -> dict[str, Any]:
    """One candidate over its seeds: per-seed outcomes (in seed order; "failed" for a run that did not finish),
    healthy count, reasons of the non-healthy seeds (distinct, in seed order), `outside_seeds` (seeds in which a
    group with gradients had tensors outside the optimizer), median fitted loss change (share of the mean loss,
    over the finite seeds with a trend), and the runs' summed wall time."""
    outcomes, reasons, changes_, walls, outside = [], [], [], [], 0
    for seed in seeds:
        record = records.get(seed)
        if record is None:
            outcomes.append("failed")
            reasons.append(f"seed {seed}: the run failed: {errors.get(seed, 'not run')}")
            continue
        outcome = classify(record, rules)
        outcomes.append(outcome.kind)
        outside += any(s["outside"] for s in update_shares(record).values())
        if outcome.kind != "healthy" and outcome.reasons and outcome.reasons[0] not in reasons:
            reasons.append(outcome.reasons[0])
        trend = loss_trend(record, rules)
        if trend is not None and outcome.kind not in ("diverged", "overflow_skipped"):
            changes_.append(trend["rel_change"])
        walls.append(record.attrs.get("wall_s") or 0.0)
    return {"name": name, "changes": "; ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items()) or "nothing",
            "changed": sorted(changes), "outcomes": outcomes, "label": label(outcomes),
            "healthy": outcomes.count("healthy"), "seeds": len(seeds), "reasons": reasons, "outside_seeds": outside,
            "loss_change": statistics.median(changes_) if changes_ else None, "wall_s": round(sum(walls), 1),
            **extra}


@dataclass
class Diagnosis:
    """The control's row (with `reproduced`), the candidates' rows in registry order, the recommended candidate
    (None when none), its sentences (`lines`), the run's evidence and the scope of everything run."""

    control: dict[str, Any]
    candidates: list[dict[str, Any]]
    recommended: str | None
    lines: list[str]
    evidence: dict[str, str]
    scope: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """The control and every candidate, as the table shows them."""
        return [self.control, *self.candidates]

    def to_json(self) -> dict[str, Any]:
        return {"control": self.control, "candidates": self.candidates, "recommended": self.recommended,
                "lines": self.lines, "evidence": self.evidence, "scope": self.scope}

    def table(self) -> str:
        """The rows as a fixed-width text table, then the reasons of the rows that were not healthy in every
        seed."""
        cells = [[r["name"], r["changes"], r["label"],
                  "-" if r["loss_change"] is None else f"{r['loss_change']:+.1%}", f"{r['wall_s']:.1f}"]
                 for r in self.rows()]
        widths = [max(len(c[k]) for c in [list(COLUMNS), *cells]) for k in range(len(COLUMNS))]
        out = ["  ".join(h.ljust(w) for h, w in zip(COLUMNS, widths)).rstrip(),
               "  ".join("-" * w for w in widths)]
        out += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)).rstrip() for cell in cells]
        why = [(r["name"], r["reasons"]) for r in self.rows() if r["healthy"] < r["seeds"] and r["reasons"]]
        if why:
            out.append("why not healthy (the first seed's reason; every seed's in the JSON):")
            out += [f"  {name}: {reasons[0]}" for name, reasons in why]
        return "\n".join(out)


def _rank(r: Mapping[str, Any]) -> tuple:
    """Higher is better: more healthy seeds, then fewer seeds at each worse outcome (diverged worst)."""
    return (r["healthy"], *(-r["outcomes"].count(k) for k in OUTCOMES), -len(r["changed"]))


def recommend(control: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]], run_outcome: str,
              scope_text: str) -> tuple[str | None, list[str]]:
    """(recommended name or None, sentences). A recommendation needs the control to reproduce the run's outcome
    in every seed; it is the candidate healthy in every seed that changes the fewest settings (registry order
    breaks ties)."""
    n = control["seeds"]
    same = control["outcomes"].count(run_outcome)
    lines = [f"The control (the run unchanged) was {control['label']}; the run itself was {run_outcome} "
             f"({scope_text})."]
    if run_outcome == "healthy":
        return None, lines + ["The run is healthy: there is nothing to fix."]
    if same < n:
        return None, lines + [f"The failure reproduced in only {same}/{n} seeds from the fork, so no candidate is "
                              f"recommended: a change cannot be credited with removing a failure the unchanged run "
                              f"does not show."]
    if not candidates:
        return None, lines + ["No candidate answers this run's evidence: no recommendation."]
    healthy = [c for c in candidates if c["healthy"] == c["seeds"] == n]
    if healthy:
        best = min(healthy, key=lambda c: len(c["changed"]))
        others = [c["name"] for c in healthy if c is not best]
        also = f"; also healthy in every seed: {', '.join(others)}" if others else ""
        return best["name"], lines + [
            f"Recommended: {best['name']}, healthy in {best['healthy']}/{n} seeds, the healthy change that changes "
            f"the fewest settings ({best['changes']}){also}.",
            f"In code: {best['code']}."]
    best = max(candidates, key=_rank)
    why = f": {best['reasons'][0]}" if best["reasons"] else ""
    return None, lines + [f"No candidate made this run healthy in every seed. The best was {best['name']} "
                          f"({best['label']}){why}."]
