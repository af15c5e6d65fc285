"""Gradient statistics per parameter, per group and globally, at one host copy per step (or per `every` steps).

What the values are:

- `.grad` as it is at `on_after_backward`: after every micro-batch backward of the optimizer step (with gradient
  accumulation the statistics are per optimizer step, never per micro-batch) and after
  `scaler.unscale_(optimizer)`. `unscale_` only touches the optimizer's parameters, so a parameter OUTSIDE the
  optimizer still holds its gradient multiplied by the loss scale: exactly what `clip_grad_norm_` over all model
  parameters sees (TrainStep's `clip_scope="model"`, the seed's behaviour).
- The global norm is over every parameter that has a `.grad`, computed as `clip_grad_norm_` computes it (the
  2-norm of the per-parameter 2-norms). With `clip_scope="optimizer"` TrainStep clips over the optimizer's
  parameters only, so its `grad_norm` differs whenever parameters outside the optimizer hold gradients.
- Norms are computed in float32 even for fp16 gradients: an fp16 norm overflows (65504) long before the values do.
  The per-group and global norms combine the per-parameter ones in float64 on the host (so a group of finite
  norms near float32's limit does not overflow where `clip_grad_norm_`'s float32 total would).
- A parameter without `.grad` is absent from that step's per-parameter arrays (NaN in `records()`'s
  fixed-length vector); a group none of whose parameters has a gradient is absent from the group dicts.
- Non-finite counts travel in float32: exact up to 2**24 per entry, and never rounded to or from zero.

Cost per step with k parameters holding a gradient and G groups: three multi-tensor reductions over the
gradients (`torch._foreach_norm` with ord 2 and 0, `torch._foreach_max` of |g|; on a CPU, a min-max pass per
tensor instead of the last), one temporary the size of the gradients (|g|, then zeroed for the non-finite count;
on a CPU only at a step whose norms are not all finite) and one concatenation, all on the gradients' device; the
per-group and global values are summed on the host from the per-parameter ones the copy carries anyway. The
statistics reach the host once per `every` steps: inside a TrainStep's own copy (queued in `ctx.packet` at
`on_after_backward`, the update ratio at `on_pack`), or through `workbench.instrument.host.to_host` in `collect()`,
`flush()` and without a TrainStep.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from workbench.instrument import host
from workbench.instrument.groups import ParamGroups, default_groups, groups_from_patterns
from workbench.instrument.host import Slot, surely_finite
from workbench.instrument.observer import StepObserver
from workbench.train import compat


HISTORY_SIZE = 1000  # steps of StepStats a probe keeps by default


@dataclass
class StepStats:
    """One optimizer step's gradient statistics, on the host.

    `param_norm`, `param_max`, `param_nonfinite` are (k,) arrays aligned with `param_names`, the k parameters
    that had a gradient at this step. `update_ratio` (per group ||w_after - w_before|| / ||w_before||) and
    `not_updated` (per group, the tensors that got a non-zero gradient but no update) are None unless the probe
    was built with update_ratio=True; `scale` is the GradScaler scale this step's backward used (None without an
    enabled scaler).
    """

    step: int
    global_norm: float
    group_norm: dict[str, float]
    group_max: dict[str, float]
    group_nonfinite: dict[str, int]
    param_names: list[str]
    param_norm: np.ndarray
    param_max: np.ndarray
    param_nonfinite: np.ndarray
    update_ratio: dict[str, float] | None
    scale: float | None
    not_updated: dict[str, int] | None = None
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class _Layout:
    """The parameters with a gradient at a step and the device mask reducing them into groups.

    index: positions in the probe's parameter list (k,); groups: the G groups holding at least one of them;
    member: (G, k) bool on the pack device (the first gradient's; the update ratio's group sums), `member_host`
    the same on the host (the gradient statistics' group sums, taken after the copy); spread: gradients live on
    several devices.
    """

    index: tuple[int, ...]
    groups: list[str]
    member: torch.Tensor
    member_host: np.ndarray
    spread: bool
    names: list[str]  # the k parameters' names (shared by every StepStats of the layout: do not change it)

    def stack(self, values: Sequence[torch.Tensor]) -> torch.Tensor:
        """k 0-d tensors -> (k,) on the pack device."""
        if self.spread:
            return torch.stack([v.to(self.member.device, non_blocking=True) for v in values])
        return torch.stack(values)


@dataclass
class _Pending:
    """A step whose statistics are still on the device: `parts` concatenate to the flat layout of `_decode`."""

    step: int
    layout: _Layout
    has_scale: bool
    parts: list[torch.Tensor]
    has_ratio: bool = False
    extra_names: list[str] = field(default_factory=list)
    extra: list[torch.Tensor] = field(default_factory=list)

    @property
    def size(self) -> int:
        g, k = len(self.layout.groups), len(self.layout.index)
        return int(self.has_scale) + 3 * k + (2 * g if self.has_ratio else 0) + len(self.extra_names)

    def packed(self) -> list[torch.Tensor]:
        """The parts in `_decode`'s order: the statistics, the update ratio, then the carried values."""
        if not self.extra:
            return self.parts
        device = self.parts[0].device
        return self.parts + [torch.stack([v.detach().to(device, torch.float32).reshape(()) for v in self.extra])]


@dataclass
class _Snapshot:
    """Parameters before the optimizer step: copies (for the update), their float32 norms (k,), and which of
    them got a non-zero gradient (k,) bool."""

    layout: _Layout
    before: list[torch.Tensor]
    before_norm: torch.Tensor
    received: torch.Tensor


def _group_sum_sq(member: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """sqrt of the per-group sum of squares of (k,) `values`: (G,). `where`, not a matmul: 0 * NaN would put
    one parameter's NaN into every group."""
    return torch.where(member, values.square(), 0.0).sum(dim=1).sqrt()


def _scale_tensor(scaler: torch.amp.GradScaler | None, device: torch.device) -> torch.Tensor | None:
    if scaler is None or not scaler.is_enabled():
        return None
    # The device tensor, read for free where get_scale() is a host sync (.item()); the concatenation copies it
    # before scaler.update() rewrites it in place, so it is this step's scale.
    scale = compat.scale_tensor(scaler)
    if isinstance(scale, torch.Tensor):
        return scale.to(device, torch.float32, non_blocking=True).reshape(1)
    return torch.full((1,), scaler.get_scale(), dtype=torch.float32, device=device)


def _decode(pending: _Pending, values: np.ndarray, param_names: list[str]) -> StepStats:
    """Inverse of the packing: [scale?, param norm, max, nonfinite (k each), update ratio and not-updated
    count? (G each), carried values]. The global and per-group values are summed here, in float64: the copy
    carries the per-parameter ones anyway, and a few host sums cost less than their device kernels."""
    groups, g, k = pending.layout.groups, len(pending.layout.groups), len(pending.layout.index)
    r = g if pending.has_ratio else 0
    scale, p_norm, p_max, p_nf, ratio, stale, extra = np.split(values, np.cumsum([int(pending.has_scale), k, k, k,
                                                                                  r, r]))
    p_norm = p_norm.astype(np.float64)
    # A max reduction need not propagate NaN on every backend; the L2 norm's sum always does.
    p_max = np.where(np.isnan(p_norm), p_norm, p_max.astype(np.float64))
    p_nf = np.rint(p_nf).astype(np.int64)
    member = pending.layout.member_host
    # `where`, not a product: 0 * NaN would put one parameter's NaN into every group
    squares = np.where(member, np.square(p_norm), 0.0)
    return StepStats(
        step=pending.step,
        global_norm=float(np.sqrt(np.square(p_norm).sum())),
        group_norm=dict(zip(groups, np.sqrt(squares.sum(axis=1)).tolist())),
        group_max=dict(zip(groups, np.where(member, p_max, 0.0).max(axis=1).tolist())),
        group_nonfinite=dict(zip(groups, np.where(member, p_nf, 0).sum(axis=1).tolist())),
        param_names=param_names,
        param_norm=p_norm,
        param_max=p_max,
        param_nonfinite=p_nf,
        update_ratio=dict(zip(groups, ratio.tolist())) if pending.has_ratio else None,
        scale=float(scale[0]) if pending.has_scale else None,
        not_updated=dict(zip(groups, np.rint(stale).astype(np.int64).tolist())) if pending.has_ratio else None,
        extra=dict(zip(pending.extra_names, extra.tolist())),
    )


class GradNormProbe(StepObserver):
    """Per-step gradient norms, max |g| and non-finite counts per parameter, per group and globally.

    As a TrainStep observer (`probe.attach(step)` or `with probe.attached(step):`) it computes at
    `on_after_backward` and, every `every` steps, queues the pending steps there in the step's host copy (the
    update ratio follows at `on_pack`; decoded at `on_step_end`). Without TrainStep call `collect()` after your
    own backward. After each copy `latest` holds the newest StepStats and `history` the last `history_size` of
    them (a run's every step is in its RunRecord and run log; one StepStats is a few KB, so a long run's would
    not fit in memory); `records()` flattens one for a run log.

    groups: a ParamGroups, a mapping of group name -> pattern(s) for `groups_from_patterns`, or None for
    `default_groups(model)`. update_ratio: also record per group ||w_after - w_before|| / ||w_before|| across
    the optimizer step and the number of tensors that got a non-zero gradient but no update (a parameter outside
    the optimizer, or a skipped step); it keeps a copy of the parameters with a gradient between the two events.
    """

    def __init__(self, model: nn.Module, groups: ParamGroups | Mapping[str, str | Sequence[str]] | None = None,
                 *, every: int = 1, update_ratio: bool = False, history_size: int = HISTORY_SIZE) -> None:
        if every < 1:
            raise ValueError(f"every: expected a positive number of steps, got {every}")
        if history_size < 1:
            raise ValueError(f"history_size: expected a positive number of steps, got {history_size}")
        self.model = model
        self.every = every
        self.update_ratio = update_ratio
        if groups is None:
            groups = default_groups(model)
        elif not isinstance(groups, ParamGroups):
            groups = groups_from_patterns(model, groups)
        self.groups = groups
        named = list(model.named_parameters())
        self.param_labels: list[str] = [name for name, _ in named]
        self._params = [p for _, p in named]
        # Empty tensors are left out: they have no entries, and an inf-norm of nothing is an error.
        self._sized = [i for i, p in enumerate(self._params) if p.numel() > 0]
        self._position = {name: i for i, name in enumerate(self.param_labels)}
        self._membership = np.zeros((len(groups), len(named)), dtype=bool)
        for row, (group, members) in enumerate(groups.items()):
            unknown = [m for m in members if m not in self._position]
            if unknown:
                raise ValueError(f"parameter group {group!r}: {unknown[0]!r} is not a parameter of this model")
            self._membership[row, [self._position[m] for m in members]] = True
        self._layouts: dict[tuple[tuple[int, ...], torch.device], _Layout] = {}
        self._current: _Pending | None = None
        self._pending: list[_Pending] = []
        self._queued: tuple[list[_Pending], list[Slot]] | None = None  # queued at on_after_backward
        self._packed: dict[int, tuple[list[_Pending], list[Slot]]] = {}  # past on_pack, by step, until its end
        self._snapshot: _Snapshot | None = None
        self._listeners: list[Callable[[StepStats], None]] = []
        self._last_step = 0
        # the last step's float32 gradient norms (k,) on the device, with their positions in named_parameters()
        self.grad_norms: tuple[tuple[int, ...], torch.Tensor] | None = None
        self.latest: StepStats | None = None
        self.history: deque[StepStats] = deque(maxlen=history_size)

    def subscribe(self, callback: Callable[[StepStats], None]) -> None:
        """Call `callback(stats)` for every step right after its host copy (OptimizerCoverage uses it)."""
        self._listeners.append(callback)

    def _layout(self, index: tuple[int, ...], grads: list[torch.Tensor]) -> _Layout:
        # The set of parameters with gradients changes only at stage changes: masks move to the device once.
        device = grads[0].device
        key = (index, device)
        if key not in self._layouts:
            member = self._membership[:, list(index)]
            active = member.any(axis=1)
            groups = [name for name, keep in zip(self.groups, active) if keep]
            spread = any(g.device != device for g in grads)
            self._layouts[key] = _Layout(index, groups, torch.from_numpy(member[active]).to(device), member[active],
                                         spread, [self.param_labels[i] for i in index])
        return self._layouts[key]

    def _record(self, step: int, scaler: torch.amp.GradScaler | None, snapshot: bool) -> torch.Tensor | None:
        """Compute the step's statistics; returns its (k,) per-parameter gradient norms (None without a gradient)."""
        if self._current is not None:
            # The previous step raised between backward and its end (TrainStep's "stop" policy): keep its stats.
            self._pending.append(self._current)
            self._current = None
        self._last_step = step
        params = self._params
        index = tuple([i for i in self._sized if params[i].grad is not None])
        self.grad_norms = None
        if not index:
            return None
        grads = [self._params[i].grad for i in index]
        layout = self._layout(index, grads)
        with torch.no_grad():
            scale = _scale_tensor(scaler, layout.member.device)
            packed, norms = self._grad_stats(grads, layout, scale)
            self._current = _Pending(step, layout, scale is not None, [packed])
            self.grad_norms = (index, norms)
            if snapshot:
                # a non-finite gradient was received too (NaN > 0 is False)
                self._take_snapshot(layout, (norms > 0) | ~torch.isfinite(norms))
        return norms

    @staticmethod
    def _grad_stats(grads: list[torch.Tensor], layout: _Layout,
                    scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed statistics and the (k,) per-parameter gradient norms."""
        f32 = torch.float32
        norms = layout.stack(compat.foreach_norm(grads, 2, dtype=f32))
        magnitudes: Sequence[torch.Tensor] | None = None
        if grads[0].device.type == "cpu":
            # On a CPU a multi-tensor kernel is a loop over the tensors anyway: one min-max pass per tensor reads
            # each gradient once and writes no temporary (|g| then its max read it twice and write it once).
            bounds = [torch.aminmax(g) for g in grads]
            maxs = torch.maximum(layout.stack([b.max for b in bounds]), -layout.stack([b.min for b in bounds]))
            maxs = maxs.to(f32)
        else:
            # One temporary the size of the gradients serves max |g| and the non-finite count (a max over |g| is
            # several times faster than the inf-norm, and exact in any dtype).
            magnitudes = compat.foreach_abs(grads)
            maxs = layout.stack([m.to(f32) for m in compat.foreach_max(magnitudes)])
        if surely_finite(norms):  # no NaN or inf under a finite float32 norm: the count's two passes are moot
            nonfinite = torch.zeros_like(norms)
        else:
            # |g| * 0 is 0 where g is finite and NaN where it is not; the ord-0 "norm" counts the non-zeros.
            if magnitudes is None:
                magnitudes = compat.foreach_abs(grads)
            compat.foreach_mul_(magnitudes, 0.0)
            nonfinite = layout.stack(compat.foreach_norm(magnitudes, 0, dtype=f32))
        return torch.cat(([] if scale is None else [scale]) + [norms, maxs, nonfinite]), norms

    def _take_snapshot(self, layout: _Layout, received: torch.Tensor) -> None:
        params = [self._params[i] for i in layout.index]
        if self._snapshot is None or self._snapshot.layout is not layout:
            before = [torch.empty_like(p) for p in params]
        else:
            before = self._snapshot.before
        compat.foreach_copy_(before, params)
        before_norm = layout.stack(compat.foreach_norm(params, 2, dtype=torch.float32))
        self._snapshot = _Snapshot(layout, before, before_norm, received)

    def _ratio(self, snapshot: _Snapshot) -> torch.Tensor:
        params = [self._params[i] for i in snapshot.layout.index]
        with torch.no_grad():
            compat.foreach_sub_(snapshot.before, params)  # now w_before - w_after, in place: no second copy
            delta = snapshot.layout.stack(compat.foreach_norm(snapshot.before, 2, dtype=torch.float32))
            member = snapshot.layout.member
            ratio = _group_sum_sq(member, delta) / _group_sum_sq(member, snapshot.before_norm)
            stale = (member & snapshot.received & (delta == 0)).sum(dim=1).float()
            return torch.cat([ratio, stale])

    def on_after_backward(self, ctx: Any) -> None:
        """TrainStep event (gradients final and unscaled, before clipping): compute this step's statistics and,
        when a copy is due, queue them (with the pending steps') in the step's host copy right away, so a copy the
        step takes before its update (a `skip_step` decision) carries them."""
        if self._queued is not None:  # the previous step raised before its copy: its steps wait again
            self._pending = self._queued[0][:-1] + self._pending
            self._current, self._queued = self._queued[0][-1], None
        norms = self._record(ctx.step, ctx.scaler, snapshot=self.update_ratio)
        packet = getattr(ctx, "packet", None)
        if packet is not None and norms is not None:
            packet.offer_grad_norms(self.model, norms)  # the step's gradient screen, when the tracer asks
        if packet is not None and self._current is not None and len(self._pending) + 1 >= self.every:
            pending, self._pending = self._pending, []
            head = torch.cat([part for p in pending for part in p.packed()] + self._current.parts)
            self._queued = (pending + [self._current], [packet.add(head)])

    def _finish_step(self) -> None:
        """Close the current step: add its update ratio and move it to the pending steps."""
        current, self._current = self._current, None
        if current is None:
            return  # no gradient this step: the loss was skipped before backward, or nothing is trainable
        if self.update_ratio and self._snapshot is not None:
            current.parts.append(self._ratio(self._snapshot))
            current.has_ratio = True
        self._pending.append(current)

    def on_pack(self, ctx: Any) -> None:
        """TrainStep event (after the optimizer step): the update ratio and carried values of a step whose
        statistics are queued join the step's copy; a step not due yet waits with the pending ones."""
        if self._queued is None:
            self._finish_step()
            return
        current, self._current = self._current, None
        tail = []
        if self.update_ratio and self._snapshot is not None:
            tail.append(self._ratio(self._snapshot))
            current.has_ratio = True
        tail += current.packed()[len(current.parts):]  # the carried values, when any
        if tail:
            # It may cross in the next step's copy: the step's end then follows that step's on_after_backward.
            self._queued[1].append(ctx.packet.add(torch.cat(tail)))
        self._packed[ctx.step], self._queued = self._queued, None

    def on_step_end(self, ctx: Any) -> None:
        """TrainStep event: decode what the step's copy brought. Called without `on_pack` (a loop that is not a
        TrainStep), it finishes the step and copies to the host itself every `every` steps."""
        if ctx.step in self._packed:
            pending, slots = self._packed.pop(ctx.step)
            self._deliver(pending, np.concatenate([slot.value for slot in slots]))
            return
        self._finish_step()
        if len(self._pending) >= self.every:
            self.flush()

    def carry(self, values: Mapping[str, torch.Tensor]) -> None:
        """Bring 0-d device tensors (a loss, a found-inf flag) to the host in the current step's copy; they come
        back in `StepStats.extra` and `records()`. Call after the step's backward and before its copy (for a
        TrainStep observer: before `on_step_end`). Without statistics for the step (no gradient), nothing is
        carried."""
        if self._current is None:
            return
        for name, value in values.items():
            self._current.extra_names.append(name)
            self._current.extra.append(value)

    def collect(self, optimizer: torch.optim.Optimizer | None = None, scaler: torch.amp.GradScaler | None = None,
                *, step: int | None = None) -> StepStats | None:
        """Statistics of the gradients as they are now, for a loop without TrainStep; one host copy.

        Call right after your own backward(s) and, with a GradScaler, after `scaler.unscale_(optimizer)`; pass
        the scaler to record its scale and the optimizer to have the probe check that unscale_ happened (it
        raises ValueError otherwise). The update ratio needs both events: call `on_after_backward(ctx)` and
        `on_step_end(ctx)` around your optimizer step instead. Returns None when no parameter has a gradient.
        """
        if optimizer is not None and scaler is not None and scaler.is_enabled():
            if not compat.unscaled(scaler, optimizer):
                raise ValueError("collect: the optimizer's gradients are still multiplied by the loss scale; "
                                 "call scaler.unscale_(optimizer) first")
        step = self._last_step + 1 if step is None else step
        self._record(step, scaler, snapshot=False)
        stats = self.flush()
        return stats[-1] if stats and stats[-1].step == step else None

    def flush(self) -> list[StepStats]:
        """Copy every step still on the device to the host in one copy; returns their stats (oldest first)."""
        if self._current is not None:
            self._pending.append(self._current)
            self._current = None
        if not self._pending:
            return []
        pending, self._pending = self._pending, []
        return self._deliver(pending, host.to_host(torch.cat([part for p in pending for part in p.packed()])))

    def _deliver(self, pending: list[_Pending], values: np.ndarray) -> list[StepStats]:
        """Decode the host values of `pending` steps into StepStats, keep them and tell the listeners."""
        offsets = np.cumsum([0] + [p.size for p in pending])
        out = [_decode(p, values[start:stop], p.layout.names)
               for p, start, stop in zip(pending, offsets[:-1], offsets[1:])]
        self.history.extend(out)
        self.latest = out[-1]
        for stats in out:
            for listener in self._listeners:
                listener(stats)
        return out

    def detach(self) -> None:
        """Stop observing and copy any pending steps to the host."""
        super().detach()
        self.flush()

    @property
    def vector_labels(self) -> dict[str, list[str]]:
        """Column names of the vector series in `records()`."""
        return {"param_grad_norm": self.param_labels}

    def row(self, step: int) -> dict[str, Any]:
        """`records()` of `step` once its statistics reached the host (empty before, or without a gradient)."""
        return self.records() if self.latest is not None and self.latest.step == step else {}

    def records(self, stats: StepStats | None = None) -> dict[str, Any]:
        """Flat run-log row for `stats` (default: latest): grad_norm/<group>, grad_max/<group>,
        grad_nonfinite/<group>, grad_norm/global, param_grad_norm (vector over `param_labels`, NaN where a
        parameter had no gradient), update_ratio/<group>, not_updated/<group> and scaler/scale when recorded."""
        stats = self.latest if stats is None else stats
        if stats is None:
            return {}
        row: dict[str, Any] = {"grad_norm/global": stats.global_norm}
        for group in stats.group_norm:
            row[f"grad_norm/{group}"] = stats.group_norm[group]
            row[f"grad_max/{group}"] = stats.group_max[group]
            row[f"grad_nonfinite/{group}"] = stats.group_nonfinite[group]
        full = np.full(len(self.param_labels), np.nan)
        full[[self._position[name] for name in stats.param_names]] = stats.param_norm
        row["param_grad_norm"] = full
        if stats.update_ratio is not None:
            row.update({f"update_ratio/{group}": value for group, value in stats.update_ratio.items()})
            row.update({f"not_updated/{group}": value for group, value in stats.not_updated.items()})
        if stats.scale is not None:
            row["scaler/scale"] = stats.scale
        row.update(stats.extra)
        return row
