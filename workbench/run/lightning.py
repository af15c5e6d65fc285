"""Lightning integration: the workbench's instruments on any `LightningModule`'s training, and step-granular
gradual unfreezing. Needs the `lightning` extra (`pip install 'rnnt-workbench[lightning]'`).

`WorkbenchCallback` attaches, for `trainer.fit`, what a workbench run has:

- the gradient-norm probe (`GradNormProbe`, per group) at `on_before_optimizer_step`, where Lightning has run the
  backward(s) and, under `16-mixed`, `scaler.unscale_(optimizer)`, and has not clipped yet;
- what the optimizer did (`workbench.run.updates.OptimizerUpdates`, the observer `watch` and `byo.instrument`
  use): update ratio, tensors not updated and tensors whose gradient was not cleared since the last step
  (gradient pre-hooks, removed when fit ends) per group, bracketed by `on_before_optimizer_step` and the end of
  the step (Lightning's closure runs the backward inside `optimizer.step`, after torch's step pre-hook);
- the optimizer-coverage check (`OptimizerCoverage`): trainable tensors with a gradient the optimizer does not
  hold, frozen tensors it holds;
- the run log: every optimizer step through `Recorder.record_step` into the same HDF5 run log as the workbench's
  own runs (`workbench trace`, `workbench report`, `read_record` and `workbench export` read it), closed
  "finished" when fit ends and "failed" (with the error and last step) on an exception;
- the outcome rules (`records.classify`: diverged / stalled / healthy), printed when fit ends and returned by
  `summary()`;
- the non-finite tracer, which replays the first non-finite steps through a `TrainStep` that mirrors Lightning's
  loop (see "Replay" below) and names the first non-finite tensor and the causal chain.

Cost per optimizer step: the probe's and the update observer's device reductions (the observer takes the probe's
gradient norms: both read the gradients at the same moment) and ONE device-to-host copy (a `HostPacket` the probe
and the observer queue in, as under a TrainStep), which also carries the loss (and every other 0-d float tensor
`training_step` returns in its dict, as a loss term), the GradScaler's found-inf verdict (`GradNormProbe.carry`) and
the parameters' non-finite check (`workbench.run.param_screen`, as `watch` checks them: a parameter the update
wrote by the norm of its change, any other only when its version counter moved; a write through `.data` is not
seen). The clip coefficient is computed on the
host from the per-parameter norms. Values go to the trainer's loggers (`trainer.loggers[*].log_metrics`, every
`log_every` steps, under `workbench/...`) as host floats, so logging adds no device work or sync (`self.log`
would make one device tensor and one `.item()` per value). While the tracer is on (until it has the causal
chain, or `trace=False`) every `CAPTURE_EVERY` steps (16; sooner when 2 s of training passed) a step also copies the
model and optimizer state (`instrument.replay.capture`), and every step notes its inputs (see "Replay").

Run-log keys per step are those of `records.recorder.step_row` (`loss/<term>` with `loss/total`, `skipped` and
`nonfinite_grad` (the GradScaler skipped the update; Lightning applies every update without one), `step_ms`,
`scaler/scale_before`, `clip/total_norm` (over the optimizer's parameters, as Lightning clips) and
`clip/coefficient` (`min(1, gradient_clip_val / (total norm + 1e-6))` when `gradient_clip_val` is set),
`lr/<group>`, `params_finite`, `params_nonfinite/*`), plus the probe's and the coverage's series. Steps are
Lightning's optimizer steps, counted from 1 (`trainer.global_step` after the step).

Kept bundle (for `workbench diagnose`). With a log, while the tracer runs, the callback keeps beside the log the
replay bundle of the run's first step at which the evidence appears (`workbench.run.kept`: the first non-finite
step, else the first with a trainable tensor outside the optimizer, else the earliest), with the module's class
and `hparams`; diagnose continues it through the same replay of `training_step`. The bundle of a step that is
not a capture is rebuilt from the chain (see "Replay") only when the keeper takes it: at most once per kind.

Replay (the tracer). A replay bundle is captured at an optimizer step's first micro-batch (`on_train_batch_start`)
every `CAPTURE_EVERY` steps, and at every step its inputs are noted (the batches, by reference, the later
micro-batches of a gradient-accumulation window included; each group's settings; the RNG state):
`workbench.instrument.replay_chain.ReplayChain`. A non-finite step's bundle is rebuilt by re-running the steps since
the last capture on a replica, each checked against the losses the live step logged (a mismatch leaves the step
untraced, with why). A new base is captured whenever a re-run could not reproduce the live steps (the optimizer
rebuilt or its groups changed, a `requires_grad` flipped, a parameter written between steps) and, with gradient
accumulation, at each epoch's start (its last window may be shorter). Bundles are replayed by a `TrainStep` whose loss
calls the replica module's `training_step(batch, batch_idx)` (with `self.global_step` and `self.current_epoch` of
the step; `self.log` there does nothing) under the run's autocast, with `LIGHTNING_SEMANTICS`:
`optimizer.zero_grad()` over the optimizer's parameters, the loss divided by the window's micro-batches, the
GradScaler under `16-mixed`, the clip over the optimizer's parameters, and no skip of non-finite updates without a
GradScaler, as Lightning's automatic optimization does. A replay cannot be faithful, and the tracer is switched off
(the reason goes to the run log's `tracer_off` attribute and `log`), under: manual optimization, a module overriding
`optimizer_step`, `optimizer_zero_grad`, `backward` or `configure_gradient_clipping`,
`gradient_clip_algorithm="value"`, a strategy over more than one device, or a precision other than 32/64-true,
bf16-mixed, 16-mixed, bf16-true and 16-true. An epoch's last accumulation window, when shorter, is replayed with its
loss divided by its own length (Lightning divides by `accumulate_grad_batches`). A `training_step` that needs more
of the trainer fails in the replay; the tracer then stops and says so.

`StepUnfreeze` is a `BaseFinetuning` callback whose freezing is step-granular: named submodules are frozen before
training and unfrozen at the first optimizer step after `freeze_steps`, either added to the running optimizer as
a new parameter group (`how="add_group"`) or with the optimizer rebuilt (`how="rebuild"`, through
`workbench.train.optim.change_optimizer`: same kind and settings, fresh state, one group per top-level component).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import lightning
import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BaseFinetuning, Callback
from lightning.pytorch.utilities.model_helpers import is_overridden

from workbench.instrument import GradNormProbe, NonFiniteTracer, OptimizerCoverage, ParamGroups
from workbench.instrument.replay_chain import ReplayMismatch
from workbench.instrument.tracer import CAPTURE_EVERY
from workbench.records import Recorder, RunRecord, classify, summarize
from workbench.run.byo import UserBatch, _param_groups
from workbench.run.kept import BundleKeeper, import_path, optimizer_layout
from workbench.run.param_screen import ParamScreen
from workbench.run.updates import OptimizerUpdates
from workbench.train import compat
from workbench.train.optim import change_optimizer, optimizer_params
from workbench.train.host import HostPacket
from workbench.train.step import LoopSemantics, StepConfig, StepContext, StepResult, TrainStep

__all__ = ["LIGHTNING_SEMANTICS", "LightningSetupError", "StepUnfreeze", "WorkbenchCallback", "configured_optimizer",
           "precision_of", "training_step_loss"]

# Lightning's automatic optimization as TrainStep switches: zero_grad and clip over the optimizer's parameters,
# non-finite updates applied (a GradScaler, under 16-mixed, skips them itself).
LIGHTNING_SEMANTICS = LoopSemantics("lightning", rebuild_at_stage_change=False, clip_scope="optimizer",
                                    zero_grad_scope="optimizer", unscale_before_clip=True, nonfinite_policy="continue")

_PRECISIONS = {"32-true": "fp32", "32": "fp32", "64-true": "fp32", "64": "fp32", "bf16-true": "fp32",
               "16-true": "fp32", "bf16-mixed": "bf16", "16-mixed": "fp16"}
# The module hooks that change the loop a replay mirrors.
_LOOP_HOOKS = ("optimizer_step", "optimizer_zero_grad", "backward", "configure_gradient_clipping")
# Series sent to the trainer's loggers (prefix match).
LOGGED = ("loss/", "grad_norm/", "clip/", "update_ratio/", "outside_optimizer/", "scaler/scale_before", "skipped")
_CARRY = "carry/"


class LightningSetupError(ValueError):
    """A LightningModule or Trainer the callback cannot instrument; one line saying what and what to do."""


def precision_of(trainer: pl.Trainer) -> str | None:
    """The workbench precision ("fp32", "bf16", "fp16") the trainer's precision corresponds to; None when a replay
    cannot mirror it."""
    return _PRECISIONS.get(str(trainer.precision))


def _scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled() else None


def _loss_terms(output: Any) -> dict[str, torch.Tensor]:
    """`training_step`'s output as loss terms: {"total": loss, <key>: every other 0-d float tensor of a dict}."""
    if isinstance(output, torch.Tensor):
        return {"total": output}
    if isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        terms = {"total": output["loss"]}
        terms.update({str(k): v for k, v in output.items() if k != "loss" and isinstance(v, torch.Tensor)
                      and v.ndim == 0 and v.is_floating_point()})
        return terms
    return {}


def _window_mean(values: list[torch.Tensor], micro: int) -> torch.Tensor:
    """The mean over a window of `micro` micro-batches as a TrainStep accumulates it (each value divided by the
    window's length, added in order), so a replay's re-run reproduces it to the last bit."""
    total = values[0] / micro
    for v in values[1:]:
        total = total + v / micro
    return total


def _json_hparams(module: pl.LightningModule) -> dict[str, Any] | None:
    """The module's `hparams` when they are plain JSON values (diagnose rebuilds the module from them), else None."""
    try:
        hparams = dict(module.hparams)
        json.dumps(hparams, allow_nan=False)
    except (TypeError, ValueError):
        return None
    return hparams


class _ReplayTrainer:
    """What a replica module's `self.trainer` is during a replay: the step's `global_step` and `current_epoch`,
    and `barebones` (so `self.log` returns at once); anything else is an AttributeError naming it."""

    barebones = True
    training = True
    sanity_checking = False

    def __init__(self, global_step: int, current_epoch: int) -> None:
        self.global_step, self.current_epoch = global_step, current_epoch

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"a replay has no trainer.{name}")


class _TrainingStepLoss:
    """TrainStep's loss hook for a replay: the replica module's own `training_step` on the captured batch, with
    `self.global_step` and `self.current_epoch` as they were at the step."""

    def __call__(self, model: torch.nn.Module, batch: UserBatch, weights: Any, *, rnnt: bool, mode: bool,
                 normalization: str) -> dict[str, torch.Tensor]:
        data, batch_idx, global_step, epoch = batch.data
        with compat.attached_trainer(model, _ReplayTrainer(global_step, epoch)), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            terms = _loss_terms(model.training_step(data, batch_idx))
        if not terms:
            raise RuntimeError("training_step returned no loss in the replay")
        return terms


def training_step_loss(module: pl.LightningModule, data: Any) -> dict[str, torch.Tensor]:
    """The module's `training_step` on a kept bundle's captured batch `data` ((batch, batch_idx, global_step,
    epoch)), as the tracer's replay runs it: `workbench diagnose` continues a Lightning run with it."""
    return _TrainingStepLoss()(module, UserBatch(data), None, rnnt=False, mode=False, normalization="")


def configured_optimizer(module: pl.LightningModule) -> torch.optim.Optimizer:
    """The first optimizer `module.configure_optimizers()` returns (an optimizer, a list or tuple whose first
    entry is one or a list of them, or a dict with "optimizer"), built over the module's trainable tensors as they
    are now."""
    found: Any = module.configure_optimizers()
    while not isinstance(found, torch.optim.Optimizer):
        if isinstance(found, Mapping) and "optimizer" in found:
            found = found["optimizer"]
        elif isinstance(found, (list, tuple)) and found:
            found = found[0]
        else:
            raise LightningSetupError(f"{type(module).__qualname__}.configure_optimizers returned "
                                      f"{type(found).__name__}: expected an optimizer")
    return found


class _ProbeSource:
    """The probe as the recorder sees it: its row without the values carried in its host copy."""

    def __init__(self, probe: GradNormProbe) -> None:
        self.probe = probe
        self.vector_labels = probe.vector_labels

    def row(self, step: int) -> dict[str, Any]:
        return {k: v for k, v in self.probe.row(step).items() if not k.startswith(_CARRY)}

    def events(self, step: int) -> list[tuple[str, dict[str, Any]]]:
        return []


@dataclasses.dataclass
class _Ctx:
    """What the probe, the coverage and the update observer read of a step; `packet` is the step's one copy."""

    step: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    packet: HostPacket | None = None


class WorkbenchCallback(Callback):
    """The workbench's instruments and run log on a LightningModule's `trainer.fit` (see the module docstring).

    log_path: the HDF5 run log to write (its folder is created; `overwrite` replaces a file there, else an
        existing file is an error before training starts); None keeps the record in memory only (`record`).
    groups: parameter groups as `workbench.run.byo.instrument` takes them (None: the module's `param_groups()`,
        else one group per top-level child module).
    trace: replay the first non-finite steps (at most `max_traces`) and record the causal chain.
    log_every: send values to the trainer's loggers every this many optimizer steps (None: the trainer's
        `log_every_n_steps`; 0: never).
    log: where the callback's lines go (coverage findings, tracer verdicts, the outcome at the end).

    After fit: `record` (the RunRecord), `summary()` (`records.summarize`), `outcome()` (`records.classify`).
    Nothing of the callback stays on the module or the trainer's objects: its gradient pre-hooks are removed and
    the probe, coverage, update observer and tracer released when fit ends.
    """

    def __init__(self, log_path: str | Path | None = None, *, groups: Any = None, trace: bool = True,
                 max_traces: int = 3, log_every: int | None = None, overwrite: bool = False, name: str | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.log_path = None if log_path is None else Path(log_path)
        self.groups_spec = groups
        self.trace = trace
        self.max_traces = max_traces
        self.log_every = log_every
        self.overwrite = overwrite
        self.name = name
        self.say = log  # not self.log: Lightning sets every callback's .log to the module's log()
        self.record: RunRecord | None = None
        self.recorder: Recorder | None = None
        self.probe: GradNormProbe | None = None
        self.updates: OptimizerUpdates | None = None
        self.coverage: OptimizerCoverage | None = None
        self.tracer: NonFiniteTracer | None = None
        self.train_step: TrainStep | None = None
        self.tracer_off: str | None = None
        self.keeper: BundleKeeper | None = None
        self.screen: ParamScreen | None = None
        self._reset_step()
        self._reported: set[tuple[str, ...]] = set()

    # ------------------------------------------------------------------------------------------- set-up

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.log_path is not None and self.log_path.exists() and not self.overwrite:
            raise LightningSetupError(f"WorkbenchCallback: run log {self.log_path} already exists; choose another "
                                      f"log_path, or pass overwrite=True to replace it")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = self._optimizer(trainer, pl_module)
        groups: ParamGroups = _param_groups(pl_module, self.groups_spec)
        self.probe = GradNormProbe(pl_module, groups)
        self.updates = OptimizerUpdates(pl_module, groups, optimizer)
        self.updates.marks.hook()  # gradients not cleared since the last step (stale_grad/<group>)
        self._named = dict(pl_module.named_parameters())
        self._names = {id(p): n for n, p in self._named.items()}
        self.screen = ParamScreen(self._named)
        self._verdicts_said = 0
        self.coverage = OptimizerCoverage(pl_module, probe=self.probe)
        precision = precision_of(trainer)
        self.tracer_off = self._replay_unsupported(trainer, pl_module) if self.trace else "trace=False"
        clip = trainer.gradient_clip_val if trainer.gradient_clip_algorithm != "value" else None
        if self.tracer_off is None:
            config = StepConfig(precision=precision, clip=None if clip is None else float(clip),
                                semantics=LIGHTNING_SEMANTICS)
            self.train_step = TrainStep(pl_module, optimizer, config, pl_module.device, scaler=_scaler(trainer),
                                        loss_fn=_TrainingStepLoss())
            # the callback holds the module's parameters fixed from fit start (as its other instruments do)
            self.tracer = NonFiniteTracer(max_traces=self.max_traces, capture_every=CAPTURE_EVERY,
                                          params=list(self._named.values()))
            self.tracer.attach(self.train_step)
        elif self.trace:
            self.say(f"workbench: the non-finite tracer is off: {self.tracer_off}")
        settings = {
            "name": self.name or (self.log_path.stem if self.log_path else type(pl_module).__qualname__),
            "model": type(pl_module).__qualname__, "optimizer": type(optimizer).__qualname__,
            "precision": str(trainer.precision), "clip": clip, "clip_algorithm": str(trainer.gradient_clip_algorithm),
            "accumulate_grad_batches": trainer.accumulate_grad_batches, "max_steps": trainer.max_steps,
            "max_epochs": trainer.max_epochs, "semantics": dataclasses.asdict(LIGHTNING_SEMANTICS),
            "groups": dict(groups.items()), "source": "lightning",
        }
        self.record = RunRecord(settings)
        sources = [_ProbeSource(self.probe), self.coverage, self.updates] + \
            ([self.tracer] if self.tracer is not None else [])
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        attrs = {"torch": torch.__version__, "lightning": lightning.__version__, "device": str(pl_module.device),
                 "tracer_off": self.tracer_off or ""}
        self.recorder = Recorder(self.record, sources=sources, log_path=self.log_path, overwrite=self.overwrite,
                                 attrs=attrs)
        scaler = _scaler(trainer)
        if scaler is not None:
            self.recorder.note(scaler={"init_scale": scaler.get_scale(),
                                       "growth_interval": scaler.get_growth_interval(),
                                       "growth_factor": scaler.get_growth_factor(),
                                       "backoff_factor": scaler.get_backoff_factor()})
        if self.log_path is not None and self.tracer is not None:
            self.keeper = BundleKeeper(self.log_path, self.recorder, {
                "source": "lightning", "model_class": import_path(type(pl_module)),
                "hparams": _json_hparams(pl_module), "precision": precision, "clip": settings["clip"],
                "semantics": dataclasses.asdict(LIGHTNING_SEMANTICS)}, say=self.say)
        self._t_fit = time.perf_counter()

    @staticmethod
    def _optimizer(trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.optim.Optimizer:
        name = type(pl_module).__qualname__
        if not pl_module.automatic_optimization:
            raise LightningSetupError(f"WorkbenchCallback: {name} uses manual optimization; the callback instruments "
                                      f"automatic optimization (one optimizer, stepped by Lightning)")
        optimizers = trainer.optimizers
        if not optimizers or type(optimizers[0]).__name__ == "_MockOptimizer":
            raise LightningSetupError(f"WorkbenchCallback: {name}.configure_optimizers returned no optimizer; return "
                                      f"the optimizer that trains the module "
                                      f"(e.g. torch.optim.AdamW(self.parameters()))")
        return optimizers[0]

    @staticmethod
    def _replay_unsupported(trainer: pl.Trainer, pl_module: pl.LightningModule) -> str | None:
        """Why a replay would not be the step Lightning ran (None when it is)."""
        if precision_of(trainer) is None:
            return f"precision {trainer.precision!r} has no replay"
        hooks = [h for h in _LOOP_HOOKS if is_overridden(h, pl_module, pl.LightningModule)]
        if hooks:
            return f"{type(pl_module).__qualname__} overrides {', '.join(hooks)}, which a replay does not run"
        if trainer.gradient_clip_val and trainer.gradient_clip_algorithm == "value":
            return "gradient_clip_algorithm='value' (a replay clips by norm)"
        if trainer.world_size > 1 or len(trainer.device_ids) > 1:
            return f"{type(trainer.strategy).__name__} over {trainer.world_size} processes (a replay runs one)"
        return None

    # ------------------------------------------------------------------------------------------- per step

    def _reset_step(self) -> None:
        self._t0: float | None = None
        self._loss: torch.Tensor | None = None
        self._terms: dict[str, list[torch.Tensor]] = {}  # each micro-batch's value of every other term
        self._micro = 0
        self._stepped = False
        self._found_inf: torch.Tensor | None = None
        self._lrs: dict[str, float] = {}
        self._optimizer_now: torch.optim.Optimizer | None = None
        self._packet: HostPacket | None = None
        self._kept: dict[str, Any] | None = None  # the optimizer's layout at this step's start, while keeping
        self._trainable: list[bool] = []  # every parameter's requires_grad at this step's start

    @property
    def active(self) -> bool:
        return self.recorder is not None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self.active:
            return
        if self._t0 is None:
            self._t0 = time.perf_counter()
        first = self._micro == 0
        self._micro += 1
        if self.tracer is None or self.train_step is None:
            return
        step = trainer.global_step + 1
        captured = UserBatch((batch, batch_idx, trainer.global_step, trainer.current_epoch))
        if first:
            self.train_step.optimizer = trainer.optimizers[0]  # StepUnfreeze may have rebuilt it
            self.train_step.step_index = step
            if batch_idx == 0 and trainer.accumulate_grad_batches > 1:
                self.tracer.rebase()  # the last window may be shorter, and a replay divides its loss differently
            ctx = StepContext(step, pl_module, trainer.optimizers[0], self.train_step.scaler, [captured], None)
            self.tracer.on_step_start(ctx)
            self._trainable = [p.requires_grad for p in self._named.values()]
            if self.keeper is not None and not self.keeper.done:
                self._kept = optimizer_layout(trainer.optimizers[0], pl_module, self._names)
        else:
            self.tracer.add_batch(captured)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.active:
            return
        terms = _loss_terms(outputs)
        if terms:
            loss = terms.pop("total").detach()
            self._loss = loss if self._loss is None else self._loss + loss
            for k, v in terms.items():
                self._terms.setdefault(k, []).append(v.detach())
        if self._stepped:
            self._end_step(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if not self.active:
            return
        step = trainer.global_step + 1
        scaler = _scaler(trainer)
        self._packet = HostPacket()
        ctx = _Ctx(step, pl_module, optimizer, scaler, self._packet)
        self.probe.on_after_backward(ctx)
        self.coverage.on_after_backward(ctx)
        self.updates.before(optimizer, self.probe.grad_norms)  # the same gradients: the probe's norms serve
        if scaler is not None:
            found = compat.found_inf(scaler, optimizer)
            self._found_inf = torch.stack([f.reshape(()) for f in found]).sum() if found else None
        self._lrs = {str(g.get("name", f"group{k}")): float(g["lr"]) for k, g in enumerate(optimizer.param_groups)}
        self._optimizer_now = optimizer
        self._stepped = True
        if self.tracer is not None and self._trainable != [p.requires_grad for p in self._named.values()]:
            # the module's on_train_batch_start runs after the callbacks': a tensor it made trainable there is
            # trainable in this step's forward and backward, so the bundle's replay must make it trainable too
            self.tracer.set_trainable([n for n, p in self._named.items() if p.requires_grad])

    def _end_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the optimizer step of this window: one host copy, the row, the logs, the tracer."""
        step = trainer.global_step
        micro, optimizer = self._micro, self._optimizer_now
        carried: dict[str, torch.Tensor] = {}
        if self._loss is not None:
            carried[f"{_CARRY}loss/total"] = self._loss
            # Lightning's loss is already divided by the window (ClosureResult): its sum is the window's mean
            carried.update({f"{_CARRY}loss/{k}": _window_mean(values, micro) for k, values in self._terms.items()})
        if self._found_inf is not None:
            carried[f"{_CARRY}found_inf"] = self._found_inf
        self.probe.carry(carried)
        ctx = _Ctx(step, pl_module, optimizer, _scaler(trainer), self._packet)
        self.updates.after()
        if self.tracer is not None:
            self.tracer.updated()
        packet = self._packet
        assert packet is not None and self.screen is not None  # on_before_optimizer_step made it
        self.probe.on_pack(ctx)
        self.updates.pack(packet)
        check = self.screen.queue(packet, self.screen.moved(), self.updates.pending_inside())
        packet.read()  # the step's one host copy
        self.probe.on_step_end(ctx)
        self.coverage.on_step_end(ctx)
        self.updates.on_step_end(ctx)
        stats = self.probe.latest if self.probe.latest is not None and self.probe.latest.step == step else None
        extra = stats.extra if stats is not None else {}
        row: dict[str, Any] = {k[len(_CARRY):]: v for k, v in extra.items() if k.startswith(f"{_CARRY}loss/")}
        found_inf = extra.get(f"{_CARRY}found_inf", 0.0)
        skipped = bool(found_inf > 0) if stats is not None else self._loss is None
        row.update({"skipped": skipped, "nonfinite_grad": bool(found_inf > 0),
                    "step_ms": (time.perf_counter() - (self._t0 or time.perf_counter())) * 1000.0})
        if stats is not None and stats.scale is not None:
            row["scaler/scale_before"] = stats.scale
        total = None
        if stats is not None:
            held = self.updates.held(optimizer)
            in_opt = [n for n, name in zip(stats.param_norm, stats.param_names) if id(self._named[name]) in held]
            total = float(np.sqrt(np.sum(np.square(np.asarray(in_opt, dtype=np.float64))))) if in_opt else 0.0
            row["clip/total_norm"] = total
            clip = self._clip(trainer)
            if clip is not None:
                row["clip/coefficient"] = math.nan if math.isnan(total) else min(1.0, clip / (total + 1e-6))
        row.update({f"lr/{k}": v for k, v in self._lrs.items()})
        update = self.updates.latest
        bad, elements = self.screen.settle(check, update.diff if update is not None else {})
        tensors = len(bad)
        row.update({"params_finite": tensors == 0, "params_nonfinite/tensors": tensors,
                    "params_nonfinite/elements": elements})
        losses = {k[len("loss/"):]: v for k, v in row.items() if k.startswith("loss/")}
        grads_bad = stats is not None and bool(np.any(stats.param_nonfinite))
        nonfinite = grads_bad or bool(tensors) or any(not math.isfinite(v) for v in losses.values())
        self._trace(step, pl_module, losses, skipped, total, stats, nonfinite)
        if self._kept is not None and self.keeper is not None and self.tracer is not None:
            finding = self.coverage.latest
            outside = finding is not None and finding.step == step and bool(finding.outside_optimizer)
            if self.keeper.wants(outside=outside, nonfinite=nonfinite):  # only then is a bundle rebuilt
                self.keeper.offer(self._bundle_of(step), self._kept, outside=outside, nonfinite=nonfinite)
        self.recorder.record_step(step, row)
        self._send(trainer, step)
        self._say_findings(step)
        self._reset_step()

    @staticmethod
    def _clip(trainer: pl.Trainer) -> float | None:
        if trainer.gradient_clip_val and trainer.gradient_clip_algorithm != "value":
            return float(trainer.gradient_clip_val)
        return None

    def _trace(self, step: int, pl_module: pl.LightningModule, losses: dict[str, float], skipped: bool,
               total: float | None, stats: Any, nonfinite: bool) -> None:
        """End the step for the tracer: its losses (a re-run from the chain must reproduce them) and whether it
        went non-finite (decided from the host values: loss, gradient entries, parameters, so the check adds no
        copy), which replays it."""
        tracer = self.tracer
        if tracer is None or self.train_step is None:
            return
        result = StepResult(step, losses, skipped, "nonfinite_grad" if skipped else None, total,
                            stats.scale if stats is not None else None, 0.0) if losses else None
        ctx = StepContext(step, pl_module, self.train_step.optimizer, self.train_step.scaler, [], None, result=result)
        try:
            tracer.on_step_end(ctx, nonfinite=nonfinite)
        except Exception as exc:  # noqa: BLE001  (a replay that cannot run must not stop the training)
            self._tracer_failed(step, exc)
            return
        for verdict in tracer.verdicts[self._verdicts_said:]:
            self.say(f"workbench: tracer: {verdict.line()}")
        self._verdicts_said = len(tracer.verdicts)

    def _bundle_of(self, step: int) -> Any:
        """The replay bundle of the step that just ended, for the keeper (None when it cannot be had)."""
        if self.tracer is None or self.tracer.max_traces == 0:  # off after a failed replay
            return None
        try:
            return self.tracer.bundle_of(step)
        except ReplayMismatch as err:  # no bundle for this step; the tracer goes on
            assert self.recorder is not None
            self.recorder.note(replay_error=f"step {step}: {err}")
            self.say(f"workbench: no replay bundle kept for diagnose: step {step}: {err}")
            return None
        except Exception as exc:  # noqa: BLE001  (rebuilding a bundle re-runs training_step; it must not stop fit)
            self._tracer_failed(step, exc)
            return None

    def _tracer_failed(self, step: int, exc: Exception) -> None:
        assert self.tracer is not None and self.recorder is not None
        self.tracer_off = f"the replay of step {step} failed: {type(exc).__name__}: {exc}".replace("\n", " ")
        self.recorder.note(tracer_off=self.tracer_off)
        self.say(f"workbench: the non-finite tracer is off: {self.tracer_off}")
        self.tracer.bundle = None
        self.tracer.max_traces = 0

    def _send(self, trainer: pl.Trainer, step: int) -> None:
        every = trainer.log_every_n_steps if self.log_every is None else self.log_every
        if not every or not trainer.loggers or (step % every and step != 1):
            return
        series, record = self.record.series, self.record
        metrics = {f"workbench/{k}": float(v[-1]) for k, v in series.items()
                   if k.startswith(LOGGED) and v and v[-1] is not None and record.steps[-1] == step}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _say_findings(self, step: int) -> None:
        finding = self.coverage.latest
        if finding is None or finding.step != step or finding.ok:
            return
        key = ("coverage", *sorted(name for name, _ in finding.outside_optimizer), *finding.frozen_in_optimizer)
        if key not in self._reported:
            self._reported.add(key)
            self.say(f"workbench: optimizer coverage: {finding.one_line()}")

    def event(self, event: str, message: str, step: int, **fields: Any) -> None:
        """Record a run event (an unfreeze, ...) in the "events" table, as the workbench's own runs do."""
        if self.recorder is not None:
            self.recorder.event("events", {"step": step, "event": event, **fields, "message": message})

    # ------------------------------------------------------------------------------------------- the end

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.active:
            return
        self._close("finished", wall_s=time.perf_counter() - self._t_fit)
        outcome = self.outcome()
        self.say(f"workbench: outcome {outcome.kind}: {'; '.join(outcome.reasons)}")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.active:
            self._close("failed", error=repr(exception).replace("\n", " "), wall_s=time.perf_counter() - self._t_fit)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.active:
            self._close("failed", error="fit ended without on_fit_end", wall_s=time.perf_counter() - self._t_fit)

    def _close(self, status: str, **attrs: Any) -> None:
        """Detach and release every instrument and close the run log; closing twice does nothing."""
        recorder, self.recorder = self.recorder, None
        if self.probe is not None:
            self.probe.detach()
        if self.updates is not None:
            self.updates.unhook()  # its gradient pre-hooks
        if self.tracer is not None:
            self.tracer.detach(self.train_step)
            self.tracer.bundle = None
        self.probe = self.coverage = self.updates = self.tracer = self.train_step = self.keeper = None
        self.screen = None
        self._reset_step()
        if recorder is not None:
            recorder.close(status, **attrs)

    def outcome(self) -> Any:
        """The run's outcome (`records.classify`): diverged, stalled or healthy, with reasons."""
        if self.record is None:
            raise RuntimeError("WorkbenchCallback: no run recorded yet (call trainer.fit first)")
        return classify(self.record)

    def summary(self) -> dict[str, Any]:
        """The run's summary (`records.summarize`): outcome, coverage findings, tracer verdicts, the causal chain."""
        if self.record is None:
            raise RuntimeError("WorkbenchCallback: no run recorded yet (call trainer.fit first)")
        return summarize(self.record)


# ------------------------------------------------------------------------------------------ step unfreezing

HOWS: tuple[str, ...] = ("add_group", "rebuild")


def _retarget(scheduler: Any, old: torch.optim.Optimizer, new: torch.optim.Optimizer, n_before: int,
              how: str) -> None:
    """Point `scheduler` (and the schedulers it chains) at `new`. With "add_group", each per-group list gets one
    entry per added group, copied from group 0's (its base lr is the added group's lr); with "rebuild", every
    group of `new` gets group 0's entries, so every group follows the schedule group 0 followed."""
    for inner in compat.scheduler_children(scheduler):
        _retarget(inner, old, new, n_before, how)
    if getattr(scheduler, "optimizer", None) is not old:
        return
    scheduler.optimizer = new
    n = len(new.param_groups)
    # Per-group lists (LambdaLR's lr_lambdas, CyclicLR's max_lrs, ...): extended or rebuilt with the groups.
    for name, values in compat.scheduler_group_lists(scheduler).items():
        if len(values) != n_before or not values:
            continue
        if how == "add_group":
            groups = new.param_groups[n_before:]
            added = ([g.get("initial_lr", g["lr"]) for g in groups] if name == "base_lrs" else
                     [g["lr"] for g in groups] if name == "_last_lr" else [values[0]] * len(groups))
            setattr(scheduler, name, values + added)
        else:
            setattr(scheduler, name, [values[0]] * n)


class StepUnfreeze(BaseFinetuning):
    """Freeze the submodules named in `modules` before training and unfreeze them at the first optimizer step
    after `freeze_steps` steps (BaseFinetuning's freezing is epoch-level; this is step-level).

    how: "add_group" adds their parameters to the running optimizer as one new group per module (named by it),
        at learning rate `lr` (default: the optimizer's first group's current lr), keeping every other group and
        the optimizer's state; "rebuild" builds a new optimizer of the same kind and settings with fresh state,
        one group per top-level component, every group at `lr` (`workbench.train.optim.change_optimizer`) and
        replaces the trainer's optimizer (`trainer.strategy.optimizers`, so `self.optimizers()` and Lightning's loop
        use it).
    LR schedulers of the optimizer are kept and pointed at it: with "add_group" the new groups follow group 0's
        schedule from their own lr; with "rebuild" every group follows group 0's schedule (its per-group lists
        `base_lrs`, `lr_lambdas`, ... and group keys such as `initial_lr` are copied from group 0), continuing from
        the scheduler's current step. A scheduler keeping other per-group state is not adjusted.
    The unfreeze happens right after optimizer step `freeze_steps` (in `on_train_batch_end`, so whatever runs at
    the next batch start, a `WorkbenchCallback`'s replay bundle included, sees it, in any callback order); training
    resumed from a checkpoint taken at or after that step without the unfreeze does it at its first batch start.
    It is recorded as an "unfreeze" event in the run log of a `WorkbenchCallback` on the same trainer. Checkpoints
    keep whether the modules were unfrozen and BaseFinetuning restores the optimizer's groups on resume.
    """

    def __init__(self, modules: str | Sequence[str], freeze_steps: int, *, how: str = "add_group",
                 lr: float | None = None, train_bn: bool = True, log: Callable[[str], None] = print) -> None:
        super().__init__()
        self.modules = [modules] if isinstance(modules, str) else list(modules)
        if not self.modules:
            raise ValueError("StepUnfreeze: expected at least one submodule name, got none")
        if isinstance(freeze_steps, bool) or not isinstance(freeze_steps, int) or freeze_steps < 1:
            raise ValueError(f"StepUnfreeze: freeze_steps: expected an integer >= 1, got {freeze_steps!r}")
        if how not in HOWS:
            raise ValueError(f"StepUnfreeze: how: expected one of {', '.join(HOWS)}, got {how!r}")
        if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"StepUnfreeze: lr: expected a positive learning rate, got {lr!r}")
        self.freeze_steps, self.how, self.lr, self.train_bn, self.say = freeze_steps, how, lr, train_bn, log
        self.unfrozen_at: int | None = None

    def _submodules(self, pl_module: pl.LightningModule) -> list[torch.nn.Module]:
        found = []
        for name in self.modules:
            try:
                found.append(pl_module.get_submodule(name))
            except AttributeError:
                children = ", ".join(n for n, _ in pl_module.named_children())
                raise LightningSetupError(f"StepUnfreeze: {type(pl_module).__qualname__} has no submodule {name!r}; "
                                          f"its top-level modules are {children}") from None
        return found

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "unfrozen_at": self.unfrozen_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.unfrozen_at = state_dict.get("unfrozen_at")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "unfrozen_at"})

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.unfrozen_at is None and 0 < trainer.max_steps <= self.freeze_steps:
            warnings.warn(f"StepUnfreeze: {', '.join(self.modules)} would unfreeze at step {self.freeze_steps + 1}, "
                          f"beyond the run's max_steps={trainer.max_steps}: they never train", stacklevel=2)

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        modules = self._submodules(pl_module)
        if self.unfrozen_at is None:
            self.freeze(modules, train_bn=self.train_bn)

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        """Nothing at epoch starts: the unfreeze is step-granular (`on_train_batch_start`)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Right after optimizer step `freeze_steps` (global_step moves only when the optimizer steps)."""
        if self.unfrozen_at is None and trainer.global_step >= self.freeze_steps and \
                not (0 < trainer.max_steps <= trainer.global_step):
            self.unfreeze(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """A run resumed past `freeze_steps` without the unfreeze: at the first window start."""
        if self.unfrozen_at is None and trainer.global_step >= self.freeze_steps and \
                not batch_idx % trainer.accumulate_grad_batches:
            self.unfreeze(trainer, pl_module)

    def unfreeze(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Make the modules trainable and give them to the optimizer (`how`); schedulers follow."""
        old = trainer.optimizers[0]
        n_before = len(old.param_groups)
        lr = self.lr if self.lr is not None else float(old.param_groups[0]["lr"])
        modules = self._submodules(pl_module)
        self.make_trainable(modules)
        step = trainer.global_step + 1
        if self.how == "add_group":
            new = old
            held = {id(p) for p in optimizer_params(old)}
            for name, module in zip(self.modules, modules):
                params = [p for p in self.filter_params(module, train_bn=self.train_bn) if id(p) not in held]
                if params:
                    group = {k: v for k, v in old.param_groups[0].items() if k not in ("params", "name", "lr")}
                    group.update({"name": name, "params": params, "lr": lr, "initial_lr": lr})
                    old.add_param_group(group)
                    held.update(id(p) for p in params)
            tensors = sum(len(g["params"]) for g in old.param_groups[n_before:])
            line = f"Added {', '.join(self.modules)} to the optimizer as new groups: {tensors} parameter tensors"
            self._store(pl_module, 0, n_before, old.param_groups)
        else:
            new, line = change_optimizer(old, pl_module, lr, "rebuild")
            group0 = old.param_groups[0]
            for group in new.param_groups:
                for key, value in group0.items():
                    if key not in group and key not in ("params", "name"):
                        group[key] = value
            trainer.strategy.optimizers = [new, *trainer.optimizers[1:]]
            self._internal_optimizer_metadata.pop(0, None)
            self._store(pl_module, 0, len(new.param_groups), new.param_groups)
        for config in trainer.lr_scheduler_configs:
            _retarget(config.scheduler, old, new, n_before, self.how)
        self.unfrozen_at = step
        message = f"step {step}: unfroze {', '.join(self.modules)} after {self.freeze_steps} steps ({self.how}): {line}"
        self.say(f"workbench: {message}")
        for cb in trainer.callbacks:
            if isinstance(cb, WorkbenchCallback):
                cb.event("unfreeze", message, step, modules=self.modules, how=self.how)
