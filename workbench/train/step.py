"""One training step used everywhere: forward, loss terms, backward, optional accumulation, clip, optimizer step.

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

Observers (the instrumentation) hook in at four points and never change what the step does:
`on_step_start(ctx)`, `on_losses(ctx)` (first micro-batch's loss terms, graph alive, before backward),
`on_after_backward(ctx)` (gradients unscaled, before clipping) and `on_step_end(ctx)`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, Sequence

import torch
import torch.nn as nn

from workbench.device import autocast
from workbench.losses import LossWeights, compute_losses
from workbench.train.optim import optimizer_params

class LossFn(Protocol):
    """Forward + loss terms for one batch; returns named terms and their weighted sum under the key "total"."""

    def __call__(self, model: nn.Module, batch: Any, weights: LossWeights, *, rnnt: bool, mode: bool,
                 normalization: str) -> dict[str, torch.Tensor]: ...


def hybrid_losses(model: nn.Module, batch: Any, weights: LossWeights, *, rnnt: bool, mode: bool,
                  normalization: str) -> dict[str, torch.Tensor]:
    """The reference model's loss function: CTC, RNN-T and mode terms of `workbench.losses`."""
    outputs = model(batch.features, batch.feature_lengths, batch.targets, batch.target_lengths, rnnt=rnnt, mode=mode)
    return compute_losses(outputs, batch.feature_lengths, batch.targets, batch.target_lengths, batch.mode_labels,
                          weights, normalization)


NONFINITE_POLICIES: tuple[str, ...] = ("skip_before_backward", "skip_step", "stop", "continue")


@dataclass(frozen=True)
class LoopSemantics:
    """Switches that decide how the step treats gradients of parameters the optimizer does not hold.

    rebuild_optimizer: build a new optimizer at every stage change/unfreeze (False = the seed's stale optimizer).
    clip_scope: "model" clips over every model parameter (seed), "optimizer" over the optimizer's only.
    zero_grad_scope: "optimizer" zeroes only the optimizer's parameters (seed), "model" every parameter.
    unscale_before_clip: unscale fp16 gradients before clipping (both presets); False clips scaled gradients.
    nonfinite_policy: what a non-finite loss or gradient does (see NONFINITE_POLICIES).
    """

    name: str
    rebuild_optimizer: bool
    clip_scope: str
    zero_grad_scope: str
    unscale_before_clip: bool = True
    nonfinite_policy: str = "skip_step"

    def __post_init__(self) -> None:
        if self.clip_scope not in ("model", "optimizer"):
            raise ValueError(f"clip_scope: expected 'model' or 'optimizer', got {self.clip_scope!r}")
        if self.zero_grad_scope not in ("model", "optimizer"):
            raise ValueError(f"zero_grad_scope: expected 'model' or 'optimizer', got {self.zero_grad_scope!r}")
        if self.nonfinite_policy not in NONFINITE_POLICIES:
            raise ValueError(
                f"nonfinite_policy: expected one of {', '.join(NONFINITE_POLICIES)}, got {self.nonfinite_policy!r}")


SEMANTICS: dict[str, LoopSemantics] = {
    "seed_faithful": LoopSemantics("seed_faithful", rebuild_optimizer=False, clip_scope="model",
                                   zero_grad_scope="optimizer", nonfinite_policy="skip_before_backward"),
    "corrected": LoopSemantics("corrected", rebuild_optimizer=True, clip_scope="optimizer",
                               zero_grad_scope="model", nonfinite_policy="skip_step"),
}


def get_semantics(name: str, **overrides: Any) -> LoopSemantics:
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
    step: int
    losses: dict[str, float]
    skipped: bool
    reason: str | None
    grad_norm: float | None
    scale: float | None
    ms: float


@dataclass
class StepContext:
    """What observers see. `losses` holds the (last micro-batch's) loss tensors; `result` is set at the end."""

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


def make_scaler(precision: str, device: torch.device, init_scale: float = 65536.0) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (initial scale 65536 by default, as torch's and the seed's); None otherwise."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type, init_scale=init_scale)


class TrainStep:
    """Runs optimizer steps on a model; owns the step counter, not the optimizer's lifetime.

    The optimizer can be swapped (`self.optimizer = ...`) by the loop or an unfreezing policy; the GradScaler
    persists across stages, like the seed's single scaler.
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

    def _notify(self, event: str, ctx: StepContext) -> None:
        for obs in self.observers:
            hook = getattr(obs, event, None)
            if hook is not None:
                hook(ctx)

    def forward_losses(self, batch: Any, weights: LossWeights, *, rnnt: bool, mode: bool) -> dict[str, torch.Tensor]:
        """Forward pass and loss terms for one batch (no backward), under the configured autocast."""
        with autocast(self.device, self.config.precision):
            return self.loss_fn(self.model, batch, weights, rnnt=rnnt, mode=mode,
                                normalization=self.config.rnnt_normalization)

    def _zero_grad(self) -> None:
        if self.config.semantics.zero_grad_scope == "model":
            self.model.zero_grad(set_to_none=True)
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def clip_params(self) -> list[torch.nn.Parameter]:
        if self.config.semantics.clip_scope == "model":
            return [p for p in self.model.parameters() if p.grad is not None]
        return [p for p in optimizer_params(self.optimizer) if p.grad is not None]

    def __call__(self, batches: Any | Sequence[Any], weights: LossWeights, *, rnnt: bool = True,
                 mode: bool = False) -> StepResult:
        """One optimizer step over one batch or a list of micro-batches (gradient accumulation).

        With k micro-batches each loss is divided by k, so the gradient is that of the mean loss; every
        statistic the observers record is per optimizer step.
        """
        batches = list(batches) if isinstance(batches, (list, tuple)) else [batches]
        sem = self.config.semantics
        t0 = time.perf_counter()
        self.step_index += 1
        ctx = StepContext(self.step_index, self.model, self.optimizer, self.scaler, batches, weights, rnnt, mode)
        self.model.train()
        self._notify("on_step_start", ctx)

        totals: dict[str, torch.Tensor] = {}
        skipped, reason = False, None
        for i, batch in enumerate(batches):
            losses = self.forward_losses(batch, weights, rnnt=rnnt, mode=mode)
            ctx.losses = losses
            if i == 0:
                self._notify("on_losses", ctx)
            for k, v in losses.items():
                totals[k] = totals.get(k, 0) + v.detach() / len(batches)
            finite = bool(torch.isfinite(losses["total"]))
            if not finite and sem.nonfinite_policy == "stop":
                raise NonFiniteError(f"step {self.step_index}: non-finite loss {losses['total'].item()}")
            if not finite and sem.nonfinite_policy == "skip_before_backward":
                skipped, reason = True, "nonfinite_loss"
                break
            if i == 0:
                self._zero_grad()
            loss = losses["total"] / len(batches)
            if self.scaler is not None:
                loss = self.scaler.scale(loss)
            if loss.requires_grad:
                loss.backward()

        grad_norm = None
        scale = self.scaler.get_scale() if self.scaler is not None else None
        if not skipped:
            if self.scaler is not None and sem.unscale_before_clip:
                self.scaler.unscale_(self.optimizer)
            self._notify("on_after_backward", ctx)
            params = self.clip_params()
            if self.config.clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, self.config.clip, foreach=True)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
            grad_norm = float(norm)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
                if self.scaler.get_scale() < scale:
                    skipped, reason = True, "nonfinite_grad"
            elif not torch.isfinite(norm) and sem.nonfinite_policy == "skip_step":
                skipped, reason = True, "nonfinite_grad"
            elif not torch.isfinite(norm) and sem.nonfinite_policy == "stop":
                raise NonFiniteError(f"step {self.step_index}: non-finite gradient norm {grad_norm}")
            else:
                self.optimizer.step()

        values = torch.stack([v.float() for v in totals.values()]).tolist()
        result = StepResult(self.step_index, dict(zip(totals, values)), skipped, reason, grad_norm, scale,
                            (time.perf_counter() - t0) * 1000.0)
        ctx.result = result
        self._notify("on_step_end", ctx)
        return result
