"""The causal chain of a run's non-finite values, computed from its record: where the first one was produced, where
one got past the guard meant to stop it, where one first reached the parameters, and where the loss followed;
or that the guard caught it.

It reads the tracer's step traces (the "tracer" table: each non-finite step replayed whole, see
`workbench.instrument.tracer.StepTrace`) and, for what no trace covers, the per-step series. A link is a dict:

    kind     "producer" | "escape" | "caught" | "contamination" | "loss"
    step     the run's step
    phase    "forward" | "backward" | "clip" | "update"
    module, param, op, dtype, nan, inf, numel   as the tracer found them (empty where the link has no tensor)
    guard    for escape and caught: what was meant to stop the value
    line     the link in one line

The guards of a training step, in order: the GradScaler's inf check over the optimizer's gradients (fp16; it
looks before the clip), the clip (its coefficient max_norm / total norm becomes 0 for an infinite norm and NaN
for a NaN one, and inf x 0 = NaN), and the loop's non-finite policy (the seed's loop checks only the loss).
"""

from __future__ import annotations

import math
from typing import Any

from workbench.instrument.tracer import Verdict
from workbench.records.record import RunRecord
from workbench.train.step import SEMANTICS

KINDS: tuple[str, ...] = ("producer", "escape", "caught", "contamination", "loss")
_TENSOR_FIELDS = ("phase", "module", "param", "op", "dtype", "nan", "inf", "numel")


def _link(kind: str, step: int, text: str, finding: dict[str, Any] | None = None, guard: str = "") -> dict[str, Any]:
    tensor = {k: (finding or {}).get(k, "" if k in ("phase", "module", "param", "op", "dtype") else 0)
              for k in _TENSOR_FIELDS}
    return {"kind": kind, "step": step, **tensor, "guard": guard, "line": f"step {step} {kind}: {text}"}


def _entries(grads: list[dict[str, Any]]) -> str:
    shown = ", ".join(f"{g['param']} ({g['count']})" for g in grads[:3])
    return shown + (", ..." if len(grads) > 3 else "")


def _finding(trace: dict[str, Any], phase: str) -> dict[str, Any] | None:
    return next((f for f in trace["findings"] if f["phase"] == phase), None)


def _coefficient(value: float | None) -> str:
    return "NaN" if value is not None and math.isnan(value) else f"{value:g}"


def zero_grad_scope(record: RunRecord) -> str | None:
    """What the run's loop zeroes between steps: "model" (every gradient), "optimizer" (only the optimizer's), or
    None when the record does not say."""
    settings = record.settings or {}
    semantics = settings.get("semantics")
    if isinstance(semantics, dict):  # byo and Lightning runs store the whole LoopSemantics
        return semantics.get("zero_grad_scope")
    if settings.get("zero_grad_scope"):
        return settings["zero_grad_scope"]
    return SEMANTICS[semantics].zero_grad_scope if isinstance(semantics, str) and semantics in SEMANTICS else None


def _carried(step: int, params: set[str], traces_by_step: dict[int, dict[str, Any]], scope: str | None) -> str:
    """What became of non-finite gradients outside the optimizer after `step`, from the loop's zero_grad scope and,
    where the next step was traced, from what that step saw."""
    after = traces_by_step.get(step + 1)
    seen = (None if after is None else
            sorted(params & {g["param"] for g in after["grads_nonfinite"] if not g["held"]}))
    if scope == "model":
        text = "the loop zeroes every gradient before the next backward, so they do not carry over"
    elif scope == "optimizer":
        text = "the loop zeroes only the optimizer's gradients, so they carry into the next step's gradients"
    else:
        text = "the record does not say whether the loop zeroes them"
    if seen:
        text += f" (step {step + 1} still held {len(seen)} of them non-finite)"
    elif seen is not None:
        text += f" (step {step + 1} held none of them non-finite)"
    return text


def _trace_links(trace: dict[str, Any], traces_by_step: dict[int, dict[str, Any]],
                 scope: str | None) -> list[dict[str, Any]]:
    """The escape, caught and contamination links one step trace shows."""
    step, links = trace["step"], []
    before_clip = trace["grads_nonfinite"]
    outside = [g for g in before_clip if not g["held"]]
    outside_after = [g for g in trace["grads_after_clip"] if not g["held"]]
    held_after = [g for g in trace["grads_after_clip"] if g["held"]]
    scaler = trace["found_inf"] is not None
    if trace["skipped"] and not trace["params_nonfinite"]:
        guard = "the GradScaler's inf check" if trace["found_inf"] else "the loop's non-finite policy"
        scale = f" and lowered the scale to {trace['scale_after']:g}" if trace["found_inf"] else ""
        links.append(_link("caught", step, f"{guard} found non-finite gradients, skipped the update{scale}",
                           guard=guard))
    if outside_after or (outside and not trace["found_inf"]):
        guard = "the GradScaler's inf check" if scaler else "the loop's non-finite policy"
        parts = [f"{guard} covers only the optimizer's gradients"]
        if outside:
            parts.append(f"{len(outside)} tensors outside the optimizer held non-finite entries after the backward "
                         f"({_entries(outside)})")
        if outside_after:
            coef = trace["clip_coef"]
            by = f" (coefficient {_coefficient(coef)})" if coef is not None else ""
            parts.append(f"{len(outside_after)} held non-finite entries after the clip{by} ({_entries(outside_after)})")
        names = {g["param"] for g in outside + outside_after}
        parts.append(_carried(step, names, traces_by_step, scope))
        links.append(_link("escape", step, "; ".join(parts), _finding(trace, "clip") if outside_after and not outside
                           else _finding(trace, "backward"), guard))
    if held_after and not trace["skipped"]:
        norm = trace["clip_norm"]
        if trace["clip_coef"] is not None and not math.isfinite(norm):
            guard = "the clip"
            what = (f"the total norm {norm:g} made the clip coefficient {_coefficient(trace['clip_coef'])}, which "
                    f"multiplied every gradient after the GradScaler's check" if scaler else
                    f"the total norm {norm:g} made the clip coefficient {_coefficient(trace['clip_coef'])}")
        else:
            guard = "the GradScaler's inf check" if scaler else "the loop's non-finite policy"
            what = f"{guard} let non-finite gradients through"
        links.append(_link("escape", step, f"{what}: {len(held_after)} tensors the optimizer holds carried "
                                           f"non-finite values into the update ({_entries(held_after)})",
                           _finding(trace, "clip") or _finding(trace, "backward"), guard))
    if trace["params_nonfinite"]:
        bad = trace["params_nonfinite"]
        links.append(_link("contamination", step, f"the update wrote non-finite values into {len(bad)} parameter "
                                                  f"tensors ({sum(p['count'] for p in bad)} elements), e.g. "
                                                  f"{bad[0]['param']}", _finding(trace, "update")))
    return links


def _producer(trace: dict[str, Any]) -> dict[str, Any] | None:
    """The producer link of the first traced step: the op that made the first non-finite value from finite
    inputs; or, when the step began with non-finite state (a finding with no op), that state as the source; or
    None when the first value seen came from an op the tracer cannot see inside (no producer is known)."""
    findings, step = trace["findings"], trace["step"]
    made = next((f for f in findings if f["role"] == "producer"), None)
    if made is not None:
        return {**_link("producer", step, "", made), "line": Verdict(**made).line()}
    first = findings[0]
    if first["op"]:
        return None
    counts = ", ".join(p for p in (f"{first['nan']} nan" if first["nan"] else "",
                                   f"{first['inf']} inf" if first["inf"] else "") if p)
    return _link("producer", step, f"the step began with non-finite values in {first['module'] or '<root>'} "
                                   f"{first['tensor']} ({counts} / {first['numel']}): they came in with the batch or "
                                   f"from state an earlier step left, not from an op of this step", first)


def causal_chain(record: RunRecord) -> list[dict[str, Any]]:
    """The ordered links of the run's chain (empty when nothing was ever non-finite). Each kind appears at most
    once except escapes, which appear once per guard."""
    traces = record.tables.get("tracer", [])
    by_step = {t["step"]: t for t in traces}
    scope = zero_grad_scope(record)
    links: list[dict[str, Any]] = []
    if traces and traces[0]["findings"]:
        link = _producer(traces[0])
        if link is not None:
            links.append(link)
    for trace in traces:
        for link in _trace_links(trace, by_step, scope):
            seen = {(k["kind"], k["guard"]) for k in links}
            if (link["kind"], link["guard"]) not in seen and not (
                    link["kind"] in ("caught", "contamination") and any(k["kind"] == link["kind"] for k in links)):
                links.append(link)
    if not any(k["kind"] == "contamination" for k in links):
        step = record.first_nonfinite_param_step()
        if step is not None:
            k = record.steps.index(step)
            tensors = record.values("params_nonfinite/tensors")[k]
            elements = record.values("params_nonfinite/elements")[k]
            counts = f"{tensors} parameter tensors ({elements} elements)" if tensors else "the parameters"
            links.append(_link("contamination", step, f"the update wrote non-finite values into {counts} "
                                                      f"(past the steps the tracer replayed)", {"phase": "update"}))
    loss_step = record.first_nonfinite_loss_step()
    if loss_step is not None:
        k = record.steps.index(loss_step)
        terms = ", ".join(f"{t} {v[k]:g}" for t, v in record.losses.items() if v[k] is not None)
        links.append(_link("loss", loss_step, f"the loss became non-finite ({terms})",
                           {"phase": "forward", "module": "<loss_fn>"}))
    return sorted(links, key=lambda k: (k["step"], KINDS.index(k["kind"])))


def decisive_link(chain: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The link that decided the run: the last escape at or before the first contamination (where a non-finite
    value got past its guard into the parameters); else the contamination; else, when the loss itself went
    non-finite with the parameters intact, the first producer (the guards only kept its result out of the
    parameters); else the first catch; else the first link."""
    contamination = next((k for k in chain if k["kind"] == "contamination"), None)
    if contamination is not None:
        escapes = [k for k in chain if k["kind"] == "escape" and k["step"] <= contamination["step"]]
        return escapes[-1] if escapes else contamination
    producer = next((k for k in chain if k["kind"] == "producer"), None)
    if producer is not None and any(k["kind"] == "loss" for k in chain):
        return producer
    return next((k for k in chain if k["kind"] == "caught"), chain[0] if chain else None)
