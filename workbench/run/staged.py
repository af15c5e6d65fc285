"""The staged training loop (CTC warmup -> joint -> mode), readable top to bottom.

Each stage draws its batches from its own iterator, and re-seeds torch's RNG (dropout), from (seed, stage index),
so a run that starts its joint stage from a saved CTC-warm checkpoint sees exactly the batches and dropout masks
the full run would have seen.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader

from workbench.data import B2TDataset, make_loader
from workbench.device import pick_device, seed_everything
from workbench.model import HybridModel, get_config
from workbench.train.checkpoint import load_checkpoint, save_checkpoint
from workbench.train.evaluate import evaluate
from workbench.train.optim import build_optimizer, component_groups, optimizer_params, optimizer_size
from workbench.train.stages import Stage, seed_stages, set_trainable
from workbench.train.step import StepConfig, TrainStep, get_semantics


@dataclass
class TrainConfig:
    preset: str = "small"
    data: str = "data_samples"
    out: str = "runs/train"
    seed: int = 0
    batch_size: int = 4
    ctc_steps: int = 300
    joint_steps: int = 20
    mode_steps: int = 0
    ctc_lr: float = 1e-3
    joint_lr: float = 1e-5
    mode_lr: float = 1e-5
    precision: str = "fp32"
    clip: float | None = 1.0
    semantics: str = "corrected"
    rnnt_normalization: str = "seed_sqrt_tu"
    device: str = "auto"
    max_sessions: int | None = None
    resume_from: str | None = None
    eval_every: int = 0


@dataclass
class StageReport:
    name: str
    steps: int
    losses: list[dict[str, float]] = field(default_factory=list)
    skipped: int = 0
    median_ms: float = 0.0
    val_per: float | None = None
    val_rnnt_per: float | None = None
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    checkpoint: str | None = None


def batches_forever(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


def stage_seed(seed: int, stage_index: int) -> int:
    """The seed of a stage's data order and of torch's RNG (dropout) at the stage's start."""
    return seed * 1000 + stage_index


def stage_loader(dataset: B2TDataset, batch_size: int, seed: int, stage_index: int) -> DataLoader:
    return make_loader(dataset, batch_size, shuffle=True, seed=stage_seed(seed, stage_index), drop_last=True)


def progress_line(i: int, n: int, losses: dict[str, float], ms: float, skipped: bool) -> str:
    terms = " ".join(f"{k} {v:.4f}" for k, v in losses.items() if k != "total")
    flag = " | SKIPPED (non-finite)" if skipped else ""
    return f"  Batch {i}/{n} ({100 * i / n:.0f}%) | Loss {losses['total']:.4f} | {ms:.0f} ms/batch | {terms}{flag}"


def should_log(i: int, n: int) -> bool:
    return i == 1 or i == n or i % max(1, n // 10) == 0


def run_training(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict:
    """Train the stages in `cfg`; save a checkpoint after each; return a summary dict."""
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    train_set = B2TDataset(cfg.data, "train", max_sessions=cfg.max_sessions)
    val_set = B2TDataset(cfg.data, "val", max_sessions=cfg.max_sessions)
    val_loader = make_loader(val_set, cfg.batch_size, shuffle=False, seed=cfg.seed)
    model = HybridModel(get_config(cfg.preset)).to(device)
    stages = seed_stages(cfg.ctc_steps, cfg.joint_steps, cfg.mode_steps,
                         ctc_lr=cfg.ctc_lr, joint_lr=cfg.joint_lr, mode_lr=cfg.mode_lr)
    done: set[str] = set()
    if cfg.resume_from:
        state = load_checkpoint(cfg.resume_from, map_location=device)
        model.load_state_dict(state["model"])
        names = [s.name for s in seed_stages(1, 1, 1)]
        done = set(names[: names.index(state["stage"]) + 1])
        log(f"Resumed from {cfg.resume_from} (completed stage {state['stage']})")
    semantics = get_semantics(cfg.semantics)
    log(f"Device {device} | preset {cfg.preset} | precision {cfg.precision} | loop semantics {semantics.name} | "
        f"train {len(train_set)} trials / val {len(val_set)} trials from {len(train_set.sessions)} sessions")

    untrained = evaluate(model, val_loader, device)
    log(f"Validation PER before training: {untrained.per:.3f}")
    summary = {"config": cfg.__dict__.copy(), "device": str(device), "val_per_initial": untrained.per,
               "stages": []}
    step_cfg = StepConfig(precision=cfg.precision, clip=cfg.clip, rnnt_normalization=cfg.rnnt_normalization,
                          semantics=semantics)
    stepper: TrainStep | None = None
    for index, stage in enumerate(stages):
        if stage.name in done:
            continue
        rep, stepper = run_stage(model, stage, index, train_set, val_loader, cfg, step_cfg, device, stepper, log)
        result = evaluate(model, val_loader, device, rnnt=stage.run_rnnt)
        rep.val_per, rep.val_rnnt_per = result.per, result.rnnt_per
        rnnt_part = f" | RNN-T greedy PER {result.rnnt_per:.3f}" if result.rnnt_per is not None else ""
        log(f"Stage {stage.name} done | {rep.skipped} skipped | median {rep.median_ms:.0f} ms/batch | "
            f"validation PER {result.per:.3f}{rnnt_part}")
        ckpt = save_checkpoint(Path(cfg.out) / f"{stage.name}.pt", model, stage=stage.name, step=stage.steps,
                               seed=cfg.seed, optimizer=stepper.optimizer, scaler=stepper.scaler)
        rep.checkpoint = str(ckpt)
        summary["stages"].append(rep.__dict__)
    summary["val_per_final"] = summary["stages"][-1]["val_per"] if summary["stages"] else untrained.per
    return summary


def run_stage(model: HybridModel, stage: Stage, index: int, train_set: B2TDataset, val_loader: DataLoader,
              cfg: TrainConfig, step_cfg: StepConfig, device: torch.device, stepper: TrainStep | None,
              log: Callable[[str], None]) -> tuple[StageReport, TrainStep]:
    """Configure trainable components and the optimizer for `stage`, then run its steps.

    With `cfg.eval_every` > 0 the validation PER is measured every that many steps (`report.val_curve`).
    """
    log(f"Stage transition -> {stage.name} (lr {stage.lr:g}, weights {stage.weights})")
    trainable = set_trainable(model, stage.trainable)
    if stepper is None or step_cfg.semantics.rebuild_optimizer:
        optimizer = build_optimizer(component_groups(model), stage.lr)
        tensors, elements = optimizer_size(optimizer)
        log(f"Created optimizer for {tensors} parameter tensors ({elements:,} elements)")
        if stepper is None:
            stepper = TrainStep(model, optimizer, step_cfg, device)
        else:
            stepper.optimizer = optimizer
    else:
        for group in stepper.optimizer.param_groups:
            group["lr"] = stage.lr
        held = {id(p) for p in optimizer_params(stepper.optimizer)}
        outside = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
        tensors, elements = optimizer_size(stepper.optimizer)
        log(f"Kept optimizer from the previous stage: {tensors} parameter tensors ({elements:,} elements); "
            f"{len(outside)} of {len(trainable)} trainable tensors are outside it")

    report = StageReport(stage.name, stage.steps)
    seed_everything(stage_seed(cfg.seed, index))
    times = []
    batches = batches_forever(stage_loader(train_set, cfg.batch_size, cfg.seed, index))
    for i in range(1, stage.steps + 1):
        batch = next(batches).to(device)
        result = stepper(batch, stage.weights, rnnt=stage.run_rnnt, mode=stage.run_mode)
        report.losses.append(result.losses)
        report.skipped += result.skipped
        times.append(result.ms)
        if should_log(i, stage.steps):
            log(progress_line(i, stage.steps, result.losses, result.ms, result.skipped))
        if cfg.eval_every and i % cfg.eval_every == 0:
            report.val_curve.append((i, evaluate(model, val_loader, device).per))
    report.median_ms = statistics.median(times)
    return report, stepper
