"""Optimizer coverage: trainable parameters that get gradients the optimizer never applies, and frozen ones it holds.

The first is the stale-optimizer bug of staged training: a component unfrozen after the optimizer was built
receives gradients (which, under fp16, `unscale_` never unscales) but is never updated. Membership is checked by
`id(param)` in pure Python at every step, with no device work at all; only the gradient norms of offending
parameters need the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from workbench.instrument import host
from workbench.instrument.host import Slot
from workbench.instrument.grad_norms import GradNormProbe, StepStats
from workbench.instrument.observer import StepObserver
from workbench.train import compat
from workbench.train.optim import HeldIds

SHOWN = 3  # offending tensors named in one_line()


@dataclass
class CoverageFinding:
    """One step's coverage check.

    outside_optimizer: (name, |g|) of trainable parameters with a gradient the optimizer does not hold, largest
    |g| first (NaN until the gradient norms reach the host; the gradients are as clip_grad_norm_ sees them, so
    under fp16 still multiplied by the loss scale). frozen_in_optimizer: names of held parameters with
    requires_grad False.
    """

    step: int
    outside_optimizer: list[tuple[str, float]] = field(default_factory=list)
    frozen_in_optimizer: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.outside_optimizer and not self.frozen_in_optimizer

    def fill_norms(self, norms: dict[str, float]) -> None:
        """Set the |g| of the outside parameters and sort them largest first (NaN counts as largest)."""
        # An empty tensor has no entries, so no norm in the probe's stats: its norm is 0.
        filled = [(name, norms.get(name, 0.0)) for name, _ in self.outside_optimizer]
        self.outside_optimizer = sorted(filled, key=lambda item: -math.inf if math.isnan(item[1]) else -item[1])

    def one_line(self) -> str:
        if self.ok:
            return f"step {self.step}: the optimizer holds every trainable tensor with a gradient, and no frozen one"
        parts = []
        if self.outside_optimizer:
            shown = ", ".join(f"{name} |g|={norm:.3g}" for name, norm in self.outside_optimizer[:SHOWN])
            more = ", ..." if len(self.outside_optimizer) > SHOWN else ""
            parts.append(f"{len(self.outside_optimizer)} trainable tensors outside the optimizer ({shown}{more})")
        if self.frozen_in_optimizer:
            shown = ", ".join(self.frozen_in_optimizer[:SHOWN])
            more = ", ..." if len(self.frozen_in_optimizer) > SHOWN else ""
            parts.append(f"{len(self.frozen_in_optimizer)} frozen tensors in the optimizer ({shown}{more})")
        return f"step {self.step}: " + "; ".join(parts)


class OptimizerCoverage(StepObserver):
    """TrainStep observer comparing the model's trainable parameters with the optimizer's, every step.

    With `probe` (a GradNormProbe on the same model, attached to the same step) the gradient norms come from
    the probe's host copy, so coverage adds no copy; they arrive when the probe copies (every `probe.every`
    steps). Without a probe, coverage computes the norms of offending parameters itself, only on steps with
    offending parameters, and queues them in the step's host copy (one copy of its own at `on_step_end`
    outside a TrainStep). `latest` is the newest finding, `findings` the steps with problems; `row(step)` and
    `events(step)` answer for the newest step and the one before (a recorder whose step ends late asks then).
    """

    def __init__(self, model: nn.Module, probe: GradNormProbe | None = None) -> None:
        if probe is not None and probe.model is not model:
            raise ValueError("OptimizerCoverage: the probe watches a different model")
        self.model = model
        self.probe = probe
        self._named = list(model.named_parameters())
        self.latest: CoverageFinding | None = None
        self.findings: list[CoverageFinding] = []
        self._awaiting: dict[int, CoverageFinding] = {}
        self._recent: dict[int, CoverageFinding] = {}  # the last two steps': a late recorder asks for the previous
        self._norms: torch.Tensor | None = None
        self._slot: Slot | None = None
        self._held = HeldIds()
        if probe is not None:
            probe.subscribe(self._on_probe_stats)

    def on_after_backward(self, ctx: Any) -> None:
        """TrainStep event: check membership by id(param); no device work unless a parameter is outside."""
        held = self._held.of(ctx.optimizer)
        outside = [(name, p) for name, p in self._named
                   if p.requires_grad and p.grad is not None and id(p) not in held]
        frozen = [name for name, p in self._named if id(p) in held and not p.requires_grad]
        finding = CoverageFinding(ctx.step, [(name, math.nan) for name, _ in outside], frozen)
        self.latest = finding
        self._recent = {k: f for k, f in self._recent.items() if k == ctx.step - 1} | {ctx.step: finding}
        self._norms = None
        if finding.ok:
            return
        self.findings.append(finding)
        if not outside:
            return
        if self.probe is not None:
            self._awaiting[ctx.step] = finding
            return
        with torch.no_grad():
            grads = [p.grad for _, p in outside]
            self._norms = torch.stack([n.to(grads[0].device) for n in
                                       compat.foreach_norm(grads, 2, dtype=torch.float32)])
        packet = getattr(ctx, "packet", None)
        if packet is not None:  # in the step's host copy (outside a TrainStep: copied at on_step_end)
            self._slot, self._norms = packet.add(self._norms), None

    def on_step_end(self, ctx: Any) -> None:
        """TrainStep event: fill in the offending gradient norms (without `on_pack`: one copy of its own)."""
        if self._slot is not None:
            values, self._slot = self._slot.value.tolist(), None
        elif self._norms is not None:
            values, self._norms = host.to_host(self._norms).tolist(), None
        else:
            return
        self.latest.fill_norms({name: value for (name, _), value in zip(self.latest.outside_optimizer, values)})

    def _on_probe_stats(self, stats: StepStats) -> None:
        finding = self._awaiting.pop(stats.step, None)
        if finding is not None:
            finding.fill_norms(dict(zip(stats.param_names, stats.param_norm.tolist())))

    def row(self, step: int) -> dict[str, int]:
        """With a probe: `outside_optimizer/<group>`, the group's tensors that got a gradient outside the optimizer
        at `step` (0 for every group when the optimizer holds them all)."""
        finding = self._recent.get(step)
        if self.probe is None or finding is None:
            return {}
        outside = {name for name, _ in finding.outside_optimizer}
        return {f"outside_optimizer/{group}": sum(name in outside for name in members)
                for group, members in self.probe.groups.items()}

    def events(self, step: int) -> list[tuple[str, dict[str, Any]]]:
        """The finding of `step` as a "coverage" event when it found a problem."""
        finding = self._recent.get(step)
        if finding is None or finding.ok:
            return []
        return [("coverage", {"step": step, "line": finding.one_line(), "outside_optimizer": finding.outside_optimizer,
                              "frozen_in_optimizer": finding.frozen_in_optimizer})]

    def one_line(self) -> str:
        """The latest finding as one line, e.g. `step 1: 22 trainable tensors outside the optimizer (...)`."""
        if self.latest is None:
            return "no step checked yet"
        return self.latest.one_line()
