"""Staged training from a fresh model (CTC warmup -> joint -> mode), readable top to bottom.

Every stage goes through the run engine: its components become trainable, the optimizer is rebuilt (corrected
loop) or kept (the seed's loop), the joint stage's unfreezing policy applies, and progress lines follow the seed's
style. A checkpoint is saved after each stage, so joint-stage experiments can fork from the CTC-warm one.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from workbench.data import B2TDataset
from workbench.model import HybridModel, get_config
from workbench.run.engine import RunEngine
from workbench.run.settings import TrainSettings
from workbench.train.checkpoint import check_checkpoint, load_weights, save_checkpoint
from workbench.train.device import pick_device, seed_everything
from workbench.train.evaluate import evaluate, validation_loader
from workbench.train.optim import build_optimizer
from workbench.train.policies import make_policy
from workbench.train.stages import STAGE_NAMES, seed_stages, stage_batches
from workbench.train.step import StepConfig, StepResult, TrainStep, get_semantics


@dataclass
class StageReport:
    name: str
    steps: int
    losses: list[dict[str, float]] = field(default_factory=list)
    skipped: int = 0
    median_ms: float = 0.0
    val_per: float | None = None
    val_rnnt_per: float | None = None
    val_rnnt_length_ratio: float | None = None  # RNN-T hypothesis / reference tokens
    val_rnnt_functional: bool | None = None  # the ratio within metrics.FUNCTIONAL_RATIO: the PER measures quality
    val_rnnt_sdi: list[int] | None = None  # substitutions, deletions, insertions
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    checkpoint: str | None = None


def progress_line(i: int, n: int, losses: dict[str, float], ms: float | None, skipped: bool) -> str:
    """`  Batch i/n (p%) | Loss x | y ms/batch | ctc ... rnnt ...`, the seed's progress line with the terms."""
    terms = " ".join(f"{k} {v:.4f}" for k, v in losses.items() if k != "total")
    timing = f" | {ms:.0f} ms/batch" if ms is not None else ""
    flag = " | SKIPPED (non-finite)" if skipped else ""
    return f"  Batch {i}/{n} ({100 * i / n:.0f}%) | Loss {losses['total']:.4f}{timing} | {terms}{flag}"


def should_log(i: int, n: int) -> bool:
    return i == 1 or i == n or i % max(1, n // 10) == 0


def run_training(cfg: TrainSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the stages in `cfg`; save a checkpoint after each; return a summary dict."""
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    train_set = B2TDataset(cfg.data, "train", max_sessions=cfg.max_sessions)
    val_set = B2TDataset(cfg.data, "val", max_sessions=cfg.max_sessions)
    val_loader = validation_loader(val_set, cfg.batch_size, cfg.seed)
    model = HybridModel(get_config(cfg.preset)).to(device)
    stages = seed_stages(cfg.ctc_steps, cfg.joint_steps, cfg.mode_steps,
                         ctc_lr=cfg.ctc_lr, joint_lr=cfg.joint_lr, mode_lr=cfg.mode_lr)
    done: set[str] = set()
    if cfg.resume_from:
        state = check_checkpoint(cfg.resume_from, model.cfg, stages=STAGE_NAMES)
        load_weights(model, state["model"], cfg.resume_from)
        done = set(STAGE_NAMES[: STAGE_NAMES.index(state["stage"]) + 1])
        log(f"Resumed from {cfg.resume_from} (completed stage {state['stage']})")
    semantics = get_semantics(cfg.semantics)
    log(f"Device {device} | preset {cfg.preset} | precision {cfg.precision} | loop semantics {semantics.name} | "
        f"train {len(train_set)} trials / val {len(val_set)} trials from {len(train_set.sessions)} sessions")

    untrained = evaluate(model, val_loader, device)
    log(f"Validation PER before training: {untrained.per:.3f}")
    summary: dict[str, Any] = {"config": cfg.to_dict(), "device": str(device), "val_per_initial": untrained.per,
                               "stages": []}
    # The first stage's optimizer is built over whatever is trainable; entering the stage decides it for real.
    step = TrainStep(model, build_optimizer(model.parameters(), cfg.ctc_lr),
                     StepConfig(precision=cfg.precision, clip=cfg.clip, rnnt_normalization=cfg.rnnt_normalization,
                                semantics=semantics), device)
    engine = RunEngine(step, log=log)
    first = True
    for stage in stages:
        if stage.name in done:
            continue
        policy = make_policy(cfg.policy, cfg.freeze_steps, rebuild_at_unfreeze=cfg.rebuild_at_unfreeze) \
            if stage.name == "joint" else None
        engine.enter_stage(stage, seed=cfg.seed, rebuild=first or semantics.rebuild_at_stage_change, policy=policy)
        first = False
        report = StageReport(stage.name, stage.steps)

        def on_step(i: int, result: StepResult, report: StageReport = report, n: int = stage.steps) -> None:
            report.losses.append(result.losses)
            report.skipped += result.skipped
            if should_log(i, n):
                log(progress_line(i, n, result.losses, result.ms, result.skipped))
            if cfg.eval_every and i % cfg.eval_every == 0:
                report.val_curve.append((i, evaluate(model, val_loader, device).per))

        results = engine.run(stage_batches(train_set, cfg.batch_size, cfg.seed, stage), stage.steps, on_step)
        report.median_ms = statistics.median(r.ms for r in results)
        result = evaluate(model, val_loader, device, rnnt=stage.run_rnnt)
        report.val_per, report.val_rnnt_per = result.per, result.rnnt_per
        rnnt_part = ""
        if result.rnnt is not None:
            facts = result.attrs()
            report.val_rnnt_length_ratio, report.val_rnnt_functional, report.val_rnnt_sdi = (
                facts["rnnt_length_ratio"], facts["rnnt_functional"], facts["rnnt_sdi"])
            rnnt_part = (f" | RNN-T greedy PER {result.rnnt_per:.3f} (length ratio {report.val_rnnt_length_ratio:.2f}"
                         f"{'' if report.val_rnnt_functional else ', not functional'}; S/D/I "
                         f"{'/'.join(map(str, report.val_rnnt_sdi))})")
        log(f"Stage {stage.name} done | {report.skipped} skipped | median {report.median_ms:.0f} ms/batch | "
            f"validation PER {result.per:.3f}{rnnt_part}")
        ckpt = save_checkpoint(Path(cfg.out) / f"{stage.name}.pt", model, stage=stage.name, step=stage.steps,
                               seed=cfg.seed, optimizer=step.optimizer, scaler=step.scaler)
        report.checkpoint = str(ckpt)
        summary["stages"].append(report.__dict__)
    engine.close()
    summary["val_per_final"] = summary["stages"][-1]["val_per"] if summary["stages"] else untrained.per
    return summary
