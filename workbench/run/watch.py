"""Watch your own training loop: `watch(model, optimizer)` observes an unchanged loop and reports silent bugs.

    from workbench import watch

    with watch(model, optimizer, scaler=scaler, log_path="runs/mine.h5") as w:
        for x, y in loader:                      # your loop, as it was
            loss = F.cross_entropy(model(x), y)
            w.loss(loss)                         # optional: gives watch the loss trend
            optimizer.zero_grad(); loss.backward(); optimizer.step()
    print(w.summary()["outcome"], w.findings)

Watch wraps nothing you call. It uses torch's optimizer step hooks (`register_optimizer_step_pre_hook` /
`..._post_hook`: the optimizer you pass and any the loop builds later over the model's parameters), one gradient
pre-hook per trainable parameter (to see whether a gradient was cleared since the last step) and, only after a
non-finite value was seen, forward hooks on every module (to name the first module whose output goes non-finite on
the next forward). Leaving the block removes every one of them.

Per optimizer step everything it measures moves to the host in ONE `to_host` copy (`HostPacket`): per-group
gradient norm and non-finite count (as the optimizer sees them: after unscale_ and your clip), the clip
coefficient (some tensors' gradient norm at the step over their norm at the end of the last backward, divided by
the GradScaler's scale: every tensor's under a GradScaler, else a few small ones' in the optimizer, since a clip
by norm scales all alike), the update ratio per group (||w_after - w_before|| / ||w_before||, measured by
`workbench.run.updates.OptimizerUpdates`, the observer `byo.instrument` and the Lightning callback share), the
tensors that got a non-zero gradient but did not change, the parameters and buffers of frozen modules that changed,
which parameters are non-finite (only those written since the last step are checked: those the update wrote by the
norm of their change, any other by the shared screen `nonfinite_flags`; a suspect is settled by counting its
non-finite elements, so a finite parameter whose norm overflows is not one), the loss and the scale. Memory: a
copy of the parameters that got a gradient, held across the optimizer step (for the update ratio).

Steps are the loop's iterations, as a TrainStep counts them, so a watch log classifies like a TrainStep log of the
same run. A step the GradScaler skips never reaches the optimizer (no step hook fires): watch tells iterations
apart by the scaler's `update()` (it writes the scale in place once per iteration, moving the scale tensor's
version counter: a host-side count, no device read) and records each skipped one as its own row (`skipped`, its
loss and its gradient norms at the end of its backward, its scale from the backoff), in the next step's copy.

Findings (a dict each: kind, step, tensors, message; printed once, in one line, when first seen):
    outside_optimizer  trainable tensors that received a gradient but are in no optimizer group
    not_updated        tensors in the optimizer that received a non-zero gradient but did not change at the step
    frozen_changed     parameters or buffers of a frozen module (every parameter requires_grad=False, or named in
                       `frozen=`) that changed across a step (a BatchNorm left in train mode updates its statistics)
    stale_grad         gradients not cleared since the previous optimizer step (several backwards then one step
                       then a clear is accumulation, not stale)
    nonfinite          the first non-finite loss, gradient or parameter; the first module (in forward order) whose
                       output went non-finite is added on the next forward
    clip_collapse      the clip coefficient below `rules.clip_floor` on more than `rules.clip_share` of the steps
    no_gradient        a trainable group in the optimizer that got no gradient at a step (a detached branch)

What watch cannot see: a step skipped without a GradScaler passed to watch (the loop's own guard, or a scaler it
was not given), the update of a skipped step (there is none: its row has no update ratio), gradients that a
loop clears between backward and step (they read as not updated), writes through `.data` (they do not move the
version counter: a frozen parameter changed that way, or a non-finite value written so into a parameter the
optimizer does not update, is not seen), anything outside `model`, and with
torch.compile'd optimizers or several processes, whatever the hooks are not called for. With several optimizers over
one model, each step is judged against the optimizer that is stepping (the other's tensors read as outside it).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from workbench.instrument.host import HostPacket, Slot
from workbench.records import Recorder, RunRecord
from workbench.records.outcome import OutcomeRules, classify
from workbench.train import compat
from workbench.run.byo import Groups, _param_groups
from workbench.run.param_screen import ParamScreen, ScreenCheck
from workbench.run.updates import OptimizerUpdates, Updates

__all__ = ["FINDINGS", "Watch", "findings_text", "watch"]

_REFERENCE_SIZE = 256   # elements of a reference tensor for the clip coefficient (see `_reference`)
_HELD = 64   # skipped iterations held on the device before they are recorded in a copy of their own

FINDINGS = ("outside_optimizer", "not_updated", "frozen_changed", "stale_grad", "nonfinite", "clip_collapse",
            "no_gradient")


def _frozen_modules(model: nn.Module, named: Sequence[str]) -> dict[str, nn.Module]:
    """The outermost modules meant to be frozen: those named, and those with parameters, none trainable."""
    found = {name: model.get_submodule(name) for name in named}
    for name, module in model.named_modules():
        if name and not any(name == f or name.startswith(f + ".") for f in found):
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                found[name] = module
    return found


class _Iteration:
    """What one iteration of the loop gave watch before its optimizer step (or its skip), still on the device."""

    def __init__(self) -> None:
        self.loss: dict[str, torch.Tensor] | None = None   # the last loss given in the iteration
        self.bad: torch.Tensor | None = None                # how many earlier losses given in it were non-finite
        self.weights: dict[str, float] = {}
        self.names: list[str] = []                          # tensors with a gradient at the end of its last backward
        self.norms: torch.Tensor | None = None              # (len(names),) their gradient norms there (scaled)


class _Snapshot:
    """What the pre-step hook queued for the step's copy, besides the update (`OptimizerUpdates`)."""

    def __init__(self) -> None:
        self.screen: ScreenCheck | None = None                  # the parameters' non-finite check
        self.frozen: list[str] = []                             # frozen parameters written since the last step
        self.buffers: list[str] = []                            # frozen buffers compared with their last copy
        self.packet = HostPacket()
        self.slots: dict[str, Slot] = {}
        self.names: dict[str, list[str]] = {}
        self.skipped: list[tuple[_Iteration, dict[str, Slot]]] = []   # iterations the GradScaler skipped before


class Watch:
    """Observes `model` trained by `optimizer` in your own loop; build it with `watch`. See the module docstring.

    Attributes: `record` (the RunRecord, one row per optimizer step), `findings` (list of dicts), `step` (optimizer
    steps seen), `groups` (ParamGroups: every parameter belongs to one, the root's in "(root)").
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 scaler: torch.amp.GradScaler | None = None, groups: Groups = None,
                 frozen: Sequence[str] | None = None, log_path: str | Path | None = None, overwrite: bool = False,
                 trace: bool = True, rules: OutcomeRules = OutcomeRules(),
                 say: Callable[[str], None] = print) -> None:
        if next(model.parameters(), None) is None:
            raise ValueError(f"watch: {type(model).__qualname__} has no parameters: expected a model with at least "
                             f"one parameter to train")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"watch: optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.groups = _param_groups(model, groups)
        self.frozen_names = list(frozen or [])
        for name in self.frozen_names:
            model.get_submodule(name)  # a typo fails here, naming the module
        self.log_path, self.overwrite, self.trace, self.rules, self.say = log_path, overwrite, trace, rules, say
        self.named = dict(model.named_parameters())
        self.group_of = {n: g for g, members in self.groups.items() for n in members}
        self.updates = OptimizerUpdates(model, self.groups, optimizer, on_backward=self._after_backward)
        self.record = RunRecord({"model": type(model).__qualname__, "optimizer": type(optimizer).__qualname__,
                                 "loop": "watch", "groups": dict(self.groups.items())})
        self.findings: list[dict[str, Any]] = []
        self.step = 0
        self.recorder: Recorder | None = None
        self._handles: list[Any] = []
        self._module_hooks: list[Any] = []
        self._outputs: list[tuple[str, torch.Tensor]] = []
        self._seen: set[tuple[str, str]] = set()
        self._ref: tuple[set[int], list[tuple[str, nn.Parameter]]] | None = None   # the clip coefficient's
        # reference tensors
        self._scaling = scaler is not None and scaler.is_enabled()
        self._iterations: dict[int, _Iteration] = {}   # by the GradScaler's update count (0 without one)
        self._next = 0                                 # update count of the first iteration not yet recorded
        self._params_finite = (True, 0, 0)             # as of the last applied step: finite, bad tensors, elements
        self._snap: _Snapshot | None = None
        self._low_clip = 0
        self._weights: dict[str, float] = {}
        self._params = list(self.named.values())
        self._index = {n: i for i, n in enumerate(self.named)}
        self.screen = ParamScreen(self.named)   # (re)built at attach: every parameter is checked at the first step
        self._buffer_base: dict[str, torch.Tensor] = {}             # frozen buffers' values at the last step
        self._frozen_cache: tuple[tuple[bool, ...], dict[str, torch.Tensor]] | None = None
        self._t0 = 0.0

    # ------------------------------------------------------------------------------------------- attaching

    def attach(self) -> Watch:
        """Install the hooks and open the run log. Attaching twice does nothing."""
        if self._handles:
            return self
        if self.log_path is not None:
            Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
        self.recorder = Recorder(self.record, log_path=self.log_path, overwrite=self.overwrite,
                                 attrs={"torch": torch.__version__})
        # Global step hooks, so an optimizer the loop rebuilds (a new stage, an unfreeze) is watched as well;
        # steps of optimizers that hold none of the model's parameters are ignored.
        self._handles = [register_optimizer_step_pre_hook(self._pre_step),
                         register_optimizer_step_post_hook(self._post_step)]
        self.updates.marks.hook()
        if self._scaling:
            assert self.scaler is not None
            self.recorder.note(scaler={"init_scale": self.scaler.get_scale(),
                                       "growth_interval": self.scaler.get_growth_interval(),
                                       "growth_factor": self.scaler.get_growth_factor(),
                                       "backoff_factor": self.scaler.get_backoff_factor()})
        self._next = self._scaler_updates()
        self.screen = ParamScreen(self.named)
        self._buffer_base = {n: t.detach().clone() for n, t in self._frozen_tensors().items()
                             if not isinstance(t, nn.Parameter)}
        self._t0 = time.perf_counter()
        return self

    def _frozen_tensors(self) -> dict[str, torch.Tensor]:
        """Name -> parameter or buffer of every module meant to be frozen now (recomputed only when some
        parameter's requires_grad changed)."""
        key = tuple(p.requires_grad for p in self.named.values())
        if self._frozen_cache is None or self._frozen_cache[0] != key:
            found: dict[str, torch.Tensor] = {}
            for mname, module in _frozen_modules(self.model, self.frozen_names).items():
                found.update(module.named_parameters(prefix=mname))
                found.update(module.named_buffers(prefix=mname))
            self._frozen_cache = (key, found)
        return self._frozen_cache[1]

    def detach(self, status: str = "finished", **attrs: Any) -> None:
        """Record the iterations the GradScaler skipped since the last step, remove every hook and close the run log
        with `status`. Detaching twice does nothing."""
        if self._handles and self._scaling:
            self._flush(self._scaler_updates())
        for handle in [*self._handles, *self._module_hooks]:
            handle.remove()
        self._handles, self._module_hooks = [], []
        self.updates.marks.unhook()
        if self.recorder is not None:
            self.recorder.close(status, **attrs)

    def __enter__(self) -> Watch:
        return self.attach()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.detach()
        else:
            self.detach("failed", error=repr(exc).replace("\n", " "))

    def _after_backward(self) -> None:
        """End of a backward: gradient norms before anything (unscale_, a clip, a skip) touched them. Under a
        GradScaler every tensor's (a skipped step's row needs them); without one only the reference tensors for the
        clip coefficient (`_reference`: a clip by norm scales every gradient alike)."""
        if self._scaling:
            received = [(n, p.grad) for n, p in self.named.items() if p.grad is not None]
        else:
            received = self._reference()
        if not received:
            return
        names, grads = [n for n, _ in received], [g for _, g in received]
        it = self._iteration()
        it.names = names
        with torch.no_grad():
            it.norms = torch.stack(compat.foreach_norm(grads, 2, dtype=torch.float32))

    def _reference(self) -> list[tuple[str, torch.Tensor]]:
        """[(name, gradient)] of the clip coefficient's reference tensors: the optimizer's parameters with a
        gradient, the 4 smallest of at least 256 elements (their norm at the end of the backward costs little,
        and four of them rarely all get a zero gradient), else the largest one; chosen again only when the
        optimizer's groups change or one of them has no gradient. [] when none has a gradient."""
        held = self.updates.held(self.optimizer)
        cached = self._ref
        if cached is not None and cached[0] is held:
            grads = [(n, p.grad) for n, p in cached[1]]
            if all(g is not None for _, g in grads):
                return grads  # type: ignore[return-value]
        found = sorted(((p.numel(), n) for n, p in self.named.items() if id(p) in held and p.grad is not None))
        if not found:
            return []
        chosen = [n for size, n in found if size >= _REFERENCE_SIZE][:4] or [found[-1][1]]
        self._ref = (held, [(n, self.named[n]) for n in chosen])
        return [(n, g) for n in chosen if (g := self.named[n].grad) is not None]

    def _scaler_updates(self) -> int:
        """How many times the GradScaler updated its scale (the version counter of its scale tensor, which
        `update()` writes in place once per iteration): the index of the current iteration; 0 without one."""
        scale = compat.scale_tensor(self.scaler) if self._scaling and self.scaler is not None else None
        return compat.tensor_version(scale) if scale is not None else 0

    def _iteration(self) -> _Iteration:
        """The current iteration's record; more than `_HELD` skipped iterations held are recorded first (a loop
        whose every step is skipped keeps no more than that on the device)."""
        now = self._scaler_updates()
        if len(self._iterations) > _HELD:
            self._flush(now)
        return self._iterations.setdefault(now, _Iteration())

    def _optimizer_params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    # ------------------------------------------------------------------------------------------- the loop's side

    def loss(self, loss: torch.Tensor | Mapping[str, torch.Tensor],
             weights: Mapping[str, float] | None = None) -> None:
        """Give watch this iteration's loss (a scalar tensor, or a dict of terms logged one by one; their sum is
        the total unless the dict has a "total"). Call it any time before the optimizer step. `weights`: the loss
        weights of a curriculum (recorded as `weight/<term>`), so the loss trend is judged at the final ones."""
        if not isinstance(loss, (torch.Tensor, Mapping)):
            raise TypeError(f"watch.loss: got {type(loss).__name__} {loss!r}: expected a scalar tensor or a dict of "
                            f"named scalar tensors")
        terms = {"total": loss} if isinstance(loss, torch.Tensor) else dict(loss)
        for name, value in terms.items():
            if not (isinstance(value, torch.Tensor) and value.numel() == 1):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else ""
                raise TypeError(f"watch.loss: term {name!r}: expected a scalar tensor, got {type(value).__name__}"
                                f"{shape}")
        if "total" not in terms:
            terms = {"total": sum(terms.values()), **terms}
        it = self._iteration()
        if it.loss is not None:
            # An earlier loss of this iteration (micro-batches, or a loop that gives losses without stepping):
            # folded into a running device count, so nothing else is kept; the last one is judged on the host.
            bad = (~torch.isfinite(it.loss["total"])).float()
            it.bad = bad if it.bad is None else it.bad + bad
        it.loss = {k: v.detach() if v.dim() == 0 else v.detach().reshape(()) for k, v in terms.items()}
        it.weights = self._weights = dict(weights or {})
        self.updates.marks.hook()  # a module unfrozen since the last step: hooked before its backward

    # ------------------------------------------------------------------------------------------- the step

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self.updates.before(optimizer):
            return  # an optimizer over none of the model's parameters
        self.optimizer = optimizer
        snap = _Snapshot()
        packet = snap.packet
        scale = compat.scale_tensor(self.scaler) if self._scaling and self.scaler is not None else None
        if scale is not None:
            snap.slots["scale"] = packet.add(scale.detach().float().reshape(1))
        now = self._scaler_updates()
        snap.skipped = self._pack_skipped(now, packet)
        it = self._iterations.pop(now, None) or _Iteration()
        self._next = now + 1
        if it.norms is not None:
            snap.names["backward"] = it.names
            snap.slots["backward_norm"] = packet.add(it.norms)
        if it.loss is not None:
            snap.names["loss"] = list(it.loss)
            snap.slots["loss"] = packet.add(torch.stack([v.float() for v in it.loss.values()]))
            if it.bad is not None:
                snap.slots["loss_nonfinite"] = packet.add(it.bad.reshape(1))
        self._snap = snap

    def _pack_skipped(self, upto: int, packet: HostPacket) -> list[tuple[_Iteration, dict[str, Slot]]]:
        """Queue in `packet` what the iterations from `_next` to `upto` (exclusive) gave before the GradScaler
        skipped their step (none without a GradScaler)."""
        skipped = []
        for version in range(self._next, upto):
            it = self._iterations.pop(version, None) or _Iteration()
            slots = {}
            if it.loss is not None:
                slots["loss"] = packet.add(torch.stack([v.float() for v in it.loss.values()]))
            if it.norms is not None:
                slots["norms"] = packet.add(it.norms)
            skipped.append((it, slots))
        for version in [v for v in self._iterations if v < upto]:
            del self._iterations[version]
        self._next = max(self._next, upto)
        return skipped

    def _flush(self, upto: int) -> None:
        """Record the skipped iterations before `upto` now, in one copy of their own (at the detach, or when more
        than `_HELD` are held)."""
        packet = HostPacket()
        skipped = self._pack_skipped(upto, packet)
        if not skipped:
            return
        assert self.scaler is not None
        current = compat.scale_tensor(self.scaler)
        assert current is not None  # updates happened, so the scale tensor exists
        scale = packet.add(current.detach().float().reshape(1))
        packet.read()
        self._record_skipped(skipped, float(scale.value[0]))

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if optimizer is not self.optimizer:
            return
        snap, self._snap = self._snap, None
        if snap is None:
            return
        packet = snap.packet
        self.updates.after()
        self.updates.pack(packet)
        moved = self.screen.moved()
        self._check_frozen(snap, moved)
        snap.screen = self.screen.queue(packet, moved, self.updates.pending_inside())
        outputs, self._outputs = self._outputs, []
        if outputs:
            snap.slots["outputs"] = packet.add(torch.stack([flag for _, flag in outputs]))
        packet.read()  # the step's one host copy
        if snap.skipped:
            self._record_skipped(snap.skipped, float(snap.slots["scale"].value[0]))
        self.step += 1
        self._record(snap, outputs)

    def _check_frozen(self, snap: _Snapshot, moved: set[int]) -> None:
        """After the update, what changed since the previous step (or the attach) in the modules frozen now: a
        parameter whose version counter moved (`ParamScreen.moved`), so a module frozen just before this step is
        judged on this step's update, or that is no longer the tensor watch holds; a frozen buffer is compared with
        its copy (kernels such as BatchNorm's write running statistics without bumping the counter; buffers are
        small)."""
        current = self._frozen_tensors()
        index = self._index
        snap.frozen = [n for n, t in current.items() if isinstance(t, nn.Parameter) and n in index
                       and (index[n] in moved or self._params[index[n]] is not t)]
        base = self._buffer_base
        buffers = [(n, t.detach()) for n, t in current.items() if not isinstance(t, nn.Parameter)]
        compared = [(n, t) for n, t in buffers if n in base and base[n].shape == t.shape]
        if compared:
            snap.buffers = [n for n, _ in compared]
            snap.slots["buffers"] = snap.packet.add(torch.stack([(t != base[n]).any().float() for n, t in compared]))
        self._buffer_base = {}  # only the buffers frozen now: one unfrozen and frozen again starts afresh
        for n, t in buffers:
            if n in base and base[n].shape == t.shape:
                self._buffer_base[n] = base[n].copy_(t)  # queued after the comparison above: no new allocation
            else:
                self._buffer_base[n] = t.clone()

    # ------------------------------------------------------------------------------------------- the host side

    def _record(self, snap: _Snapshot, outputs: list[tuple[str, torch.Tensor]]) -> None:
        step, v = self.step, {k: s.value for k, s in snap.slots.items()}
        row: dict[str, Any] = {"step_ms": (time.perf_counter() - self._t0) * 1e3}
        self._t0 = time.perf_counter()
        u = self.updates.decode()
        assert u is not None
        norm = u.norm
        grads = u.gradient_rows()
        total, nonfinite_grad = grads.pop("grad_norm/global"), grads.pop("nonfinite_grad")
        row.update(grads)
        row.update(u.rows())
        row["grad_norm/global"], row["nonfinite_grad"] = total, nonfinite_grad
        if "scale" in v:
            row["scaler/scale_before"] = float(v["scale"][0])
        row["skipped"] = False
        coef = None
        if "backward_norm" in v and norm:
            # over the same tensors: their norm at the step over their (unscaled) norm at the end of the backward
            same = [(norm[n], x) for n, x in zip(snap.names["backward"], v["backward_norm"].tolist()) if n in norm]
            backward = math.sqrt(sum(x ** 2 for _, x in same)) / (row.get("scaler/scale_before") or 1.0)
            ratio = math.sqrt(sum(x ** 2 for x, _ in same)) / backward if backward > 0 else math.nan
            if math.isfinite(backward) and ratio > 0 and math.isfinite(ratio):
                coef = min(1.0, ratio)
                row["clip/coefficient"] = coef
                row["clip/total_norm"] = row["grad_norm/global"] / ratio
        if self._weights:
            row.update({f"weight/{k}": float(x) for k, x in self._weights.items()})
        if "loss" in v:
            row.update({f"loss/{k}": float(x) for k, x in zip(snap.names["loss"], v["loss"].tolist())})
        assert snap.screen is not None
        nonfinite_params, elements = self.screen.settle(snap.screen, u.diff)
        tensors = len(nonfinite_params)
        row.update({"params_finite": tensors == 0, "params_nonfinite/tensors": tensors,
                    "params_nonfinite/elements": elements})
        self._params_finite = (tensors == 0, tensors, elements)
        assert self.recorder is not None
        self.recorder.record_step(step, row)
        self._find(snap, u, v, nonfinite_params, coef, outputs)

    def _record_skipped(self, skipped: list[tuple[_Iteration, dict[str, Slot]]], scale: float) -> None:
        """One row per iteration whose step the GradScaler skipped, in order, as a TrainStep records it: its loss,
        its gradient norms at the end of its backward (unscaled by its scale), no update (no update ratio).
        `scale`: the scale after the last of them (each skip multiplied it by the backoff factor)."""
        assert self.scaler is not None and self.recorder is not None
        backoff = self.scaler.get_backoff_factor()
        held = {id(p) for p in self._optimizer_params()}
        for k, (it, slots) in enumerate(skipped):
            self.step += 1
            before = scale / backoff ** (len(skipped) - k)
            row: dict[str, Any] = {"skipped": True, "nonfinite_grad": True, "scaler/scale_before": before,
                                   **dict(zip(("params_finite", "params_nonfinite/tensors",
                                               "params_nonfinite/elements"), self._params_finite))}
            norm = dict(zip(it.names, (x / before for x in slots["norms"].value.tolist()))) if "norms" in slots \
                else {}
            for group, members in self.groups.items():
                got = [n for n in members if n in norm]
                if got:
                    row[f"grad_norm/{group}"] = math.sqrt(sum(norm[n] ** 2 for n in got))
                    row[f"grad_nonfinite/{group}"] = sum(1 for n in got if not math.isfinite(norm[n]))
                    row[f"outside_optimizer/{group}"] = sum(1 for n in got if id(self.named[n]) not in held)
            if norm:
                row["grad_norm/global"] = math.sqrt(sum(x ** 2 for x in norm.values()))
            row.update({f"weight/{k}": float(x) for k, x in it.weights.items()})
            losses = dict(zip(it.loss or {}, slots["loss"].value.tolist())) if "loss" in slots else {}
            row.update({f"loss/{k}": x for k, x in losses.items()})
            self.recorder.record_step(self.step, row)
            if not all(math.isfinite(x) for x in losses.values()) and \
                    self._report("nonfinite", [], "a non-finite loss on a step the GradScaler skipped; the first "
                                 "module with a non-finite output is named at the next forward") and self.trace:
                self._hook_modules()

    def _find(self, snap: _Snapshot, u: Updates, v: dict[str, Any], nonfinite_params: list[str],
              coef: float | None, outputs: list[tuple[str, torch.Tensor]]) -> None:
        step = self.step
        outside = u.outside
        if outside:
            self._report("outside_optimizer", outside, f"{len(outside)} trainable tensors received a gradient but "
                         f"are in no optimizer group ({_some(outside)}): they never train")
        stuck = u.stuck()
        if stuck:
            self._report("not_updated", stuck, f"{len(stuck)} tensors in the optimizer got a non-zero gradient but "
                         f"did not change at the step ({_some(stuck)})")
        changed = snap.frozen + [n for n, f in zip(snap.buffers, v.get("buffers", [])) if f]
        if changed:
            self._report("frozen_changed", changed, f"{len(changed)} parameters or buffers of frozen modules changed "
                         f"since the previous step ({_some(changed)})")
        stale = u.stale
        if stale:
            self._report("stale_grad", stale, f"{len(stale)} gradients were not cleared since the previous optimizer "
                         f"step ({_some(stale)}): they accumulate across steps")
        if u.idle:
            idle = u.idle
            groups = sorted({self.group_of.get(n, n) for n in idle})
            self._report("no_gradient", idle, f"trainable tensors in the optimizer got no gradient "
                         f"({_some(idle)}; groups {', '.join(groups)}): detached from the loss?", key=",".join(groups))
        bad_loss = int(v["loss_nonfinite"][0]) if "loss_nonfinite" in v else 0
        if "loss" in v:  # the last loss given, judged on the host
            bad_loss += not math.isfinite(float(v["loss"][snap.names["loss"].index("total")]))
        bad_grads = u.nonfinite
        if bad_loss or bad_grads or nonfinite_params:
            what = (["a loss"] if bad_loss else []) + ([f"gradients of {_some(bad_grads)}"] if bad_grads else []) + \
                ([f"parameters {_some(nonfinite_params)}"] if nonfinite_params else [])
            if self._report("nonfinite", bad_grads + nonfinite_params,
                            f"non-finite {' and '.join(what)}; the first module with a non-finite output is named "
                            f"at the next forward") and self.trace:
                self._hook_modules()
        if outputs:
            first = next((n for (n, _), f in zip(outputs, v["outputs"].tolist()) if f), None)
            if first is not None:
                for finding in self.findings:
                    if finding["kind"] == "nonfinite" and "module" not in finding:
                        finding["module"] = first
                        finding["message"] += f"; first non-finite module output (forward order): {first}"
                        self.say(f"watch: step {step}: first non-finite module output: {first}")
                for handle in self._module_hooks:
                    handle.remove()
                self._module_hooks = []
        if coef is not None:
            self._low_clip += coef < self.rules.clip_floor
            if coef < self.rules.clip_floor and self._low_clip / step > self.rules.clip_share:
                self._report("clip_collapse", [], f"the clip coefficient was {coef:.2g} (below "
                             f"{self.rules.clip_floor:g} on {self._low_clip} of {step} steps): a clip over still-"
                             f"scaled gradients, or a max norm far below the gradient norm")

    def _report(self, kind: str, tensors: list[str], message: str, key: str | None = None) -> bool:
        """Record a finding the first time its kind (and key) is seen; True when it is new."""
        if (kind, key or "") in self._seen:
            return False
        self._seen.add((kind, key or ""))
        finding = {"kind": kind, "step": self.step, "tensors": list(tensors), "message": message}
        self.findings.append(finding)
        self.say(f"watch: step {self.step}: {kind}: {message}")
        if self.recorder is not None:
            self.recorder.event("watch", {"step": self.step, "kind": kind, "tensors": ", ".join(tensors),
                                          "message": message})
        return True

    def _hook_modules(self) -> None:
        """Forward hooks on every module that queue a non-finite flag of its output for the next step's copy."""
        for name, module in self.model.named_modules():
            self._module_hooks.append(module.register_forward_hook(self._output_hook(name or "(root)")))

    def _output_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            tensors = [t for t in (output if isinstance(output, (tuple, list)) else [output])
                       if isinstance(t, torch.Tensor) and t.is_floating_point()]
            if tensors:
                flags = [(~torch.isfinite(t.detach())).any() for t in tensors]
                self._outputs.append((name, torch.stack(flags).any().float()))
        return hook

    # ------------------------------------------------------------------------------------------- results

    def summary(self) -> dict[str, Any]:
        """outcome (by `classify` under `rules`), outcome_reasons, outcome_warnings, findings, steps, log path."""
        outcome = classify(self.record, self.rules)
        return {"outcome": outcome.kind, "outcome_reasons": outcome.reasons, "outcome_warnings": outcome.warnings,
                "findings": [dict(f) for f in self.findings], "steps": self.step, "log_path": self.record.path}


def findings_text(record: RunRecord, limit: int = 20) -> str:
    """The findings `watch` recorded in a run log (its "watch" table), one line each, for `workbench trace`; empty
    for a run that was not watched."""
    rows = record.tables.get("watch", [])
    if not rows:
        return ""
    lines = [f"watch findings: {len(rows)}"]
    lines += [f"  step {r['step']}: {r['kind']}: {r['message']}" for r in rows[:limit]]
    if len(rows) > limit:
        lines.append(f"  ... {len(rows) - limit} more")
    return "\n".join(lines) + "\n"


def _some(names: Sequence[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (f", ... ({len(names)} in all)" if len(names) > k else "")


def watch(model: nn.Module, optimizer: torch.optim.Optimizer, *, scaler: torch.amp.GradScaler | None = None,
          groups: Groups = None, frozen: Sequence[str] | None = None, log_path: str | Path | None = None,
          overwrite: bool = False, trace: bool = True, rules: OutcomeRules = OutcomeRules(),
          say: Callable[[str], None] = print) -> Watch:
    """A `Watch` over your own loop: use it as a context manager (`with watch(model, optimizer) as w:`) or call
    `attach()` / `detach()`. groups: as `workbench.run.byo.instrument` takes them; frozen: names of modules meant to
    stay frozen (modules whose every parameter has requires_grad=False are frozen anyway); log_path: an HDF5 run
    log (`workbench report` / `trace` / `export` read it); trace: name the first non-finite module output after a
    non-finite value was seen; say: where the one-line findings go."""
    return Watch(model, optimizer, scaler=scaler, groups=groups, frozen=frozen, log_path=log_path,
                 overwrite=overwrite, trace=trace, rules=rules, say=say)
