"""One training step used everywhere: forward and loss terms, backward, unscale, clip, update.

Loop semantics are explicit switches so the seed's loop (MODE-SSM scripts/train.py, modessm.md 3.5) can be
reproduced exactly and then corrected one switch at a time:

    seed_faithful                          corrected
    forward -> loss                        forward -> loss
    non-finite loss? skip, no backward
    optimizer.zero_grad()                  model.zero_grad(set_to_none=True)
    backward (scaled)                      backward (scaled under fp16)
    scaler.unscale_(optimizer)             scaler.unscale_(optimizer)
    clip over ALL model parameters         clip over the optimizer's parameters
    scaler.step; scaler.update             scaler.step / optimizer.step (skipped when non-finite)

Each phase is a method (`forward`, `zero_grad`, `backward`, `unscale`, `clip`, `update`) and `run` is the only
place that strings them together. The non-finite tracer replays a step by calling `run` on a replica with a
`StepMonitor` that watches every phase, so the replay can never drift from the step it explains.

Observers (the instrumentation) hook in at five points and never change what the step does:
`on_step_start(ctx)`, `on_losses(ctx)` (first micro-batch's loss terms, graph alive, before backward),
`on_after_backward(ctx)` (gradients unscaled, before clipping), `on_pack(ctx)` (after the update: queue in
`ctx.packet` what the observer needs on the host) and `on_step_end(ctx)` (every queued value is on the host).

Host reads. The step's values (loss terms, the clip's norm, the GradScaler's scale and found-inf verdict) and
every observer's go to the host together: `ctx.packet` (a `workbench.train.host.HostPacket`) moves them in one
`to_host` copy after `on_pack`, so a step with the default settings syncs the host with the device once.
Decisions the step must take on the host before that add a read, each documented where it is taken:
- `stop` and `skip_before_backward` read each micro-batch's loss finiteness before its backward;
- `skip_step` and `stop` without a GradScaler need the norm's finiteness before the optimizer step: the packet
  is read there (carrying everything queued so far), and that read is the step's one copy. What observers
  queue after the update (`on_pack`: the parameters' non-finite check, the size of the update) rides the NEXT
  step's read instead of a second copy: those observers get `on_step_end(ctx)` for step k late, right after
  step k+1's decision read (after that step's `on_step_start`, `on_losses` and `on_after_backward`, so they
  keep step k's state apart from step k+1's), or at `settle()`, which a run calls before it reads its record
  and when it ends (`RunEngine.run` and `RunEngine.close` do: one more copy per run, for its last step;
  `run.joint` settles after each step when a callback reads the record). Observers that queued nothing at `on_pack`
  get `on_step_end` at the end of the step as always; `ctx` keeps naming step k, so rows written late carry
  their own step;
- with a GradScaler the skip is the scaler's own decision: torch reads its found-inf flags inside
  `GradScaler.step` (one `.item()` per device), and `GradScaler.update` keeps the scale on the device. An
  optimizer's own step may read too (e.g. Adam's CPU step counter, `capturable=False`); those reads are torch's.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, ContextManager, Protocol, Sequence

import torch
import torch.nn as nn

from workbench.model.losses import LossWeights, compute_losses
from workbench.train import compat
from workbench.train.device import autocast
from workbench.train.host import HostPacket, Slot
from workbench.train.optim import optimizer_params


class _StepPacket(HostPacket):
    """A step's HostPacket that counts what it was asked for (`asked`: values queued and shared checks requested)
    and notes whether it was read (`crossed`), so TrainStep knows which observers wait for a later copy."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0
        self.crossed = False

    def add(self, t: torch.Tensor) -> Slot:
        self.asked += 1
        return super().add(t)

    def params_nonfinite(self, model: nn.Module) -> Slot:
        self.asked += 1
        return super().params_nonfinite(model)

    def read(self) -> None:
        super().read()
        self.crossed = True


class LossFn(Protocol):
    """Forward + loss terms for one batch; returns named terms and their weighted sum under the key "total"."""

    def __call__(self, model: nn.Module, batch: Any, weights: LossWeights, *, rnnt: bool, mode: bool,
                 normalization: str) -> dict[str, torch.Tensor]: ...


def hybrid_losses(model: nn.Module, batch: Any, weights: LossWeights, *, rnnt: bool, mode: bool,
                  normalization: str) -> dict[str, torch.Tensor]:
    """The reference model's loss function: CTC, RNN-T and mode terms of `workbench.model.losses`."""
    outputs = model(batch.features, batch.feature_lengths, batch.targets, batch.target_lengths, rnnt=rnnt, mode=mode)
    return compute_losses(outputs, batch.feature_lengths, batch.targets, batch.target_lengths, batch.mode_labels,
                          weights, normalization)


NONFINITE_POLICIES: tuple[str, ...] = ("skip_before_backward", "skip_step", "stop", "continue")
SCOPES: tuple[str, ...] = ("model", "optimizer")


@dataclass(frozen=True)
class LoopSemantics:
    """Switches that decide how the step treats gradients of parameters the optimizer does not hold.

    rebuild_at_stage_change: build a new optimizer when a stage starts (False = the seed's stale optimizer).
    substring_match: a stage's components are matched by substring, as the seed's component manager does, so
        "encoder" also makes rnnt_decoder.joint.encoder_proj trainable (and a member of the CTC stage's optimizer).
    clip_scope: "model" clips over every model parameter (seed), "optimizer" over the optimizer's only.
    zero_grad_scope: "optimizer" zeroes only the optimizer's parameters (seed), "model" every parameter.
    unscale_before_clip: unscale fp16 gradients before clipping (both presets); False clips scaled gradients.
    nonfinite_policy: what a non-finite loss or gradient does (see NONFINITE_POLICIES).
    """

    name: str
    rebuild_at_stage_change: bool
    clip_scope: str
    zero_grad_scope: str
    unscale_before_clip: bool = True
    nonfinite_policy: str = "skip_step"
    substring_match: bool = False

    def __post_init__(self) -> None:
        for name in ("clip_scope", "zero_grad_scope"):
            if getattr(self, name) not in SCOPES:
                raise ValueError(f"{name}: expected 'model' or 'optimizer', got {getattr(self, name)!r}")
        if self.nonfinite_policy not in NONFINITE_POLICIES:
            raise ValueError(
                f"nonfinite_policy: expected one of {', '.join(NONFINITE_POLICIES)}, got {self.nonfinite_policy!r}")


SEMANTICS: dict[str, LoopSemantics] = {
    "seed_faithful": LoopSemantics("seed_faithful", rebuild_at_stage_change=False, clip_scope="model",
                                   zero_grad_scope="optimizer", nonfinite_policy="skip_before_backward",
                                   substring_match=True),
    "corrected": LoopSemantics("corrected", rebuild_at_stage_change=True, clip_scope="optimizer",
                               zero_grad_scope="model", nonfinite_policy="skip_step"),
}


def get_semantics(name: str, **overrides: Any) -> LoopSemantics:
    """The named semantics with single switches overridden (`rebuild_at_stage_change=True`, ...)."""
    if name not in SEMANTICS:
        raise ValueError(f"loop semantics: expected one of {', '.join(SEMANTICS)}, got {name!r}")
    sem = SEMANTICS[name]
    return replace(sem, **overrides) if overrides else sem


@dataclass
class StepConfig:
    precision: str = "fp32"
    clip: float | None = 1.0
    init_scale: float = 65536.0
    rnnt_normalization: str = "seed_sqrt_tu"
    semantics: LoopSemantics = field(default_factory=lambda: SEMANTICS["corrected"])


class NonFiniteError(RuntimeError):
    """Raised by the `stop` policy."""


@dataclass
class StepResult:
    """One step's outcome. `grad_norm`: the norm the clip measured; `clip_coef`: the factor the clip applied to
    every gradient, min(1, clip / (norm + 1e-6)) as torch computes it (0 for an infinite norm, NaN for a NaN one;
    None without clipping or backward); `scale`: the GradScaler scale this step's backward used."""

    step: int
    losses: dict[str, float]
    skipped: bool
    reason: str | None
    grad_norm: float | None
    scale: float | None
    ms: float
    clip_coef: float | None = None


@dataclass
class StepContext:
    """What observers see. `losses` holds the (last micro-batch's) loss tensors; `result` is set at the end;
    `packet` carries the step's device values to the host (None outside TrainStep.run); when the step read it
    before its update, `on_pack` gets a new one that crosses with the next step's copy."""

    step: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    batches: Sequence[Any]
    weights: LossWeights
    rnnt: bool = True
    mode: bool = False
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    result: StepResult | None = None
    packet: HostPacket | None = None


class StepMonitor:
    """Watches the phases of `TrainStep.run`: `phase(name)` wraps a phase's work, `after(name, **outcome)` sees
    its outcome. Phases: "forward" (outcome `losses`), "backward", "unscale", "clip" (outcome `norm`), "update".
    This base class does nothing; the non-finite tracer's replay checks every phase and stops at the first
    non-finite outcome by raising from `after`."""

    def phase(self, name: str) -> ContextManager[None]:
        return contextlib.nullcontext()

    def after(self, name: str, **outcome: Any) -> None:
        return None


NO_MONITOR = StepMonitor()


def make_scaler(precision: str, device: torch.device, init_scale: float = 65536.0) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (initial scale 65536 by default, as torch's and the seed's); None otherwise."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type, init_scale=init_scale)


class TrainStep:
    """Runs optimizer steps on a model; owns the step counter, not the optimizer's lifetime.

    The optimizer can be swapped (`self.optimizer = ...`) by the run engine at a stage change or an unfreeze;
    the GradScaler persists across stages, like the seed's single scaler.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: StepConfig,
        device: torch.device,
        *,
        scaler: torch.amp.GradScaler | None = None,
        observers: Sequence[Any] = (),
        loss_fn: LossFn | None = None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn or hybrid_losses
        self.optimizer = optimizer
        self.config = config
        self.device = device
        self.scaler = scaler if scaler is not None else make_scaler(config.precision, device, config.init_scale)
        self.observers = list(observers)
        self.step_index = 0
        # The previous step's post-update values (a packet not read yet) and the observers waiting for them.
        self._carry: _StepPacket | None = None
        self._waiting: list[tuple[Any, StepContext]] = []

    def _notify(self, event: str, ctx: StepContext) -> None:
        for obs in self.observers:
            hook = getattr(obs, event, None)
            if hook is not None:
                hook(ctx)

    # ------------------------------------------------------------------------------------------------ phases

    def forward(self, batch: Any, weights: LossWeights, *, rnnt: bool, mode: bool) -> dict[str, torch.Tensor]:
        """Forward pass and loss terms for one batch (no backward), under the configured autocast."""
        with autocast(self.device, self.config.precision):
            return self.loss_fn(self.model, batch, weights, rnnt=rnnt, mode=mode,
                                normalization=self.config.rnnt_normalization)

    def zero_grad(self) -> None:
        """Clear gradients: every parameter's, or (the seed's loop) only the optimizer's."""
        if self.config.semantics.zero_grad_scope == "model":
            self.model.zero_grad(set_to_none=True)
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def backward(self, total: torch.Tensor, micro_batches: int) -> None:
        """Backward of `total / micro_batches`, multiplied by the GradScaler's scale under fp16."""
        loss = total / micro_batches
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        if loss.requires_grad:
            loss.backward()

    def unscale(self) -> None:
        """Divide the optimizer's gradients by the loss scale (parameters outside the optimizer keep theirs)."""
        if self.scaler is not None and self.config.semantics.unscale_before_clip:
            self.scaler.unscale_(self.optimizer)

    def clip_params(self) -> list[torch.nn.Parameter]:
        if self.config.semantics.clip_scope == "model":
            return [p for p in self.model.parameters() if p.grad is not None]
        return [p for p in optimizer_params(self.optimizer) if p.grad is not None]

    def clip(self) -> torch.Tensor:
        """The total gradient norm over `clip_params()`, clipping to `config.clip` when set (0-d tensor)."""
        params = self.clip_params()
        if self.config.clip is not None:
            return torch.nn.utils.clip_grad_norm_(params, self.config.clip, foreach=True)
        return torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)

    def update(self, norm: Slot, packet: HostPacket) -> bool | Slot:
        """Apply the optimizer step (through the GradScaler under fp16); `norm` is the clip's norm, queued in
        `packet`. Returns whether it was skipped for a non-finite gradient: a bool, or under a GradScaler the slot
        of its found-inf count (> 0: skipped)."""
        policy = self.config.semantics.nonfinite_policy
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            # The GradScaler's own verdict: it skips when its inf check over the optimizer's gradients found one.
            # (A lower scale after update() is not a test: an infinite scale stays infinite when backed off.)
            found = compat.found_inf(self.scaler, self.optimizer)
            found_inf = packet.add(torch.stack([f.to(found[0].device).reshape(()) for f in found]).sum())
            self.scaler.update()
            return found_inf
        if policy in ("skip_step", "stop"):
            packet.read()  # the step's one copy, taken before the update (see the module docstring)
            self.settle()  # it brought the previous step's post-update values: end that step for its observers
            value = float(norm.value[0])
            if not math.isfinite(value) and policy == "stop":
                raise NonFiniteError(f"step {self.step_index}: non-finite gradient norm {value}")
            if not math.isfinite(value):
                return True
        self.optimizer.step()
        return False

    def _scale(self, packet: HostPacket) -> Slot | float | None:
        """The scale this step's backward uses: queued from the device (a copy, as update() rewrites it in place),
        or the initial scale before the GradScaler made its tensor."""
        if self.scaler is None:
            return None
        scale = compat.scale_tensor(self.scaler)
        return self.scaler.get_scale() if scale is None else packet.add(scale.clone())

    def settle(self) -> None:
        """End the previous step for the observers still waiting for its post-update values: bring them to the
        host (one copy, unless this step's decision read already brought them) and call their `on_step_end`.
        Nothing to do, and no copy, when none wait. Call it before reading a run's record between steps."""
        carry, waiting = self._carry, self._waiting
        self._carry, self._waiting = None, []
        if carry is not None and not carry.crossed:
            carry.read()
        for observer, ctx in waiting:
            observer.on_step_end(ctx)

    # ---------------------------------------------------------------------------------------------- the step

    def __call__(self, batches: Any | Sequence[Any], weights: LossWeights, *, rnnt: bool = True,
                 mode: bool = False) -> StepResult:
        return self.run(batches, weights, rnnt=rnnt, mode=mode)

    def run(self, batches: Any | Sequence[Any], weights: LossWeights, *, rnnt: bool = True, mode: bool = False,
            monitor: StepMonitor = NO_MONITOR) -> StepResult:
        """One optimizer step over one batch or a list of micro-batches (gradient accumulation).

        With k micro-batches each loss is divided by k, so the gradient is that of the mean loss; every
        statistic the observers record is per optimizer step.
        """
        batches = list(batches) if isinstance(batches, (list, tuple)) else [batches]
        policy = self.config.semantics.nonfinite_policy
        t0 = time.perf_counter()
        self.step_index += 1
        # The step's values join what the previous step queued after its update: one read brings both.
        packet = self._carry if self._carry is not None else _StepPacket()
        ctx = StepContext(self.step_index, self.model, self.optimizer, self.scaler, batches, weights, rnnt, mode,
                          packet=packet)
        self.model.train()
        self._notify("on_step_start", ctx)

        totals: dict[str, torch.Tensor] = {}
        skipped, reason = False, None
        scale = self._scale(packet)
        for i, batch in enumerate(batches):
            with monitor.phase("forward"):
                losses = self.forward(batch, weights, rnnt=rnnt, mode=mode)
            monitor.after("forward", losses=losses)
            ctx.losses = losses
            if i == 0:
                self._notify("on_losses", ctx)
            for k, v in losses.items():
                totals[k] = totals.get(k, 0) + v.detach() / len(batches)
            # These two policies decide before backward: one read of the loss per micro-batch.
            if policy in ("stop", "skip_before_backward") and not bool(torch.isfinite(losses["total"])):
                if policy == "stop":
                    raise NonFiniteError(f"step {self.step_index}: non-finite loss {losses['total'].item()}")
                skipped, reason = True, "nonfinite_loss"
                break
            if i == 0:
                self.zero_grad()
            with monitor.phase("backward"):
                self.backward(losses["total"], len(batches))
            monitor.after("backward")
        loss_slot = packet.add(torch.stack([v.float() for v in totals.values()]))

        norm_slot: Slot | None = None
        update_skipped: bool | Slot = False
        if not skipped:
            with monitor.phase("unscale"):
                self.unscale()
            monitor.after("unscale")
            self._notify("on_after_backward", ctx)
            with monitor.phase("clip"):
                norm = self.clip()
            monitor.after("clip", norm=norm)
            norm_slot = packet.add(norm)
            with monitor.phase("update"):
                update_skipped = self.update(norm_slot, packet)
            monitor.after("update")

        if self._waiting:  # no decision read brought the previous step's values (it raised before one)
            self.settle()
        late = self._pack(ctx)
        self._waiting = [(obs, ctx) for obs in late]
        if not packet.crossed:
            packet.read()  # the step's one copy: its values and every observer's
        if isinstance(update_skipped, Slot):
            update_skipped = bool(update_skipped.value[0] > 0)
        if update_skipped:
            skipped, reason = True, "nonfinite_grad"
        grad_norm = clip_coef = None
        if norm_slot is not None:
            grad_norm = float(norm_slot.value[0])
            if self.config.clip is not None:
                clip_coef = math.nan if math.isnan(grad_norm) else min(1.0, self.config.clip / (grad_norm + 1e-6))
        scale_value = float(scale.value[0]) if isinstance(scale, Slot) else scale
        result = StepResult(self.step_index, dict(zip(totals, loss_slot.value.tolist())), skipped, reason, grad_norm,
                            scale_value, (time.perf_counter() - t0) * 1000.0, clip_coef)
        ctx.result = result
        for obs in self.observers:
            hook = getattr(obs, "on_step_end", None)
            if hook is not None and not any(obs is other for other in late):
                hook(ctx)
        return result

    def _pack(self, ctx: StepContext) -> list[Any]:
        """`on_pack` for every observer. After a decision read they queue in a new packet that waits for the next
        step's read (`self._carry`); returns the observers that queued there (their step ends late)."""
        packet = ctx.packet
        if not isinstance(packet, _StepPacket) or not packet.crossed:
            self._notify("on_pack", ctx)
            return []
        ctx.packet = after = _StepPacket()
        late = []
        for obs in self.observers:
            hook = getattr(obs, "on_pack", None)
            if hook is not None:
                asked = after.asked
                hook(ctx)
                if after.asked > asked:
                    late.append(obs)
        if late:
            self._carry = after
        return late
