"""Joint-stage runs forked from one CTC-warm checkpoint: the unit every notebook, the explorer and the sweep run.

A run resumes staged training at the joint stage: the model and the CTC stage's optimizer (with its state) come
from the checkpoint, the run engine enters the joint stage (keeping that optimizer, as the seed's loop does, or
rebuilding it), and the stage runs fully instrumented. Every run built from the same checkpoint sees the same
batches in the same order (the joint stage's loader seeded by the run seed) and starts from the same weights,
optimizer state and RNG state, so two runs that differ in one setting differ only by that setting's effect.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import torch

from workbench.data import B2TDataset
from workbench.instrument import GradNormProbe, LossAttribution, NonFiniteTracer, OptimizerCoverage, default_groups
from workbench.instrument.tracer import CAPTURE_EVERY
from workbench.records import Recorder, RunRecord
from workbench.run.engine import RunEngine
from workbench.run.settings import RunSettings, SettingsError
from workbench.train.checkpoint import model_from_checkpoint
from workbench.train.device import pick_device
from workbench.train.evaluate import evaluate, validation_loader
from workbench.train.optim import build_optimizer, component_groups
from workbench.train.policies import make_policy
from workbench.train.stages import Stage, decoder_seed, seed_stages, set_trainable, stage_batches
from workbench.train.step import StepConfig, StepResult, TrainStep

OnStep = Callable[[int, RunRecord], None]


def joint_stage(settings: RunSettings) -> Stage:
    """The seed's joint stage at the run's lr; a CTC-only control keeps the CTC stage's components and never
    computes the RNN-T term."""
    ctc, joint = seed_stages(1, settings.steps, joint_lr=settings.lr)[:2]
    if not settings.ctc_only:
        return joint
    return dataclasses.replace(joint, weights=dataclasses.replace(joint.weights, rnnt=0.0), trainable=ctc.trainable,
                               run_rnnt=False)


def ctc_stage_optimizer(model: torch.nn.Module, state: dict, settings: RunSettings) -> torch.optim.Optimizer:
    """The CTC stage's optimizer as the checkpoint saved it (AdamW state restored), the one the joint stage starts
    from. With the seed's substring match the tensors it adds (rnnt_decoder.joint.encoder_proj) join it as one more
    group without state, as in the seed, where they never had a gradient."""
    ctc = seed_stages(1, 0)[0]
    set_trainable(model, ctc.trainable)
    optimizer = build_optimizer(component_groups(model), settings.lr, settings.optimizer)
    if state.get("optimizer") is not None and settings.optimizer == "adamw":
        optimizer.load_state_dict(state["optimizer"])
    if settings.loop_semantics().substring_match:
        exact = {id(p) for p in model.parameters() if p.requires_grad}
        set_trainable(model, ctc.trainable, substring=True)
        extra = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in exact]
        if extra:
            optimizer.add_param_group({"name": "substring match", "params": [p for _, p in extra],
                                       "lr": settings.lr})
    return optimizer


def _validate(model: torch.nn.Module, loader: Any, device: torch.device, step: int, *, rnnt: bool,
              reason: str) -> dict[str, Any]:
    return {"step": step, "reason": reason, **evaluate(model, loader, device, rnnt=rnnt).attrs()}


def run_joint(
    checkpoint: str | Path,
    data: str | Path,
    settings: RunSettings,
    *,
    log_path: str | Path | None = None,
    device: str = "cpu",
    on_step: OnStep | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> RunRecord:
    """One joint-stage run from a CTC-warm checkpoint, fully instrumented, optionally logged to HDF5.

    `on_step(i, record)` is called after every step with the record so far (live figures read it). The
    returned record holds every step's series, the events, and the results `val_per` / `val_rnnt_per` (the
    final validation, skipped when a parameter went non-finite) with the rest of `EvalResult.attrs("val_")` (the
    RNN-T length ratio, functional flag and S/D/I split, per-utterance errors) and `wall_s` in `attrs`.
    """
    t0 = time.perf_counter()
    dev = pick_device(device)
    # both splits are opened (and validated) before any step runs
    train_set, val_set = B2TDataset(data, "train"), B2TDataset(data, "val")
    val_loader = validation_loader(val_set, settings.batch_size, settings.seed)
    model, state = model_from_checkpoint(checkpoint, dev)
    if state.get("stage") == "ctc_warmup":
        # The CTC stage never trains the decoder: each seed draws its own fresh one.
        model.reset_decoder(decoder_seed(settings.seed))
    semantics = settings.loop_semantics()
    step = TrainStep(model, ctc_stage_optimizer(model, state, settings),
                     StepConfig(precision=settings.precision, clip=settings.clip, init_scale=settings.init_scale,
                                rnnt_normalization=settings.rnnt_normalization, semantics=semantics), dev)
    if settings.carry_scaler:
        if state.get("scaler") is None or step.scaler is None:
            raise SettingsError(f"carry_scaler: expected an fp16 run from a checkpoint whose CTC warmup ran in fp16 "
                                f"(with a GradScaler), got precision {settings.precision} and a checkpoint "
                                f"{'without' if state.get('scaler') is None else 'with'} one ({checkpoint})")
        step.scaler.load_state_dict(state["scaler"])
    groups = default_groups(model)
    probe = GradNormProbe(model, groups, update_ratio=True)
    instruments = [probe, OptimizerCoverage(model, probe=probe),
                   LossAttribution(groups, after_change=settings.attribution_steps)]
    if settings.trace:
        instruments.append(NonFiniteTracer(capture_every=CAPTURE_EVERY))
    record = RunRecord(settings.to_dict())
    recorder = Recorder(record, sources=instruments, log_path=log_path,
                        attrs={"checkpoint": str(checkpoint), "data": str(Path(data).resolve()),
                               "torch": torch.__version__, "device": str(dev)})
    engine = RunEngine(step, instruments=instruments, recorder=recorder, log=log)
    try:
        stage = joint_stage(settings)
        policy = None if settings.ctc_only else make_policy(settings.policy, settings.freeze_steps,
                                                            rebuild_at_unfreeze=settings.rebuild_at_unfreeze)
        engine.enter_stage(stage, seed=settings.seed, rebuild=semantics.rebuild_at_stage_change, policy=policy,
                           module_lr=settings.decoder_lr)
        batches = stage_batches(train_set, settings.batch_size, settings.seed, stage)
        rnnt = not settings.ctc_only
        if settings.eval_at_start:
            recorder.event("validation", _validate(model, val_loader, dev, 0, rnnt=rnnt, reason="before step 1"))
        attached = engine.policy.attach_step
        eval_step = attached + settings.eval_after_attach - 1 if settings.eval_after_attach else None

        def after_step(i: int, result: StepResult) -> None:
            if i == eval_step or on_step is not None:
                step.settle()  # the record up to step i: its parameter check may wait for the next step's copy
            if i == eval_step and record.first_nonfinite_param_step() is None:
                recorder.event("validation", _validate(
                    model, val_loader, dev, i, rnnt=rnnt,
                    reason=f"{settings.eval_after_attach} steps after the decoder's first trainable step {attached}"))
            if on_step is not None:
                on_step(i, record)

        engine.run(batches, settings.steps, after_step)
        results = {"val_per": None, "val_rnnt_per": None}
        if settings.eval_at_end and record.first_nonfinite_param_step() is None:
            results = evaluate(model, val_loader, dev, rnnt=rnnt).attrs("val_")
    except BaseException as exc:
        engine.close("failed", error=repr(exc).replace("\n", " "), wall_s=time.perf_counter() - t0)
        raise
    engine.close(**results, wall_s=time.perf_counter() - t0)
    return record
