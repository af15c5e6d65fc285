"""The study behind notebook 02: when does the freeze length N matter?

Gradual unfreezing keeps the fresh RNN-T decoder frozen for N steps. The question is whether that protects the
CTC-pretrained encoder, and whether it speeds or slows the joint training. With a correct loop (every trainable
tensor in the optimizer), per freeze length N, learning rate and policy, over several seeds, each run trains the
decoder for the same number of steps after its unfreeze, and this module measures from its record:

    ctc_per_after_attach   validation PER (greedy CTC) `eval_after_attach` steps after the decoder's first
                           trainable step: what the fresh decoder did to the encoder
    val_per                validation PER at the end
    val_rnnt_per           validation RNN-T greedy PER at the end
    rnnt_loss_end          median RNN-T training loss over the last `window` steps
    steps_to_target        steps after the decoder's first trainable step until the RNN-T training loss first
                           falls to `target` times its value at that step (None: not reached)
    rnnt_length_ratio      RNN-T hypothesis tokens / reference tokens at the end, and `rnnt_functional`:
                           within `metrics.FUNCTIONAL_RATIO`, so that its PER measures quality (a decoder that emits
                           nothing or several times the reference is never ranked)
    diverged               a loss or a parameter became non-finite

Conclusions compare the largest N with the smallest per policy and learning rate as paired effects in errors on
the same validation utterances (`stats.paired_effect`: mean over seeds with a bootstrap interval over seeds and
utterances), count every comparison made (`stats.Tally`) and say how many "same way in every seed" results chance
alone would give.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from workbench.records import RunRecord
from workbench.studies.criteria import attach_step
from workbench.model.metrics import FUNCTIONAL_RATIO
from workbench.studies.stats import Tally, paired_effect

# What a preset's notebook-02 study runs: steps after the unfreeze, freeze lengths, learning rates, seeds.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"steps": 12, "freeze_steps": [0, 2, 6], "lr": [1e-3], "seed": [0, 1, 2]},
    "small": {"steps": 60, "freeze_steps": [0, 1, 10, 30, 100], "lr": [1e-3], "seed": [0, 1, 2]},
}


@dataclass(frozen=True)
class Measures:
    """How the measures are taken: validation `eval_after_attach` steps after the decoder's first trainable step,
    the RNN-T loss target as a fraction of its value at that step, and the final-loss window."""

    eval_after_attach: int = 5
    target: float = 0.5
    window: int = 5


def measure(record: RunRecord, measures: Measures = Measures()) -> dict[str, Any]:
    """The study's measures of one joint run (see the module docstring), with the per-utterance errors behind
    them (`ctc_errors_after_attach`, `rnnt_errors`, `ref_lengths`) for paired comparisons."""
    a = attach_step(record.settings)
    row = next((row for row in record.tables.get("validation", []) if row["step"] >= a), {})
    rnnt = [(s, v) for s, v in zip(record.steps, record.losses.get("rnnt", [])) if v is not None and s >= a]
    start = rnnt[0][1] if rnnt else None
    reached = next((s - a + 1 for s, v in rnnt if start is not None and v <= measures.target * start), None)
    tail = [v for _, v in rnnt[-measures.window:]]
    attrs = record.attrs
    return {"attach_step": a, "ctc_per_after_attach": row.get("per"), "val_per": attrs.get("val_per"),
            "val_rnnt_per": attrs.get("val_rnnt_per"), "rnnt_length_ratio": attrs.get("val_rnnt_length_ratio"),
            "rnnt_functional": attrs.get("val_rnnt_functional"), "rnnt_loss_at_attach": start,
            "rnnt_loss_end": statistics.median(tail) if tail else None, "steps_to_target": reached,
            "diverged": record.first_nonfinite_step() is not None,
            "ctc_errors_after_attach": row.get("ctc_errors"), "rnnt_errors": attrs.get("val_rnnt_errors"),
            "ref_lengths": attrs.get("val_ref_lengths") or row.get("ref_lengths")}


def _stats(values: Sequence[float | None]) -> dict[str, Any]:
    present = [v for v in values if v is not None]
    if not present:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(present), "min": min(present), "max": max(present), "n": len(present)}


def aggregate(cells: Sequence[Mapping[str, Any]], measured: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (policy, lr, N) over the seeds: each measure's median, min, max and count, the divergences,
    the step-matched CTC-only controls' PER after attaching (at the same step N + k) and at the end (as many
    steps), and each run's difference from its own control (same seed): `*_vs_control`."""
    rows: dict[tuple, dict[str, Any]] = {}
    for cell in cells:
        m = measured.get(cell["run"])
        if m is None:
            continue
        axes = cell["axes"]
        key = (axes["policy"], axes["lr"], axes["freeze_steps"])
        row = rows.setdefault(key, {"policy": axes["policy"], "lr": axes["lr"], "freeze_steps": axes["freeze_steps"],
                                    "runs": [], "controls": []})
        if cell["run"] not in row["runs"]:
            row["runs"].append(cell["run"])
            row.setdefault("pairs", []).append((cell["run"], cell.get("control"), axes.get("seed")))
        if cell.get("control") and cell["control"] not in row["controls"]:
            row["controls"].append(cell["control"])
    out = []
    for row in rows.values():
        ms = [measured[r] for r in row["runs"]]
        row.update({key: _stats([m[key] for m in ms]) for key in
                    ("ctc_per_after_attach", "val_per", "val_rnnt_per", "rnnt_length_ratio", "rnnt_loss_end",
                     "steps_to_target")})
        row["rnnt_functional"] = sum(m["rnnt_functional"] is True for m in ms)
        row["rnnt_scored"] = sum(m["rnnt_functional"] is not None for m in ms)
        row["diverged"] = sum(m["diverged"] for m in ms)
        row["reached"] = sum(m["steps_to_target"] is not None for m in ms)
        row["control_val_per"] = _stats([measured[c]["val_per"] for c in row["controls"] if c in measured])
        row["control_ctc_per_after_attach"] = _stats([measured[c]["ctc_per_after_attach"] for c in row["controls"]
                                                      if c in measured])
        pairs = [(measured[r], measured[c], seed) for r, c, seed in row.pop("pairs") if c in measured]
        for key in ("ctc_per_after_attach", "val_per"):
            row[f"{key}_vs_control"] = _stats([_minus(m[key], c[key]) for m, c, _ in pairs])
        # per seed, for paired comparisons between rows (`conclusions` counts them in a stats.Tally)
        row["per_seed"] = {seed: {"ctc_per_after_attach_vs_control": _minus(m["ctc_per_after_attach"],
                                                                              c["ctc_per_after_attach"]),
                                  "ctc_errors_after_attach_vs_control": _minus_each(m["ctc_errors_after_attach"],
                                                                                    c["ctc_errors_after_attach"]),
                                  "val_rnnt_per": m["val_rnnt_per"], "rnnt_errors": m["rnnt_errors"],
                                  "rnnt_functional": m["rnnt_functional"], "ref_lengths": m["ref_lengths"]}
                           for m, c, seed in pairs}
        out.append(row)
    return sorted(out, key=lambda r: (r["policy"], r["lr"], r["freeze_steps"]))


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _minus_each(a: Sequence[int] | None, b: Sequence[int] | None) -> list[int] | None:
    """Per utterance a - b (the same utterances in the same order), None unless both were measured."""
    return None if a is None or b is None or len(a) != len(b) else [x - y for x, y in zip(a, b)]


def fmt_stats(stats: Mapping[str, Any], digits: int = 3) -> str:
    if stats["median"] is None:
        return "-"
    if stats["n"] == 1 or stats["min"] == stats["max"]:
        return f"{stats['median']:.{digits}g}"
    return f"{stats['median']:.{digits}g} [{stats['min']:.{digits}g}-{stats['max']:.{digits}g}]"


# The two comparisons of the largest N with the smallest, per policy and learning rate.
COMPARED = (("ctc_errors_after_attach_vs_control", "the CTC errors right after the decoder attached, minus its "
                                                   "step-matched control's"),
            ("rnnt_errors", "the final RNN-T greedy errors (equal steps after the unfreeze)"))


def _functional(stats_row: Mapping[str, Any]) -> str:
    """`ratio 1.02 [0.9-1.1], 3/3 functional` for a row's final RNN-T decoder."""
    return (f"length ratio {fmt_stats(stats_row['rnnt_length_ratio'])}, {stats_row['rnnt_functional']}/"
            f"{stats_row['rnnt_scored']} functional")


def comparisons(rows: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], Tally | None]:
    """Per policy and learning rate, the largest N against the smallest, paired per seed on the same validation
    utterances: one dict per comparison (`policy`, `lr`, `measure`, `a`, `b` (the two N), `effect`: the
    `stats.Effect` dict b - a in errors, or None with `reason`), and the Tally of the comparisons that were made.

    The RNN-T errors are compared only where the decoder was functional in every seed of both settings: a PER of
    a decoder that emits nothing, or several times the reference, is no quality."""
    seeds = sorted({seed for r in rows for seed in r.get("per_seed", {})}, key=str)
    tally = Tally(len(seeds)) if seeds else None
    out: list[dict[str, Any]] = []
    for policy in sorted({r["policy"] for r in rows}):
        for lr in sorted({r["lr"] for r in rows if r["policy"] == policy}):
            group = sorted((r for r in rows if r["policy"] == policy and r["lr"] == lr),
                           key=lambda r: r["freeze_steps"])
            if len(group) < 2 or not seeds:
                continue
            first, last = group[0], group[-1]
            for key, what in COMPARED:
                item: dict[str, Any] = {"policy": policy, "lr": lr, "measure": key, "what": what,
                                        "a": first["freeze_steps"], "b": last["freeze_steps"], "effect": None}
                a = [first.get("per_seed", {}).get(s, {}) for s in seeds]
                b = [last.get("per_seed", {}).get(s, {}) for s in seeds]
                if key == "rnnt_errors" and not all(x.get("rnnt_functional") for x in a + b):
                    item["reason"] = (f"not compared: the decoder was functional in {first['rnnt_functional']}/"
                                      f"{first['rnnt_scored']} seeds at N={first['freeze_steps']} and "
                                      f"{last['rnnt_functional']}/{last['rnnt_scored']} at N={last['freeze_steps']}")
                elif any(x.get(key) is None for x in a + b):
                    item["reason"] = "not compared: not measured in every seed"
                else:
                    effect = paired_effect([x[key] for x in a], [x[key] for x in b], a[0]["ref_lengths"])
                    item["effect"] = effect.to_dict()
                    item["text"] = effect.text(f"N={first['freeze_steps']}", f"N={last['freeze_steps']}")
                    if tally is not None:
                        tally.add(f"{policy} lr {lr:g} {key}: N={last['freeze_steps']} vs N={first['freeze_steps']}",
                                  list(effect.per_seed))
                out.append(item)
    return out, tally


def conclusions(rows: Sequence[Mapping[str, Any]], scope: str) -> list[str]:
    """Findings per policy and learning rate, each with its counts; `scope` says what was run."""
    out = [f"Scope: {scope}. Values are medians over the seeds with [min-max]. Differences between N are paired "
           f"effects in errors on the same validation utterances (mean over seeds, 95% bootstrap interval over seeds "
           f"and utterances); an RNN-T PER counts only for a functional decoder (hypothesis/reference length ratio "
           f"in [{FUNCTIONAL_RATIO[0]:g}, {FUNCTIONAL_RATIO[1]:g}])."]
    compared, tally = comparisons(rows)
    for policy in sorted({r["policy"] for r in rows}):
        for lr in sorted({r["lr"] for r in rows if r["policy"] == policy}):
            group = sorted((r for r in rows if r["policy"] == policy and r["lr"] == lr),
                           key=lambda r: r["freeze_steps"])
            if len(group) < 2:
                continue
            runs = sum(len(r["runs"]) for r in group)
            diverged = sum(r["diverged"] for r in group)
            head = f"{policy}, lr {lr:g} ({runs} runs):"
            parts = [f"{diverged}/{runs} diverged"]
            parts.append("CTC val PER after the decoder attached (step N+k; its CTC-only control at the same step): "
                         + ", ".join(f"N={r['freeze_steps']} {fmt_stats(r['ctc_per_after_attach'])} "
                                     f"({fmt_stats(r['control_ctc_per_after_attach'])})" for r in group))
            parts.append("final CTC PER (its control trained as many steps): " + ", ".join(
                f"N={r['freeze_steps']} {fmt_stats(r['val_per'])} ({fmt_stats(r['control_val_per'])})"
                for r in group))
            parts.append("final RNN-T greedy PER: " + ", ".join(
                f"N={r['freeze_steps']} {fmt_stats(r['val_rnnt_per'])} ({_functional(r)})" for r in group))
            parts.append("steps to halve the RNN-T loss: " + ", ".join(
                f"N={r['freeze_steps']} {fmt_stats(r['steps_to_target'])} ({r['reached']}/{len(r['runs'])} reached)"
                for r in group))
            out.append(f"{head} " + "; ".join(parts) + ".")
            effects = []
            for item in (c for c in compared if c["policy"] == policy and c["lr"] == lr):
                if item["effect"] is None:
                    effects.append(f"{item['what']}: {item['reason']}")
                    continue
                e = item["effect"]
                verdict = ((f"{'more' if e['diff_errors'] > 0 else 'fewer'} with N={item['b']}, the interval "
                            f"excludes 0") if e["resolved"] else "not resolved, the interval includes 0")
                effects.append(f"{item['what']}: {item['text']}: {verdict}")
            if effects:
                out.append(f"{head} " + "; ".join(effects) + ".")
    scored = sum(r["rnnt_scored"] for r in rows)
    if scored:
        out.append(f"The fresh decoder was functional at the end in {sum(r['rnnt_functional'] for r in rows)}/"
                   f"{scored} runs (hypothesis/reference length ratio in [{FUNCTIONAL_RATIO[0]:g}, "
                   f"{FUNCTIONAL_RATIO[1]:g}]).")
    if tally is not None and tally.made:
        out.append("Paired over seeds (largest N minus smallest, same seed): " + tally.sentence())
    return out
