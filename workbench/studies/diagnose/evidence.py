"""What a failing run shows, in the terms the candidate fixes answer: evidence kinds read from its outcome, its
causal chain, its optimizer-coverage findings and its settings, each with the line of the record that shows it.

    outside_optimizer  trainable tensors got gradients but the optimizer does not hold them
    kept_at_unfreeze   a freezing policy kept the optimizer at the unfreeze (the module trains outside it)
    stale_gradients    the loop zeroes only the optimizer's gradients while tensors outside it hold gradients
    clip_nonfinite     a non-finite total norm made the clip coefficient non-finite and it scaled every gradient
    clip_collapsed     a finite clip coefficient below `clip_floor` on more than `clip_share` of the updates (an fp16
                       loop that clips the loss-scaled gradients before unscaling them shows it)
    fp16_overflow      the first non-finite value was produced by an op in float16
    slow_loss          finite, but the loss did not fall by `min_drop` beyond its noise (stalled or inconclusive
                       on the loss)
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from workbench.records import Outcome, OutcomeRules, RunRecord, classify
from workbench.records.chain import causal_chain, decisive_link, zero_grad_scope
from workbench.records.outcome import loss_trend, update_shares
from workbench.train.policies import POLICIES

KINDS: tuple[str, ...] = ("outside_optimizer", "kept_at_unfreeze", "stale_gradients", "clip_nonfinite",
                          "clip_collapsed", "fp16_overflow", "slow_loss")


@dataclass
class Evidence:
    """A run's outcome, the decisive link of its chain (None when nothing was non-finite) and `kinds`: evidence
    kind -> the record's line that shows it, in `KINDS` order."""

    outcome: Outcome
    decisive: dict[str, Any] | None
    kinds: dict[str, str] = field(default_factory=dict)


def _outside(record: RunRecord) -> str | None:
    # coverage findings also list frozen tensors the optimizer holds (harmless): only tensors outside count here
    outside_rows = [c for c in record.tables.get("coverage", []) if c.get("outside_optimizer")]
    if outside_rows:
        first = outside_rows[0]
        names = ", ".join(name for name, _ in first["outside_optimizer"][:3])
        return (f"step {first['step']}: {len(first['outside_optimizer'])} trainable tensors with gradients outside "
                f"the optimizer ({names}{', ...' if len(first['outside_optimizer']) > 3 else ''})")
    outside = {g: s for g, s in update_shares(record).items() if s["outside"]}
    if not outside:
        return None
    return "; ".join(f"{g} outside the optimizer on {s['outside']} of its {s['steps']} steps with gradients"
                     for g, s in sorted(outside.items()))


def _collapsed(record: RunRecord, rules: OutcomeRules) -> str | None:
    # finite coefficients only: a NaN one is clip_nonfinite, and an applied update with it diverges anyway
    skipped = set(record.skipped)
    coefs = [c for s, c in zip(record.steps, record.values("clip/coefficient"))
             if s not in skipped and c is not None and math.isfinite(c)]
    low = [c for c in coefs if c < rules.clip_floor]
    if not coefs or len(low) / len(coefs) <= rules.clip_share:
        return None
    return (f"the clip coefficient was below {rules.clip_floor:g} on {len(low)} of {len(coefs)} finite updates "
            f"(median {statistics.median(coefs):.2g})")


def _slow(record: RunRecord, outcome: Outcome, rules: OutcomeRules) -> str | None:
    if outcome.kind not in ("stalled", "inconclusive"):
        return None
    trend = loss_trend(record, rules)
    if trend is None:
        return f"fewer than {rules.min_steps} finite steps to judge the loss"
    if -trend["change"] > rules.z * trend["se"] and -trend["rel_change"] >= rules.min_drop:
        return None
    return (f"the loss changed by {trend['rel_change']:+.1%} of its mean over {trend['n']} steps "
            f"({rules.z:g} standard errors = {trend['resolution']:.1%})")


def gather(record: RunRecord, rules: OutcomeRules = OutcomeRules()) -> Evidence:
    """The evidence of `record` (see the module docstring)."""
    outcome = classify(record, rules)
    chain = causal_chain(record)
    found: dict[str, str] = {}
    outside = _outside(record)
    if outside is not None:
        found["outside_optimizer"] = outside
        settings = record.settings or {}
        policy = POLICIES.get(settings.get("policy", "none"))
        if policy is not None and policy.freezes and settings.get("freeze_steps") and \
                settings.get("rebuild_at_unfreeze") is False:
            found["kept_at_unfreeze"] = (f"{settings['policy']} unfroze the decoder at step "
                                         f"{settings['freeze_steps'] + 1} and kept the optimizer")
        if zero_grad_scope(record) == "optimizer":
            found["stale_gradients"] = ("the loop zeroes only the optimizer's gradients, so the tensors outside it "
                                        "keep theirs across steps")
    clip = next((k for k in chain if k["kind"] == "escape" and k["guard"] == "the clip"), None)
    if clip is not None:
        found["clip_nonfinite"] = clip["line"]
    collapsed = _collapsed(record, rules)
    if collapsed is not None:
        found["clip_collapsed"] = collapsed
    producer = next((k for k in chain if k["kind"] == "producer"), None)
    if producer is not None and producer["dtype"] == "float16":
        found["fp16_overflow"] = producer["line"]
    slow = _slow(record, outcome, rules)
    if slow is not None:
        found["slow_loss"] = slow
    return Evidence(outcome, decisive_link(chain), {k: found[k] for k in KINDS if k in found})
