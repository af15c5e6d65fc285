"""The stability boundary: per cell (policy, freeze length N, loop semantics, precision, budget), the learning rate
at which the joint stage stops being healthy, found by bisection in log space over lr with several seeds at each
probe point, not read off a fixed grid.

Every probe is a `workbench.studies.sweep` run forked from one CTC-warm checkpoint, kept in one sweep folder, so a
search that is interrupted and started again reuses every run already finished (run ids are a function of the
settings and the code) and, the probes being chosen from those runs' outcomes, probes the same learning rates.

Per cell the search first probes `lo`, then (only where `lo` was healthy in every seed) `hi`, the ceiling, then
`rounds` times the geometric mean of the bracket (rounded to two significant digits): the largest lr healthy in
every seed so far and the smallest lr where some seed was not healthy. What a cell reports:

    lr_healthy_max    the largest probed lr healthy in every seed (None: none was)
    lr_unhealthy_min  the smallest probed lr where some seed was not healthy (the boundary lies in between)
    lr_diverged_min   the smallest probed lr where some seed diverged (None: nothing diverged up to `lr_max`)
    lr_max            the largest lr probed
    probes            per probed lr (ascending): each seed's outcome, first non-finite step, decisive link
    first_failure     the lowest-lr run that was not healthy: its outcome and decisive link

N "moves the boundary" of a policy and semantics only where two cells' boundary intervals [lr_healthy_max,
lr_unhealthy_min] do not overlap: inside an interval the seeds disagree or the search's resolution ends, so that
interval is the seeds' spread plus the resolution.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TextIO

from workbench.records import OUTCOMES
from workbench.studies.sweep import Sweep, SweepGrid, make_plan

BUDGETS = ("after_unfreeze", "total")

# What a preset's boundary search runs. `cells` x `seeds` at each probe; `steps` are the joint steps after the
# decoder's first trainable step (budget "after_unfreeze") or in all (budget "total"). The second comparison
# (`precisions`, `budgets`) is smaller: one policy and semantics, the smallest and largest N.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"steps": 12, "freeze_steps": [0, 6], "lo": 1e-2, "hi": 1.0, "rounds": 1, "seeds": 3,
             "policies": ["freeze_params", "freeze_and_mute"], "semantics": ["corrected", "seed_faithful"],
             "precisions": ["fp32"]},
    # small: one bisection round between lo and hi (each round costs 16 cells x 3 seeds, about 25 minutes on a
    # loaded 2-core CPU); pass boundary_rounds to the notebook for a finer boundary
    "small": {"steps": 30, "freeze_steps": [0, 1, 10, 30, 100], "lo": 1e-3, "hi": 1.0, "rounds": 1, "seeds": 3,
              "policies": ["freeze_params", "freeze_and_mute"], "semantics": ["corrected", "seed_faithful"],
              "precisions": ["fp32", "bf16"]},
}


@dataclass(frozen=True, order=True)
class Cell:
    """One boundary: a policy, a freeze length N, loop semantics, a precision and a step budget. `seed_faithful`
    is the seed's loop with its optimizer kept (the CTC stage's into the joint stage, and at the unfreeze: the
    decoder trains outside it); `corrected` rebuilds it at both."""

    policy: str
    freeze_steps: int
    semantics: str = "corrected"
    precision: str = "fp16"
    budget: str = "after_unfreeze"

    def __post_init__(self) -> None:
        if self.budget not in BUDGETS:
            raise ValueError(f"budget: expected one of {', '.join(BUDGETS)}, got {self.budget!r}")

    @property
    def label(self) -> str:
        loop = "seed_faithful (optimizer kept)" if self.semantics == "seed_faithful" else self.semantics
        return (f"{self.policy}, N={self.freeze_steps}, {loop}, {self.precision}, "
                f"{'equal steps after the unfreeze' if self.budget == 'after_unfreeze' else 'equal total steps'}")


@dataclass(frozen=True)
class Search:
    """How the boundary is searched: the bracket [lo, hi] in lr, bisection rounds after probing both ends, the
    seeds at each probe, `steps` after the decoder's first trainable step (budget "after_unfreeze") and
    `total_steps` in all (budget "total"; default: `steps` + the largest N searched), the batch size and run settings fixed for every probe."""

    lo: float = 1e-4
    hi: float = 1.0
    rounds: int = 3
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 40
    total_steps: int | None = None
    batch_size: int = 4
    # a probe needs only its outcome: no final validation (80 utterances with greedy RNN-T decoding per run)
    fixed: Mapping[str, Any] = field(default_factory=lambda: {"eval_at_end": False})

    def __post_init__(self) -> None:
        if not (0 < self.lo < self.hi and math.isfinite(self.hi)):
            raise ValueError(f"lo, hi: expected 0 < lo < hi, got lo={self.lo!r}, hi={self.hi!r}")
        if self.rounds < 0 or not self.seeds or self.steps < 1:
            raise ValueError(f"rounds >= 0, at least one seed and steps >= 1 expected, got rounds={self.rounds}, "
                             f"seeds={self.seeds}, steps={self.steps}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seeds": list(self.seeds), "fixed": dict(self.fixed)}


def midpoint(lo: float, hi: float) -> float:
    """The geometric mean of lo and hi, rounded to two significant digits (readable run ids, and the same probe on
    every machine)."""
    return float(f"{math.sqrt(lo * hi):.2g}")


def grid(search: Search, cell: Cell, lr: float) -> SweepGrid:
    """The sweep grid of one probe: the cell's settings at `lr` over the search's seeds, no CTC-only controls."""
    total = search.total_steps if search.total_steps is not None else search.steps
    steps = search.steps if cell.budget == "after_unfreeze" else total - cell.freeze_steps
    if steps < 1:
        raise ValueError(f"{cell.label}: a total budget of {total} steps leaves none after N={cell.freeze_steps}")
    return SweepGrid(freeze_steps=[cell.freeze_steps], lr=[lr], policy=[cell.policy], seed=list(search.seeds),
                     semantics=[cell.semantics], precision=[cell.precision], steps=steps,
                     rebuild_at_unfreeze=[cell.semantics != "seed_faithful"],
                     batch_size=search.batch_size, controls=False, fixed=dict(search.fixed))


def probe_verdict(runs: Sequence[Mapping[str, Any]]) -> str:
    """'healthy' when every seed was healthy, 'diverged' when any seed diverged, else 'not_healthy'."""
    kinds = [r["outcome"] for r in runs]
    if all(k == "healthy" for k in kinds):
        return "healthy"
    return "diverged" if "diverged" in kinds else "not_healthy"


@dataclass
class CellState:
    """A cell's probes so far (lr -> per-seed runs) and whether its search has ended (and why)."""

    cell: Cell
    probes: dict[float, list[dict[str, Any]]] = field(default_factory=dict)
    ended: str | None = None

    def bracket(self) -> tuple[float | None, float | None]:
        """(largest lr healthy in every seed, smallest lr where some seed was not healthy)."""
        ok = [lr for lr, runs in self.probes.items() if probe_verdict(runs) == "healthy"]
        bad = [lr for lr, runs in self.probes.items() if probe_verdict(runs) != "healthy"]
        return (max(ok) if ok else None), (min(bad) if bad else None)

    def next_lr(self, search: Search) -> float | None:
        """The next lr to probe, or None when the search of this cell has ended (`ended` says why)."""
        if search.lo not in self.probes:
            return search.lo
        lo, hi = self.bracket()
        if lo is None:  # the ceiling would add nothing: the boundary lies below the search's range
            self.ended = f"not healthy in every seed already at the lowest lr {search.lo:g}"
            return None
        if search.hi not in self.probes:
            return search.hi
        if hi is None:
            self.ended = f"healthy in every seed up to the ceiling lr {search.hi:g}"
            return None
        if len(self.probes) - 2 >= search.rounds:
            self.ended = f"bracket [{lo:g}, {hi:g}] after {search.rounds} bisection round(s)"
            return None
        mid = midpoint(lo, hi)
        if mid in self.probes or not lo < mid < hi:
            self.ended = f"bracket [{lo:g}, {hi:g}] at the search's resolution"
            return None
        return mid

    def result(self) -> dict[str, Any]:
        """What the cell reports (see the module docstring)."""
        lo, hi = self.bracket()
        diverged = [lr for lr, runs in self.probes.items() if probe_verdict(runs) == "diverged"]
        lrs = sorted(self.probes)
        failures = [(lr, r) for lr in lrs for r in self.probes[lr] if r["outcome"] != "healthy"]
        first = failures[0] if failures else None
        return {
            **asdict(self.cell), "label": self.cell.label,
            "lr_healthy_max": lo, "lr_unhealthy_min": hi,
            "lr_diverged_min": min(diverged) if diverged else None, "lr_max": lrs[-1] if lrs else None,
            "probes": [{"lr": lr, "verdict": probe_verdict(self.probes[lr]),
                        "outcomes": {k: sum(r["outcome"] == k for r in self.probes[lr]) for k in OUTCOMES
                                     if any(r["outcome"] == k for r in self.probes[lr])},
                        "runs": self.probes[lr]} for lr in lrs],
            "first_failure": None if first is None else {"lr": first[0], **first[1]},
            "search_ended": self.ended,
        }


def _run_entry(sweep: Sweep, rid: str) -> dict[str, Any]:
    entry = sweep.index["runs"][rid]
    summary = entry["summary"] or {}
    settings = entry["settings"]
    return {"seed": settings["seed"], "run": rid, "status": entry["status"],
            "outcome": summary.get("outcome", "unknown") if entry["status"] == "finished" else "unknown",
            "first_nonfinite_step": summary.get("first_nonfinite_step"),
            "decisive_link": summary.get("tracer_verdict"), "steps": settings["steps"]}


def search_boundaries(out: str | Path, checkpoint: str | Path, data: str | Path, search: Search,
                      cells: Sequence[Cell], *, workers: int | None = None, progress: bool | TextIO = False,
                      device: str = "cpu", backend: str = "local",
                      on_round: Callable[[int, list[dict[str, Any]]], None] | None = None) -> dict[str, Any]:
    """Search every cell's boundary; the probes of all cells in a round run as one sweep in folder `out` (finished
    runs there are reused). `on_round(round, results)` is called after each round. Returns
    {"search", "cells": [Cell.result()...], "rounds", "runs", "failed"}."""
    states = [CellState(c) for c in sorted(set(cells))]
    if search.total_steps is None:
        search = replace(search, total_steps=search.steps + max(s.cell.freeze_steps for s in states))
    failed: dict[str, str] = {}
    n_round = 0
    while True:
        wanted: dict[int, list[float]] = {}
        for k, state in enumerate(states):
            if state.ended is not None:
                continue
            lr = state.next_lr(search)
            if lr is not None:
                wanted[k] = [lr]
        if not wanted:
            break
        grids = [(k, lr, grid(search, states[k].cell, lr)) for k, lrs in wanted.items() for lr in lrs]
        sweep = Sweep(out, checkpoint, data, [g for _, _, g in grids], device=device, backend=backend)
        outcome = sweep.run(workers, progress=progress)
        failed.update(outcome.failed)
        if outcome.interrupted:
            raise RuntimeError(f"{out}: a worker process died during round {n_round}; run the search again to "
                               f"finish it (finished runs are reused)")
        for k, lr, g in grids:
            cell_runs = dict.fromkeys(c["run"] for c in make_plan(g).cells)
            states[k].probes[lr] = sorted((_run_entry(sweep, rid) for rid in cell_runs), key=lambda r: r["seed"])
        n_round += 1
        if on_round is not None:
            on_round(n_round, [s.result() for s in states])
    results = [s.result() for s in states]
    return {"search": search.to_dict(), "cells": results, "rounds": n_round,
            "runs": sum(len(p["runs"]) for r in results for p in r["probes"]), "failed": failed}


# ------------------------------------------------------------------------------------------------- answers

def _interval(result: Mapping[str, Any]) -> tuple[float, float]:
    """The cell's boundary interval in lr: (largest lr healthy in every seed, smallest lr some seed failed), with
    0 / inf where the search found none."""
    lo = result["lr_healthy_max"] if result["lr_healthy_max"] is not None else 0.0
    hi = result["lr_unhealthy_min"] if result["lr_unhealthy_min"] is not None else math.inf
    return lo, hi


def compare(results: Sequence[Mapping[str, Any]], axis: str, reference: Any) -> list[dict[str, Any]]:
    """For every group of cells that differ only in `axis`: each other value's boundary interval against the
    `reference` value's: 'higher' / 'lower' when the intervals do not overlap (beyond the seeds' spread and the
    search's resolution), else 'within spread'."""
    keys = [k for k in ("policy", "freeze_steps", "semantics", "precision", "budget") if k != axis]
    groups: dict[tuple, dict[Any, Mapping[str, Any]]] = {}
    for r in results:
        groups.setdefault(tuple(r[k] for k in keys), {})[r[axis]] = r
    out = []
    for key, members in groups.items():
        if reference not in members:
            continue
        ref_lo, ref_hi = _interval(members[reference])
        for value, r in sorted(members.items(), key=lambda item: str(item[0])):
            if value == reference:
                continue
            lo, hi = _interval(r)
            moved = "higher" if lo >= ref_hi else "lower" if hi <= ref_lo else "within spread"
            out.append({**dict(zip(keys, key)), axis: value, "reference": reference, "moved": moved,
                        "interval": [lo, hi], "reference_interval": [ref_lo, ref_hi]})
    return out


def _fmt_interval(interval: Sequence[float]) -> str:
    lo, hi = interval
    return f"({'none' if lo == 0 else f'{lo:g}'}, {'none' if math.isinf(hi) else f'{hi:g}'}]"


def answers(results: Sequence[Mapping[str, Any]], scope: str) -> list[str]:
    """The answers, computed from the cells: per policy, semantics, precision and budget (each line says which
    budget its comparison of N uses) whether N moved the boundary beyond the seeds' spread, with counts; where nothing diverged, up to which lr; whether precision or
    the budget moved it, where the search ran that comparison."""
    lines = [f"Scope: {scope}. A boundary is the interval (largest lr healthy in every seed, smallest lr where some "
             f"seed was not healthy]; N moves it only where two intervals do not overlap."]
    for key in sorted({(r["policy"], r["semantics"], r["precision"], r["budget"]) for r in results}):
        members = sorted((r for r in results if (r["policy"], r["semantics"], r["precision"], r["budget"]) == key),
                         key=lambda r: r["freeze_steps"])
        policy, semantics, precision, budget = key
        budget_text = "equal steps after the unfreeze" if budget == "after_unfreeze" else "equal total joint steps"
        head = f"{policy}, {semantics}, {precision}, {budget_text}"
        table = ", ".join(f"N={r['freeze_steps']} {_fmt_interval(_interval(r))}" for r in members)
        if len(members) > 1:
            n0 = members[0]["freeze_steps"]
            cmp = compare(members, "freeze_steps", n0)
            moved = [c for c in cmp if c["moved"] != "within spread"]
            verdict = (f"N moved the boundary beyond the seeds' spread in {len(moved)} of {len(cmp)} comparisons "
                       f"with N={n0}" + (" (" + ", ".join(f"N={c['freeze_steps']} {c['moved']}" for c in moved) + ")"
                                        if moved else ""))
        else:
            verdict = "one N only"
        diverged = [r for r in members if r["lr_diverged_min"] is not None]
        div = (f"some seed diverged in {len(diverged)} of {len(members)} cells, from lr "
               f"{min(r['lr_diverged_min'] for r in diverged):g}" if diverged else
               f"nothing diverged up to lr {max(r['lr_max'] for r in members):g}")
        lines.append(f"{head}: boundary by N {table}; {verdict}; {div}.")
    for axis, reference, what in (("precision", "fp16", "precision"), ("budget", "after_unfreeze", "the budget")):
        cmp = compare(results, axis, reference)
        if cmp:
            moved = [c for c in cmp if c["moved"] != "within spread"]
            examples = "; ".join(f"{c['policy']} N={c['freeze_steps']} {c['semantics']} {c[axis]}: "
                                 f"{_fmt_interval(c['interval'])} vs {_fmt_interval(c['reference_interval'])}"
                                 for c in cmp[:4])
            lines.append(f"Did {what} move the boundary (against {reference})? In {len(moved)} of {len(cmp)} "
                         f"comparisons beyond the seeds' spread ({examples}).")
    return lines


def table(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per cell for `criteria.format_table`: the boundary's ends, the ceiling, the first failure."""
    return [{"cell": r["label"], "healthy_max": r["lr_healthy_max"], "unhealthy_min": r["lr_unhealthy_min"],
             "diverged_min": r["lr_diverged_min"], "lr_max": r["lr_max"],
             "first_failure": (f"{r['first_failure']['outcome']} at lr {r['first_failure']['lr']:g}"
                               if r["first_failure"] else None)} for r in results]


TABLE_COLUMNS = ("cell", "healthy_max", "unhealthy_min", "diverged_min", "lr_max", "first_failure")


def failure_lines(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per cell that failed somewhere: how its first failure looked (outcome, lr, seed, decisive link)."""
    return [f"{r['label']}: first failure {f['outcome']} at lr {f['lr']:g} (seed {f['seed']}): "
            f"{f['decisive_link'] or 'no causal chain (finite run)'}"
            for r in results if (f := r["first_failure"]) is not None]


def cells_for(size: Mapping[str, Any], *, precisions: Sequence[str] = ("fp32", "bf16"),
              budgets: bool = True) -> list[Cell]:
    """The main comparison (every policy x N x semantics at fp16, equal steps after the unfreeze) and the smaller
    second one: the first policy, corrected loop, the smallest and largest N at each of `precisions`, and (when
    `budgets`) at an equal total number of joint steps."""
    ns = size["freeze_steps"]
    main = [Cell(p, n, s) for p in size["policies"] for n in ns for s in size["semantics"]]
    ends = sorted({ns[0], ns[-1]})
    policy = size["policies"][0]
    second = [Cell(policy, n, "corrected", precision=prec) for prec in precisions for n in ends]
    if budgets:
        second += [Cell(policy, n, "corrected", budget="total") for n in ends]
    return main + second
