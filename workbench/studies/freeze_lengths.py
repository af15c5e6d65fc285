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
    diverged               a loss or a parameter became non-finite

Conclusions compare N against the spread of the seeds: a difference counts only where it is larger than the
range the seeds give for each of the two settings compared.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from workbench.records import RunRecord
from workbench.studies.criteria import attach_step
from workbench.studies.stats import Tally

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
    """The study's measures of one joint run (see the module docstring)."""
    a = attach_step(record.settings)
    after = next((row["per"] for row in record.tables.get("validation", []) if row["step"] >= a), None)
    rnnt = [(s, v) for s, v in zip(record.steps, record.losses.get("rnnt", [])) if v is not None and s >= a]
    start = rnnt[0][1] if rnnt else None
    reached = next((s - a + 1 for s, v in rnnt if start is not None and v <= measures.target * start), None)
    tail = [v for _, v in rnnt[-measures.window:]]
    return {"attach_step": a, "ctc_per_after_attach": after, "val_per": record.attrs.get("val_per"),
            "val_rnnt_per": record.attrs.get("val_rnnt_per"), "rnnt_loss_at_attach": start,
            "rnnt_loss_end": statistics.median(tail) if tail else None, "steps_to_target": reached,
            "diverged": record.first_nonfinite_step() is not None}


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
                    ("ctc_per_after_attach", "val_per", "val_rnnt_per", "rnnt_loss_end", "steps_to_target")})
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
                                  "val_rnnt_per": m["val_rnnt_per"]} for m, c, seed in pairs}
        out.append(row)
    return sorted(out, key=lambda r: (r["policy"], r["lr"], r["freeze_steps"]))


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def fmt_stats(stats: Mapping[str, Any], digits: int = 3) -> str:
    if stats["median"] is None:
        return "-"
    if stats["n"] == 1 or stats["min"] == stats["max"]:
        return f"{stats['median']:.{digits}g}"
    return f"{stats['median']:.{digits}g} [{stats['min']:.{digits}g}-{stats['max']:.{digits}g}]"


def _apart(a: Mapping[str, Any], b: Mapping[str, Any]) -> int:
    """+1 when every seed of `a` is above every seed of `b`, -1 when below, 0 when their ranges overlap."""
    if a["median"] is None or b["median"] is None:
        return 0
    if a["min"] > b["max"]:
        return 1
    if a["max"] < b["min"]:
        return -1
    return 0


def conclusions(rows: Sequence[Mapping[str, Any]], scope: str) -> list[str]:
    """Findings per policy and learning rate, each with its counts; `scope` says what was run."""
    out = [f"Scope: {scope}. Values are medians over the seeds with [min-max]; a difference counts only where the "
           f"seeds' ranges of the two settings do not overlap."]
    measures = (("ctc_per_after_attach_vs_control", "the CTC PER right after the decoder attached, minus its "
                                                    "step-matched control's"),
                ("val_rnnt_per", "the final RNN-T PER (equal steps after the unfreeze)"))
    seeds = sorted({seed for r in rows for seed in r.get("per_seed", {})}, key=str)
    tally = Tally(len(seeds)) if seeds else None
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
                f"N={r['freeze_steps']} {fmt_stats(r['val_rnnt_per'])}" for r in group))
            parts.append("steps to halve the RNN-T loss: " + ", ".join(
                f"N={r['freeze_steps']} {fmt_stats(r['steps_to_target'])} ({r['reached']}/{len(r['runs'])} reached)"
                for r in group))
            out.append(f"{head} " + "; ".join(parts) + ".")
            first, last = group[0], group[-1]
            effects = []
            for key, what in measures:
                sign = _apart(last[key], first[key])
                if sign:
                    effects.append(f"{what} was {'higher' if sign > 0 else 'lower'} with N={last['freeze_steps']} "
                                   f"than with N={first['freeze_steps']} in every seed")
            for key, _ in measures:
                diffs = _paired(first, last, key, seeds)
                if diffs is not None and tally is not None:
                    tally.add(f"{policy} lr {lr:g} {key}: N={last['freeze_steps']} vs N={first['freeze_steps']}",
                              diffs)
            out.append(f"{head} " + ("; ".join(effects) if effects else
                                     f"N={last['freeze_steps']} and N={first['freeze_steps']} differed by less than "
                                     f"the seeds' spread in the CTC PER after attaching (against its step-matched "
                                     f"control) and the final RNN-T PER")
                       + ".")
    if tally is not None and tally.made:
        out.append("Paired over seeds (largest N minus smallest, same seed): " + tally.sentence())
    return out


def _paired(first: Mapping[str, Any], last: Mapping[str, Any], key: str, seeds: Sequence[Any]) -> list[float] | None:
    """Per seed, `last`'s value of `key` minus `first`'s; None unless every seed has both."""
    a, b = first.get("per_seed", {}), last.get("per_seed", {})
    diffs = [_minus(b.get(s, {}).get(key), a.get(s, {}).get(key)) for s in seeds]
    return None if any(d is None for d in diffs) else diffs
