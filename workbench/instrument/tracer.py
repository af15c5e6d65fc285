"""Find the first non-finite tensor of a training step by replaying it (the second tier of anchors.md section 8).

Tier one is `NonFiniteTracer`, a TrainStep observer: it captures a replay bundle at every step start and, at
the step end, asks whether the step went non-finite with one batched reduction and one host read. Tier two is
`localize`, run only on such a step: it replays the bundle on a private replica by calling the same
`TrainStep.run` the live step ran, with a `StepMonitor` that puts each phase under a `TorchDispatchMode` checking
the floating outputs of every op, in execution order, through four phases:

- forward: `TrainStep.forward` (under the step's autocast); ops are attributed to the innermost module running
  (forward pre/post hooks keep a module stack; ops outside the model belong to `<loss_fn>`).
- backward: `loss.backward()` (scaled by the GradScaler like the live step) and `scaler.unscale_`. On CPU the
  autograd engine runs on the calling thread and the mode sees every backward op;
  `compat.current_autograd_node()` names the autograd node running it. Each node is labelled in forward
  with the module whose op created it, and a node feeding a parameter's AccumulateGrad (directly or through
  transposes, casts and views) names that parameter. On CUDA the engine runs backward on a device thread; the
  engine installs the caller's thread-local state there, dispatch modes included, so the same checks should
  apply (not verified on a GPU here). Whatever the mode sees, `register_post_accumulate_grad_hook` on every
  trainable parameter names the first parameter whose gradient becomes non-finite, so a verdict always names it.
- clip: `clip_grad_norm_` / `get_total_norm` over the step's clip parameters.
- update: `scaler.step` or `optimizer.step`.

Cost. An op output is checked by one `aminmax` pass and one read (finite exactly when its min and max are),
and a phase stops checking once its producer is found. Modules marked `checked_as_unit` (the selective scan,
whose recurrence runs thousands of small ops per call) are checked as one op each, at their outputs in forward
and at the gradients their autograd nodes return in backward; only when one of those is a phase's first
unexplained non-finite value (the first seen, or one of a kind it did not read) is the step replayed again
with that unit checked op by op (`_Replay`). With the
scan checked op by op, replaying a seed-size step took over 25 times the step; `benchmarks/bench_tracer.py`
measures the ratio now.

Each phase ends with a check of its outcome (loss, gradients, grad norm, parameters and optimizer state); the
verdict comes from the first phase whose outcome is non-finite, so an intermediate inf that the model discards
(`torch.where` over a log, a CTC zero_infinity path) is not blamed on a healthy step.

Producer vs propagator. Only two sources can feed a non-finite value into the first faulty op: state that was
already non-finite at the step start (checked before the replay: batches, parameters, buffers, surviving
gradients; reported as a `propagator` in phase "forward", with no op) and deliberate constants
(`masked_fill(mask, -inf)`, a `-inf` mask buffer, CTC's log-alpha table). So an op output counts as produced
when it holds a kind of non-finite value (NaN, or +-inf) that none of its inputs held; ops whose Python scalar
arguments are non-finite (a masking constant) and the outputs listed in `EXPECTED_NONFINITE` never count.
When no op is seen producing the value (a kernel outside the dispatcher), the first op output seen
non-finite is reported as a propagator.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Mapping, TypeVar

import torch
import torch.nn as nn

from workbench.instrument.observer import StepObserver
from workbench.instrument.replay import ReplayBundle, bundle_rng, capture, replica, save_bundle
from workbench.instrument.replay_chain import ReplayChain, ReplayMismatch
from workbench.train import compat
from workbench.train.host import Slot, nonfinite_flags, to_host
from workbench.train.step import NonFiniteError, StepContext, StepMonitor, TrainStep

PHASES: tuple[str, ...] = ("forward", "backward", "clip", "update")
LOSS_FN = "<loss_fn>"

ExpectedRule = Callable[[Mapping[str, Any]], Collection[int]]
_R = TypeVar("_R")


def _ctc_loss_expected(bound: Mapping[str, Any]) -> Collection[int]:
    """`_ctc_loss` returns (loss, log_alpha); log_alpha is -inf on unreachable lattice cells. With
    zero_infinity an infeasible utterance's inf loss is replaced by 0 right after, so it is expected too."""
    return (0, 1) if bound.get("zero_infinity", False) else (1,)


# Op (overload packet) -> rule giving the output indices whose non-finite values are by design.
EXPECTED_NONFINITE: dict[str, ExpectedRule] = {"aten._ctc_loss": _ctc_loss_expected}

# Their outputs are uninitialised memory: never inspected.
_ALLOCATORS: frozenset[str] = frozenset({
    "aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty", "aten.new_empty_strided",
    "aten.resize_", "aten.resize_as_",
})

# Autograd nodes that only transpose, cast or view a gradient on its way to a parameter's AccumulateGrad.
_PASS_THROUGH: frozenset[str] = frozenset({
    "TBackward0", "ToCopyBackward0", "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0",
    "PermuteBackward0", "TransposeBackward0", "TransposeBackward1", "AliasBackward0", "CloneBackward0",
})


@dataclass
class Finding:
    """A non-finite tensor: where it is and what made it.

    module: qualified module name ("" for the root, "<loss_fn>" for ops outside the model). tensor: what went
    non-finite ("output", "grad of weight", "grad_input (SqrtBackward0)", "param weight", "exp_avg_sq of weight",
    "batch features", ...). op: the aten op that produced it ("" when no op was seen). dtype: that tensor's dtype.
    nan / inf / numel: counts in that tensor. input_absmax: max |x| over the finite values of the op's inputs
    (NaN when unknown). role: "producer" (the op made a non-finite kind its inputs lacked) or "propagator".
    param: qualified name of the parameter concerned.
    """

    module: str
    tensor: str
    op: str
    dtype: str
    nan: int
    inf: int
    numel: int
    input_absmax: float
    role: str
    param: str = ""


@dataclass(kw_only=True)
class Verdict(Finding):
    """Where a step first went non-finite: the Finding, at step `step` in phase `phase` ("forward" | "backward" |
    "clip" | "update"). In the backward phase `param` is the first parameter whose gradient became non-finite."""

    step: int
    phase: str

    def line(self) -> str:
        """One line, e.g. `step 1 backward: producer joint.net.4 grad of weight via aten.mm.default (float16):
        12 inf / 2624, input max|x| over finite entries 3.1e+02`."""
        where = f"{self.module or '<root>'} {self.tensor}"
        via = f" via {self.op}" if self.op else ""
        counts = ", ".join(part for part in (f"{self.nan} nan" if self.nan else "",
                                             f"{self.inf} inf" if self.inf else "") if part)
        text = f"step {self.step} {self.phase}: {self.role} {where}{via} ({self.dtype}): {counts} / {self.numel}"
        if not math.isnan(self.input_absmax):
            text += f", input max|x| over finite entries {self.input_absmax:.1e}"
        owner, _, local = self.param.rpartition(".")
        if self.param and not (owner == self.module and self.tensor.endswith(f" {local}")):
            text += f"; first non-finite parameter: {self.param}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class StepTrace:
    """Everything one replay of a non-finite step saw, phase by phase, and what the step's guards did.

    findings: the first non-finite tensor of each phase that had one, in phase order (non-finite state at the
    step's start is a "forward" propagator). grads_nonfinite: after the backward and unscale, every gradient
    holding a non-finite value, as {"param", "count", "held"} (held: inside the optimizer). found_inf: the
    GradScaler's inf check over the optimizer's gradients found one and skipped the update (None without a
    GradScaler). clip_norm / clip_coef: what the clip measured and the factor it applied (None without a clip).
    grads_after_clip: the gradients holding a non-finite value after the clip, as grads_nonfinite. skipped: the
    update was skipped. scale_after: the GradScaler's scale after the step. params_nonfinite: after the update,
    every parameter holding a non-finite value, as {"param", "count"}. loss_finite: the step's loss was finite.
    """

    step: int
    findings: list[Verdict]
    grads_nonfinite: list[dict[str, Any]]
    found_inf: bool | None
    clip_norm: float | None
    clip_coef: float | None
    grads_after_clip: list[dict[str, Any]]
    skipped: bool
    scale_after: float | None
    params_nonfinite: list[dict[str, Any]]
    loss_finite: bool

    @property
    def escaped(self) -> bool:
        """A non-finite value survives the step where no guard cleared it: in the parameters, or in gradients
        that the next step does not zero."""
        return bool(self.params_nonfinite) or any(not g["held"] for g in self.grads_after_clip)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "findings": [f.to_dict() for f in self.findings]}


def _nonfinite_count(t: torch.Tensor) -> int:
    return int((~torch.isfinite(t)).sum())


def _inspectable(t: Any) -> bool:
    return (isinstance(t, torch.Tensor) and t.is_floating_point() and t.layout == torch.strided
            and t.device.type != "meta" and t.numel() > 0)


def _range(t: torch.Tensor) -> tuple[float, float]:
    """(min, max) of a non-empty floating tensor in one pass and one read: both finite exactly when every element
    is (min and max propagate NaN). A tenth of the time of `isfinite(t).all()` on CPU, which writes a mask."""
    lo, hi = torch.stack(torch.aminmax(t)).tolist()
    return lo, hi


def _finite(t: torch.Tensor) -> bool:
    if t.numel() == 0:
        return True
    lo, hi = _range(t)
    return math.isfinite(lo) and math.isfinite(hi)


def _kinds(t: torch.Tensor) -> tuple[bool, bool, float]:
    """(holds NaN, holds +-inf, max |x| over the finite values) of a non-empty floating tensor."""
    lo, hi = _range(t)
    if math.isfinite(lo) and math.isfinite(hi):
        return False, False, max(-lo, hi)
    finite = torch.isfinite(t)
    values = t[finite]
    absmax = float(values.abs().max()) if values.numel() else 0.0
    return bool(torch.isnan(t).any()), bool(torch.isinf(t).any()), absmax


def _present(t: torch.Tensor) -> set[str]:
    """The non-finite kinds ("nan", "inf") a non-empty floating tensor holds: one min/max pass, and a second
    only when it holds a NaN (which hides whether an inf is there too)."""
    lo, hi = _range(t)
    if math.isnan(lo) or math.isnan(hi):
        return {"nan", "inf"} if bool(torch.isinf(t).any()) else {"nan"}
    return {"inf"} if math.isinf(lo) or math.isinf(hi) else set()


def _nonfinite_kinds(values: Any) -> set[str]:
    """The non-finite kinds ("nan", "inf") held by the floating tensors in `values` (nested lists and tuples)."""
    kinds: set[str] = set()
    with torch.no_grad():
        for t in compat.tree_flatten(values)[0]:
            if _inspectable(t):
                kinds |= _present(t)
    return kinds


def _seen_state(t: torch.Tensor, module: str, tensor: str, param: str = "") -> Finding:
    """A tensor found non-finite with no op to blame (state at a phase boundary)."""
    return Finding(module, tensor, "", str(t.dtype).removeprefix("torch."), int(torch.isnan(t).sum()),
                 int(torch.isinf(t).sum()), t.numel(), math.nan, "propagator", param)


def _same_shape(param: torch.Size, grad: torch.Size) -> bool:
    """Shapes equal up to size-1 dimensions (a bias gradient summed with keepdim) or, for matrices, transposed
    (the weight gradient of `x @ w.t()` before its TBackward0)."""
    a = [s for s in param if s != 1]
    b = [s for s in grad if s != 1]
    return a == b or (len(a) == 2 and a == b[::-1])


def _owner(name: str) -> tuple[str, str]:
    """Qualified parameter name -> (owning module, local name)."""
    owner, _, local = name.rpartition(".")
    return owner, local


class _NonFiniteMode(compat.TorchDispatchMode):
    """Checks the floating outputs of every op until a phase's first produced non-finite value is found; keeps
    that one and the first non-finite output seen at all.

    Also labels, in forward, each autograd node with the module whose op created it (the outputs of op k get
    their grad_fn only after the dispatch returns, so they are labelled at the next dispatch or at `flush`).
    """

    def __init__(self, module_stack: list[str], param_names: dict[int, str],
                 expected: Mapping[str, ExpectedRule]) -> None:
        super().__init__()
        self.module_stack = module_stack
        self.param_names = param_names
        self.expected = expected
        self.phase = "forward"
        self.names: dict[int, tuple[str, str]] = {}
        self.node_labels: dict[Any, str] = {}
        self.produced: Finding | None = None
        self.first_seen: Finding | None = None
        self._pending: list[tuple[weakref.ref[torch.Tensor], str]] = []
        # Closed units (see `_Replay`): their names, and how deep the forward is inside one now.
        self.closed_units: frozenset[str] = frozenset()
        self.unit_depth = 0

    def start(self, phase: str, names: dict[int, tuple[str, str]]) -> None:
        """Begin a phase; `names` maps id(tensor) -> (parameter name, description) for the tensors it touches."""
        self.phase, self.names = phase, names
        self.produced = self.first_seen = None

    @property
    def checking(self) -> bool:
        """The phase's producer is not found yet: op outputs are still checked."""
        return self.produced is None

    def flush(self) -> None:
        for ref, label in self._pending:
            t = ref()
            node = None if t is None else t.grad_fn
            if node is not None and node not in self.node_labels:
                self.node_labels[node] = label
        self._pending.clear()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        self.flush()
        packet = str(func.overloadpacket)
        forward = self.phase == "forward"
        checking = self.checking and not self._in_closed_unit()
        if packet in _ALLOCATORS or not (checking or forward):
            return func(*args, **kwargs)
        bound = self._bind(func, args, kwargs)
        schema_args = compat.op_arguments(func)
        mutated = [t for a in schema_args if a.alias_info is not None and a.alias_info.is_write and not a.is_out
                   for t in compat.tree_flatten(bound.get(a.name))[0] if isinstance(t, torch.Tensor)]
        with torch.no_grad():
            # In-place ops overwrite their inputs: read those before the op runs.
            before = [_kinds(t) for t in mutated if _inspectable(t)] if checking else []
        out = func(*args, **kwargs)
        returned = [t for t in compat.tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        # In-place ops return the tensor they mutate: list it once.
        outputs = returned + [m for m in mutated if not any(m is t for t in returned)]
        if forward:
            label = self.module_stack[-1] if self.module_stack else LOSS_FN
            self._pending.extend((weakref.ref(t), label) for t in outputs)
        if checking:
            with torch.no_grad():
                self._check(func, packet, bound, schema_args, outputs, mutated, before)
        return out

    def _in_closed_unit(self) -> bool:
        """The op belongs to a closed unit: its forward, or in backward an autograd node its forward created."""
        if self.phase == "forward":
            return self.unit_depth > 0
        if not self.closed_units:
            return False
        node = compat.current_autograd_node()
        return node is not None and self.node_labels.get(node) in self.closed_units

    @staticmethod
    def _bind(func: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Argument name -> value, positional arguments first, in schema order."""
        bound = {a.name: v for a, v in zip(compat.op_arguments(func), args)}
        bound.update(kwargs)
        return bound

    def _check(self, func: Any, packet: str, bound: dict[str, Any], schema_args: Any,
               outputs: list[torch.Tensor], mutated: list[torch.Tensor], before: list[tuple]) -> None:
        present = {k: _present(t) for k, t in enumerate(outputs) if _inspectable(t)}
        bad = [k for k, kinds in present.items() if kinds]
        if not bad:
            return
        scalars = [v for v in compat.tree_flatten(list(bound.values()))[0] if isinstance(v, float)]
        if any(not math.isfinite(v) for v in scalars):
            return  # a deliberate constant such as masked_fill(mask, -inf)
        rule = self.expected.get(packet)
        if rule is not None:
            skip = set(rule(bound))
            bad = [k for k in bad if k not in skip]
            if not bad:
                return
        outs = {a.name for a in schema_args if a.is_out}
        inputs = [t for name, v in bound.items() if name not in outs for t in compat.tree_flatten(v)[0]
                  if _inspectable(t) and not any(t is m for m in mutated)]
        read = {kind for s in before for kind, held in zip(("nan", "inf"), s[:2]) if held} | _nonfinite_kinds(inputs)
        k, new = next(((k, True) for k in bad if present[k] - read), (bad[0], False))
        if not new and self.first_seen is not None:
            return  # a propagator after the first one: nothing to record (the costly part below is skipped)
        absmax = max([s[2] for s in before + [_kinds(t) for t in inputs]] + [abs(v) for v in scalars],
                     default=math.nan)
        t = outputs[k]
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        module, tensor, param = self._describe(t, k, len(outputs), bound)
        seen = Finding(module, tensor, str(func), str(t.dtype).removeprefix("torch."), nan, inf, t.numel(), absmax,
                     "producer" if new else "propagator", param)
        if new and self.produced is None:
            self.produced = seen
        if self.first_seen is None:
            self.first_seen = seen

    def _describe(self, t: torch.Tensor, k: int, n_outputs: int, bound: dict[str, Any]) -> tuple[str, str, str]:
        """(module, tensor description, parameter name) of output k."""
        node = compat.current_autograd_node()
        if node is not None:
            return self._describe_backward(node, t)
        if self.phase == "forward":
            module = self.module_stack[-1] if self.module_stack else LOSS_FN
            if id(t) in self.names:
                return module, self.names[id(t)][1], ""  # a buffer updated in place (BatchNorm statistics)
            return module, "output" if n_outputs == 1 else f"output {k}", ""
        if id(t) in self.names:
            param, desc = self.names[id(t)]
            return _owner(param)[0], desc, param
        # Foreach ops (clip norms, optimizer updates): output k belongs to the k-th tensor of the first list.
        first = next(iter(bound.values()), None)
        if isinstance(first, (list, tuple)) and k < len(first) and id(first[k]) in self.names:
            param, desc = self.names[id(first[k])]
            return _owner(param)[0], f"output for {desc}", param
        return "", "output", ""

    def _describe_backward(self, node: Any, t: torch.Tensor) -> tuple[str, str, str]:
        """A parameter's gradient when `node` accumulates or feeds it, else a gradient inside the module that
        created `node` in forward."""
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in self.param_names:
            name = self.param_names[id(variable)]  # the AccumulateGrad of this parameter
            owner, local = _owner(name)
            return owner, f"grad of {local}", name
        name = self._param_fed_by(node, t)
        if name:
            owner, local = _owner(name)
            return owner, f"grad of {local}", name
        return self.node_labels.get(node, LOSS_FN), f"grad_input ({node.name()})", ""

    def _param_fed_by(self, node: Any, t: torch.Tensor) -> str:
        """The parameter whose AccumulateGrad `node` feeds through pass-through nodes and whose shape is t's
        (see `_same_shape`); "" if none."""
        frontier = [fn for fn, _ in node.next_functions if fn is not None]
        for _ in range(4):
            nxt = []
            for fn in frontier:
                variable = getattr(fn, "variable", None)
                if variable is not None:
                    if id(variable) in self.param_names and _same_shape(variable.shape, t.shape):
                        return self.param_names[id(variable)]
                elif fn.name() in _PASS_THROUGH:
                    nxt.extend(f for f, _ in fn.next_functions if f is not None)
            frontier = nxt
        return ""


class _Found(Exception):
    """Raised by the replay's monitor at the first phase whose outcome is non-finite."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.line())
        self.verdict = verdict


class _Reopen(Exception):
    """Raised when checking the ops of a closed unit could change the phase's finding (see `_Replay`): the replay
    starts again with that unit checked op by op."""

    def __init__(self, unit: str) -> None:
        super().__init__(unit)
        self.unit = unit


def _units(model: nn.Module) -> frozenset[str]:
    """Qualified names of the modules marked `checked_as_unit` (e.g. `workbench.model.ssm.SelectiveScan`)."""
    return frozenset(name for name, module in model.named_modules() if getattr(module, "checked_as_unit", False))


# TrainStep's phases -> the verdict's phase (unscaling is part of the backward's outcome).
_VERDICT_PHASE = {"forward": "forward", "backward": "backward", "unscale": "backward", "clip": "clip",
                  "update": "update"}


class _Replay(StepMonitor):
    """One replay of a bundle on a replica: `TrainStep.run` itself, watched phase by phase. With `whole=False` it
    stops at the first non-finite outcome; with `whole=True` it runs the whole step and keeps each phase's first
    non-finite tensor and what the guards did (a StepTrace).

    Units (modules marked `checked_as_unit`, such as the selective scan's recurrence over every frame) named in
    `closed` are checked as one op each: in forward their outputs when they return, in backward the gradients
    each autograd node their forward created returns; the ops inside are not checked. While a phase's producer
    is not found, a non-finite value there raises `_Reopen` when it is the phase's first non-finite value or of a
    kind (NaN, inf) that nothing the unit read held (its inputs, and in backward also the incoming gradients),
    and the caller replays again with that unit open (`_replayed`). A verdict is then the one checking every op
    gives, save where a unit makes and discards a non-finite value inside itself, or where an op inside a unit
    that reads non-finite values makes a kind that its own inputs lacked but other inputs of the unit held."""

    def __init__(self, rep: TrainStep, bundle: ReplayBundle, expected: Mapping[str, ExpectedRule], *,
                 whole: bool = False, closed: frozenset[str] = frozenset()) -> None:
        self.rep = rep
        self.bundle = bundle
        self.whole = whole
        self.model: nn.Module = rep.model
        self.params = dict(self.model.named_parameters())
        self.held = {id(p) for group in rep.optimizer.param_groups for p in group["params"]}
        self.module_stack: list[str] = []
        self.mode = _NonFiniteMode(self.module_stack, {id(p): n for n, p in self.params.items()}, expected)
        self.mode.closed_units = closed
        self._node_hooks: list[Any] = []
        # Per closed unit: the non-finite kinds ("nan", "inf") its forward read or returned (what backward reads).
        self._unit_kinds: dict[str, set[str]] = {}
        self.first_grad: str | None = None
        self.findings: list[Verdict] = []
        self.grads_nonfinite: list[dict[str, Any]] = []
        self.grads_after_clip: list[dict[str, Any]] = []
        self.params_nonfinite: list[dict[str, Any]] = []
        self.loss_finite = True

    def run(self) -> Verdict | None:
        """The first non-finite tensor of the step (None when the replay stays finite)."""
        self._replay()
        return self.findings[0] if self.findings else None

    def trace(self) -> StepTrace:
        """The whole step (needs `whole=True`)."""
        result = self._replay()
        scaler = self.rep.scaler
        return StepTrace(
            step=self.bundle.step, findings=self.findings, grads_nonfinite=self.grads_nonfinite,
            found_inf=None if scaler is None else result is not None and result.reason == "nonfinite_grad",
            clip_norm=None if result is None else result.grad_norm,
            clip_coef=None if result is None else result.clip_coef, grads_after_clip=self.grads_after_clip,
            skipped=True if result is None else result.skipped,
            scale_after=None if scaler is None else scaler.get_scale(), params_nonfinite=self.params_nonfinite,
            loss_finite=self.loss_finite)

    def _replay(self) -> Any:
        stale = self._stale_state()
        if stale is not None:
            self.findings.append(self._verdict("forward", stale))
            if not self.whole:
                return None
        handles = self._install_hooks()
        batches = [b.to(self.rep.device) for b in self.bundle.batches]
        try:
            return self.rep.run(batches, self.bundle.weights, rnnt=self.bundle.rnnt, mode=self.bundle.mode,
                                monitor=self)
        except (_Found, NonFiniteError):
            return None
        finally:
            for h in handles + self._node_hooks:
                h.remove()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        grads = name in ("unscale", "clip", "update")
        self.mode.start(_VERDICT_PHASE[name], self._names(grads=grads, state=name == "update"))
        with self.mode:
            yield
        self.mode.flush()
        if name == "forward":
            self._hook_unit_nodes()

    def after(self, name: str, **outcome: Any) -> None:
        if name == "forward":
            total = outcome["losses"]["total"].detach()
            self.loss_finite = self.loss_finite and _finite(total)
            bad = None if _finite(total) else _seen_state(total, LOSS_FN, "loss total")
        elif name == "update":
            bad = self._bad_update()
            if self.whole:
                self.params_nonfinite = [{"param": n, "count": _nonfinite_count(p.detach())}
                                         for n, p in self.params.items() if not _finite(p.detach())]
        else:
            bad = self._bad_grad()
            norm = outcome.get("norm")
            if bad is None and norm is not None and not _finite(norm):
                bad = _seen_state(norm, "", "grad norm")
            if self.whole and name in ("unscale", "clip"):
                grads = self._nonfinite_grads()
                if name == "unscale":
                    self.grads_nonfinite = grads
                else:
                    self.grads_after_clip = grads
        if bad is None:
            return
        phase = _VERDICT_PHASE[name]
        if not self.whole:
            self.findings.append(self._verdict(phase, bad))
            raise _Found(self.findings[-1])
        if not any(f.phase == phase for f in self.findings):
            self.findings.append(self._verdict(phase, bad))

    def _nonfinite_grads(self) -> list[dict[str, Any]]:
        return [{"param": n, "count": _nonfinite_count(p.grad), "held": id(p) in self.held}
                for n, p in self.params.items() if p.grad is not None and not _finite(p.grad)]

    def _install_hooks(self) -> list[Any]:
        handles = []
        for name, module in self.model.named_modules():
            handles.append(module.register_forward_pre_hook(functools.partial(self._enter, name)))
            handles.append(module.register_forward_hook(self._leave, always_call=True))
            if name in self.mode.closed_units:
                handles.append(module.register_forward_pre_hook(functools.partial(self._enter_unit, name)))
                handles.append(module.register_forward_hook(functools.partial(self._leave_unit, name),
                                                            always_call=True))
        for name, p in self.params.items():
            if p.requires_grad:
                handles.append(p.register_post_accumulate_grad_hook(lambda p, name=name: self._on_grad(name, p)))
        return handles

    def _enter(self, name: str, module: nn.Module, args: Any) -> None:
        self.module_stack.append(name)

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self.module_stack.pop()  # returning None keeps the module's output

    def _enter_unit(self, name: str, module: nn.Module, args: Any) -> None:
        self.mode.unit_depth += 1
        self._unit_kinds[name] = self._unit_kinds.get(name, set()) | _nonfinite_kinds(args)

    def _leave_unit(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        """Label the nodes that produced the unit's outputs with it and check those outputs."""
        self.mode.unit_depth -= 1
        outputs = [t for t in compat.tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
        for t in outputs:
            if t.grad_fn is not None:
                self.mode.node_labels[t.grad_fn] = name
        inputs = self._unit_kinds[name]
        made = _nonfinite_kinds(outputs)
        self._unit_kinds[name] = inputs | made
        if self.mode.phase == "forward" and self.mode.checking and not self.mode.unit_depth:
            self._reopen_if_inside(name, made, inputs)

    def _reopen_if_inside(self, name: str, made: set[str], available: set[str]) -> None:
        """Reopen the unit where checking its ops would change the phase's finding: a non-finite value it returns
        is the first seen in the phase, or is of a kind (NaN, inf) that nothing it read held."""
        if made and (self.mode.first_seen is None or not made <= available):
            raise _Reopen(name)

    def _hook_unit_nodes(self) -> None:
        """Check what every autograd node of a closed unit returns in backward (its ops are not checked)."""
        for node, label in self.mode.node_labels.items():
            if label in self.mode.closed_units:
                self._node_hooks.append(node.register_hook(functools.partial(self._unit_grads, label)))

    def _unit_grads(self, name: str, grad_inputs: tuple, grad_outputs: tuple) -> None:
        """A closed unit's autograd node returned `grad_inputs` from `grad_outputs` and what its forward saved."""
        if self.mode.phase == "backward" and self.mode.checking:
            made = _nonfinite_kinds(grad_inputs)
            if made:
                self._reopen_if_inside(name, made, _nonfinite_kinds(grad_outputs) | self._unit_kinds.get(name, set()))

    def _on_grad(self, name: str, p: torch.Tensor) -> None:
        if self.first_grad is None and not _finite(p.grad):
            self.first_grad = name

    def _names(self, *, grads: bool = False, state: bool = False) -> dict[int, tuple[str, str]]:
        names: dict[int, tuple[str, str]] = {}
        for name, buf in self.model.named_buffers():
            names[id(buf)] = (name, f"buffer {_owner(name)[1]}")
        for name, p in self.params.items():
            local = _owner(name)[1]
            names[id(p)] = (name, f"param {local}")
            if grads and p.grad is not None:
                names[id(p.grad)] = (name, f"grad of {local}")
            if state:
                for key, value in self.rep.optimizer.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor):
                        names[id(value)] = (name, f"{key} of {local}")
        return names

    def _stale_state(self) -> Finding | None:
        """Non-finite values already present when the step starts: batches, parameters, buffers, gradients."""
        for batch in self.bundle.batches:
            fields = ({f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
                      if dataclasses.is_dataclass(batch) else getattr(batch, "__dict__", {}))
            for key, value in fields.items():
                if _inspectable(value) and not _finite(value):
                    return _seen_state(value, "", f"batch {key}")
        state = self.model.state_dict()
        for name, p in self.params.items():
            owner, local = _owner(name)
            if not _finite(p.detach()):
                return _seen_state(p.detach(), owner, f"param {local}", name)
            if p.grad is not None and not _finite(p.grad):
                return _seen_state(p.grad, owner, f"grad of {local}", name)
        for name, buf in self.model.named_buffers():
            if name in state and _inspectable(buf) and not _finite(buf):
                owner, local = _owner(name)
                return _seen_state(buf, owner, f"buffer {local}")
        return None

    def _bad_grad(self) -> Finding | None:
        """The first parameter whose gradient is non-finite: in time when the hooks saw it, else in order."""
        order = ([self.first_grad] if self.first_grad else []) + list(self.params)
        for name in order:
            grad = self.params[name].grad
            if grad is not None and not _finite(grad):
                owner, local = _owner(name)
                return _seen_state(grad, owner, f"grad of {local}", name)
        return None

    def _bad_update(self) -> Finding | None:
        """The first parameter, or optimizer state tensor, that is non-finite after the update."""
        for name, p in self.params.items():
            owner, local = _owner(name)
            if not _finite(p.detach()):
                return _seen_state(p.detach(), owner, f"param {local}", name)
            for key, value in self.rep.optimizer.state.get(p, {}).items():
                if _inspectable(value) and not _finite(value):
                    return _seen_state(value, owner, f"{key} of {local}", name)
        return None

    def _verdict(self, phase: str, outcome: Finding) -> Verdict:
        """The phase's first produced (else first seen) non-finite op output; the outcome when no op was seen.
        The backward phase always names the first parameter whose gradient went non-finite."""
        seen = (self.mode.produced or self.mode.first_seen if self.mode.phase == phase else None) or outcome
        param, module = seen.param, seen.module
        if not param and phase == "backward":
            param = self.first_grad or outcome.param
        elif not param and phase in ("clip", "update"):
            param = outcome.param
            module = module or _owner(param)[0]
        return Verdict(**{**dataclasses.asdict(seen), "module": module, "param": param}, step=self.bundle.step,
                       phase=phase)


def localize(step: TrainStep, bundle: ReplayBundle, *,
             expected: Mapping[str, ExpectedRule] = EXPECTED_NONFINITE) -> Verdict | None:
    """Replay `bundle`'s step on a replica of `step` and return where it first went non-finite (None when the
    replayed step is finite throughout). The live model, optimizer, scaler and RNG state are left untouched.

    `expected` maps an op ("aten._ctc_loss") to a rule giving the indices of its outputs whose non-finite
    values are by design; extend `EXPECTED_NONFINITE` for a model that builds masks with, e.g., `log(0)`.
    """
    return _replayed(step, bundle, lambda rep, closed: _Replay(rep, bundle, expected, closed=closed).run())


def trace_step(step: TrainStep, bundle: ReplayBundle, *,
               expected: Mapping[str, ExpectedRule] = EXPECTED_NONFINITE) -> StepTrace:
    """Replay `bundle`'s whole step on a replica of `step`: each phase's first non-finite tensor and what the
    step's guards (the GradScaler, the clip, the non-finite policy) did with it. Leaves the live run untouched."""
    return _replayed(step, bundle,
                     lambda rep, closed: _Replay(rep, bundle, expected, whole=True, closed=closed).trace())


def _replayed(step: TrainStep, bundle: ReplayBundle, attempt: Callable[[TrainStep, frozenset[str]], _R]) -> _R:
    """`attempt(replica, closed units)` on a fresh replica under the bundle's RNG state: first with every unit of
    the model closed, then with the unit that raised `_Reopen` open, then with every unit open (which cannot
    raise it)."""
    opened: frozenset[str] = frozenset()
    while True:
        rep = replica(step, bundle)
        units = _units(rep.model)
        try:
            with bundle_rng(bundle):
                return attempt(rep, units - opened)
        except _Reopen as reopen:
            opened = opened | {reopen.unit} if not opened else units


# A run's tracer captures every this many steps (workbench.run.joint): on a CPU a capture is a copy of the
# parameters and the optimizer state as slow as memory (about 3 ms at `small`); a traced step pays up to
# CAPTURE_EVERY - 1 re-run steps instead, and never more than about 2 s of them (ReplayChain.max_rerun_s). Measured
# at `small` (one thread, 16-step rounds, interleaved): tracer armed 1.039 of the plain step with 8, 1.031 with 16.
CAPTURE_EVERY = 16


class NonFiniteTracer(StepObserver):
    """Observer that traces the non-finite steps of a run, as many as the causal chain needs (at most
    `max_traces` replays).

    Per step while tracing: `capture` at the step start (cost in `workbench.instrument.replay`), or with
    `capture_every=K` > 1 a `ReplayChain` (a capture every K steps, each step's inputs in between; a non-finite
    step's bundle is rebuilt by re-running up to K - 1 plain steps on a replica, checked against the live losses:
    a mismatch leaves the step untraced: see `untraced`; `bundle` then stays None; `params`: the model's
    parameters for the chain, when the caller holds them fixed), and one check:
    the loss total and grad norm (on the host with the step's result), one multi-tensor reduction over the
    gradients (queued at `on_after_backward`) and the step's shared check over the parameters
    (`HostPacket.params_nonfinite`, at `on_pack`), both in the step's host copy (outside a TrainStep, one
    reduction and one read of its own). When that check ends the step late (a `skip_step` decision read takes the
    step's one copy: see `workbench.train.step`), the step's bundle is kept until then, beside the next step's. A
    non-finite step is replayed whole with
    `trace_step`; its StepTrace goes to `traces` (and to a run's recorder through `events`), its first
    non-finite tensor to `verdicts`, and the bundle to `save_dir/step_<n>.pt` when `save_dir` is set. Tracing
    stops once the chain is complete: a non-finite value reached the parameters, or a step's guards caught the
    overflow and left nothing non-finite behind. A non-finite step that could not be traced goes to `untraced`
    with why (its bundle could not be rebuilt, or its replay stayed finite: e.g. CUDA non-determinism, or a
    forward that reads state no tensor holds), and to a run's recorder as a "tracer_unreproduced" event; it uses
    up a replay as well.

    Needs the TrainStep itself (config, loss_fn, device) to replay: use `attach(step)`, not only
    `TrainStep(observers=[...])`. With the `stop` policy the step raises before `on_step_end`: call
    `localize(step, tracer.bundle)` where the NonFiniteError is caught.

    A loop that is not a TrainStep (Lightning's callback) calls `on_step_start` at each step start, `add_batch` for
    a window's later micro-batches, `set_trainable` when its tensors' `requires_grad` changed after the start,
    `updated()` after the update and `on_step_end(ctx, nonfinite=...)` at every step end with its own verdict (and
    `ctx.result` holding the step's losses, or None when it has none); `bundle_of(step)` gives a step's bundle
    right after its end (rebuilt from the chain when needed).
    """

    def __init__(self, *, max_traces: int = 3, save_dir: str | None = None, capture_every: int = 1,
                 params: list[torch.Tensor] | None = None) -> None:
        self.max_traces = max_traces
        self.save_dir = save_dir
        self.traces: list[StepTrace] = []
        self.verdicts: list[Verdict] = []
        self.untraced: list[tuple[int, str]] = []  # (step, why) of the non-finite steps not traced
        self.bundle: ReplayBundle | None = None
        self._chain = ReplayChain(capture_every, params=params) if capture_every > 1 else None
        self._armed = False  # checking the current step
        self._complete = False
        self._grads: Slot | None = None
        self._checks: list[Slot] | None = None
        self._bundles: dict[int, ReplayBundle] = {}  # by step, until its end (which may follow the next start)
        self._last: tuple[int, ReplayBundle] | None = None  # the bundle of the step that ended last, when known

    def detach(self, step: Any | None = None) -> None:
        """Stop observing the attached step (and remove the tracer from `step.observers` when given)."""
        super().detach()
        if step is not None:
            step.observers[:] = [obs for obs in step.observers if obs is not self]

    @property
    def exhausted(self) -> bool:
        return self._complete or len(self.traces) + len(self.untraced) >= self.max_traces

    @property
    def unreproduced(self) -> list[int]:
        """The non-finite steps that could not be traced (`untraced` says why)."""
        return [k for k, _ in self.untraced]

    def on_step_start(self, ctx: StepContext) -> None:
        if self._train_step is None:
            raise RuntimeError("NonFiniteTracer needs the TrainStep to replay steps: call tracer.attach(step)")
        self._bundles = {k: b for k, b in self._bundles.items() if k == ctx.step - 1}
        self.bundle = self._last = None
        self._armed = not self.exhausted
        if not self._armed:
            return
        if self._chain is not None:
            self._chain.start(self._train_step, ctx.batches, ctx.weights, rnnt=ctx.rnnt, mode=ctx.mode,
                              index=ctx.step)
            return
        self.bundle = self._bundles[ctx.step] = capture(self._train_step, ctx.batches, ctx.weights, rnnt=ctx.rnnt,
                                                        mode=ctx.mode, index=ctx.step)

    def rebase(self) -> None:
        """The next step captures a full bundle (a chain's new base), whatever else is due."""
        if self._chain is not None:
            self._chain.rebase()

    def add_batch(self, batch: Any) -> None:
        """A later micro-batch of the current step, for a loop that is not a TrainStep."""
        if not self._armed:
            return
        if self._chain is not None:
            self._chain.add_batch(batch)
        elif self.bundle is not None:
            self.bundle.batches.append(copy.deepcopy(batch))

    def set_trainable(self, names: list[str]) -> None:
        """The tensors the current step trains, when they changed after its start (a LightningModule's own
        `on_train_batch_start` runs after the callbacks')."""
        if not self._armed:
            return
        if self._chain is not None:
            self._chain.set_trainable(names)
        elif self.bundle is not None:
            self.bundle.trainable = list(names)

    def updated(self) -> None:
        """After the step's update, for a loop that is not a TrainStep (a TrainStep's `on_pack` does it)."""
        if self._armed and self._chain is not None:
            self._chain.updated()

    def bundle_of(self, step: int) -> ReplayBundle | None:
        """The bundle of `step`, right after its end: the one captured at its start or rebuilt for its trace, else
        rebuilt from the chain now (None when the tracer was not armed at that step). Raises ReplayMismatch when a
        re-run step did not reproduce the live one."""
        if self._last is not None and self._last[0] == step:
            return self._last[1]
        if self._chain is None or self._train_step is None or not self._chain.covers(step):
            return None
        bundle = self._chain.bundle_at(self._train_step, step)
        self._last = (step, bundle)
        return bundle

    def on_after_backward(self, ctx: StepContext) -> None:
        """TrainStep event: queue the gradients' non-finite check (the clip scales them by a finite factor or
        makes the norm non-finite, and the update leaves them alone, so their finiteness is final here)."""
        if self._armed:
            self._grads = ctx.packet.grads_nonfinite(ctx.model)  # the probe's norms when it ran first

    def on_pack(self, ctx: StepContext) -> None:
        """TrainStep event: queue the parameters' non-finite check (the step's shared one) after the update."""
        if self._armed:
            self._checks = [ctx.packet.params_nonfinite(ctx.model)] + ([self._grads] if self._grads is not None else [])
            self._grads = None
            if self._chain is not None:
                self._chain.updated()

    def on_step_end(self, ctx: StepContext, nonfinite: bool | None = None) -> None:
        """TrainStep event: trace the step when it went non-finite. `nonfinite`: that verdict from a loop that
        checked the step itself (None: the tracer's own check, from the step's host copy)."""
        checks, self._checks = self._checks, None
        bundle = self._bundles.pop(ctx.step, None)
        if bundle is not None:
            self._last = (ctx.step, bundle)
        chain = self._chain
        if chain is not None and ctx.result is not None:
            chain.ended(ctx.step, ctx.result.losses)
        covered = bundle is not None or (chain is not None and chain.covers(ctx.step))
        if not covered or self.exhausted:
            return
        if not (self._went_nonfinite(ctx, checks) if nonfinite is None else nonfinite):
            return
        if bundle is None:
            assert chain is not None and self._train_step is not None
            try:
                bundle = chain.bundle_at(self._train_step, ctx.step)
            except ReplayMismatch as err:
                self.untraced.append((ctx.step, str(err)))
                return
            self._last = (ctx.step, bundle)
        if self.save_dir is not None:
            Path(self.save_dir).mkdir(parents=True, exist_ok=True)
            save_bundle(Path(self.save_dir) / f"step_{ctx.step}.pt", bundle)
        trace = trace_step(self._train_step, bundle)
        if not trace.findings:
            self.untraced.append((ctx.step, "its replay from the step's bundle stayed finite (the step does not "
                                            "reproduce: a non-deterministic kernel, or a forward that reads state "
                                            "no tensor holds)"))
            return
        self.traces.append(trace)
        self.verdicts.append(trace.findings[0])
        self._complete = bool(trace.params_nonfinite) or not trace.escaped

    def events(self, step: int) -> list[tuple[str, dict[str, Any]]]:
        """The trace of `step`, when that step was replayed, as a "tracer" event (`line`: its first non-finite
        tensor in one line); a "tracer_unreproduced" event when it was not traced (`why`: see `untraced`)."""
        events = [("tracer", {**t.to_dict(), "line": t.findings[0].line()}) for t in self.traces if t.step == step]
        return events + [("tracer_unreproduced", {"step": k, "why": why}) for k, why in self.untraced if k == step]

    @staticmethod
    def _went_nonfinite(ctx: StepContext, checks: list[Slot] | None) -> bool:
        result = ctx.result
        if not math.isfinite(result.losses.get("total", 0.0)):
            return True
        if result.grad_norm is not None and not math.isfinite(result.grad_norm):
            return True
        if checks is None:
            params = list(ctx.model.parameters())
            tensors = [p.grad for p in params if p.grad is not None] + [p.detach() for p in params]
            return bool(to_host(nonfinite_flags(tensors)).any())
        return any(bool(slot.value.any()) for slot in checks)
