"""The reproduction study behind notebook 01: the seed's joint-stage run, single-switch controls forked from the
same checkpoint, a summary table, and conclusions computed from that table.

Nothing here states a finding in advance: every sentence `conclusions` returns is chosen by comparing recorded
outcomes (first non-finite step, non-finite parameters) between runs that differ in exactly one setting.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from workbench.records import RunLog
from workbench.run.settings import RunSettings

ATTRIBUTION_GROUPS = ("encoder", "ctc_head", "rnnt_decoder.joint", "rnnt_decoder.predictor")


def seed_run(steps: int, *, lr: float = 1e-5, precision: str = "fp16", seed: int = 0,
             init_scale: float = 65536.0, batch_size: int = 4) -> RunSettings:
    """The seed's joint stage: seed_faithful loop, AdamW lr 1e-5, 0.3 CTC + 1.0 RNN-T (sqrt(T*U)), fp16, clip 1.0."""
    return RunSettings(name="seed_faithful", steps=steps, lr=lr, precision=precision, semantics="seed_faithful",
                       seed=seed, init_scale=init_scale, batch_size=batch_size)


def controls(base: RunSettings, freeze_lengths: Sequence[int]) -> list[RunSettings]:
    """Runs that each change one thing about `base` (the names say what), in the notebook's order."""
    runs = [
        replace(base, name="rebuild_at_stage_change", rebuild_at_stage_change=True),
        replace(base, name="clip_optimizer_params", clip_scope="optimizer"),
        replace(base, name="zero_grad_model", zero_grad_scope="model"),
        replace(base, name="bf16", precision="bf16"),
        replace(base, name="fp32", precision="fp32"),
        replace(base, name="init_scale_4096", init_scale=4096.0),
    ]
    for n in freeze_lengths:
        runs.append(replace(base, name=f"freeze_params_N{n}_rebuild", policy="freeze_params", freeze_steps=n))
        runs.append(replace(base, name=f"freeze_params_N{n}_no_rebuild", policy="freeze_params", freeze_steps=n,
                            rebuild_at_unfreeze=False))
    n_mute = sorted(freeze_lengths)[len(freeze_lengths) // 2]
    runs.append(replace(base, name=f"freeze_and_mute_N{n_mute}", policy="freeze_and_mute", freeze_steps=n_mute))
    return runs


def diverged(row: dict[str, Any]) -> bool:
    """A run diverged when a loss term or a parameter became non-finite (`summarize`'s row)."""
    return row["first_nonfinite_step"] is not None


def signature_reproduced(seed_row: dict[str, Any]) -> bool:
    """The seed's signature: a finite loss at joint step 1 and a non-finite loss later."""
    first = seed_row["first_nonfinite_loss_step"]
    return first is not None and first > 1


def _fmt(row: dict[str, Any]) -> str:
    if row["first_nonfinite_param_step"] is None and row["first_nonfinite_loss_step"] is None:
        return "stayed finite"
    return (f"parameters non-finite after step {row['first_nonfinite_param_step']}, "
            f"first non-finite loss at step {row['first_nonfinite_loss_step']}")


def conclusions(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Sentences derived from the summary rows (the seed run must be named `seed_faithful`)."""
    by_name = {r["name"]: r for r in rows}
    seed = by_name["seed_faithful"]
    out = []
    if signature_reproduced(seed):
        out.append(f"The seed's signature reproduced: joint step 1 had a finite loss ({seed['loss_step_1']:.3f}) "
                   f"and the first non-finite loss came at step {seed['first_nonfinite_loss_step']}; "
                   f"{_fmt(seed)}.")
    elif diverged(seed):
        out.append(f"The seed's run diverged but not with its signature: {_fmt(seed)}.")
    else:
        out.append(f"The seed's signature did NOT reproduce with this model on this machine: the seed_faithful "
                   f"run stayed finite for all {seed['settings']['steps']} steps.")
    if seed["tracer_verdict"]:
        out.append(f"First non-finite tensor (tracer): {seed['tracer_verdict']}.")
    if seed["outside_optimizer"]:
        out.append(f"{len(seed['outside_optimizer'])} trainable tensors received gradients outside the optimizer "
                   f"(the stale CTC-stage optimizer), e.g. {', '.join(seed['outside_optimizer'][:3])}.")
    if diverged(seed):
        single = ["rebuild_at_stage_change", "clip_optimizer_params", "zero_grad_model", "bf16", "fp32",
                  "init_scale_4096"]
        removed = [n for n in single if n in by_name and not diverged(by_name[n])]
        kept = [n for n in single if n in by_name and diverged(by_name[n])]
        if removed:
            out.append(f"Changing any one of these removed the divergence: {', '.join(removed)}.")
        if kept:
            out.append(f"These single changes did not remove it: {', '.join(kept)}.")
    out.extend(_wait_vs_rebuild(rows))
    mute = [r for r in rows if r["name"].startswith("freeze_and_mute")]
    for r in mute:
        out.append(f"{r['name']} (RNN-T term dropped while frozen, then optimizer rebuilt): {_fmt(r)}.")
    return out


def _wait_vs_rebuild(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Compare freeze_params runs across N (the wait) and across rebuild/no-rebuild (the optimizer)."""
    freeze = [r for r in rows if r["settings"]["policy"] == "freeze_params"]
    if not freeze:
        return []
    with_rebuild = {r["settings"]["freeze_steps"]: diverged(r) for r in freeze if r["settings"]["rebuild_at_unfreeze"]}
    without = {r["settings"]["freeze_steps"]: diverged(r) for r in freeze if not r["settings"]["rebuild_at_unfreeze"]}
    lengths = sorted(set(with_rebuild) & set(without))
    out = [f"Gradual unfreezing (freeze_params) for N = {', '.join(map(str, lengths))} steps: with the optimizer "
           f"rebuilt at unfreeze {sum(with_rebuild[n] for n in lengths)} of {len(lengths)} diverged; without the "
           f"rebuild {sum(without[n] for n in lengths)} of {len(lengths)} diverged."]
    n_matters = len(set(with_rebuild.values())) > 1 or len(set(without.values())) > 1
    rebuild_matters = any(with_rebuild[n] != without[n] for n in lengths)
    if rebuild_matters and not n_matters:
        out.append("So the optimizer rebuild, not the length of the wait, decided whether training diverged.")
    elif n_matters and not rebuild_matters:
        out.append("So the length of the wait, not the optimizer rebuild, decided whether training diverged.")
    elif n_matters and rebuild_matters:
        out.append("Both the length of the wait and the optimizer rebuild changed the outcome (see the table).")
    else:
        out.append("Neither the length of the wait nor the optimizer rebuild changed the outcome here.")
    return out


def diagnosis(log_path: str | Path) -> list[str]:
    """The mechanism as the run log records it: tracer verdicts, optimizer coverage, loss-term attribution."""
    with RunLog(log_path) as log:
        tables = log.table_names()
        verdicts = log.table("tracer") if "tracer" in tables else []
        coverage = log.table("coverage") if "coverage" in tables else []
        attribution = log.table("attribution") if "attribution" in tables else []
    lines = [f"tracer: {v['line']}" for v in verdicts] or ["tracer: no non-finite step was traced"]
    if coverage:
        first = coverage[0]
        lines.append(f"optimizer coverage ({len(coverage)} step(s) with findings), first: {first['line']}")
        for name, norm in first["outside_optimizer"]:
            lines.append(f"    outside the optimizer: {name}  |g| = {norm:.4g}")
    else:
        lines.append("optimizer coverage: every trainable parameter with a gradient was in the optimizer")
    for a in attribution:
        norms = a["norms"]
        parts = "; ".join(f"{term}: " + ", ".join(f"{g} {v:.3g}" for g, v in groups.items()
                                                  if g in ATTRIBUTION_GROUPS)
                          for term, groups in norms.items())
        lines.append(f"attribution step {a['step']} ({a['reason']}), |grad| by term and group: {parts}")
    return lines
