"""In-memory per-step traces of a training run, in the shape the plots draw (`workbench.plots.training_figure`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepTraces:
    """Series recorded step by step.

    losses: term -> value per step. group_norms / group_nonfinite: group -> value per step that had gradient
    statistics (a step skipped before backward has none). global_norm: the probe's global norm per such step.
    scale: the GradScaler scale per step (None without one). skipped: steps whose update was skipped. overflow:
    steps with a non-finite gradient. events: e.g. {"step": 11, "event": "unfreeze", "message": ...}.
    """

    losses: dict[str, list[float]] = field(default_factory=dict)
    group_norms: dict[str, list[float]] = field(default_factory=dict)
    group_nonfinite: dict[str, list[int]] = field(default_factory=dict)
    global_norm: list[float] = field(default_factory=list)
    scale: list[float | None] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    overflow: list[int] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    first_nonfinite_loss_step: int | None = None
