"""Finite is not fixed: the outcome of a run, computed from its record by one set of rules used everywhere.

    diverged   a loss term or a parameter became non-finite
    stalled    finite, but something that should train does not: a component that receives gradients is never
               updated (outside the optimizer, or every update zero or skipped), the clip coefficient stays below
               `clip_floor` on more than `clip_share` of the updates, or the training loss does not fall
    healthy    finite, every component with gradients updated, and the loss falls

"The loss falls" is judged on the weighted total loss over the steps at the run's final loss weights (from the
first step whose `weight/<term>` values are those of the last step; every step when no weights are recorded): its
median over the last `window` of those steps must be at least `min_drop` below its median over the first
`window`. The rules and thresholds are the same for every run and every freeze length; `OutcomeRules.describe`
prints them. A fp16 run whose GradScaler backed off from an overflow is also checked for a later overflow: the
scale grows back (by `growth_factor` every `growth_interval` clean steps) to the level that overflowed.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from workbench.records.chain import causal_chain, decisive_link
from workbench.records.record import RunRecord

OUTCOMES: tuple[str, ...] = ("diverged", "stalled", "healthy")


@dataclass(frozen=True)
class OutcomeRules:
    clip_floor: float = 1e-3
    clip_share: float = 0.5
    min_drop: float = 0.02
    window: float = 0.2
    min_window: int = 2

    def describe(self) -> dict[str, str]:
        """Each rule in one sentence, with this instance's numbers."""
        return {
            "diverged": "a loss term or a parameter became non-finite at some step",
            "stalled: never updated": "a parameter group got a non-zero gradient on some steps but on every one of "
                                      "them some of its tensors were not updated (outside the optimizer, or the "
                                      "update skipped)",
            "stalled: clip": f"the clip coefficient (max_norm / total norm) was below {self.clip_floor:g} on more "
                             f"than {self.clip_share:.0%} of the updates",
            "stalled: loss": f"over the steps at the final loss weights, the median total loss of the last "
                             f"{self.window:.0%} (at least {self.min_window} steps) was not at least "
                             f"{self.min_drop:.0%} below that of the first {self.window:.0%}",
            "healthy": "none of the above",
        }


@dataclass
class Outcome:
    """`kind` in OUTCOMES; `reasons` say why in one sentence each (for healthy: the evidence); `warnings` add what
    the run predicts for later steps."""

    kind: str
    reasons: list[str]
    warnings: list[str] = field(default_factory=list)


def _finite(v: Any) -> bool:
    return v is not None and math.isfinite(v)


def final_weights_start(record: RunRecord) -> int:
    """Index (into record.steps) of the first step whose loss weights equal the last step's."""
    weights = [v for k, v in sorted(record.prefixed("weight").items())]
    if not weights or not record.steps:
        return 0
    rows = list(zip(*weights))
    k = len(rows) - 1
    while k > 0 and rows[k - 1] == rows[-1]:
        k -= 1
    return k


def loss_trend(record: RunRecord, rules: OutcomeRules) -> dict[str, Any] | None:
    """First and last window medians of the total loss at the final weights, or None with too few steps."""
    start = final_weights_start(record)
    steps = record.steps[start:]
    values = [(s, v) for s, v in zip(steps, record.losses.get("total", [])[start:]) if _finite(v)]
    w = max(rules.min_window, round(rules.window * len(values)))
    if len(values) < 2 * w:
        return None
    first = statistics.median(v for _, v in values[:w])
    last = statistics.median(v for _, v in values[-w:])
    return {"from_step": values[0][0], "to_step": values[-1][0], "window": w, "first": first, "last": last,
            "drop": (first - last) / abs(first) if first else 0.0}


def _never_updated(record: RunRecord) -> list[str]:
    reasons = []
    norms, stale = record.group_norms, record.prefixed("not_updated")
    outside = record.prefixed("outside_optimizer")
    for group, values in stale.items():
        steps = [k for k, v in enumerate(norms.get(group, [])) if v is not None and not v <= 0]
        if steps and all((values[k] or 0) > 0 for k in steps):
            out = sum(1 for k in steps if (outside.get(group, [None] * len(record.steps))[k] or 0) > 0)
            where = f"outside the optimizer on {out} of them" if out else "its updates were zero or skipped"
            reasons.append(f"{group} got gradients on {len(steps)} steps but was never fully updated ({where})")
    return reasons


def _clip_stall(record: RunRecord, rules: OutcomeRules) -> str | None:
    skipped = set(record.skipped)
    coefs = [c for s, c in zip(record.steps, record.values("clip/coefficient")) if s not in skipped and c is not None]
    if not coefs:
        return None
    low = [c for c in coefs if not c >= rules.clip_floor]
    if len(low) / len(coefs) <= rules.clip_share:
        return None
    median = statistics.median(c for c in coefs if not math.isnan(c)) if any(not math.isnan(c) for c in coefs) \
        else math.nan
    return (f"the clip coefficient was below {rules.clip_floor:g} on {len(low)} of {len(coefs)} updates (median "
            f"{median:.2g}): the clip scaled the updates to almost nothing")


def regrowth_warning(record: RunRecord) -> str | None:
    """For a fp16 run whose GradScaler backed off: when the scale grows back to the level that overflowed."""
    scaler = record.attrs.get("scaler") or {}
    scales, flags = record.scale, record.values("nonfinite_grad")
    overflowed = [sc for sc, f in zip(scales, flags) if f and _finite(sc)]
    if not scaler or not overflowed or not record.steps:
        return None
    level = min(overflowed)
    last = scales[-1]
    now = last * scaler["backoff_factor"] if flags[-1] else last
    if not _finite(now) or now >= level:
        return None
    clean = 0
    for f in reversed(flags):
        if f:
            break
        clean += 1
    doublings = math.ceil(math.log(level / now, scaler["growth_factor"]))
    wait = doublings * scaler["growth_interval"] - clean % scaler["growth_interval"]
    return (f"predicted: the GradScaler overflowed at scale {level:g} and runs at {now:g} now; after about {wait} "
            f"more clean steps it grows back to {level:g}, where the same gradients overflowed")


def classify(record: RunRecord, rules: OutcomeRules = OutcomeRules()) -> Outcome:
    """The run's outcome under `rules` (see the module docstring)."""
    warnings = [w for w in [regrowth_warning(record)] if w]
    bad = record.first_nonfinite_step()
    if bad is not None:
        link = decisive_link(causal_chain(record))
        reasons = [f"a loss term or a parameter became non-finite at step {bad}"]
        if link is not None:
            reasons.append(link["line"])
        return Outcome("diverged", reasons, warnings)
    stalled = []
    updates = len(record.steps) - len(record.skipped)
    if record.steps and updates == 0:
        stalled.append(f"every update was skipped ({len(record.steps)} of {len(record.steps)} steps)")
    else:
        stalled += _never_updated(record)
    clip = _clip_stall(record, rules)
    if clip:
        stalled.append(clip)
    trend = loss_trend(record, rules)
    if trend is None:
        stalled.append("too few steps at the final loss weights to show the loss falling")
    elif trend["drop"] < rules.min_drop:
        stalled.append(f"the training loss did not fall by {rules.min_drop:.0%}: median {trend['last']:.4g} over the "
                       f"last {trend['window']} steps vs {trend['first']:.4g} over the first {trend['window']} (from "
                       f"step {trend['from_step']}), a change of {-trend['drop']:+.1%}")
    if stalled:
        return Outcome("stalled", stalled, warnings)
    updated = ("every parameter group with gradients was updated" if record.prefixed("not_updated") else
               "whether every parameter group was updated was not measured (no update ratios recorded)")
    return Outcome("healthy", [f"the training loss fell {trend['drop']:.1%}: median {trend['first']:.4g} over the "
                               f"first {trend['window']} steps (from step {trend['from_step']}) to {trend['last']:.4g} "
                               f"over the last {trend['window']}", updated], warnings)
