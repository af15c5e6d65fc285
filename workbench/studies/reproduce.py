"""The reproduction study behind notebook 01: the seed's joint-stage run and configurations that each change one
thing about it, every one run with several seeds (data order and the fresh decoder's initialisation), all forked
from one CTC-warm checkpoint; their outcomes, causal chains and the conclusions drawn from them.

Nothing here states a finding in advance: every sentence `conclusions` returns is chosen by comparing the outcome
classes (`workbench.records.outcome`) of configurations that differ in one setting, and states its counts.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from workbench.data import real_length_dataset
from workbench.records import OUTCOMES, RunRecord, summarize
from workbench.run.settings import RunSettings
from workbench.studies.sweep.grid import Plan, code_stamp

ATTRIBUTION_GROUPS = ("encoder", "ctc_head", "rnnt_decoder.joint", "rnnt_decoder.predictor")
# The single changes to the seed's loop, in the notebook's order: the name says what each changes.
SINGLE_CHANGES = ("rebuild_at_stage_change", "clip_optimizer_params", "zero_grad_model", "bf16", "fp32",
                  "init_scale_4096", "exact_component_match")
# The seed's training log: the first NaN loss at joint batch 2.
SEED_LOG_NAN_STEP = 2
# A clearly separate comparison: the rebuilt run with a learning rate of its own for the fresh decoder.
DECODER_LR = 1e-3


@dataclass(frozen=True)
class StudySize:
    """How much one preset's study runs: the CTC warmup of the shared checkpoint, the joint steps every
    configuration trains after the decoder's first trainable step, the freeze lengths N, the seeds, the trial
    lengths of its default data ("sample": the committed `data_samples/`; "b2t": a real-length synthetic set,
    `workbench.data.real_length_dataset`), the configurations it runs (empty: all of them) and how many runs go at
    once by default (0: one per CPU core)."""

    ctc_steps: int
    steps: int
    freeze_steps: tuple[int, ...]
    seeds: tuple[int, ...]
    lengths: str = "sample"
    configs: tuple[str, ...] = ()
    workers: int = 0


SIZES: dict[str, StudySize] = {
    "tiny": StudySize(ctc_steps=40, steps=12, freeze_steps=(1, 3, 6), seeds=(0, 1, 2)),
    "small": StudySize(ctc_steps=300, steps=60, freeze_steps=(1, 10, 100), seeds=(0, 1, 2)),
    # The seed's sizes at the real trial lengths cost minutes per step on a CPU: the seed's run and the main
    # controls (the optimizer rebuilt, fp32) for a few steps, enough to see whether and where the signature appears.
    # One run at a time: a run whose overflow the tracer replays peaked at 12.9 GB here (T up to ~2,000 frames).
    "seed": StudySize(ctc_steps=20, steps=4, freeze_steps=(1,), seeds=(0,), lengths="b2t",
                      configs=("seed_faithful", "rebuild_at_stage_change", "fp32"), workers=1),
}


def study_data(size: StudySize, repo_root: Path) -> Path:
    """The data root a study of `size` runs on when none is given: `data_samples/`, or a real-length set generated
    (once) under `<repo_root>/runs/data`."""
    if size.lengths == "b2t":
        return real_length_dataset(repo_root / "runs" / "data")
    return repo_root / "data_samples"


def seed_run(steps: int, *, lr: float = 1e-5, precision: str = "fp16", init_scale: float = 65536.0,
             batch_size: int = 4, carry_scaler: bool = False) -> RunSettings:
    """The seed's joint stage: seed_faithful loop, AdamW lr 1e-5, 0.3 CTC + 1.0 RNN-T (sqrt(T*U)), fp16, clip 1.0.
    It also measures the validation PER before step 1 (the untrained decoder's RNN-T PER is the baseline).
    `carry_scaler`: start from the fp16 CTC warmup's GradScaler, as the seed's single scaler does."""
    return RunSettings(name="seed_faithful", steps=steps, lr=lr, precision=precision, semantics="seed_faithful",
                       init_scale=init_scale, batch_size=batch_size, eval_at_start=True, carry_scaler=carry_scaler)


def configurations(base: RunSettings, freeze_lengths: Sequence[int], only: Sequence[str] = ()) -> list[RunSettings]:
    """The seed's run and the runs that each change one thing about it (the names say what); a freezing run gets
    N more steps, so that every configuration trains the decoder for `base.steps` steps. Where `base` carries the
    CTC warmup's GradScaler, the bf16 and fp32 runs have no scaler to carry and init_scale_4096 starts a fresh one
    at 4096 (that is its change). `only`: keep just these names (in this order); an unknown name raises
    ValueError."""
    plain = replace(base, eval_at_start=False)
    runs = [
        base,
        replace(plain, name="rebuild_at_stage_change", rebuild_at_stage_change=True),
        replace(plain, name="clip_optimizer_params", clip_scope="optimizer"),
        replace(plain, name="zero_grad_model", zero_grad_scope="model"),
        replace(plain, name="bf16", precision="bf16", carry_scaler=False),
        replace(plain, name="fp32", precision="fp32", carry_scaler=False),
        replace(plain, name="init_scale_4096", init_scale=4096.0, carry_scaler=False),
        replace(plain, name="exact_component_match", substring_match=False),
    ]
    for n in freeze_lengths:
        frozen = replace(plain, policy="freeze_params", freeze_steps=n, steps=base.steps + n)
        runs.append(replace(frozen, name=f"freeze_params_N{n}_rebuild"))
        runs.append(replace(frozen, name=f"freeze_params_N{n}_no_rebuild", rebuild_at_unfreeze=False))
    n_mute = sorted(freeze_lengths)[len(freeze_lengths) // 2]
    runs.append(replace(plain, name=f"freeze_and_mute_N{n_mute}", policy="freeze_and_mute", freeze_steps=n_mute,
                        steps=base.steps + n_mute))
    runs.append(replace(plain, name=f"rebuild_decoder_lr_{DECODER_LR:g}", rebuild_at_stage_change=True,
                        decoder_lr=DECODER_LR, eval_at_start=True))
    if not only:
        return runs
    by_name = {r.name: r for r in runs}
    unknown = [name for name in only if name not in by_name]
    if unknown:
        raise ValueError(f"configurations: unknown {', '.join(unknown)}; expected some of {', '.join(by_name)}")
    return [by_name[name] for name in only]


def plan(configs: Sequence[RunSettings], seeds: Sequence[int]) -> Plan:
    """Every configuration at every seed, as a plan the sweep runner executes (run id `<config>-seed<s>-<code
    stamp>`: a rerun after the code changed never reuses a log the older code wrote)."""
    runs, cells = {}, []
    for seed in seeds:
        for config in configs:
            rid = f"{config.name}-seed{seed}-{code_stamp()}"
            runs[rid] = replace(config, seed=seed, name=rid)
            cells.append({"axes": {"config": config.name, "seed": seed}, "run": rid, "control": None})
    return Plan(runs, cells)


def run_rows(plan_: Plan, records: Mapping[str, RunRecord]) -> list[dict[str, Any]]:
    """`summarize` of every finished run, with its configuration, seed and the validation before step 1 (the
    untrained decoder's RNN-T PER) of its seed."""
    start = {}
    for cell in plan_.cells:
        rec = records.get(cell["run"])
        table = rec.tables.get("validation", []) if rec is not None else []
        first = next((row for row in table if row["step"] == 0), None)
        if first is not None:
            start.setdefault(cell["axes"]["seed"], first)
    rows = []
    for cell in plan_.cells:
        rec = records.get(cell["run"])
        if rec is None:
            continue
        initial = start.get(cell["axes"]["seed"], {})
        rows.append({**summarize(rec), "config": cell["axes"]["config"], "seed": cell["axes"]["seed"],
                     "val_per_initial": initial.get("per"), "val_rnnt_per_initial": initial.get("rnnt_per")})
    return rows


def config_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration over its seeds: outcome counts, first non-finite steps, decisive links, the
    first reason of each seed, and the medians of the final validation PERs."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        agg = out.setdefault(row["config"], {"name": row["config"], "outcomes": {}, "seeds": [], "settings":
                                             {k: v for k, v in row["settings"].items() if k not in ("name", "seed")},
                                             "first_nonfinite_steps": [], "first_nonfinite_loss_steps": [],
                                             "decisive": [], "reasons": [], "outcome_per_seed": [],
                                             "val_per": [], "val_rnnt_per": [], "val_rnnt_per_initial": []})
        agg["outcomes"][row["outcome"]] = agg["outcomes"].get(row["outcome"], 0) + 1
        agg["seeds"].append(row["seed"])
        agg["first_nonfinite_steps"].append(row["first_nonfinite_step"])
        agg["first_nonfinite_loss_steps"].append(row["first_nonfinite_loss_step"])
        agg["outcome_per_seed"].append(row["outcome"])
        agg["decisive"].append(row["tracer_verdict"])
        agg["reasons"].append(row["outcome_reasons"][0] if row["outcome_reasons"] else "")
        for key in ("val_per", "val_rnnt_per", "val_rnnt_per_initial"):
            agg[key].append(row[key])
    for agg in out.values():
        runs = sum(agg["outcomes"].values())
        worst = next(k for k in OUTCOMES if agg["outcomes"].get(k))
        agg["note"] = _dominant_reason(agg, worst)
        agg["label"] = " ".join(f"{agg['outcomes'][k]}/{runs} {k}" for k in reversed(OUTCOMES)
                                if agg["outcomes"].get(k))
    return list(out.values())


def _dominant_reason(agg: Mapping[str, Any], outcome: str) -> str:
    """The most frequent first reason among the seeds whose outcome is `outcome`."""
    reasons = [r for r, o in zip(agg["reasons"], agg["outcome_per_seed"]) if r and o == outcome]
    return max(set(reasons), key=reasons.count) if reasons else ""


def _count(agg: Mapping[str, Any], kind: str) -> str:
    return f"{agg['outcomes'].get(kind, 0)}/{sum(agg['outcomes'].values())}"


def _all(agg: Mapping[str, Any], kind: str) -> bool:
    return agg["outcomes"].get(kind, 0) == sum(agg["outcomes"].values())


def signature(agg: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[bool]:
    """Per seed of the seed's configuration: a finite loss at joint step 1 and a non-finite loss later."""
    return [r["first_nonfinite_loss_step"] is not None and r["first_nonfinite_loss_step"] > 1
            for r in rows if r["config"] == agg["name"]]


def conclusions(rows: Sequence[Mapping[str, Any]], scope: str) -> list[str]:
    """Sentences derived from the runs (the seed's configuration must be named `seed_faithful`); `scope` says
    what was run (preset, data, device, precision, learning rate, steps, seeds) and closes the first sentence."""
    configs = {agg["name"]: agg for agg in config_rows(rows)}
    seed = configs["seed_faithful"]
    n = sum(seed["outcomes"].values())
    out = []
    sig = signature(seed, rows)
    steps = sorted({s for s in seed["first_nonfinite_steps"] if s is not None})
    loss_steps = sorted({s for s in seed["first_nonfinite_loss_steps"] if s is not None})
    if all(sig):
        timing = ("as in the seed's log (NaN from batch 2)" if loss_steps == [SEED_LOG_NAN_STEP] else
                  f"where the seed's log shows NaN from batch {SEED_LOG_NAN_STEP}: the same mechanism, "
                  f"{'later' if min(loss_steps) > SEED_LOG_NAN_STEP else 'earlier'} here")
        out.append(f"The seed's signature reproduced in {sum(sig)}/{n} seeds ({scope}): joint step 1 had a finite "
                   f"loss, the parameters went non-finite first at step {', '.join(map(str, steps))} and the loss at "
                   f"step {', '.join(map(str, loss_steps))}, {timing}.")
    elif _all(seed, "diverged"):
        out.append(f"The seed's run diverged in {n}/{n} seeds ({scope}), but its step-1 loss was finite in only "
                   f"{sum(sig)}/{n}, unlike the seed's log: first non-finite step {', '.join(map(str, steps))}.")
    else:
        out.append(f"The seed's signature did not reproduce in every seed ({scope}): the seed_faithful run was "
                   f"{seed['label']}.")
    decisive = [d for d in seed["decisive"] if d]
    if decisive:
        out.append(f"The decisive link of its causal chain (seed {seed['seeds'][0]}): {decisive[0]}.")
    singles = [configs[c] for c in SINGLE_CHANGES if c in configs]
    healthy = [a["name"] for a in singles if _all(a, "healthy")]
    if healthy:
        listed = ", ".join(f"{name} ({_count(configs[name], 'healthy')})" for name in healthy)
        out.append(f"Changing one of these alone made every seed healthy (finite, every component updated, the "
                   f"loss falling): {listed}.")
    for agg in singles:
        if _all(agg, "stalled"):
            out.append(f"{agg['name']} stayed finite but stalled in {_count(agg, 'stalled')} seeds, so it is not a "
                       f"fix: {agg['note']}.")
    diverged = [a["name"] for a in singles if _all(a, "diverged")]
    if diverged:
        out.append(f"These single changes still diverged in every seed: {', '.join(diverged)}.")
    for agg in singles:
        if len(agg["outcomes"]) > 1:
            out.append(f"{agg['name']} depended on the seed ({agg['label']}); where it was not healthy: "
                       f"{agg['note']}.")
    out.extend(_wait_vs_rebuild(configs))
    for agg in configs.values():
        if agg["name"].startswith("freeze_and_mute"):
            out.append(f"{agg['name']} (RNN-T term dropped while frozen, then the optimizer rebuilt): {agg['label']}.")
    out.extend(_learning(configs))
    return out


def _wait_vs_rebuild(configs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Compare the freeze_params configurations across N (the wait) and rebuild / no rebuild (the optimizer)."""
    freeze = [a for a in configs.values() if a["settings"]["policy"] == "freeze_params"]
    if not freeze:
        return []
    with_rebuild = {a["settings"]["freeze_steps"]: a for a in freeze if a["settings"]["rebuild_at_unfreeze"]}
    without = {a["settings"]["freeze_steps"]: a for a in freeze if not a["settings"]["rebuild_at_unfreeze"]}
    lengths = sorted(set(with_rebuild) & set(without))
    parts = "; ".join(f"N={n}: rebuilt {with_rebuild[n]['label']}, kept {without[n]['label']}" for n in lengths)
    out = [f"Gradual unfreezing (freeze_params), the optimizer rebuilt at the unfreeze or kept: {parts}."]
    diverging = {n: (with_rebuild[n]["outcomes"].get("diverged", 0), without[n]["outcomes"].get("diverged", 0))
                 for n in lengths}
    n_matters = len({d[0] for d in diverging.values()}) > 1 or len({d[1] for d in diverging.values()}) > 1
    rebuild_matters = any(a != b for a, b in diverging.values())
    if rebuild_matters and not n_matters:
        out.append("So the optimizer rebuild, not the length of the wait, decided whether training diverged.")
    elif n_matters and not rebuild_matters:
        out.append("So the length of the wait, not the optimizer rebuild, decided whether training diverged.")
    elif n_matters and rebuild_matters:
        out.append("Both the length of the wait and the optimizer rebuild changed how many runs diverged.")
    else:
        out.append("Neither the length of the wait nor the optimizer rebuild changed how many runs diverged here.")
    return out


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _learning(configs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Whether the decoder learned: the final validation RNN-T greedy PER against the untrained decoder's."""
    out = []
    for name in ("rebuild_at_stage_change", f"rebuild_decoder_lr_{DECODER_LR:g}"):
        agg = configs.get(name)
        if agg is None:
            continue
        pairs = [(a, b) for a, b in zip(agg["val_rnnt_per_initial"], agg["val_rnnt_per"])
                 if a is not None and b is not None]
        if not pairs:
            continue
        better = sum(b < a for a, b in pairs)
        lr = agg["settings"].get("decoder_lr") or agg["settings"]["lr"]
        out.append(f"{name} (decoder lr {lr:g}): validation RNN-T greedy PER {_median([a for a, _ in pairs]):.3f} "
                   f"for the untrained decoder -> {_median([b for _, b in pairs]):.3f} at the end (medians); it "
                   f"improved in {better}/{len(pairs)} seeds.")
    return out


def diagnosis(record: RunRecord) -> list[str]:
    """The mechanism as the run recorded it: the causal chain, optimizer coverage, loss-term attribution."""
    summary = summarize(record)
    lines = [f"causal chain: {link['line']}" for link in summary["causal_chain"]] or [
        "causal chain: nothing was non-finite"]
    coverage = record.tables.get("coverage", [])
    if coverage:
        first = coverage[0]
        lines.append(f"optimizer coverage ({len(coverage)} step(s) with findings), first: {first['line']}")
        for name, norm in first["outside_optimizer"]:
            lines.append(f"    outside the optimizer: {name}  |g| = {norm:.4g}")
    else:
        lines.append("optimizer coverage: every trainable parameter with a gradient was in the optimizer")
    for a in record.tables.get("attribution", []):
        parts = "; ".join(f"{term}: " + ", ".join(f"{g} {v:.3g}" for g, v in groups.items()
                                                  if g in ATTRIBUTION_GROUPS)
                          for term, groups in a["norms"].items())
        lines.append(f"attribution step {a['step']} ({a['reason']}), |grad| by term and group: {parts}")
    return lines
