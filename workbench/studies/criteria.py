"""The seed's five success criteria, summary tables, stability-map data and conclusions, computed from runs.

Everything here is a pure function of `RunRecord`s (what a run log holds; `workbench.records.read_record` reads
one) and of the sweep's grid cells. No sentence in `conclusions` is written in advance: each one is chosen and
filled in by comparing recorded outcomes between runs that differ only in the axis the sentence is about.

A grid cell is a mapping ``{"axes": {axis: value, ...}, "run": run_id, "control": control_run_id}``; several
cells may name the same run when an axis has no effect there (every policy with N = 0 is the same run).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from workbench.records import RunRecord, summarize
from workbench.run.settings import axes
from workbench.train.policies import make_policy

DECODER_PREFIX = "rnnt_decoder."

# The seed's five success criteria, in its order, with the exact rule each verdict applies.
CRITERIA: dict[str, str] = {
    "no_nonfinite": "no NaN/Inf in the joint stage: every loss term and every parameter finite at every step "
                    "(fp16 gradient overflows that the GradScaler catches and skips are not counted)",
    "clean_unfreeze": "the decoder unfreezes at step N without issues: with a freezing policy and N > 0 exactly one "
                      "unfreeze event, at step N + 1; from its first trainable step on the decoder is inside the "
                      "optimizer (coverage instrument); and the losses of that step and the next K are finite",
    "stable_after_unfreeze": "the loss stays stable after unfreezing: from the decoder's first trainable step to the "
                             "end, every loss term and parameter is finite and no term exceeds `explode_factor` "
                             "times its reference: the median of the term over `explode_window` steps up to that step "
                             "(computed before the decoder's first update; filled up with the steps after it when "
                             "fewer came before, as with N = 0), never below `explode_floor`",
    "per_vs_control": "final validation PER (greedy CTC) no worse than the CTC-only control with the same lr, "
                      "precision, clipping, optimizer, loop semantics, seed and number of steps (PER <= control PER + tolerance, the "
                      "tolerance being the spread (max - min) of the controls' PER over the sweep's seeds; a "
                      "control whose parameters went non-finite has no PER and counts as worse)",
    "all_steps_complete": "all steps complete: the run log is finished, every step is logged, and the final "
                          "validation ran (it is skipped when the parameters are non-finite)",
}
# Axes of a sweep cell, in the order tables list them (the run settings a sweep may vary, `settings.axes()`, with
# the freeze length and the learning rate last); a stability-map panel fixes all but freeze_steps, lr and the
# seed, whose runs share one map cell.
AXES: tuple[str, ...] = tuple(a for a in axes() if a not in ("freeze_steps", "lr")) + ("freeze_steps", "lr")
PANEL_AXES: tuple[str, ...] = tuple(a for a in AXES[:-2] if a != "seed")


@dataclass(frozen=True)
class Rule:
    """Parameters of the criteria: K steps after the unfreeze, the explosion factor, the explosion reference's
    window (steps) and floor (loss units). The PER tolerance is not a parameter: it is measured from the controls' spread over seeds (`per_tolerances`)."""

    k_after: int = 5
    explode_factor: float = 10.0
    explode_window: int = 5
    explode_floor: float = 0.1

    def __post_init__(self) -> None:
        if self.k_after < 1:
            raise ValueError(f"k_after: expected a positive number of steps, got {self.k_after}")
        if not self.explode_factor > 1:
            raise ValueError(f"explode_factor: expected a factor above 1, got {self.explode_factor}")
        if self.explode_window < 1:
            raise ValueError(f"explode_window: expected a positive number of steps, got {self.explode_window}")
        if not (self.explode_floor >= 0 and math.isfinite(self.explode_floor)):
            raise ValueError(f"explode_floor: expected a finite loss >= 0, got {self.explode_floor}")

    def describe(self) -> dict[str, str]:
        """The criteria with this rule's numbers filled in."""
        text = dict(CRITERIA)
        text["clean_unfreeze"] = text["clean_unfreeze"].replace("next K", f"next K = {self.k_after}")
        text["stable_after_unfreeze"] = (text["stable_after_unfreeze"]
                                         .replace("`explode_factor` times", f"{self.explode_factor:g} times")
                                         .replace("`explode_window` steps", f"{self.explode_window} steps")
                                         .replace("`explode_floor`", f"{self.explode_floor:g}"))
        return text


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def freezes(settings: Mapping[str, Any]) -> bool:
    """The run's policy holds the decoder frozen for at least one step."""
    return not settings.get("ctc_only") and make_policy(settings["policy"], settings["freeze_steps"]).active


def attach_step(settings: Mapping[str, Any]) -> int:
    """The decoder's first trainable step (1-based): N + 1 under a freezing policy with N > 0, else 1."""
    return 1 if settings.get("ctc_only") else make_policy(settings["policy"], settings["freeze_steps"]).attach_step


def explosion(record: RunRecord, rule: Rule) -> dict[str, Any] | None:
    """The first (step, term) at or after the decoder's first trainable step whose finite loss exceeds
    `explode_factor` times its reference, or None.

    The reference of a term is the median of its finite values over `explode_window` steps: the last ones up to
    and including the decoder's first trainable step (computed before the decoder's first update), filled up with
    the steps right after it where the run has fewer before (N = 0); never below `explode_floor`, so a term that has
    fallen near zero (a CTC loss of 0.01) does not make one batch's ordinary value (0.1) an explosion.
    """
    a = attach_step(record.settings)
    found = []
    for term, values in record.losses.items():
        if term == "total":
            continue
        steps = [(i + 1, v) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
        before = [v for step, v in steps if step <= a][-rule.explode_window:]
        window = before + [v for step, v in steps if step > a][:rule.explode_window - len(before)]
        if not window:
            continue
        reference = max(statistics.median(window), rule.explode_floor)
        for step, v in steps:
            if step >= a and v > rule.explode_factor * reference:
                found.append({"step": step, "term": term, "value": v, "reference": reference})
                break
    return min(found, key=lambda e: e["step"], default=None)


def decoder_outside_steps(record: RunRecord) -> list[int]:
    """Steps at or after the decoder's first trainable step where a decoder tensor trained outside the optimizer."""
    a = attach_step(record.settings)
    return [row["step"] for row in record.tables.get("coverage", []) if row["step"] >= a
            and any(name.startswith(DECODER_PREFIX) for name, *_ in row.get("outside_optimizer", []))]


def run_summary(record: RunRecord, rule: Rule) -> dict[str, Any]:
    """The run's summary (`workbench.records.summarize`) with what the criteria measure added: the outcome, the
    decoder's first trainable step, the loss there and K steps later, the explosion, counts for the tables."""
    total = record.losses.get("total", [])
    a = attach_step(record.settings)
    before = total[a - 1] if a <= len(total) else None
    after = total[a - 1 + rule.k_after] if a + rule.k_after <= len(total) else None
    ratio = after / before if _finite(before) and before and after is not None else None
    return {
        **summarize(record),
        "attach_step": a,
        "steps_skipped": len(record.skipped),
        "nonfinite_grad_steps": len(record.flagged("nonfinite_grad")),
        "loss_at_attach": before,
        "loss_k_after": after,
        "loss_ratio_k_after": ratio,
        "explosion": explosion(record, rule),
        "decoder_outside_optimizer_steps": len(decoder_outside_steps(record)),
    }


def per_tolerances(controls: Mapping[str, RunRecord]) -> dict[str, float]:
    """Per control run: the spread (max - min) of the final validation PER over the controls that differ from it
    only in the seed; 0 where it has no such sibling (one seed), so a PER comparison is then exact."""
    families: dict[str, list[str]] = {}
    for rid, rec in controls.items():
        key = json.dumps({k: v for k, v in rec.settings.items() if k not in ("name", "seed")}, sort_keys=True)
        families.setdefault(key, []).append(rid)
    out = {}
    for members in families.values():
        pers = [controls[r].attrs.get("val_per") for r in members]
        present = [p for p in pers if p is not None]
        spread = max(present) - min(present) if len(present) > 1 else 0.0
        out.update({r: spread for r in members})
    return out


def verdict(record: RunRecord, control: RunRecord | None, rule: Rule, per_tolerance: float = 0.0) -> dict[str, Any]:
    """The five criteria for one run: True / False, or None where a criterion does not apply (a control run has
    no decoder to unfreeze and no control of its own). `reasons` says in one line why each False is False.
    `per_tolerance` is the PER margin granted against the control (`per_tolerances`)."""
    settings = record.settings
    is_control = bool(settings.get("ctc_only"))
    a = attach_step(settings)
    reasons: dict[str, str] = {}
    bad = record.first_nonfinite_step()
    no_nonfinite = bad is None
    if not no_nonfinite:
        reasons["no_nonfinite"] = f"first non-finite loss or parameter at step {bad}"

    clean: bool | None = None
    if not is_control:
        problems = []
        unfreezes = [e["step"] for e in record.events if e.get("event") == "unfreeze"]
        if freezes(settings) and unfreezes != [a]:
            problems.append(f"unfreeze events at steps {unfreezes}, expected [{a}]")
        outside = decoder_outside_steps(record)
        if outside:
            problems.append(f"decoder trained outside the optimizer at {len(outside)} step(s) from step {outside[0]}")
        logged = len(record.steps)
        window = range(a, min(a + rule.k_after, logged) + 1)
        early = [s for s in window if any(s <= len(v) and v[s - 1] is not None and not math.isfinite(v[s - 1])
                                          for v in record.losses.values())]
        if early:
            problems.append(f"non-finite loss at step {early[0]}, within {rule.k_after} steps of the unfreeze")
        if a > logged:
            problems.append(f"the run ended (step {logged}) before the decoder's first trainable step {a}")
        clean = not problems
        if problems:
            reasons["clean_unfreeze"] = "; ".join(problems)

    boom = explosion(record, rule)
    late = record.first_nonfinite_step(a)
    stable = late is None and boom is None
    if late is not None:
        reasons["stable_after_unfreeze"] = f"non-finite loss or parameter at step {late} (decoder trainable from {a})"
    elif boom is not None:
        reasons["stable_after_unfreeze"] = (f"{boom['term']} loss {boom['value']:.4g} at step {boom['step']} > "
                                            f"{rule.explode_factor:g} x reference {boom['reference']:.4g}")

    per_ok: bool | None = None
    if not is_control:
        val_per = record.attrs.get("val_per")
        control_per = control.attrs.get("val_per") if control is not None else None
        if val_per is None:
            per_ok = False
            reasons["per_vs_control"] = "no final validation PER (parameters non-finite or run incomplete)"
        elif control is None:
            per_ok = False
            reasons["per_vs_control"] = "no CTC-only control in this sweep"
        elif control_per is None:
            per_ok = True
        else:
            per_ok = val_per <= control_per + per_tolerance
            if not per_ok:
                reasons["per_vs_control"] = (f"PER {val_per:.3f} > control {control_per:.3f} + the seeds' spread "
                                             f"{per_tolerance:.3f}")

    expected = settings["steps"]
    validated = record.attrs.get("val_per") is not None
    complete = record.status == "finished" and len(record.steps) == expected and validated
    if not complete:
        reasons["all_steps_complete"] = (f"status {record.status}, {len(record.steps)}/{expected} steps logged, "
                                         f"validation {'ran' if validated else 'did not run'}")
    checks = {"no_nonfinite": no_nonfinite, "clean_unfreeze": clean, "stable_after_unfreeze": stable,
              "per_vs_control": per_ok, "all_steps_complete": complete}
    return {**checks, "all": all(v is not False for v in checks.values()),
            "passed": sum(v is True for v in checks.values()),
            "applicable": sum(v is not None for v in checks.values()), "reasons": reasons}


# ---------------------------------------------------------------------------------------------------- tables

def fmt(value: Any) -> str:
    """A table cell: short floats, '-' for None, yes/no for booleans."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.3g}" if (abs(value) < 1e-2 or abs(value) >= 1e4) and value != 0 else f"{value:.3f}"
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A fixed-width text table (no pandas needed; it reads the same in a headless notebook and a terminal)."""
    cells = [[fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[j]) for r in cells]) for j, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def varying_axes(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    """Axes that take more than one value among `cells`, in AXES order."""
    return [a for a in AXES if len({repr(c["axes"].get(a)) for c in cells}) > 1]


def axis_label(axis: str, value: Any) -> str:
    if axis == "lr":
        return f"lr {value:.0e}"
    if axis == "freeze_steps":
        return f"N={value}"
    if axis == "clip":
        return "clip off" if not value else f"clip {value:g}"
    if axis == "rebuild_at_unfreeze":
        return "rebuild at unfreeze" if value else "no rebuild at unfreeze"
    return str(value)


def slice_label(axes: Mapping[str, Any], names: Iterable[str]) -> str:
    return ", ".join(axis_label(a, axes[a]) for a in names) or "all runs"


# ------------------------------------------------------------------------------------------- stability map

@dataclass
class MapPanel:
    """One heatmap of the stability map: freeze length N (rows) x lr (columns) for fixed values of the other axes.

    `cells[i][j]` summarises the finished runs of that point over the seeds: "runs", "outcomes" (outcome ->
    count), "first_nonfinite_steps" (of the diverged ones), "val_per" (median final PER, None when no run has
    one), "passed" / "applicable" (criteria summed over the runs); None while none of them has finished.
    """

    title: str
    freeze_lengths: list[int]
    lrs: list[float]
    cells: list[list[dict[str, Any] | None]]


def stability_map(cells: Sequence[Mapping[str, Any]], summaries: Mapping[str, Mapping[str, Any]],
                  verdicts: Mapping[str, Mapping[str, Any]]) -> list[MapPanel]:
    """One panel per combination of the varied axes other than freeze_steps and lr; runs missing from `summaries` or
    `verdicts` (not finished yet) leave their cell None, so a live map keeps its shape while it fills in."""
    varied = [a for a in varying_axes(cells) if a in PANEL_AXES]
    panels: dict[tuple, list[Mapping[str, Any]]] = {}
    for cell in cells:
        panels.setdefault(tuple(repr(cell["axes"][a]) for a in varied), []).append(cell)
    out = []
    for members in panels.values():
        freeze_lengths = sorted({c["axes"]["freeze_steps"] for c in members})
        lrs = sorted({c["axes"]["lr"] for c in members})
        runs: dict[tuple[int, int], list[str]] = {}
        for c in members:
            point = (freeze_lengths.index(c["axes"]["freeze_steps"]), lrs.index(c["axes"]["lr"]))
            if c["run"] in summaries and c["run"] in verdicts and c["run"] not in runs.setdefault(point, []):
                runs[point].append(c["run"])
        grid: list[list[dict[str, Any] | None]] = [[None] * len(lrs) for _ in freeze_lengths]
        for (i, j), ids in runs.items():
            if ids:
                grid[i][j] = _map_cell(ids, summaries, verdicts)
        out.append(MapPanel(slice_label(members[0]["axes"], varied), freeze_lengths, lrs, grid))
    return out


def _map_cell(ids: list[str], summaries: Mapping[str, Mapping[str, Any]],
              verdicts: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    pers = [summaries[r]["val_per"] for r in ids if summaries[r]["val_per"] is not None]
    outcomes: dict[str, int] = {}
    for r in ids:
        outcomes[summaries[r]["outcome"]] = outcomes.get(summaries[r]["outcome"], 0) + 1
    return {"runs": ids, "outcomes": outcomes,
            "first_nonfinite_steps": [summaries[r]["first_nonfinite_step"] for r in ids
                                      if summaries[r]["first_nonfinite_step"] is not None],
            "val_per": statistics.median(pers) if pers else None,
            "passed": sum(verdicts[r]["passed"] for r in ids),
            "applicable": sum(verdicts[r]["applicable"] for r in ids)}


# --------------------------------------------------------------------------------------------- conclusions

def _groups(cells: Sequence[Mapping[str, Any]], axis: str) -> list[list[Mapping[str, Any]]]:
    """Cells that agree on every axis but `axis`, one list per group, keeping groups of >= 2 distinct runs."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for cell in cells:
        key = tuple(repr(cell["axes"][a]) for a in AXES if a != axis)
        groups.setdefault(key, []).append(cell)
    return [g for g in groups.values() if len({c["run"] for c in g}) > 1]


def axis_effect(cells: Sequence[Mapping[str, Any]], summaries: Mapping[str, Mapping[str, Any]],
                axis: str) -> dict[str, Any]:
    """How often changing `axis` alone changed whether a run diverged, and how often every value diverged.

    Returns counts and, for the first few groups, what happened at each value of the axis. `monotone` counts the
    changed groups where a larger value was never worse (every value above the largest diverged one stayed
    finite); `delayed` counts the all-diverged groups where the largest value diverged later than the smallest.
    """
    changed, monotone, all_diverged, delayed, examples = 0, 0, 0, 0, []
    groups = _groups(cells, axis)
    for g in groups:
        by_value = {}
        for c in sorted(g, key=lambda c: c["axes"][axis]):
            by_value[c["axes"][axis]] = summaries[c["run"]]["first_nonfinite_step"]
        diverged = {v: s is not None for v, s in by_value.items()}
        if len(set(diverged.values())) > 1:
            changed += 1
            flags = list(diverged.values())
            monotone += flags == sorted(flags, reverse=True)
            if len(examples) < 3:
                others = slice_label(g[0]["axes"], [a for a in varying_axes(cells) if a != axis])
                went = ", ".join(axis_label(axis, v) for v, d in diverged.items() if d)
                held = ", ".join(axis_label(axis, v) for v, d in diverged.items() if not d)
                examples.append(f"{others}: non-finite at {went}; finite at {held}")
        elif all(diverged.values()):
            all_diverged += 1
            steps = list(by_value.values())
            if steps[-1] > steps[0]:
                delayed += 1
    return {"axis": axis, "groups": len(groups), "changed": changed, "monotone": monotone,
            "all_diverged": all_diverged, "delayed": delayed, "examples": examples}


def _effect_sentence(effect: Mapping[str, Any], subject: str, scope: str) -> str:
    axis = effect["axis"]
    name = "freeze length N" if axis == "freeze_steps" else axis
    text = (f"{scope}: changing {name} alone changed whether a run went non-finite in {effect['changed']} of "
            f"{effect['groups']} comparable groups of {subject}")
    if effect["examples"]:
        text += " (e.g. " + "; ".join(effect["examples"]) + ")"
    if axis in ("freeze_steps", "lr") and effect["changed"]:
        text += (f"; a larger {name} was never worse in {effect['monotone']} of those {effect['changed']} "
                 f"group(s)")
    if axis == "freeze_steps" and effect["all_diverged"]:
        text += (f"; in {effect['all_diverged']} group(s) every N went non-finite, and the largest N did so "
                 f"later than the smallest in {effect['delayed']} of them")
    return text + "."


def conclusions(cells: Sequence[Mapping[str, Any]], summaries: Mapping[str, Mapping[str, Any]],
                verdicts: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Findings computed from the sweep's table; each sentence states the counts it rests on."""
    if not cells:
        return ["The sweep has no grid cells, so there is nothing to conclude."]
    lines = []
    runs = sorted({c["run"] for c in cells})
    diverged = {r for r in runs if summaries[r]["first_nonfinite_step"] is not None}

    freeze_lengths = sorted({c["axes"]["freeze_steps"] for c in cells})
    by_n = []
    for n in freeze_lengths:
        ids = {c["run"] for c in cells if c["axes"]["freeze_steps"] == n}
        by_n.append(f"N={n}: {len(ids & diverged)}/{len(ids)}")
    lines.append(f"{len(diverged)} of {len(runs)} runs went non-finite (a NaN/Inf loss or parameter); by freeze "
                 f"length: " + ", ".join(by_n) + ".")

    # N's effect, split by whether the decoder was inside the optimizer from its first trainable step (measured by
    # the coverage instrument): the seed's loop rebuilds the optimizer only at an unfreeze.
    inside = [c for c in cells if summaries[c["run"]]["decoder_outside_optimizer_steps"] == 0]
    outside = [c for c in cells if summaries[c["run"]]["decoder_outside_optimizer_steps"] > 0]
    if len(freeze_lengths) > 1:
        for subset, scope in ((inside, "Decoder inside the optimizer from its first trainable step"),
                              (outside, "Decoder training outside the optimizer")):
            effect = axis_effect(subset, summaries, "freeze_steps")
            if effect["groups"]:
                lines.append(_effect_sentence(effect, "runs that differ only in N", scope))
        verdict_n = axis_effect(inside, summaries, "freeze_steps")
        if verdict_n["groups"]:
            if verdict_n["changed"]:
                how = ("consistently: a longer freeze was never worse" if verdict_n["monotone"] == verdict_n["changed"]
                       else f"but not consistently: a longer freeze was never worse in only {verdict_n['monotone']} "
                            f"of them")
                lines.append(f"Once the decoder is in the optimizer, the freeze length changed whether training stayed "
                             f"finite in {verdict_n['changed']} of {verdict_n['groups']} groups, {how}.")
            else:
                lines.append(f"Once the decoder is in the optimizer, the freeze length did not change whether training "
                             f"stayed finite in any of {verdict_n['groups']} groups in this grid.")
    for axis in varying_axes(cells):
        if axis in ("freeze_steps", "lr", "seed"):
            continue
        effect = axis_effect(cells, summaries, axis)
        if effect["groups"]:
            lines.append(_effect_sentence(effect, f"runs that differ only in {axis}", "Across the grid"))

    # The largest lr at which every seed of each N was healthy, per stability-map panel.
    panels = stability_map(cells, summaries, verdicts)
    for panel in panels:
        parts = []
        for i, n in enumerate(panel.freeze_lengths):
            ok = [lr for lr, cell in zip(panel.lrs, panel.cells[i])
                  if cell and cell["outcomes"].get("healthy", 0) == len(cell["runs"])]
            parts.append(f"N={n}: {max(ok):.0e}" if ok else f"N={n}: none")
        lines.append(f"Largest lr at which every run was healthy ({panel.title}): " + ", ".join(parts) + ".")

    passed = [r for r in runs if verdicts[r]["all"]]
    per_criterion = ", ".join(
        f"{name} {sum(verdicts[r][name] is True for r in runs)}/{sum(verdicts[r][name] is not None for r in runs)}"
        for name in CRITERIA)
    lines.append(f"All five success criteria held in {len(passed)} of {len(runs)} runs; per criterion: "
                 f"{per_criterion}.")
    per_parts = []
    for n in freeze_lengths:
        members = [c for c in cells if c["axes"]["freeze_steps"] == n]
        pers = [summaries[r]["val_per"] for r in {c["run"] for c in members} if summaries[r]["val_per"] is not None]
        controls = {c["control"] for c in members if c.get("control") and c["control"] in summaries}
        control_pers = [summaries[c]["val_per"] for c in controls if summaries[c]["val_per"] is not None]
        if pers:
            part = f"N={n}: {statistics.median(pers):.3f}"
            if control_pers:
                part += f" (control of the same length {statistics.median(control_pers):.3f})"
            per_parts.append(part)
    if per_parts:
        lines.append("Median final validation PER by N, each against CTC-only controls trained as many steps: "
                     + ", ".join(per_parts) + ".")
    return lines
