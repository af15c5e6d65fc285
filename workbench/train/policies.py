"""RNN-T decoder unfreezing policies at joint-stage entry, step-granular, with length N.

A policy decides, before each joint step i (1-based), whether the decoder is trainable, which loss weights
and learning rates apply, and what happens to the optimizer at the unfreeze. It never runs the step itself
(the freezing policy is kept apart from the loop, as in Lightning's BaseFinetuning).

    none             decoder trainable from step 1
    freeze_params    the seed's literal code: decoder requires_grad=False for N steps while the RNN-T term
                     stays in the loss (and still backpropagates into the encoder); then unfreeze and
                     rebuild the optimizer (`rebuild=False` keeps the old one: the decoder trains outside it)
    freeze_and_mute  the seed's stated intent: as freeze_params, and the RNN-T term is not computed for N steps
    add_param_group  freeze for N steps, then add the decoder to the existing optimizer as a new param group,
                     keeping the encoder's Adam state
    loss_ramp        decoder trainable from step 1; RNN-T weight ramps linearly from 0 (step 1) to 1 (step N+1)
    lr_warmup        decoder trainable from step 1; its learning rate ramps linearly to the stage lr over N steps
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch.nn as nn

from workbench.losses import LossWeights
from workbench.train.optim import build_optimizer, component_groups
from workbench.train.step import TrainStep

POLICIES: tuple[str, ...] = ("none", "freeze_params", "freeze_and_mute", "add_param_group", "loss_ramp", "lr_warmup")
DECODER = "rnnt_decoder"


@dataclass(frozen=True)
class StepPlan:
    """What policy decided for one step."""

    weights: LossWeights
    rnnt: bool
    decoder_trainable: bool
    decoder_lr_scale: float
    event: str | None


def _set_decoder_trainable(model: nn.Module, trainable: bool) -> None:
    for p in getattr(model, DECODER).parameters():
        p.requires_grad_(trainable)


class UnfreezePolicy:
    """One policy instance per joint stage run."""

    def __init__(self, kind: str = "none", n: int = 0, *, rebuild: bool = True) -> None:
        if kind not in POLICIES:
            raise ValueError(f"unfreezing policy: expected one of {', '.join(POLICIES)}, got {kind!r}")
        if n < 0:
            raise ValueError(f"warmup length N: expected a non-negative number of steps, got {n}")
        self.kind, self.n, self.rebuild = kind, n, rebuild

    @property
    def freezes(self) -> bool:
        return self.kind in ("freeze_params", "freeze_and_mute", "add_param_group") and self.n > 0

    def __repr__(self) -> str:
        extra = "" if self.rebuild or not self.freezes else ", rebuild=False"
        return f"UnfreezePolicy({self.kind!r}, n={self.n}{extra})"

    def start(self, model: nn.Module) -> None:
        """Call after the stage made its components trainable and before the optimizer is built."""
        if self.freezes:
            _set_decoder_trainable(model, False)

    def plan(self, i: int, weights: LossWeights) -> StepPlan:
        """The plan for joint step i (1-based) given the stage's loss weights."""
        frozen = self.freezes and i <= self.n
        event = "unfreeze" if self.freezes and i == self.n + 1 else None
        rnnt_weight = weights.rnnt
        if self.kind == "freeze_and_mute" and frozen:
            rnnt_weight = 0.0
        if self.kind == "loss_ramp" and self.n > 0:
            rnnt_weight = weights.rnnt * min(1.0, (i - 1) / self.n)
        lr_scale = min(1.0, i / self.n) if self.kind == "lr_warmup" and self.n > 0 else 1.0
        return StepPlan(replace(weights, rnnt=rnnt_weight), rnnt=not (self.kind == "freeze_and_mute" and frozen),
                        decoder_trainable=not frozen, decoder_lr_scale=lr_scale, event=event)

    def apply(self, plan: StepPlan, step: TrainStep, lr: float) -> str | None:
        """Carry out the plan's optimizer changes on `step`; return a log line for an unfreeze, else None."""
        if self.kind == "lr_warmup":
            for group in step.optimizer.param_groups:
                if group.get("name") == DECODER:
                    group["lr"] = lr * plan.decoder_lr_scale
        if plan.event != "unfreeze":
            return None
        _set_decoder_trainable(step.model, True)
        if self.kind == "add_param_group":
            params = list(getattr(step.model, DECODER).parameters())
            step.optimizer.add_param_group({"name": DECODER, "params": params, "lr": lr})
            return f"Unfroze {DECODER}: added {len(params)} tensors to the existing optimizer as a new group"
        if self.rebuild:
            step.optimizer = build_optimizer(component_groups(step.model), lr)
            return f"Unfroze {DECODER} and rebuilt the optimizer"
        return f"Unfroze {DECODER}; kept the optimizer (the decoder trains outside it)"
