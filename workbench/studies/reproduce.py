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

from workbench.data import large_val_dataset, real_length_dataset
from workbench.records import OUTCOMES, RunRecord, summarize
from workbench.run.settings import RunSettings
from workbench.model.metrics import FUNCTIONAL_RATIO
from workbench.studies.stats import Tally, paired_effect
from workbench.studies.sweep.grid import Plan, code_stamp

ATTRIBUTION_GROUPS = ("encoder", "ctc_head", "rnnt_decoder.joint", "rnnt_decoder.predictor")
# The single changes to the seed's loop, in the notebook's order: the name says what each changes.
SINGLE_CHANGES = ("rebuild_at_stage_change", "clip_optimizer_params", "zero_grad_model", "bf16", "fp32",
                  "init_scale_4096", "exact_component_match")
# The seed's training log: the first NaN loss at joint batch 2.
SEED_LOG_NAN_STEP = 2
# A clearly separate comparison: the rebuilt run with a learning rate of its own for the fresh decoder.
DECODER_LR = 1e-3
# The configurations whose decoder's learning is compared with the untrained decoder.
LEARNING = ("rebuild_at_stage_change", f"rebuild_decoder_lr_{DECODER_LR:g}")


@dataclass(frozen=True)
class StudySize:
    """How much one preset's study runs: the CTC warmup of the shared checkpoint, the joint steps every
    configuration trains after the decoder's first trainable step, the freeze lengths N, the seeds, the trial
    lengths of its default data ("sample": the committed `data_samples/` training set with 80 validation trials,
    `workbench.data.large_val_dataset`; "b2t": a real-length synthetic set, `workbench.data.real_length_dataset`),
    the configurations it runs (empty: all of them), how many runs go at once by default (0: one per CPU core),
    the CTC warmup's precision and whether the joint stage starts from that warmup's GradScaler (the seed's
    single scaler)."""

    ctc_steps: int
    steps: int
    freeze_steps: tuple[int, ...]
    seeds: tuple[int, ...]
    lengths: str = "sample"
    configs: tuple[str, ...] = ()
    workers: int = 0
    ctc_precision: str = "fp32"
    carry_scaler: bool = False


SIZES: dict[str, StudySize] = {
    "tiny": StudySize(ctc_steps=40, steps=12, freeze_steps=(1, 3, 6), seeds=(0, 1, 2)),
    "small": StudySize(ctc_steps=300, steps=60, freeze_steps=(1, 10, 100), seeds=(0, 1, 2)),
    # The seed's sizes at the real trial lengths cost minutes per step on a CPU: the seed's run and the main
    # controls (the optimizer rebuilt, fp32) for a few steps, enough to see whether and where the signature appears.
    # One run at a time: a run whose overflow the tracer replays peaked at 12.9 GB here (T up to ~2,000 frames).
    # The seed's precision through the whole curriculum: an encoder whose fp16 activations overflow must meet fp16
    # in the CTC stage, as the seed's did, not first at the joint stage.
    "seed": StudySize(ctc_steps=20, steps=4, freeze_steps=(1,), seeds=(0,), lengths="b2t",
                      configs=("seed_faithful", "rebuild_at_stage_change", "fp32"), workers=1,
                      ctc_precision="fp16", carry_scaler=True),
}


def study_data(size: StudySize, repo_root: Path) -> Path:
    """The data root a study of `size` runs on when none is given, generated once under `<repo_root>/runs/data`:
    `data_samples/`'s training set with 80 validation trials (its 10 resolve no difference of a few errors), or a
    real-length set."""
    if size.lengths == "b2t":
        return real_length_dataset(repo_root / "runs" / "data")
    return large_val_dataset(repo_root / "runs" / "data")


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
    stamp>`: a rerun after the code changed never reuses a log the older code wrote), each with its CTC-only
    control: the same seed and settings without the decoder, trained as many steps as the configuration in the
    same precision (one control per run length and precision, `ctc_only_<precision>_<steps>-seed<s>`, with the
    settings of the first configuration of that length and precision), so a final CTC PER is compared at an equal
    budget."""
    runs, cells, controls = {}, [], {}
    for seed in seeds:
        for config in configs:
            cid = f"ctc_only_{config.precision}_{config.steps}-seed{seed}-{code_stamp()}"
            if cid not in controls:
                controls[cid] = replace(config, seed=seed, name=cid, ctc_only=True, eval_at_start=False,
                                        policy="none", freeze_steps=0, decoder_lr=None)
            rid = f"{config.name}-seed{seed}-{code_stamp()}"
            runs[rid] = replace(config, seed=seed, name=rid)
            cells.append({"axes": {"config": config.name, "seed": seed}, "run": rid, "control": cid})
    return Plan({**controls, **runs}, cells)


def run_rows(plan_: Plan, records: Mapping[str, RunRecord]) -> list[dict[str, Any]]:
    """`summarize` of every finished run, with its configuration, seed, the validation before step 1 (the
    untrained decoder's RNN-T PER and errors) of its seed, and its step-matched CTC-only control's final PER and
    per-utterance errors."""
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
        control = records.get(cell.get("control") or "")
        rows.append({**summarize(rec), "config": cell["axes"]["config"], "seed": cell["axes"]["seed"],
                     "val_per_initial": initial.get("per"), "val_rnnt_per_initial": initial.get("rnnt_per"),
                     "val_rnnt_errors_initial": initial.get("rnnt_errors"),
                     "control": None if control is None else control.name,
                     "control_val_per": None if control is None else control.attrs.get("val_per"),
                     "control_val_ctc_errors": None if control is None else control.attrs.get("val_ctc_errors")})
    return rows


def config_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration over its seeds: outcome counts, first non-finite steps, decisive links, the
    first reason of each seed, and per seed the final validation PERs, the RNN-T decoder's length ratio and
    functional flag, and the step-matched control's final PER."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        agg = out.setdefault(row["config"], {"name": row["config"], "outcomes": {}, "seeds": [], "settings":
                                             {k: v for k, v in row["settings"].items() if k not in ("name", "seed")},
                                             "first_nonfinite_steps": [], "first_nonfinite_loss_steps": [],
                                             "decisive": [], "reasons": [], "outcome_per_seed": [],
                                             "val_per": [], "val_rnnt_per": [], "val_rnnt_per_initial": [],
                                             "val_rnnt_length_ratio": [], "val_rnnt_functional": [],
                                             "control_val_per": []})
        agg["outcomes"][row["outcome"]] = agg["outcomes"].get(row["outcome"], 0) + 1
        agg["seeds"].append(row["seed"])
        agg["first_nonfinite_steps"].append(row["first_nonfinite_step"])
        agg["first_nonfinite_loss_steps"].append(row["first_nonfinite_loss_step"])
        agg["outcome_per_seed"].append(row["outcome"])
        agg["decisive"].append(row["tracer_verdict"])
        agg["reasons"].append(row["outcome_reasons"][0] if row["outcome_reasons"] else "")
        for key in ("val_per", "val_rnnt_per", "val_rnnt_per_initial", "val_rnnt_length_ratio",
                    "val_rnnt_functional", "control_val_per"):
            agg[key].append(row.get(key))
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


def _by_seed(rows: Sequence[Mapping[str, Any]], config: str) -> dict[Any, Mapping[str, Any]]:
    return {r["seed"]: r for r in rows if r["config"] == config}


def effects(rows: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], Tally | None]:
    """The study's paired comparisons in errors on the same validation utterances, seed by seed:

    - `vs_control`: every configuration's final CTC errors minus its step-matched CTC-only control's (same seed,
      same number of steps, same precision): what attaching the decoder did to the encoder at an equal budget;
    - `vs_untrained`: the final RNN-T greedy errors of the decoder-learning configurations minus the untrained
      decoder's (before step 1), only where the final decoder is functional in every seed (a decoder that emits
      nothing or several times the reference has no quality to compare).

    Returns one dict per comparison (`config`, `kind`, `effect`: the `stats.Effect` dict, or None with `reason`)
    and the Tally of the comparisons made (None without seeds)."""
    seeds = sorted({r["seed"] for r in rows}, key=str)
    tally = Tally(len(seeds)) if seeds else None
    out: list[dict[str, Any]] = []
    for config in dict.fromkeys(r["config"] for r in rows):
        by_seed = _by_seed(rows, config)
        if set(by_seed) != set(seeds):
            continue
        per = [by_seed[s] for s in seeds]
        item: dict[str, Any] = {"config": config, "kind": "vs_control", "effect": None}
        if any(r.get("val_ctc_errors") is None or r.get("control_val_ctc_errors") is None for r in per):
            item["reason"] = "not compared: a run or its control has no final validation (non-finite parameters)"
        else:
            item["effect"] = paired_effect([r["control_val_ctc_errors"] for r in per],
                                           [r["val_ctc_errors"] for r in per], per[0]["val_ref_lengths"]).to_dict()
        out.append(item)
        if config not in LEARNING:
            continue
        item = {"config": config, "kind": "vs_untrained", "effect": None}
        functional = sum(bool(r.get("val_rnnt_functional")) for r in per)
        if functional < len(per):
            item["reason"] = f"not compared: the final decoder was functional in {functional}/{len(per)} seeds"
        elif any(r.get("val_rnnt_errors_initial") is None for r in per):
            item["reason"] = "not compared: no validation of the untrained decoder"
        else:
            item["effect"] = paired_effect([r["val_rnnt_errors_initial"] for r in per],
                                           [r["val_rnnt_errors"] for r in per], per[0]["val_ref_lengths"]).to_dict()
        out.append(item)
    if tally is not None:
        for item in out:
            if item["effect"] is not None:
                tally.add(f"{item['config']} {item['kind']}", item["effect"]["per_seed"])
    return out, tally


def _effect_phrase(effect: Mapping[str, Any]) -> str:
    seeds = ", ".join(f"{d:+d}" for d in effect["per_seed"])
    return (f"{effect['diff_errors']:+.1f} errors [{effect['low']:+.1f}, {effect['high']:+.1f}] of "
            f"{effect['ref_tokens']} (per seed {seeds})")


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
    for agg in singles:
        if _all(agg, "inconclusive"):
            out.append(f"{agg['name']} stayed finite and updated every component, but the run could not show the "
                       f"loss falling ({_count(agg, 'inconclusive')} seeds inconclusive): {agg['note']}; a longer "
                       f"joint stage (a larger preset or `steps`) is needed to call it a fix.")
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
    found, tally = effects(rows)
    out.extend(_learning(configs, found))
    control = [(i["config"], i["effect"]) for i in found if i["kind"] == "vs_control" and i["effect"] is not None]
    if control:
        resolved = [f"{name} {_effect_phrase(e)}" for name, e in control if e["resolved"]]
        out.append(f"Final CTC errors minus the step-matched CTC-only control's (same seed, steps and precision; mean "
                   f"over seeds, 95% bootstrap interval over seeds and utterances): {len(resolved)} of {len(control)} "
                   f"configurations differed from their control beyond the interval"
                   + (f": {'; '.join(resolved)}." if resolved else "."))
    if tally is not None and tally.made:
        out.append("Paired comparisons: " + tally.sentence())
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


def _learning(configs: Mapping[str, Mapping[str, Any]], found: Sequence[Mapping[str, Any]]) -> list[str]:
    """Whether the decoder learned: is it functional at the end (length ratio), and only then its final validation
    RNN-T greedy errors against the untrained decoder's (`effects`)."""
    out = []
    for name in LEARNING:
        agg = configs.get(name)
        if agg is None:
            continue
        ratios = [r for r in agg["val_rnnt_length_ratio"] if r is not None]
        if not ratios:
            continue
        lr = agg["settings"].get("decoder_lr") or agg["settings"]["lr"]
        functional = sum(bool(f) for f in agg["val_rnnt_functional"])
        head = (f"{name} (decoder lr {lr:g}): the final RNN-T decoder was functional in {functional}/{len(ratios)} "
                f"seeds (hypothesis/reference length ratio {', '.join(f'{r:.2f}' for r in ratios)}; functional in "
                f"[{FUNCTIONAL_RATIO[0]:g}, {FUNCTIONAL_RATIO[1]:g}])")
        item = next((i for i in found if i["config"] == name and i["kind"] == "vs_untrained"), None)
        if item is not None and item["effect"] is not None:
            e = item["effect"]
            verdict = ("fewer errors than the untrained decoder, the interval excludes 0" if e["resolved"] and
                       e["diff_errors"] < 0 else "no fewer errors than the untrained decoder beyond the interval")
            out.append(f"{head}; validation RNN-T greedy PER {_median(agg['val_rnnt_per_initial']):.3f} untrained -> "
                       f"{_median(agg['val_rnnt_per']):.3f} (medians), {_effect_phrase(e)}: {verdict}.")
        else:
            out.append(f"{head}; its PER is not ranked ({item['reason'] if item else 'not compared'}).")
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
