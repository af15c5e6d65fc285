"""Joint-stage experiments forked from one CTC-warm checkpoint: the unit every notebook and the sweep runs.

Every run built from the same checkpoint sees the same batches in the same order (the joint stage's loader
seeded by the run seed) and starts from the same weights, optimizer state and RNG state, so two runs that
differ in one setting differ only by that setting's effect.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from workbench.data import B2TDataset, make_loader
from workbench.device import pick_device, seed_everything
from workbench.instrument import GradNormProbe, LossAttribution, NonFiniteTracer, OptimizerCoverage, default_groups
from workbench.records import RunLogWriter
from workbench.records.traces import StepTraces
from workbench.train import (
    LoopSemantics, StepConfig, TrainConfig, TrainStep, build_optimizer, evaluate, get_semantics, model_from_checkpoint,
    run_training, seed_stages, set_trainable,
)
from workbench.train.loop import batches_forever, stage_loader, stage_seed
from workbench.train.optim import component_groups
from workbench.train.unfreeze import UnfreezePolicy

JOINT_STAGE_INDEX = 1


@dataclass(frozen=True)
class RunSettings:
    """Everything that distinguishes one joint-stage run. Defaults are the seed's joint stage."""

    name: str = "seed_faithful"
    steps: int = 20
    lr: float = 1e-5
    precision: str = "fp16"
    semantics: str = "seed_faithful"
    policy: str = "none"
    warmup: int = 0
    rebuild_at_unfreeze: bool = True
    clip: float | None = 1.0
    rnnt_normalization: str = "seed_sqrt_tu"
    optimizer: str = "adamw"
    init_scale: float = 65536.0
    batch_size: int = 4
    seed: int = 0
    ctc_only: bool = False
    attribution_steps: int = 2
    trace: bool = True
    # single-switch overrides of the named loop semantics (None keeps the preset's value)
    rebuild_optimizer: bool | None = None
    clip_scope: str | None = None
    zero_grad_scope: str | None = None

    def loop_semantics(self) -> LoopSemantics:
        overrides = {k: v for k, v in (("rebuild_optimizer", self.rebuild_optimizer),
                                       ("clip_scope", self.clip_scope),
                                       ("zero_grad_scope", self.zero_grad_scope)) if v is not None}
        return get_semantics(self.semantics, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RunResult:
    name: str
    settings: dict[str, Any]
    losses: dict[str, list[float]]
    skipped_steps: list[int]
    overflow_steps: list[int]
    first_nonfinite_loss_step: int | None
    first_nonfinite_param_step: int | None
    tracer_verdict: str | None
    outside_optimizer: list[str]
    attribution: list[dict]
    events: list[dict]
    global_grad_norm: list[float]
    scale: list[float | None]
    val_per: float | None
    val_rnnt_per: float | None
    wall_s: float
    log_path: str | None = None
    verdicts: list[dict] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-safe summary: non-finite floats become the strings "nan", "inf", "-inf"."""
        return json_safe(dataclasses.asdict(self))


def json_safe(value: Any) -> Any:
    """Recursively replace non-finite floats by strings so strict JSON can hold them."""
    if isinstance(value, float) and not np.isfinite(value):
        return "nan" if np.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def checkpoint_key(**settings: Any) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def ctc_warm_checkpoint(data: str | Path, preset: str, *, seed: int = 0, steps: int = 300, lr: float = 1e-3,
                        batch_size: int = 4, eval_every: int = 0, cache_dir: str | Path = "runs/cache",
                        log: Callable[[str], None] = print) -> tuple[Path, dict | None]:
    """Train (or load from a cache keyed by its settings) the CTC-warm checkpoint; returns (path, summary).

    The training summary (losses per step, validation PER every `eval_every` steps) is cached beside it.
    """
    key = checkpoint_key(data=str(Path(data).resolve()), preset=preset, seed=seed, steps=steps, lr=lr,
                         batch_size=batch_size, eval_every=eval_every)
    path = Path(cache_dir) / f"ctc_warm_{preset}_{key}.pt"
    summary_path = path.with_suffix(".json")
    if path.is_file() and summary_path.is_file():
        log(f"Loaded CTC-warm checkpoint from cache: {path}")
        return path, json.loads(summary_path.read_text())
    work = Path(cache_dir) / f"tmp_{key}"
    cfg = TrainConfig(preset=preset, data=str(data), out=str(work), seed=seed, batch_size=batch_size,
                      ctc_steps=steps, joint_steps=0, ctc_lr=lr, device="cpu", eval_every=eval_every)
    summary = run_training(cfg, log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(json_safe(summary), default=str))
    shutil.move(str(work / "ctc_warmup.pt"), path)
    shutil.rmtree(work, ignore_errors=True)
    return path, summary


def _stale_optimizer(model: torch.nn.Module, state: dict, settings: RunSettings) -> torch.optim.Optimizer:
    """The CTC stage's optimizer with its saved state, as the seed's loop keeps using it in the joint stage."""
    ctc_components = seed_stages(1, 0)[0].trainable
    groups = [g for g in component_groups(model) if g["name"] in ctc_components]
    optimizer = build_optimizer(groups, settings.lr, settings.optimizer)
    if state.get("optimizer") is not None and settings.optimizer == "adamw":
        optimizer.load_state_dict(state["optimizer"])
    for group in optimizer.param_groups:
        group["lr"] = settings.lr
    return optimizer


def _params_finite(model: torch.nn.Module) -> bool:
    norms = torch._foreach_norm([p.detach() for p in model.parameters()])
    return bool(torch.isfinite(torch.stack(norms)).all())


def run_joint(
    checkpoint: str | Path,
    data: str | Path,
    settings: RunSettings,
    *,
    log_path: str | Path | None = None,
    device: str = "cpu",
    on_step: Callable[[int, "RunState"], None] | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> RunResult:
    """One joint-stage run from a CTC-warm checkpoint, fully instrumented, optionally logged to HDF5."""
    t0 = time.perf_counter()
    dev = pick_device(device)
    model, state = model_from_checkpoint(checkpoint, dev)
    seed_everything(stage_seed(settings.seed, JOINT_STAGE_INDEX))
    stage = seed_stages(1, settings.steps)[JOINT_STAGE_INDEX]
    weights = stage.weights
    components = stage.trainable
    if settings.ctc_only:
        components = seed_stages(1, 0)[0].trainable
        weights = dataclasses.replace(weights, rnnt=0.0)
    set_trainable(model, components)
    policy = UnfreezePolicy(settings.policy, settings.warmup, rebuild=settings.rebuild_at_unfreeze)
    if not settings.ctc_only:
        policy.start(model)
    semantics = settings.loop_semantics()
    if semantics.rebuild_optimizer:
        optimizer = build_optimizer(component_groups(model), settings.lr, settings.optimizer)
    else:
        optimizer = _stale_optimizer(model, state, settings)

    groups = default_groups(model)
    probe = GradNormProbe(model, groups)
    coverage = OptimizerCoverage(model, probe=probe)
    attribution = LossAttribution(groups)
    step = TrainStep(model, optimizer,
                     StepConfig(precision=settings.precision, clip=settings.clip, init_scale=settings.init_scale,
                                rnnt_normalization=settings.rnnt_normalization, semantics=semantics),
                     dev, observers=[probe, coverage, attribution])
    tracer = NonFiniteTracer(max_traces=1) if settings.trace else None
    if tracer is not None:
        tracer.attach(step)

    writer = None
    if log_path is not None:
        writer = RunLogWriter(log_path, attrs={"settings": settings.to_dict(), "checkpoint": str(checkpoint),
                                               "torch": torch.__version__, "device": str(dev)})
        writer.declare_vector("param_grad_norm", probe.param_labels)
        if tracer is not None:
            tracer.verdict_listeners.append(lambda v: writer.log_event("tracer", {**v.to_dict(), "line": v.line()}))

    train_set = B2TDataset(data, "train")
    batches = batches_forever(stage_loader(train_set, settings.batch_size, settings.seed, JOINT_STAGE_INDEX))
    run = RunState(settings=settings)
    attribution.request(settings.attribution_steps, "joint stage start")
    for i in range(1, settings.steps + 1):
        plan = policy.plan(i, weights) if not settings.ctc_only else None
        if plan is not None:
            message = policy.apply(plan, step, settings.lr)
            if message:
                log(f"step {i}: {message}")
                run.events.append({"step": i, "event": plan.event, "message": message})
                attribution.request(settings.attribution_steps, "after unfreeze")
                if writer is not None:
                    writer.log_event("events", {"step": i, "event": plan.event, "message": message})
        step_weights = plan.weights if plan is not None else weights
        rnnt = plan.rnnt if plan is not None else False
        result = step(next(batches).to(dev), step_weights, rnnt=rnnt)
        finite_params = _params_finite(model)
        run.record(i, result, probe, coverage, finite_params)
        if writer is not None:
            writer.log_step(i, run.step_record(i, result, probe, step.optimizer, finite_params))
            finding = coverage.latest
            if finding is not None and finding.step == result.step and not finding.ok:
                writer.log_event("coverage", {"step": i, "line": finding.one_line(),
                                              "outside_optimizer": finding.outside_optimizer,
                                              "frozen_in_optimizer": finding.frozen_in_optimizer})
        if on_step is not None:
            on_step(i, run)

    for a in attribution.results:
        run.attribution.append(a.to_dict())
        if writer is not None:
            writer.log_event("attribution", a.to_dict())
    val_set = B2TDataset(data, "val")
    if run.first_nonfinite_param_step is None:
        ev = evaluate(model, make_loader(val_set, settings.batch_size, shuffle=False, seed=settings.seed), dev,
                      rnnt=not settings.ctc_only)
        val_per, val_rnnt_per = ev.per, ev.rnnt_per
    else:
        val_per = val_rnnt_per = None
    result = RunResult(
        name=settings.name, settings=settings.to_dict(), losses=run.losses, skipped_steps=run.skipped,
        overflow_steps=run.overflow, first_nonfinite_loss_step=run.first_nonfinite_loss_step,
        first_nonfinite_param_step=run.first_nonfinite_param_step,
        tracer_verdict=tracer.verdicts[0].line() if tracer is not None and tracer.verdicts else None,
        outside_optimizer=run.outside_optimizer, attribution=run.attribution, events=run.events,
        global_grad_norm=run.global_norm, scale=run.scale, val_per=val_per, val_rnnt_per=val_rnnt_per,
        wall_s=time.perf_counter() - t0, log_path=str(log_path) if log_path else None,
        verdicts=[v.to_dict() for v in tracer.verdicts] if tracer is not None else [],
    )
    if writer is not None:
        writer.set_attrs(summary=result.summary())
        writer.close()
    return result


@dataclass
class RunState(StepTraces):
    """What a run has recorded so far; live plots read it from `on_step` callbacks."""

    settings: RunSettings = field(default_factory=RunSettings)
    outside_optimizer: list[str] = field(default_factory=list)
    attribution: list[dict] = field(default_factory=list)
    first_nonfinite_param_step: int | None = None

    def record(self, i: int, result, probe: GradNormProbe, coverage: OptimizerCoverage, finite_params: bool) -> None:
        for k, v in result.losses.items():
            self.losses.setdefault(k, []).append(v)
        stats = probe.latest
        if stats is not None and stats.step == result.step:
            for g, v in stats.group_norm.items():
                self.group_norms.setdefault(g, []).append(v)
            for g, v in stats.group_nonfinite.items():
                self.group_nonfinite.setdefault(g, []).append(v)
            self.global_norm.append(stats.global_norm)
            if any(stats.group_nonfinite.values()) or result.reason == "nonfinite_grad":
                self.overflow.append(i)
        elif result.reason == "nonfinite_grad":
            self.overflow.append(i)
        self.scale.append(result.scale)
        if result.skipped:
            self.skipped.append(i)
        if self.first_nonfinite_loss_step is None and not np.isfinite(result.losses["total"]):
            self.first_nonfinite_loss_step = i
        if self.first_nonfinite_param_step is None and not finite_params:
            self.first_nonfinite_param_step = i
        finding = coverage.latest
        if finding is not None and finding.outside_optimizer and not self.outside_optimizer:
            self.outside_optimizer = [name for name, _ in finding.outside_optimizer]

    def step_record(self, i: int, result, probe: GradNormProbe, optimizer: torch.optim.Optimizer,
                    finite_params: bool) -> dict[str, Any]:
        rec: dict[str, Any] = {f"loss/{k}": v for k, v in result.losses.items()}
        rec.update({"skipped": result.skipped, "step_ms": result.ms, "params_finite": finite_params,
                    "nonfinite_grad": result.reason == "nonfinite_grad"})
        if result.scale is not None:
            rec["scaler/scale_before"] = result.scale
        if result.grad_norm is not None:
            rec["clip/total_norm"] = result.grad_norm
        for group in optimizer.param_groups:
            rec[f"lr/{group.get('name', 'group')}"] = group["lr"]
        if probe.latest is not None and probe.latest.step == result.step:
            rec.update(probe.records())
        return rec
