"""Opt-in activation statistics from forward hooks: max |a|, RMS and non-finite count per module and step.

Each hooked module's output (its first tensor, for modules returning tuples such as LSTM) is reduced on the
device in float32 and accumulated into a preallocated (M, 3) device buffer; under a TrainStep the buffer is
queued in the step's own host copy (at `on_after_backward`), without one `collect()` copies it (one copy). A
module called several times in a step (micro-batches, a predictor run per decoding step) contributes every call:
max over calls, RMS over all their entries, counts summed. Forwards with gradients disabled (validation under no_grad/inference_mode) are not recorded unless
`include_no_grad=True`, so evaluation between steps does not leak into the next step's statistics.
"""

from __future__ import annotations

import functools
import math
import weakref
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from workbench.instrument import host
from workbench.instrument.observer import StepObserver

# model -> the ActivationStats whose hooks are on it: a re-run notebook cell replaces, never doubles, them.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, ActivationStats] = weakref.WeakKeyDictionary()

MAX, SUMSQ, NONFINITE = 0, 1, 2  # buffer columns


def _first_tensor(output: Any) -> torch.Tensor | None:
    """The first tensor in a module output: the tensor itself, or the first found depth-first in tuples,
    lists (LSTM's (output, (h, c)), PackedSequence) and mapping values."""
    if isinstance(output, torch.Tensor):
        return output
    items = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def leaf_modules_with_params(model: nn.Module) -> list[str]:
    """Names of modules without children that hold parameters of their own (the default hooked set)."""
    return [name for name, module in model.named_modules()
            if next(module.children(), None) is None and next(module.parameters(recurse=False), None) is not None]


class ActivationStats(StepObserver):
    """Forward-hook statistics of `modules` (names in `model.named_modules()`; default: leaf modules with
    parameters).

    `with ActivationStats(model) as acts:` registers the hooks and removes every one of them on exit; as a
    TrainStep observer use `with acts.attached(step):`. At most one instance hooks a model at a time: entering
    another (a re-run notebook cell) first removes the previous one's hooks. After each step `latest` maps
    module -> (max |a|, RMS, non-finite count) for the modules that ran; `records()` flattens it for a run log.
    """

    def __init__(self, model: nn.Module, modules: Sequence[str] | None = None, *,
                 include_no_grad: bool = False) -> None:
        self.model = model
        self.modules = list(leaf_modules_with_params(model) if modules is None else modules)
        known = dict(model.named_modules())
        unknown = [name for name in self.modules if name not in known]
        if unknown:
            raise ValueError(f"ActivationStats: {unknown[0]!r} is not a module of this model")
        self._targets = [known[name] for name in self.modules]
        self.include_no_grad = include_no_grad
        self._buffer = torch.zeros(len(self.modules), 3, dtype=torch.float32)
        self._numel = [0] * len(self.modules)
        self._handles: list[RemovableHandle] = []
        self._queued: tuple[list[int], list[int], Any] | None = None
        self.step = 0
        self.latest: dict[str, tuple[float, float, int]] = {}

    def _hook(self, index: int, module: nn.Module, args: Any, output: Any) -> None:
        if not (self.include_no_grad or torch.is_grad_enabled()):
            return
        a = _first_tensor(output)
        if a is None or not a.is_floating_point() or a.numel() == 0:
            return
        if a.device != self._buffer.device and not any(self._numel):
            # Follow the model's device (first use, or moved between steps) rather than copy every statistic.
            self._buffer = self._buffer.to(a.device)
        with torch.no_grad():
            a = a.detach()
            row = self._buffer[index]
            # One pass each, and fast on CPU too (an inf-norm or a bool sum is several times slower there).
            # aminmax and maximum propagate NaN, so a NaN activation shows as a NaN max.
            lo, hi = torch.aminmax(a)
            torch.maximum(row[MAX], torch.maximum(hi, lo.neg()).to(row.device), out=row[MAX])
            sumsq = torch.linalg.vector_norm(a, 2, dtype=torch.float32).square()
            nonfinite = torch.count_nonzero(a * 0)  # a * 0 is 0 where a is finite, NaN where it is not
            row[SUMSQ:].add_(torch.stack((sumsq, nonfinite.float())).to(row.device))
        self._numel[index] += a.numel()

    def attach(self, step: Any = None) -> None:
        """Register the hooks (once), and observe `step` (a TrainStep) when given."""
        other = _ACTIVE.get(self.model)
        if other is not None and other is not self:
            other.detach()
        if not self._handles:
            self._handles = [module.register_forward_hook(functools.partial(self._hook, i))
                             for i, module in enumerate(self._targets)]
            _ACTIVE[self.model] = self
        if step is not None:
            super().attach(step)

    def detach(self) -> None:
        """Remove every hook and stop observing; statistics already accumulated stay for `collect()`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if _ACTIVE.get(self.model) is self:
            del _ACTIVE[self.model]
        super().detach()

    def __enter__(self) -> ActivationStats:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def on_after_backward(self, ctx: Any) -> None:
        """TrainStep event: the step's forwards are done; queue their statistics in its host copy now, so a copy
        the step takes before its update carries them (outside a TrainStep: copied at on_step_end)."""
        if getattr(ctx, "packet", None) is not None:
            self._queue(ctx)

    def on_pack(self, ctx: Any) -> None:
        """TrainStep event: queue the statistics unless already queued (a step skipped before backward)."""
        if self._queued is None:
            self._queue(ctx)

    def _queue(self, ctx: Any) -> None:
        """Queue the accumulated statistics in the step's host copy and reset the accumulators."""
        ran = [i for i, n in enumerate(self._numel) if n]
        self._queued = (ran, list(self._numel), ctx.packet.add(self._buffer.clone()) if ran else None)
        self._buffer.zero_()
        self._numel = [0] * len(self.modules)

    def on_step_end(self, ctx: Any) -> None:
        """TrainStep event: decode the statistics the step's copy brought (without `on_pack`: copy them now)."""
        if self._queued is None:
            self.collect(ctx.step)
            return
        (ran, numel, slot), self._queued = self._queued, None
        self.step = ctx.step
        self.latest = self._decode(ran, numel, slot.value.reshape(-1, 3) if slot is not None else None)

    def collect(self, step: int | None = None) -> dict[str, tuple[float, float, int]]:
        """Copy what the hooks accumulated since the last collect to the host (one copy; none when no hooked
        module ran), reset the accumulators, and return `latest`."""
        self.step = self.step + 1 if step is None else step
        ran = [i for i, n in enumerate(self._numel) if n]
        if not ran:
            self.latest = {}
            return self.latest
        values = host.to_host(self._buffer)
        self._buffer.zero_()
        self.latest = self._decode(ran, self._numel, values)
        self._numel = [0] * len(self.modules)
        return self.latest

    def _decode(self, ran: list[int], numel: list[int], values: Any) -> dict[str, tuple[float, float, int]]:
        """(max |a|, RMS, non-finite count) per module that ran, from the (M, 3) host buffer."""
        return {self._label(i): (float(values[i, MAX]), math.sqrt(float(values[i, SUMSQ]) / numel[i]),
                                 int(round(float(values[i, NONFINITE])))) for i in ran}

    def _label(self, index: int) -> str:
        return self.modules[index] or "(root)"

    def row(self, step: int) -> dict[str, float | int]:
        """`records()` when the latest statistics are those of `step`."""
        return self.records() if self.step == step else {}

    def records(self) -> dict[str, float | int]:
        """Flat run-log row of `latest`: act_max/<module>, act_rms/<module>, act_nonfinite/<module>."""
        row: dict[str, float | int] = {}
        for name, (amax, rms, nonfinite) in self.latest.items():
            row[f"act_max/{name}"] = amax
            row[f"act_rms/{name}"] = rms
            row[f"act_nonfinite/{name}"] = nonfinite
        return row
