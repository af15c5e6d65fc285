"""Opt-in activation statistics from forward hooks: max |a|, RMS and non-finite count per module and step.

Each hooked module's output (its first tensor, for modules returning tuples such as LSTM) is reduced on the
device to four scalars per call (min, max, float32 2-norm, non-finite count: three reductions, no bookkeeping op;
on the CPU two where the norm is finite, as the count is then 0),
kept until the step's statistics are queued; then they are stacked into one (calls, 4) tensor, under a TrainStep in
the step's own host copy (at `on_after_backward`), without one by `collect()` (one copy), and combined per module
on the host. A module called several times in a step (micro-batches, a predictor run per decoding step)
contributes every call: max over calls, RMS over all their entries, counts summed. A loop that runs more than
`_HELD` calls between two copies (a long evaluation with `include_no_grad`) has them folded on the host then, so
what is held stays bounded. Forwards with gradients disabled (validation under no_grad/inference_mode) are not
recorded unless `include_no_grad=True`, so evaluation between steps does not leak into the next step's statistics.
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

_HELD = 4096  # calls held on the device before they are folded on the host (one extra copy)


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
        # per call since the last copy: (module index, numel) and its (min, max, 2-norm, non-finite count)
        self._calls: list[tuple[int, int]] = []
        self._values: list[torch.Tensor] = []
        self._folded: dict[int, list[float]] = {}   # calls folded on the host early: index -> [max, sumsq, count, n]
        self._handles: list[RemovableHandle] = []
        self._queued: tuple[list[tuple[int, int]], dict[int, list[float]], Any] | None = None
        self.step = 0
        self.latest: dict[str, tuple[float, float, int]] = {}

    def _hook(self, index: int, module: nn.Module, args: Any, output: Any) -> None:
        if not (self.include_no_grad or torch.is_grad_enabled()):
            return
        a = _first_tensor(output)
        if a is None or not a.is_floating_point() or a.numel() == 0:
            return
        with torch.no_grad():
            a = a.detach()
            # One pass each, and fast on CPU too (an inf-norm or a bool sum is several times slower there); min
            # and max propagate NaN, a * 0 is 0 where a is finite and NaN where it is not. Under a finite norm
            # nothing is NaN or inf: where reading that is free (the CPU), the count's two passes are skipped.
            lo, hi = torch.aminmax(a)
            norm = torch.linalg.vector_norm(a, 2, dtype=torch.float32)
            count = torch.zeros((), dtype=torch.int64) if host.surely_finite(norm) else torch.count_nonzero(a * 0)
            self._values += (lo, hi, norm, count)
        self._calls.append((index, a.numel()))
        if len(self._calls) > _HELD:
            self._fold(self._calls, host.to_host(self._stacked()), self._folded)
            self._calls, self._values = [], []

    def _stacked(self) -> torch.Tensor:
        """(calls, 4) float32 of the held calls' scalars, on the first one's device."""
        device = self._values[0].device
        values = self._values
        if any(v.device != device for v in values):  # a model split over devices
            values = [v.to(device) for v in values]
        return torch.stack(values).float().reshape(-1, 4)

    @staticmethod
    def _fold(calls: list[tuple[int, int]], values: Any, into: dict[int, list[float]]) -> None:
        """Combine the calls' (min, max, 2-norm, count) host rows into `into`: index -> [max |a| (NaN when any
        entry was NaN), sum of squares, non-finite count, entries]."""
        for (index, numel), (lo, hi, norm, count) in zip(calls, values.tolist()):
            amax = math.nan if math.isnan(lo) or math.isnan(hi) else max(-lo, hi)
            acc = into.get(index)
            if acc is None:
                into[index] = [amax, norm * norm, count, numel]
            else:
                acc[0] = math.nan if math.isnan(acc[0]) or math.isnan(amax) else max(acc[0], amax)
                acc[1] += norm * norm
                acc[2] += count
                acc[3] += numel

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
        """Queue the held statistics in the step's host copy and start afresh."""
        slot = ctx.packet.add(self._stacked()) if self._calls else None
        self._queued = (self._calls, self._folded, slot)
        self._calls, self._values, self._folded = [], [], {}

    def on_step_end(self, ctx: Any) -> None:
        """TrainStep event: decode the statistics the step's copy brought (without `on_pack`: copy them now)."""
        if self._queued is None:
            self.collect(ctx.step)
            return
        (calls, folded, slot), self._queued = self._queued, None
        self.step = ctx.step
        self.latest = self._decode(calls, folded, slot.value.reshape(-1, 4) if slot is not None else None)

    def collect(self, step: int | None = None) -> dict[str, tuple[float, float, int]]:
        """Copy what the hooks measured since the last collect to the host (one copy; none when no hooked module
        ran), start afresh, and return `latest`."""
        self.step = self.step + 1 if step is None else step
        values = host.to_host(self._stacked()) if self._calls else None
        self.latest = self._decode(self._calls, self._folded, values)
        self._calls, self._values, self._folded = [], [], {}
        return self.latest

    def _decode(self, calls: list[tuple[int, int]], folded: dict[int, list[float]],
                values: Any) -> dict[str, tuple[float, float, int]]:
        """(max |a|, RMS, non-finite count) per module that ran, in the hooked modules' order."""
        acc = {index: list(row) for index, row in folded.items()}
        if values is not None:
            self._fold(calls, values, acc)
        return {self._label(i): (acc[i][0], math.sqrt(acc[i][1] / acc[i][3]), int(round(acc[i][2])))
                for i in sorted(acc)}

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
