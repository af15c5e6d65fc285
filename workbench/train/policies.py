"""Unfreezing policies for a freshly attached module (the RNN-T decoder at joint-stage entry), step-granular.

A policy decides, before each step i (1-based) of its stage, whether the module is trainable, which loss weights
and learning-rate scale apply, and what happens to the optimizer at the unfreeze. It never runs the step itself:
the run engine asks it (the freezing policy is kept apart from the loop, as in Lightning's BaseFinetuning).

Every policy is one class registered by name in `POLICIES`; the sweep, the criteria, the CLI and the explorer
ask the registry. To add one, subclass `UnfreezePolicy` in any file with its name as a class keyword and override
what differs: `class Mine(UnfreezePolicy, name="mine", freezes=True): ...` (see the README's "Extending the
workbench").

    none             module trainable from step 1
    freeze_params    the seed's literal code: requires_grad=False for N steps while the RNN-T term stays in the
                     loss (and still backpropagates into the encoder); then unfreeze and rebuild the optimizer
                     (`rebuild_at_unfreeze=False` keeps the old one: the module trains outside it)
    freeze_and_mute  the seed's stated intent: as freeze_params, and the RNN-T term is not computed for N steps
    add_param_group  freeze for N steps, then add the module to the existing optimizer as a new param group,
                     keeping the encoder's Adam state
    loss_ramp        trainable from step 1; the RNN-T weight ramps linearly from 0 (step 1) to 1 (step N+1)
    lr_warmup        trainable from step 1; the module's learning rate ramps linearly to the stage lr over N steps
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn as nn

from workbench.model.losses import LossWeights
from workbench.train.optim import change_optimizer

DECODER = "rnnt_decoder"
POLICIES: dict[str, type[UnfreezePolicy]] = {}


@dataclass(frozen=True)
class StepPlan:
    """What a policy decided for one step: the loss weights, whether the RNN-T term is computed, whether the
    module is trainable, the scale of its learning rate, and "unfreeze" on the step the module unfreezes."""

    weights: LossWeights
    rnnt: bool
    trainable: bool
    lr_scale: float
    event: str | None


class UnfreezePolicy:
    """Base policy: the module trains from step 1 with the stage's weights (registered as "none").

    Class keywords of a subclass: `name` (its registry name), `freezes` (the policy holds the module frozen for
    its first `freeze_steps` steps) and `rebuilds` (at the unfreeze the optimizer is rebuilt, True, or the
    module is added to it as a new group, False). A subclass registers itself; a name may be used once.
    """

    name: ClassVar[str] = "none"
    freezes: ClassVar[bool] = False
    rebuilds: ClassVar[bool] = True

    def __init_subclass__(cls, *, name: str, freezes: bool = False, rebuilds: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name in POLICIES:
            raise ValueError(f"unfreezing policy {name!r} is already registered by {POLICIES[name].__qualname__}")
        cls.name, cls.freezes, cls.rebuilds = name, freezes, rebuilds
        POLICIES[name] = cls

    def __init__(self, freeze_steps: int = 0, modules: tuple[str, ...] = (DECODER,), *,
                 rebuild_at_unfreeze: bool = True) -> None:
        if freeze_steps < 0:
            raise ValueError(f"freeze_steps: expected a non-negative number of steps, got {freeze_steps}")
        self.freeze_steps, self.modules, self.rebuild_at_unfreeze = freeze_steps, tuple(modules), rebuild_at_unfreeze

    @property
    def active(self) -> bool:
        """The policy freezes for at least one step."""
        return self.freezes and self.freeze_steps > 0

    def __repr__(self) -> str:
        extra = "" if self.rebuild_at_unfreeze or not self.active else ", rebuild_at_unfreeze=False"
        return f"{type(self).__name__}(freeze_steps={self.freeze_steps}{extra})"

    @property
    def attach_step(self) -> int:
        """The module's first trainable step (1-based): N + 1 for a policy that freezes N > 0 steps, else 1."""
        return self.freeze_steps + 1 if self.active else 1

    def frozen(self, i: int) -> bool:
        return self.active and i <= self.freeze_steps

    def start(self, model: nn.Module) -> None:
        """Call after the stage made its components trainable and before the optimizer is chosen."""
        if self.active:
            self._set_trainable(model, False)

    def plan(self, i: int, weights: LossWeights) -> StepPlan:
        """The plan for step i (1-based) of the stage, given the stage's loss weights."""
        event = "unfreeze" if self.active and i == self.freeze_steps + 1 else None
        return StepPlan(weights, rnnt=True, trainable=not self.frozen(i), lr_scale=1.0, event=event)

    def unfreeze(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 lr: float) -> tuple[torch.optim.Optimizer, str]:
        """Make the modules trainable and return the optimizer to use from now on, with a log line."""
        self._set_trainable(model, True)
        how = "keep" if not self.rebuild_at_unfreeze else "rebuild" if self.rebuilds else "add_group"
        optimizer, line = change_optimizer(optimizer, model, lr, how, added=self.modules)
        return optimizer, f"Unfroze {', '.join(self.modules)}. {line}"

    def _set_trainable(self, model: nn.Module, trainable: bool) -> None:
        for name in self.modules:
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(trainable)


def make_policy(name: str, freeze_steps: int = 0, *, modules: tuple[str, ...] = (DECODER,),
                rebuild_at_unfreeze: bool = True) -> UnfreezePolicy:
    """An instance of the registered policy `name`."""
    if name not in POLICIES:
        raise ValueError(f"unfreezing policy: expected one of {', '.join(POLICIES)}, got {name!r}")
    return POLICIES[name](freeze_steps, modules, rebuild_at_unfreeze=rebuild_at_unfreeze)


POLICIES[UnfreezePolicy.name] = UnfreezePolicy


class FreezeParams(UnfreezePolicy, name="freeze_params", freezes=True):
    """The seed's code: frozen parameters for N steps, the RNN-T term still in the loss."""


class FreezeAndMute(UnfreezePolicy, name="freeze_and_mute", freezes=True):
    """The seed's stated intent: frozen for N steps and the RNN-T term not computed meanwhile."""

    def plan(self, i: int, weights: LossWeights) -> StepPlan:
        plan = super().plan(i, weights)
        if not self.frozen(i):
            return plan
        return replace(plan, weights=replace(weights, rnnt=0.0), rnnt=False)


class AddParamGroup(UnfreezePolicy, name="add_param_group", freezes=True, rebuilds=False):
    """Frozen for N steps, then added to the running optimizer as a new group (its state is kept)."""


class LossRamp(UnfreezePolicy, name="loss_ramp"):
    """Trainable from step 1; the RNN-T weight ramps from 0 at step 1 to its stage value at step N + 1."""

    def plan(self, i: int, weights: LossWeights) -> StepPlan:
        plan = super().plan(i, weights)
        if self.freeze_steps == 0:
            return plan
        return replace(plan, weights=replace(weights, rnnt=weights.rnnt * min(1.0, (i - 1) / self.freeze_steps)))


class LrWarmup(UnfreezePolicy, name="lr_warmup"):
    """Trainable from step 1; the module's learning rate ramps linearly to the stage's over N steps."""

    def plan(self, i: int, weights: LossWeights) -> StepPlan:
        plan = super().plan(i, weights)
        if self.freeze_steps == 0:
            return plan
        return replace(plan, lr_scale=min(1.0, i / self.freeze_steps))
