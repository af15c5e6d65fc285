"""Finite is not fixed: the outcome of a run, computed from its record by one set of rules used everywhere.

In order of precedence (the first that applies):

    diverged          a parameter became non-finite, or a loss term went non-finite on a step whose update was
                      applied
    overflow_skipped  losses went non-finite only on steps whose update was skipped; every parameter stayed finite
                      (the loop's guard held: a failure of the forward pass, not of the parameters)
    stalled           finite, but the run cannot train: a parameter group that receives gradients is updated on too
                      few of its steps (outside the optimizer, skipped or zero updates), or its updates are too small
                      to move it; or the run was long and quiet enough to show a fall of the loss and showed none
    unknown           finite, but whether the groups were updated was not measured (no `update_ratio/<group>`
                      series): no verdict on training without it
    inconclusive      finite and every group updated, but the run is too short or its loss too noisy to tell a
                      falling loss from noise
    healthy           finite, every group with gradients updated on most of its steps by updates that move it, and
                      the loss fell by more than its own noise explains

The loss trend is a least-squares line through the total loss (at the run's final loss weights: from the first
step whose `weight/<term>` values are those of the last step) against the step number. Its fitted change over the
steps is compared with `z` standard errors of that change: a fall beyond that and at least `min_drop` of the mean
loss is a falling loss. A run that could not have shown a fall of `min_drop` (its `z` standard errors exceed
`min_drop` of the mean loss, or it has fewer than `min_steps` steps) gets no loss verdict: `inconclusive` when
nothing else is wrong.

Updates are judged on what the parameters did (`update_ratio/<group>`: ||w_after - w_before|| / ||w_before|| per
step; `not_updated/<group>`: the group's tensors that got a non-zero gradient but no update), not on the clip
coefficient: Adam's step is invariant to a constant gradient scale, so a tiny clip coefficient alone says
nothing about the update. A clip coefficient below `clip_floor` on most updates is a warning.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from workbench.records.chain import causal_chain, decisive_link
from workbench.records.record import RunRecord

OUTCOMES: tuple[str, ...] = ("diverged", "overflow_skipped", "stalled", "unknown", "inconclusive", "healthy")


@dataclass(frozen=True)
class OutcomeRules:
    """Thresholds of the rules (see the module docstring).

    update_share: a group must be fully updated on at least this share of the steps on which it got gradients.
    min_update_ratio: the median per-step update ratio of such a group must reach this (relative to its norm):
    far below what a fine-tune at the seed's lr 1e-5 makes (1e-6 to 1e-5 per step for the pretrained encoder and
    CTC head, measured in notebook 01 at small), so only a collapsed update (a clip or lr scaling it to nothing)
    falls under it; slow updates that still move the loss are judged by the loss.
    min_steps: fewer steps at the final loss weights give no loss verdict.
    z: standard errors the fitted fall must exceed. min_drop: the least fall, as a share of the mean loss, that
    counts as learning; also the resolution a run needs before a flat loss is called stalled.
    clip_floor, clip_share: the clip warning (coefficient below clip_floor on more than clip_share of updates).
    """

    update_share: float = 0.5
    min_update_ratio: float = 1e-7
    min_steps: int = 8
    z: float = 2.5
    min_drop: float = 0.01
    clip_floor: float = 1e-3
    clip_share: float = 0.5

    def describe(self) -> dict[str, str]:
        """Each rule in one sentence, with this instance's numbers."""
        return {
            "diverged": "a parameter became non-finite, or a loss term went non-finite on a step whose update was "
                        "applied",
            "overflow_skipped": "loss terms went non-finite only on steps whose update was skipped, and every "
                                "parameter stayed finite",
            "stalled: not updated": f"a parameter group that got gradients was fully updated on less than "
                                    f"{self.update_share:.0%} of those steps (outside the optimizer, skipped or zero "
                                    f"updates)",
            "stalled: updates too small": f"the median per-step update of such a group moved it by less than "
                                          f"{self.min_update_ratio:g} of its norm",
            "stalled: loss": f"the run could resolve a fall of {self.min_drop:.0%} of its mean loss ({self.z:g} "
                             f"standard errors of the fitted change, at least {self.min_steps} steps) and the loss "
                             f"did not fall beyond its noise",
            "unknown": "finite, but the updates were not measured (no update ratios recorded)",
            "inconclusive": f"finite and updated, but too short (fewer than {self.min_steps} steps) or too noisy "
                            f"({self.z:g} standard errors above {self.min_drop:.0%} of the mean loss) to show the "
                            f"loss falling",
            "healthy": f"finite, every group with gradients updated, and the loss fell by more than {self.z:g} "
                       f"standard errors and at least {self.min_drop:.0%}",
            "warning: clip": f"the clip coefficient was below {self.clip_floor:g} on more than {self.clip_share:.0%} "
                             f"of the updates",
        }


@dataclass
class Outcome:
    """`kind` in OUTCOMES; `reasons` say why in one sentence each (for healthy: the evidence); `warnings` add what
    the run predicts for later steps or what looks wrong without deciding the outcome."""

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
    """The least-squares line of the total loss against the step, over the finite losses at the final weights.

    Returns None with fewer than `rules.min_steps` points, else: from_step, to_step, n, mean, `change` (the fitted
    change from the first to the last step, negative when the loss falls), `se` (its standard error), and their
    shares of the mean loss `rel_change` and `resolution` (z standard errors over the mean: the smallest fall
    this run can tell from noise).
    """
    start = final_weights_start(record)
    points = [(s, v) for s, v in zip(record.steps[start:], record.losses.get("total", [])[start:]) if _finite(v)]
    n = len(points)
    if n < max(rules.min_steps, 3):
        return None
    xs, ys = [float(s) for s, _ in points], [v for _, v in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    residual = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys))
    span = xs[-1] - xs[0]
    se = math.sqrt(residual / (n - 2) / sxx) * span
    scale = abs(my) or 1.0
    return {"from_step": points[0][0], "to_step": points[-1][0], "n": n, "mean": my, "change": slope * span,
            "se": se, "rel_change": slope * span / scale, "resolution": rules.z * se / scale}


def _trend_text(t: dict[str, Any], rules: OutcomeRules) -> str:
    return (f"fitted change {t['rel_change']:+.1%} of the mean loss {t['mean']:.4g} over {t['n']} steps (steps "
            f"{t['from_step']}-{t['to_step']}), {rules.z:g} standard errors = {t['resolution']:.1%}")


def _trained_steps(record: RunRecord, group: str) -> list[int]:
    """Indices of the steps on which `group` got a gradient (non-zero, or non-finite)."""
    return [k for k, v in enumerate(record.group_norms.get(group, [])) if v is not None and not v <= 0]


def update_measured(record: RunRecord) -> bool:
    """Whether the run recorded what its updates did (per-group update ratios)."""
    return any(any(v is not None for v in values) for values in record.prefixed("update_ratio").values())


def update_shares(record: RunRecord) -> dict[str, dict[str, Any]]:
    """Per group with gradients: `steps` (with a gradient), `updated` (of those, fully updated: update applied,
    no tensor with a gradient left unchanged), `outside` (of those, with tensors outside the optimizer) and
    `median_ratio` (median update ratio over the updated steps, None when none)."""
    skipped = set(record.skipped)
    ratios, stale = record.prefixed("update_ratio"), record.prefixed("not_updated")
    outside = record.prefixed("outside_optimizer")
    shares = {}
    for group in record.group_norms:
        steps = _trained_steps(record, group)
        if not steps or group not in ratios:
            continue
        ratio, left, out = ratios[group], stale.get(group), outside.get(group)
        updated = [k for k in steps if record.steps[k] not in skipped and _finite(ratio[k]) and ratio[k] > 0
                   and not (left is not None and (left[k] or 0) > 0)]
        shares[group] = {"steps": len(steps), "updated": len(updated),
                         "outside": sum(1 for k in steps if out is not None and (out[k] or 0) > 0),
                         "median_ratio": statistics.median(ratio[k] for k in updated) if updated else None}
    return shares


def _update_stalls(record: RunRecord, rules: OutcomeRules) -> list[str]:
    reasons = []
    for group, s in sorted(update_shares(record).items()):
        if s["updated"] < rules.update_share * s["steps"]:
            why = (f"outside the optimizer on {s['outside']} of them" if s["outside"]
                   else "its updates were skipped or zero")
            reasons.append(f"{group} got gradients on {s['steps']} steps but was fully updated on only "
                           f"{s['updated']} ({s['updated'] / s['steps']:.0%}; {why})")
        elif s["median_ratio"] is not None and s["median_ratio"] < rules.min_update_ratio:
            reasons.append(f"{group}'s updates were too small to train it: median {s['median_ratio']:.2g} of its "
                           f"norm per step (below {rules.min_update_ratio:g}) over {s['updated']} updates")
    return reasons


def _clip_warning(record: RunRecord, rules: OutcomeRules) -> str | None:
    skipped = set(record.skipped)
    coefs = [c for s, c in zip(record.steps, record.values("clip/coefficient")) if s not in skipped and c is not None]
    low = [c for c in coefs if not c >= rules.clip_floor]
    if not coefs or len(low) / len(coefs) <= rules.clip_share:
        return None
    finite = [c for c in coefs if not math.isnan(c)]
    median = f"{statistics.median(finite):.2g}" if finite else "NaN"
    return (f"the clip coefficient was below {rules.clip_floor:g} on {len(low)} of {len(coefs)} updates (median "
            f"{median}): SGD-like updates shrink with it, Adam's do not (judged by the update ratios)")


def _no_gradient_warning(record: RunRecord) -> str | None:
    """Groups that got no gradient on any step: they did not train (frozen throughout, or detached from the loss).
    Not a stall by itself: a group may be meant to stay frozen."""
    idle = sorted(g for g, values in record.group_norms.items()
                  if record.steps and not any(v is not None and not v <= 0 for v in values))
    if not idle:
        return None
    return (f"{len(idle)} parameter groups got no gradient on any of the {len(record.steps)} steps and did not train "
            f"({', '.join(idle[:4])}{', ...' if len(idle) > 4 else ''}): frozen throughout, or detached from the loss")


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


def _nonfinite_loss_steps(record: RunRecord) -> list[int]:
    return sorted({s for values in record.losses.values() for s, v in zip(record.steps, values)
                   if v is not None and not math.isfinite(v)})


def _nonfinite(record: RunRecord) -> Outcome | None:
    """diverged or overflow_skipped, or None when every loss and parameter stayed finite."""
    param_step = record.first_nonfinite_param_step()
    loss_steps = _nonfinite_loss_steps(record)
    if param_step is None and not loss_steps:
        return None
    link = decisive_link(causal_chain(record))
    decided = [link["line"]] if link is not None else []
    skipped = set(record.skipped)
    applied = [s for s in loss_steps if s not in skipped]
    if param_step is None and not applied:
        updates = len(record.steps) - len(skipped)
        return Outcome("overflow_skipped", [
            f"a loss term was non-finite on {len(loss_steps)} steps (first at step {loss_steps[0]}), every one of "
            f"them skipped, and every parameter stayed finite ({updates} of {len(record.steps)} updates applied)",
            *decided])
    first = min(s for s in [param_step, *applied] if s is not None)
    what = "a parameter became non-finite" if first == param_step else "a loss term went non-finite and the update"\
        " was applied"
    return Outcome("diverged", [f"{what} at step {first}", *decided])


def classify(record: RunRecord, rules: OutcomeRules = OutcomeRules()) -> Outcome:
    """The run's outcome under `rules` (see the module docstring)."""
    warnings = [w for w in [regrowth_warning(record), _clip_warning(record, rules), _no_gradient_warning(record)]
                if w]
    failed = _nonfinite(record)
    if failed is not None:
        failed.warnings = warnings
        return failed
    updates = len(record.steps) - len(record.skipped)
    stalled = ([f"every update was skipped ({len(record.steps)} of {len(record.steps)} steps)"]
               if record.steps and updates == 0 else _update_stalls(record, rules))
    trend = loss_trend(record, rules)
    judged = trend is not None and trend["resolution"] <= rules.min_drop
    falls = trend is not None and -trend["change"] > rules.z * trend["se"] and -trend["rel_change"] >= rules.min_drop
    if judged and not falls:
        fell = -trend["change"] > rules.z * trend["se"]
        what = f"fell less than {rules.min_drop:.0%}" if fell else "did not fall beyond its noise"
        stalled.append(f"the training loss {what}: {_trend_text(trend, rules)}")
    if stalled:
        return Outcome("stalled", stalled, warnings)
    if not update_measured(record):
        return Outcome("unknown", ["whether every parameter group was updated was not measured (no update ratios "
                                   "recorded)"], warnings)
    shares = update_shares(record)
    updated = "; ".join(f"{g} {s['updated']}/{s['steps']}" for g, s in sorted(shares.items()))
    evidence = f"every group with gradients was updated on most of its steps ({updated})"
    if trend is None:
        return Outcome("inconclusive", [f"too short to judge the loss: fewer than {rules.min_steps} finite steps at "
                                        f"the final loss weights", evidence], warnings)
    if not falls:
        return Outcome("inconclusive", [f"too noisy to judge the loss: {_trend_text(trend, rules)}, above the "
                                        f"{rules.min_drop:.0%} this rule needs", evidence], warnings)
    return Outcome("healthy", [f"the training loss fell: {_trend_text(trend, rules)}", evidence], warnings)
