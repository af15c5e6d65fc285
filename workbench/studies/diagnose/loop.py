"""The loop a kept replay bundle (of a `byo.instrument` session or a Lightning run) is continued with: the run's own
(the control) or that loop with one candidate's change. `candidates.Candidate.continued` changes one; `continued`
runs it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from workbench.train.step import LoopSemantics

OPTIMIZERS: tuple[str, ...] = ("kept", "rebuilt", "kept+missing")
GROUP_LR_FACTOR = 10.0  # a group's own learning rate, relative to the optimizer's first group's


@dataclass(frozen=True)
class Loop:
    """How the bundle's step and the K steps after it run.

    precision, clip, clip_scope, zero_grad_scope, unscale_before_clip, nonfinite_policy: the step's (see
    `workbench.train.step.LoopSemantics`). init_scale: the GradScaler's scale to start from under fp16 (the
    control's is the bundle's own, with the rest of its GradScaler state; None when the run had no GradScaler). optimizer: "kept" (the run's optimizer
    with its state), "rebuilt" (over every trainable tensor with fresh state: the LightningModule's
    `configure_optimizers`, or the run's optimizer class with its first group's settings), "kept+missing" (the
    run's optimizer and state, with the trainable tensors it lacks added as one group at its first group's
    settings). group_lr: the run's parameter group (as its log names it) whose tensors the optimizer holds go into
    an optimizer group of their own at `GROUP_LR_FACTOR` times the first group's learning rate (None: none).
    slowest: the run's group with the smallest median update ratio, which `group_lr` would name (not a change).
    """

    precision: str
    clip: float | None
    clip_scope: str
    zero_grad_scope: str
    unscale_before_clip: bool
    nonfinite_policy: str
    init_scale: float | None
    optimizer: str = "kept"
    group_lr: str | None = None
    slowest: str | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")

    @classmethod
    def of_run(cls, replay: dict[str, Any], scale: float | None, slowest: str | None) -> Loop:
        """The run's own loop from its log's `replay` attribute, the bundle's GradScaler scale and the run's
        slowest-updated group."""
        sem = replay["semantics"]
        return cls(precision=replay["precision"], clip=replay["clip"], clip_scope=sem["clip_scope"],
                   zero_grad_scope=sem["zero_grad_scope"], unscale_before_clip=sem["unscale_before_clip"],
                   nonfinite_policy=sem["nonfinite_policy"], init_scale=scale, slowest=slowest)

    def semantics(self) -> LoopSemantics:
        return LoopSemantics("continued", rebuild_at_stage_change=False, clip_scope=self.clip_scope,
                             zero_grad_scope=self.zero_grad_scope, unscale_before_clip=self.unscale_before_clip,
                             nonfinite_policy=self.nonfinite_policy)

    def to_dict(self) -> dict[str, Any]:
        """The fields that say how the loop runs (`slowest` describes the run)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "slowest"}
