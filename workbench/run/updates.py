"""What the optimizer did at one of its steps: the one implementation `watch`, `byo.instrument` and Lightning's
`WorkbenchCallback` share.

`OptimizerUpdates.before(optimizer)` runs right before an optimizer's update (gradients final: after `unscale_`
and any clip) and `after()` right after it. Between them it holds, on the device, the gradient norm of every
parameter with a gradient, a copy of those the optimizer holds (in one flat buffer, reused while the set stays
the same) and each group's norm, one reduction per run of the buffer that the same groups hold; `after()` turns the
copies into the norm of each one's change. `pack(packet)` queues all of it in the caller's one host copy and
`decode()` (after the copy) returns the step's `Updates`, whose per-group rows the host sums over index lists
worked out once per layout (who has a gradient, who is in the optimizer: the same from one step to the next).

Who brackets the update: torch's global optimizer step hooks (`hook_optimizers()`), which follow any optimizer the
loop builds over the model's parameters (a new stage, an unfreeze) and ignore the rest (a replay's replica); so do
`watch` and, as a TrainStep observer (`attach(step)`: queued at `on_pack`, decoded at `on_step_end`, `row(step)`
for the recorder), `byo.instrument`. Lightning's closure runs the backward inside `optimizer.step`, after torch's
pre-hook, so its callback calls `before` in `on_before_optimizer_step` and `after` once the step returned.

A step whose update was skipped (a GradScaler's overflow, TrainStep's skip_step) never reaches `before`: it has
no `Updates` and its row no update ratio.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from workbench.instrument import ParamGroups
from workbench.instrument.host import HostPacket, Slot
from workbench.instrument.observer import StepObserver
from workbench.train import compat
from workbench.train.optim import HeldIds

__all__ = ["GradientMarks", "OptimizerUpdates", "Updates"]


class _Layout:
    """Who had a gradient at an update and where they stand: the same for every step of a loop until a gradient
    appears or vanishes, a requires_grad flag flips or the optimizer's groups change (then a new one is built).

    `received`: indices (into the model's parameters) of those with a gradient, the optimizer's first; `inside`:
    how many of them the optimizer holds; `idle`: names of trainable ones it holds without a gradient. Per group
    (of `groups`, those holding a received tensor) the positions of its tensors, so the host sums per group over
    lists of indices. The copies of the inside tensors live in one flat buffer per device and dtype, ordered so
    that tensors of the same groups sit side by side: `segments` are those runs, whose norms (one reduction each)
    give every group's norm before the update without a reduction per tensor."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], held: set[int], groups: ParamGroups) -> None:
        inside, outside, idle = [], [], []
        for i, (n, p) in enumerate(named):
            if p.grad is None:
                if p.requires_grad and id(p) in held:
                    idle.append(n)
            elif id(p) in held:
                inside.append(i)
            elif p.requires_grad:
                outside.append(i)
        self.received = inside + outside
        self.inside = len(inside)
        self.names = [named[i][0] for i in self.received]
        self.params = [named[i][1] for i in inside]
        self.idle = idle
        self.key = tuple(self.names[:self.inside])   # what the copies are of
        where = {n: k for k, n in enumerate(self.names)}
        rows = [(g, [where[n] for n in members if n in where]) for g, members in groups.items()]
        rows = [(g, idx) for g, idx in rows if idx]
        self.groups = [g for g, _ in rows]
        self.members = [idx for _, idx in rows]                           # received positions per group
        self.members_inside = [[k for k in idx if k < self.inside] for idx in self.members]
        self.outside = [sum(1 for k in idx if k >= self.inside) for idx in self.members]
        # The flat copies: inside tensors ordered by (device, dtype, the groups holding them).
        holds = [set(idx) for idx in self.members_inside]
        sig = [(p.device, p.dtype, tuple(g for g, idx in enumerate(holds) if k in idx))
               for k, p in enumerate(self.params)]
        order = sorted(range(self.inside), key=lambda k: (str(sig[k][0]), str(sig[k][1]), sig[k][2]))
        self.segments: list[tuple[tuple[torch.device, torch.dtype], int, int]] = []   # (buffer, start, stop)
        self.segment_groups: list[tuple[int, ...]] = []
        self.sizes: dict[tuple[torch.device, torch.dtype], int] = {}
        self.offsets = [0] * self.inside
        for k in order:
            device, dtype, held_by = sig[k]
            buffer, numel = (device, dtype), self.params[k].numel()
            start = self.sizes.get(buffer, 0)
            self.offsets[k], self.sizes[buffer] = start, start + numel
            last = self.segments[-1] if self.segments else None
            if last is not None and last[0] == buffer and last[2] == start and self.segment_groups[-1] == held_by:
                self.segments[-1] = (buffer, last[1], start + numel)
            else:
                self.segments.append((buffer, start, start + numel))
                self.segment_groups.append(held_by)
        self.group_segments = [[s for s, held_by in enumerate(self.segment_groups) if g in held_by]
                               for g in range(len(self.groups))]
        # where each received tensor sits in another instrument's norms, by (their positions, device); None: absent
        self.gathers: dict[tuple[tuple[int, ...], torch.device], torch.Tensor | None] = {}

    def gather(self, index: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
        """Positions in norms over the parameters at `index` (into the model's parameters) of every received
        tensor, as a device tensor (None when one is not among them)."""
        key = (index, device)
        if key not in self.gathers:
            where = {i: k for k, i in enumerate(index)}
            found = [where.get(i) for i in self.received]
            self.gathers[key] = None if None in found else torch.tensor(found, device=device)
        return self.gathers[key]


class _Copies:
    """The flat buffers holding a copy of the inside tensors of one layout, and a view per tensor."""

    def __init__(self, layout: _Layout) -> None:
        self.key = layout.key
        self.flat = {buffer: torch.empty(size, device=buffer[0], dtype=buffer[1])
                     for buffer, size in layout.sizes.items()}
        self.views = [self.flat[(p.device, p.dtype)][start:start + p.numel()].view(p.shape)
                      for p, start in zip(layout.params, layout.offsets)]
        self.segments = [self.flat[buffer][start:stop] for buffer, start, stop in layout.segments]


def _sum_squares(values: list[float], idx: list[int]) -> float:
    return sum([values[k] * values[k] for k in idx])


class Updates:
    """One update on the host. `received`: parameters with a gradient (those in the optimizer first), `inside`
    and `outside` the optimizer; `idle`: trainable parameters in the optimizer without a gradient; `norm`: the
    gradient norm of each received one; `nonfinite`: received ones whose gradient norm is not finite; `diff`: for
    each inside one, the norm of its change (absent when the update has not run); `stale`: inside ones whose
    gradient was not cleared since the previous update (`GradientMarks`). Per group (`rows`, `gradient_rows`): over
    the groups the observer was built with."""

    def __init__(self, layout: _Layout, norms: list[float], segments: list[float], diff: list[float] | None,
                 stale: list[str]) -> None:
        self._layout, self._norms, self._segments, self._diffs = layout, norms, segments, diff
        self.received = layout.names
        self.inside = layout.names[:layout.inside]
        self.outside = layout.names[layout.inside:]
        self.idle = layout.idle
        self.norm = dict(zip(self.received, norms))
        # a sum of float32 norms overflows no float64: it is finite exactly when every norm is
        self._bad = [] if math.isfinite(sum(norms)) else [k for k, x in enumerate(norms) if not math.isfinite(x)]
        self.nonfinite = [self.received[k] for k in self._bad]
        self.diff = {} if diff is None else dict(zip(self.inside, diff))
        self.stale = stale

    def _movable(self) -> list[bool]:
        top = max((x for x in self._norms if math.isfinite(x)), default=0.0)
        return [math.isfinite(x) and x > 1e-6 * top for x in self._norms]

    def _stuck(self) -> list[int]:
        """Positions of the stuck tensors (see `stuck`)."""
        if self._diffs is None or 0.0 not in self._diffs:
            return []
        movable = self._movable()
        return [k for k, d in enumerate(self._diffs) if d == 0 and movable[k]]

    def movable(self) -> list[str]:
        """Received tensors whose gradient could move them: finite and above 1e-6 of the step's largest gradient
        norm (a bias right before a BatchNorm gets ~1e-9, which no float32 update represents)."""
        return [n for n, m in zip(self.received, self._movable()) if m]

    def stuck(self) -> list[str]:
        """Tensors in the optimizer whose gradient could move them but that did not change."""
        return [self.received[k] for k in self._stuck()]

    def rows(self) -> dict[str, float | int]:
        """Per group with a gradient: `update_ratio/<group>` (||w_after - w_before|| / ||w_before|| over its
        tensors in the optimizer; 0 when none is), `not_updated/<group>` (its tensors that could move but did
        not: unchanged in the optimizer, or outside it) and `stale_grad/<group>` (its tensors in the optimizer
        whose gradient was not cleared since the previous update)."""
        layout, diffs = self._layout, self._diffs
        stuck = set(self._stuck())
        stale = {k for k, n in enumerate(self.inside) if n in self.stale} if self.stale else set()
        row: dict[str, float | int] = {}
        for g, group in enumerate(layout.groups):
            inside = layout.members_inside[g]
            base = math.sqrt(_sum_squares(self._segments, layout.group_segments[g]))
            moved = math.sqrt(_sum_squares(diffs, inside)) if diffs is not None else 0.0
            row[f"update_ratio/{group}"] = moved / base if base > 0 else (0.0 if moved == 0 else math.inf)
            row[f"not_updated/{group}"] = layout.outside[g] + (sum(1 for k in inside if k in stuck) if stuck else 0)
            row[f"stale_grad/{group}"] = sum(1 for k in inside if k in stale) if stale else 0
        return row

    def gradient_rows(self) -> dict[str, float | int | bool]:
        """Per group with a gradient: `grad_norm/<group>` (the norm over its received tensors), `grad_nonfinite/
        <group>` (how many of them have a non-finite gradient norm), `outside_optimizer/<group>`; then
        `grad_norm/global` and `nonfinite_grad` over every received tensor."""
        layout, norms = self._layout, self._norms
        bad = set(self._bad)
        row: dict[str, float | int | bool] = {}
        for g, group in enumerate(layout.groups):
            members = layout.members[g]
            row[f"grad_norm/{group}"] = math.sqrt(_sum_squares(norms, members))
            row[f"grad_nonfinite/{group}"] = sum(1 for k in members if k in bad) if bad else 0
            row[f"outside_optimizer/{group}"] = layout.outside[g]
        row["grad_norm/global"] = math.sqrt(sum([x * x for x in norms]))
        row["nonfinite_grad"] = bool(bad)
        return row


class GradientMarks:
    """Which gradients were not cleared since the last update: one gradient pre-hook per trainable parameter.

    A pre-hook runs before autograd accumulates into `p.grad`; the first time after an update, `p.grad` still
    being the very tensor the update saw, unchanged (same object, same version), means nothing cleared it (no
    zero_grad, or one over other parameters). Several backwards and then one update is accumulation, not stale:
    only the first backward after an update is judged. `on_backward`: called once at the end of every backward
    that reached a hooked parameter (queued on autograd's engine by the first hook to run).
    """

    def __init__(self, named: dict[str, nn.Parameter], on_backward: Callable[[], None] | None = None) -> None:
        self.named, self.on_backward = named, on_backward
        self._names, self._params = list(named), list(named.values())
        self._hooks: dict[int, Any] = {}
        self._unhooked = list(range(len(self._names)))
        # by position in `named`: id and version of each .grad at the last update (None / -1: it had none)
        self._ids: list[int | None] = [None] * len(self._names)
        self._versions: list[int] = [-1] * len(self._names)
        self._checked: set[int] = set()
        self.stale: set[str] = set()                   # judged stale since the last update
        self._queued = False

    def hook(self) -> None:
        """A pre-hook on every trainable parameter not hooked yet (a module unfrozen later included); called at
        every step, so it looks only at the parameters still without one."""
        params = self._params
        for k in [k for k in self._unhooked if params[k].requires_grad]:
            self._hooks[k] = params[k].register_hook(self._hook(k, params[k]))
            self._unhooked.remove(k)

    def unhook(self) -> None:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks = {}
        self._unhooked = list(range(len(self._names)))

    def _hook(self, k: int, p: nn.Parameter) -> Callable[[torch.Tensor], None]:
        def hook(_: torch.Tensor) -> None:
            if k not in self._checked:
                self._checked.add(k)
                g = p.grad
                if g is not None and self._ids[k] == id(g) and self._versions[k] == compat.tensor_version(g):
                    self.stale.add(self._names[k])
            if self.on_backward is not None and not self._queued:
                self._queued = True
                compat.queue_backward_callback(self._backward_done)
        return hook

    def _backward_done(self) -> None:
        self._queued = False
        if self.on_backward is not None:
            self.on_backward()

    def mark(self, grads: list[torch.Tensor | None] | None = None) -> None:
        """After an update: remember every gradient as it is now, and start judging afresh. `grads`: every
        parameter's `.grad` in `named`'s order, when the caller has them (the update replaces none)."""
        if grads is None:
            grads = [p.grad for p in self._params]
        self._ids = [None if g is None else id(g) for g in grads]
        self._versions = compat.tensor_versions(grads)
        self.stale, self._checked = set(), set()


class _Pending:
    """One update still on the device."""

    def __init__(self, layout: _Layout, stale: list[str], grads: list[torch.Tensor | None]) -> None:
        self.layout, self.stale, self.grads = layout, stale, grads   # grads: every parameter's, before the update
        self.tensors: dict[str, torch.Tensor] = {}
        self.slots: dict[str, Slot] = {}
        self.marked = False   # the gradients were marked after the update


class OptimizerUpdates(StepObserver):
    """Brackets the optimizer's updates of `model`'s parameters (see the module docstring). `optimizer`: the one
    expected first (None: the first that steps any of the model's parameters); `latest` / `step`: the last
    decoded `Updates` and the step it belongs to (TrainStep observer)."""

    def __init__(self, model: nn.Module, groups: ParamGroups, optimizer: torch.optim.Optimizer | None = None,
                 on_backward: Callable[[], None] | None = None) -> None:
        self.model, self.groups, self.optimizer = model, groups, optimizer
        self.named = dict(model.named_parameters())
        self.marks = GradientMarks(self.named, on_backward)
        self._items = list(self.named.items())
        self._params = list(self.named.values())
        self._mine = {id(p) for p in self._params}
        self._pending: _Pending | None = None
        self._copies: _Copies | None = None
        self._hooks: list[Any] = []
        self._held = HeldIds()
        self._layouts: dict[tuple[Any, ...], _Layout] = {}
        self.latest: Updates | None = None
        self.step = 0

    # ------------------------------------------------------------------------------------------- bracketing

    def owns(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether `optimizer`'s step is one of the model's updates; an optimizer over the model's parameters that
        is not the current one becomes it (the loop rebuilt it)."""
        if optimizer is self.optimizer:
            return True
        if not any(id(p) in self._mine for group in optimizer.param_groups for p in group["params"]):
            return False
        self.optimizer = optimizer
        return True

    def held(self, optimizer: torch.optim.Optimizer) -> set[int]:
        """ids of the optimizer's parameters, rebuilt only when its groups (or their lists) change."""
        return self._held.of(optimizer)

    def _layout(self, optimizer: torch.optim.Optimizer) -> tuple[_Layout, list[torch.Tensor | None]]:
        """The current layout, found by which parameters have a gradient and are trainable (host-side flags, read
        at every step) and built only when that or the optimizer's groups changed; and every parameter's `.grad`."""
        held, generation = self._held.of(optimizer), self._held.generation
        params = self._params
        grads = [p.grad for p in params]
        key = (generation, tuple([g is None for g in grads]), tuple([p.requires_grad for p in params]))
        layout = self._layouts.get(key)
        if layout is None:
            if len(self._layouts) >= 8:  # a loop that keeps changing which tensors get gradients
                self._layouts.clear()
            layout = self._layouts[key] = _Layout(self._items, held, self.groups)
        return layout, grads

    def before(self, optimizer: torch.optim.Optimizer,
               grad_norms: tuple[tuple[int, ...], torch.Tensor] | None = None) -> bool:
        """Right before `optimizer` updates: note who got a gradient and copy what it will change. False (nothing
        noted) when the optimizer holds none of the model's parameters. `grad_norms`: the gradients' float32 norms
        as they are now, when another instrument took them (`GradNormProbe.grad_norms`: their positions in the
        model's parameters and a (k,) tensor), so they are not taken twice."""
        if not self.owns(optimizer):
            return False
        layout, grads = self._layout(optimizer)
        self.marks.hook()  # parameters made trainable since the last update (their first backward is not judged)
        stale = sorted(self.marks.stale.intersection(layout.names[:layout.inside])) if self.marks.stale else []
        pending = _Pending(layout, stale, grads)
        params = layout.params
        with torch.no_grad():
            # under no_grad the parameters are read as they are: a detach per tensor would cost a dispatch each
            received = [grads[i] for i in layout.received]
            shared = None  # the received tensors' norms, picked from `grad_norms` when it holds them all
            if grad_norms is not None and received:
                gather = layout.gather(grad_norms[0], grad_norms[1].device)
                shared = None if gather is None else grad_norms[1].index_select(0, gather)
            norms = list(compat.foreach_norm(received, 2, dtype=torch.float32)) if received and shared is None \
                else []
            if params:
                copies = self._copies
                if copies is None or copies.key != layout.key:
                    copies = self._copies = _Copies(layout)
                compat.foreach_copy_(copies.views, params)
                # after the gradients' norms, each group's norm before the update, from the runs of the flat copies
                norms += compat.foreach_norm(copies.segments, 2, dtype=torch.float32)
            if shared is not None:
                pending.tensors["norms"] = torch.cat([shared, torch.stack(norms).to(shared.device)]) if norms \
                    else shared
            elif norms:
                pending.tensors["norms"] = torch.stack(norms)
        self._pending = pending
        return True

    def after(self) -> None:
        """Right after the update: the norm of each copied parameter's change (computed in place on the copies)."""
        pending = self._pending
        if pending is None or "diff" in pending.tensors or pending.marked:
            return
        pending.marked = True
        self.marks.mark(pending.grads)
        if not pending.layout.inside or self._copies is None:
            return
        with torch.no_grad():
            views = self._copies.views
            compat.foreach_sub_(views, pending.layout.params)
            pending.tensors["diff"] = torch.stack(compat.foreach_norm(views, 2, dtype=torch.float32))

    def pending_inside(self) -> list[str]:
        """Names of the parameters in the optimizer the bracketed update holds copies of (none when none)."""
        pending = self._pending
        return [] if pending is None else pending.layout.names[:pending.layout.inside]

    def pack(self, packet: HostPacket) -> bool:
        """Queue the bracketed update in `packet` (the caller's one host copy); False when there is none."""
        if self._pending is None:
            return False
        self._pending.slots = {k: packet.add(t) for k, t in self._pending.tensors.items()}
        return True

    def decode(self) -> Updates | None:
        """The packed update, once its packet was read; None when there was none. Clears it."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        v = {k: s.value.tolist() for k, s in pending.slots.items()}
        norms, received = v.get("norms", []), len(pending.layout.received)
        return Updates(pending.layout, norms[:received], norms[received:], v.get("diff"), pending.stale)

    # ------------------------------------------------------------------------------------------- torch's hooks

    def hook_optimizers(self) -> None:
        """Bracket every optimizer step through torch's global step hooks and judge the gradients through their
        pre-hooks (`unhook` removes both)."""
        self.marks.hook()
        if not self._hooks:
            self._hooks = [register_optimizer_step_pre_hook(self._pre_hook),
                           register_optimizer_step_post_hook(self._post_hook)]

    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.before(optimizer)  # a pre-hook must return None (anything else replaces the step's arguments)

    def _post_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if optimizer is self.optimizer:
            self.after()

    def unhook(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self.marks.unhook()

    # ------------------------------------------------------------------------------------------- TrainStep

    def attach(self, step: Any) -> None:
        super().attach(step)
        self.hook_optimizers()

    def detach(self) -> None:
        self.unhook()
        super().detach()

    def on_step_start(self, ctx: Any) -> None:
        if self._pending is not None and not self._pending.slots:  # a packed one waits for its (late) step end
            self._pending = None  # an update the last step did not reach (skipped) must not be taken for this one

    def on_pack(self, ctx: Any) -> None:
        self.pack(ctx.packet)

    def on_step_end(self, ctx: Any) -> None:
        self.latest, self.step = self.decode(), ctx.step

    def row(self, step: int) -> dict[str, Any]:
        """`Updates.rows` of `step` (empty when its update was skipped)."""
        return self.latest.rows() if self.latest is not None and self.step == step else {}
