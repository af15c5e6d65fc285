"""What the optimizer did at one of its steps: the one implementation `watch`, `byo.instrument` and Lightning's
`WorkbenchCallback` share.

`OptimizerUpdates.before(optimizer)` runs right before an optimizer's update (gradients final: after `unscale_`
and any clip) and `after()` right after it. Between them it holds, on the device, the gradient norm of every
parameter with a gradient, a copy of those the optimizer holds (one buffer per parameter, reused while the set
stays the same) and their norms; `after()` turns the copies into the norm of each one's change. `pack(packet)`
queues all of it in the caller's one host copy and `decode()` (after the copy) returns the step's `Updates`.

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
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from workbench.instrument import ParamGroups
from workbench.instrument.host import HostPacket, Slot
from workbench.instrument.observer import StepObserver
from workbench.train import compat

__all__ = ["GradientMarks", "OptimizerUpdates", "Updates"]


@dataclass
class Updates:
    """One update on the host. `received`: parameters with a gradient (those in the optimizer first), `inside`
    and `outside` the optimizer; `idle`: trainable parameters in the optimizer without a gradient; `norm`: the
    gradient norm of each received one; `before` / `diff`: for each inside one, its norm before the update and the
    norm of its change (absent when the update has not run)."""

    received: list[str]
    inside: list[str]
    outside: list[str]
    idle: list[str]
    norm: dict[str, float]
    before: dict[str, float]
    diff: dict[str, float]
    stale: list[str]   # inside ones whose gradient was not cleared since the previous update (`GradientMarks`)

    def movable(self) -> list[str]:
        """Received tensors whose gradient could move them: finite and above 1e-6 of the step's largest gradient
        norm (a bias right before a BatchNorm gets ~1e-9, which no float32 update represents)."""
        top = max((x for x in self.norm.values() if math.isfinite(x)), default=0.0)
        return [n for n, x in self.norm.items() if math.isfinite(x) and x > 1e-6 * top]

    def stuck(self) -> list[str]:
        """Tensors in the optimizer whose gradient could move them but that did not change."""
        return [n for n in self.movable() if self.diff.get(n) == 0]

    def rows(self, groups: ParamGroups) -> dict[str, float | int]:
        """Per group with a gradient: `update_ratio/<group>` (||w_after - w_before|| / ||w_before|| over its
        tensors in the optimizer; 0 when none is), `not_updated/<group>` (its tensors that could move but did
        not: unchanged in the optimizer, or outside it) and `stale_grad/<group>` (its tensors in the optimizer
        whose gradient was not cleared since the previous update)."""
        stuck, outside, stale = set(self.stuck()), set(self.outside), set(self.stale)
        row: dict[str, float | int] = {}
        for group, members in groups.items():
            got = [n for n in members if n in self.norm]
            if not got:
                continue
            base = math.sqrt(sum(self.before.get(n, 0.0) ** 2 for n in got))
            moved = math.sqrt(sum(self.diff.get(n, 0.0) ** 2 for n in got))
            row[f"update_ratio/{group}"] = moved / base if base > 0 else (0.0 if moved == 0 else math.inf)
            row[f"not_updated/{group}"] = sum(1 for n in got if n in stuck or n in outside)
            row[f"stale_grad/{group}"] = sum(1 for n in got if n in stale)
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
        self._hooks: dict[str, Any] = {}
        self._unhooked = list(named)
        self._mark: dict[str, tuple[int, int]] = {}   # name -> (id, version) of its .grad at the last update
        self._checked: set[str] = set()
        self.stale: set[str] = set()                   # judged stale since the last update
        self._queued = False

    def hook(self) -> None:
        """A pre-hook on every trainable parameter not hooked yet (a module unfrozen later included); called at
        every step, so it looks only at the parameters still without one."""
        for name in [n for n in self._unhooked if self.named[n].requires_grad]:
            self._hooks[name] = self.named[name].register_hook(self._hook(name, self.named[name]))
            self._unhooked.remove(name)

    def unhook(self) -> None:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks = {}
        self._unhooked = list(self.named)

    def _hook(self, name: str, p: nn.Parameter) -> Callable[[torch.Tensor], None]:
        def hook(_: torch.Tensor) -> None:
            if name not in self._checked:
                self._checked.add(name)
                g = p.grad
                if g is not None and self._mark.get(name) == (id(g), compat.tensor_version(g)):
                    self.stale.add(name)
            if self.on_backward is not None and not self._queued:
                self._queued = True
                compat.queue_backward_callback(self._backward_done)
        return hook

    def _backward_done(self) -> None:
        self._queued = False
        if self.on_backward is not None:
            self.on_backward()

    def mark(self) -> None:
        """After an update: remember every gradient as it is now, and start judging afresh."""
        self._mark = {name: (id(p.grad), compat.tensor_version(p.grad)) for name, p in self.named.items()
                      if p.grad is not None}
        self.stale, self._checked = set(), set()


class _Pending:
    """One update still on the device."""

    def __init__(self, received: list[tuple[str, nn.Parameter]], inside: int, outside: list[str],
                 idle: list[str], stale: list[str]) -> None:
        self.received, self.inside, self.outside, self.idle, self.stale = received, inside, outside, idle, stale
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
        self._mine = {id(p) for p in self.named.values()}
        self._pending: _Pending | None = None
        self._copies: tuple[tuple[str, ...], list[torch.Tensor]] | None = None
        self._hooks: list[Any] = []
        self._held_cache: tuple[Any, set[int]] | None = None
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
        key = (id(optimizer), tuple((id(g["params"]), len(g["params"])) for g in optimizer.param_groups))
        if self._held_cache is None or self._held_cache[0] != key:
            self._held_cache = (key, {id(p) for group in optimizer.param_groups for p in group["params"]})
        return self._held_cache[1]

    def before(self, optimizer: torch.optim.Optimizer) -> bool:
        """Right before `optimizer` updates: note who got a gradient and copy what it will change. False (nothing
        noted) when the optimizer holds none of the model's parameters."""
        if not self.owns(optimizer):
            return False
        held = self.held(optimizer)
        inside: list[tuple[str, nn.Parameter]] = []
        outside: list[tuple[str, nn.Parameter]] = []
        idle: list[str] = []
        for n, p in self.named.items():  # one pass: this runs at every step
            if p.grad is None:
                if p.requires_grad and id(p) in held:
                    idle.append(n)
            elif id(p) in held:
                inside.append((n, p))
            elif p.requires_grad:
                outside.append((n, p))
        self.marks.hook()  # parameters made trainable since the last update (their first backward is not judged)
        stale = sorted(self.marks.stale.intersection(n for n, _ in inside))
        pending = _Pending(inside + outside, len(inside), [n for n, _ in outside], idle, stale)
        with torch.no_grad():
            # under no_grad the parameters are read as they are: a detach per tensor would cost a dispatch each
            params = [p for _, p in inside]
            if params:
                key = tuple(n for n, _ in inside)
                if self._copies is None or self._copies[0] != key:
                    self._copies = (key, [torch.empty_like(p) for p in params])
                compat.foreach_copy_(self._copies[1], params)
            if pending.received:  # the gradients' norms, then the parameters': one reduction
                grads = [p.grad for _, p in pending.received]
                pending.tensors["norms"] = torch.stack(compat.foreach_norm(grads + params, 2, dtype=torch.float32))
        self._pending = pending
        return True

    def after(self) -> None:
        """Right after the update: the norm of each copied parameter's change (computed in place on the copies)."""
        pending = self._pending
        if pending is None or "diff" in pending.tensors or pending.marked:
            return
        pending.marked = True
        self.marks.mark()
        if not pending.inside or self._copies is None:
            return
        with torch.no_grad():
            copies = self._copies[1]
            compat.foreach_sub_(copies, [p for _, p in pending.received[:pending.inside]])
            pending.tensors["diff"] = torch.stack(compat.foreach_norm(copies, 2, dtype=torch.float32))

    def pending_inside(self) -> list[str]:
        """Names of the parameters in the optimizer the bracketed update holds copies of (none when none)."""
        pending = self._pending
        return [] if pending is None else [n for n, _ in pending.received[:pending.inside]]

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
        names = [n for n, _ in pending.received]
        inside = names[:pending.inside]
        v = {k: s.value.tolist() for k, s in pending.slots.items()}
        norms = v.get("norms", [])
        return Updates(received=names, inside=inside, outside=pending.outside, idle=pending.idle,
                       norm=dict(zip(names, norms[:len(names)])), before=dict(zip(inside, norms[len(names):])),
                       diff=dict(zip(inside, v.get("diff", []))), stale=pending.stale)

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
        return self.latest.rows(self.groups) if self.latest is not None and self.step == step else {}
