"""Bring your own model: the workbench's instruments and run log on any `nn.Module` and loss function.

High level: `instrument` wraps one training step of your model in the workbench's `TrainStep` and attaches
the probes. Your loss function takes `(model, batch)` and returns a scalar tensor or a dict of scalar terms
(their sum is the total unless the dict has a "total")::

    import torch, torch.nn as nn, torch.nn.functional as F
    from workbench.run.byo import instrument

    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def loss_fn(model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)

    with instrument(model, optimizer, loss_fn, groups={"hidden": "0", "out": "2"}, log_path="runs/mlp.h5") as s:
        for _ in range(10):
            result = s.step((torch.randn(16, 8), torch.randint(0, 3, (16,))))
    print(s.probe.latest.group_norm, s.summary()["first_nonfinite_loss_step"])

Each step records the gradient norm, max |g| and non-finite count per group (before clipping, after unscaling), what
the optimizer did (update ratio and tensors not updated per group: `workbench.run.updates`, the same observer
`watch` and the Lightning callback use), checks that the optimizer holds every trainable parameter with a gradient, optionally records
activation statistics, and on the first non-finite step replays it and names the first non-finite tensor and
the op that produced it. Everything goes to `s.record` (a `workbench.records.RunRecord`) and, with `log_path`,
to the HDF5 run log (`workbench.records.read_record` reads it back); `workbench.views.plots.training_figure`
draws either. With `log_path` the session also keeps, beside the log, the replay bundle of the first step at which
the run's evidence appears (`workbench.run.kept`), which `workbench diagnose` continues with each candidate fix.

Low level, for your own training loop: a `GradNormProbe` needs no TrainStep. Call `collect` after your
backward and, with a GradScaler, after `scaler.unscale_(optimizer)` (it raises if you forgot)::

    from workbench.run.byo import GradNormProbe

    probe = GradNormProbe(model, {"hidden": "0", "out": "2"})
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    stats = probe.collect(optimizer, scaler)       # one host copy; stats.group_norm["out"], stats.scale
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(optimizer)
    scaler.update()

`probe.records(stats)` flattens the statistics into a row for `RunLogWriter.log_step`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from workbench.instrument import (
    ActivationStats, GradNormProbe, NonFiniteTracer, OptimizerCoverage, ParamGroups, Verdict, default_groups,
    groups_from_patterns,
)
from workbench.instrument.replay import capture
from workbench.records import Recorder, RunRecord, summarize
from workbench.run.engine import RunEngine
from workbench.run.kept import BundleKeeper, import_path, optimizer_layout
from workbench.run.updates import OptimizerUpdates
from workbench.train.device import autocast_dtype
from workbench.train.step import LoopSemantics, StepConfig, StepResult, TrainStep, get_semantics

__all__ = ["GradNormProbe", "Session", "UserBatch", "instrument", "loss_terms"]

UserLossFn = Callable[[nn.Module, Any], torch.Tensor | Mapping[str, torch.Tensor]]
Groups = ParamGroups | Mapping[str, str | Sequence[str]] | Sequence[str] | None


def _move(obj: Any, device: torch.device) -> Any:
    """`obj` with every tensor moved to `device`: tensors and objects with their own `.to` are moved by it,
    mappings (returned as dicts), namedtuples, tuples and lists element by element; anything else is kept."""
    if isinstance(obj, torch.Tensor) or callable(getattr(obj, "to", None)):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _move(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_move(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_move(v, device) for v in obj)
    return obj


@dataclass
class UserBatch:
    """Your batch, whatever its structure, as one object with `.to(device)`.

    TrainStep reads a list or tuple as micro-batches and the tracer's replay moves batches with `.to`, so a
    `(inputs, targets)` tuple is wrapped rather than passed as it is.
    """

    data: Any

    def to(self, device: torch.device | str) -> UserBatch:
        return UserBatch(_move(self.data, torch.device(device)))


def loss_terms(value: torch.Tensor | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The user's loss as TrainStep's terms: {"total": ..., <term>: ...}, every value a 0-d floating tensor.

    A tensor is the total. A dict's terms are summed into "total" unless it has one (then it is used as is).
    """
    if not isinstance(value, (torch.Tensor, Mapping)):
        raise TypeError(f"loss_fn returned {type(value).__name__} {value!r}: expected a 0-d floating tensor "
                        f"or a dict of named 0-d floating tensors")
    terms = {"total": value} if isinstance(value, torch.Tensor) else dict(value)
    if not terms:
        raise ValueError("loss_fn returned an empty dict: expected a scalar tensor or named scalar terms")
    for name, term in terms.items():
        if not isinstance(term, torch.Tensor):
            raise TypeError(f"loss_fn: term {name!r} is {type(term).__name__} {term!r}: expected a 0-d floating "
                            f"tensor")
        if not term.is_floating_point():
            raise TypeError(f"loss_fn: term {name!r} has dtype {term.dtype}: expected a floating dtype "
                            f"(float32, bfloat16, float16 or float64)")
        if term.ndim != 0:
            raise ValueError(f"loss_fn: term {name!r} must be a 0-d floating tensor, got shape {tuple(term.shape)}")
    if "total" not in terms:
        terms = {"total": sum(terms.values()), **terms}
    return terms


class _LossAdapter:
    """TrainStep's loss hook around the user's `loss_fn(model, batch)`; the reference model's loss weights
    and RNN-T flags do not apply to it and are ignored."""

    def __init__(self, loss_fn: UserLossFn) -> None:
        self.loss_fn = loss_fn

    def __call__(self, model: nn.Module, batch: UserBatch, weights: Any, *, rnnt: bool, mode: bool,
                 normalization: str) -> dict[str, torch.Tensor]:
        return loss_terms(self.loss_fn(model, batch.data))


def _named_groups(model: nn.Module, groups: Groups) -> ParamGroups:
    if groups is None:
        return default_groups(model)
    if isinstance(groups, ParamGroups):
        return groups
    if isinstance(groups, Mapping):
        return groups_from_patterns(model, groups)
    if isinstance(groups, str):
        raise TypeError("groups: expected a list of patterns or a mapping, got a single string")
    return groups_from_patterns(model, {pattern: pattern for pattern in groups})


def _param_groups(model: nn.Module, groups: Groups) -> ParamGroups:
    """None: the model's own groups (`param_groups()`) or one per top-level child; a list of name prefixes /
    're:' patterns: one group each, named by the pattern; a mapping: group name -> pattern(s).

    Every parameter belongs to a group, so every one is checked for updates: parameters registered on the root
    form the group "(root)", any other parameter no group names the group "(other)".
    """
    named = _named_groups(model, groups)
    grouped = {name for members in named.values() for name in members}
    rest = [name for name, _ in model.named_parameters() if name not in grouped]
    extra = {"(root)": [n for n in rest if "." not in n], "(other)": [n for n in rest if "." in n]}
    return ParamGroups({**named, **{group: members for group, members in extra.items() if members}})


class Session:
    """One instrumented training loop over your model; build it with `instrument`.

    Attributes: `engine` (the RunEngine), `train_step`, `probe` (GradNormProbe), `coverage` (OptimizerCoverage),
    `tracer` (NonFiniteTracer or None), `activations` (ActivationStats or None), `record` (the RunRecord of every
    step), `results` (the StepResult of every step) and `keeper` (the BundleKeeper, with a log).
    """

    def __init__(self, engine: RunEngine, probe: GradNormProbe, coverage: OptimizerCoverage,
                 tracer: NonFiniteTracer | None, activations: ActivationStats | None, record: RunRecord,
                 keeper: BundleKeeper | None = None) -> None:
        self.engine = engine
        self.probe = probe
        self.coverage = coverage
        self.tracer = tracer
        self.activations = activations
        self.record = record
        self.keeper = keeper
        self.results: list[StepResult] = []
        self.closed = False

    @property
    def train_step(self) -> TrainStep:
        return self.engine.train_step

    @property
    def model(self) -> nn.Module:
        return self.train_step.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.train_step.optimizer

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        return self.train_step.scaler

    @property
    def verdicts(self) -> list[Verdict]:
        """The tracer's verdicts so far (the first non-finite tensor of each replayed step)."""
        return list(self.tracer.verdicts) if self.tracer is not None else []

    def step(self, batch: Any) -> StepResult:
        """One instrumented optimizer step on `batch` (any structure your loss_fn accepts; its tensors are
        moved to the model's device). Returns the step's losses (floats), skip reason, grad norm and scale."""
        if self.closed:
            raise RuntimeError("this instrumented session is closed")
        batch = UserBatch(batch).to(self.train_step.device)
        keeping = self.keeper is not None and not self.keeper.done
        # the tracer captures every step start while it traces; once it stops, the session captures its own
        own = keeping and (self.tracer is None or self.tracer.exhausted)
        bundle = capture(self.train_step, batch, None, index=self.train_step.step_index + 1) if own else None
        layout = optimizer_layout(self.optimizer, self.model) if keeping else {}
        result = self.engine.step(batch)
        self.results.append(result)
        if self.keeper is not None and keeping:
            traced = self.tracer.bundle if self.tracer is not None else None
            self._keep(self.keeper, bundle if own else traced, layout, result)
        return result

    def _keep(self, keeper: BundleKeeper, bundle: Any, layout: dict[str, Any], result: StepResult) -> None:
        finding = self.coverage.latest
        outside = finding is not None and finding.step == result.step and bool(finding.outside_optimizer)
        finite = self.record.values("params_finite")[-1:] != [False]
        nonfinite = not (math.isfinite(result.losses.get("total", math.nan)) and finite
                         and (result.grad_norm is None or math.isfinite(result.grad_norm)))
        keeper.offer(bundle, layout, outside=outside, nonfinite=nonfinite)

    def summary(self) -> dict[str, Any]:
        """The run's summary (`workbench.records.summarize`): steps, first non-finite loss step, skipped and
        overflow steps, tensors found outside the optimizer, the tracer's verdicts, the final losses, the log.
        Settles the last step first: under `skip_step` without a GradScaler its post-update values (the parameter
        check, the update size) wait for the next step's copy (`TrainStep.settle`)."""
        self.train_step.settle()
        return summarize(self.record)

    def close(self, *, status: str = "finished", error: str | None = None, **attrs: Any) -> None:
        """Detach every instrument (activation hooks included) and close the run log, storing `attrs` (run-level
        results such as `wall_s`) with it. Closing twice does nothing."""
        if self.closed:
            return
        self.closed = True
        self.engine.close(status, **attrs, **({"error": error} if error is not None else {}))

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.close()
        else:
            self.close(status="failed", error=repr(exc).replace("\n", " "))


def instrument(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: UserLossFn,
    *,
    groups: Groups = None,
    precision: str = "fp32",
    clip: float | None = 1.0,
    semantics: str | LoopSemantics = "corrected",
    init_scale: float = 65536.0,
    log_path: str | Path | None = None,
    overwrite: bool = False,
    activations: bool | Sequence[str] = False,
    trace: bool = True,
    device: torch.device | str | None = None,
    keep_bundle: bool = True,
) -> Session:
    """Instrument `model` trained by `optimizer` on `loss_fn(model, batch) -> Tensor | dict[str, Tensor]`.

    loss_fn must run the model it is given, not a global one: the tracer replays a step on a copy.

    groups: None (the model's `param_groups()`, else one group per top-level child module), a list of
        parameter-name prefixes or 're:' regular expressions (one group each), or a mapping group name ->
        pattern(s); see `groups_from_patterns`.
    precision: "fp32", "bf16" or "fp16" autocast (fp16 with a GradScaler starting at `init_scale`).
    clip: max gradient norm (None: no clipping; the norm is still computed).
    semantics: the step's loop semantics, "corrected" (zero every gradient, clip over the optimizer's
        parameters, skip the update on a non-finite gradient) or "seed_faithful"; see `workbench.train.step`.
    log_path: a new HDF5 run log for every step's series and the coverage / tracer events (its folder is
        created); `overwrite` replaces an existing file instead of raising FileExistsError.
    activations: record max |a|, RMS and non-finite count of leaf modules with parameters (True) or of the
        named modules; their forward hooks are removed on `close`.
    trace: replay the first non-finite step and name the first non-finite tensor (costs one state-dict copy
        per step until then).
    device: where batches go (default: the device of the model's first parameter).
    keep_bundle: with `log_path`, keep the replay bundle of the first step at which the run's evidence appears
        beside the log (`<stem>.bundle.pt`, see `workbench.run.kept`) for `workbench diagnose`; it costs one
        state-dict copy per step once the tracer has stopped (the tracer's own copy before that).
    """
    first = next(model.parameters(), None)
    if first is None:
        raise ValueError(f"instrument: {type(model).__qualname__} has no parameters: expected a model with at "
                         f"least one parameter to train")
    if device is None:
        device = first.device
    device = torch.device(device)
    autocast_dtype(precision)  # an unknown precision fails here, not at the first step
    sem = semantics if isinstance(semantics, LoopSemantics) else get_semantics(semantics)
    probe = GradNormProbe(model, _param_groups(model, groups))
    instruments: list[Any] = [probe, OptimizerCoverage(model, probe=probe),
                              OptimizerUpdates(model, probe.groups, optimizer)]
    acts = None
    if activations:
        acts = ActivationStats(model, None if activations is True else list(activations))
        instruments.append(acts)
    tracer = NonFiniteTracer(max_traces=1) if trace else None
    if tracer is not None:
        instruments.append(tracer)
    config = StepConfig(precision=precision, clip=clip, init_scale=init_scale, semantics=sem)
    train_step = TrainStep(model, optimizer, config, device, loss_fn=_LossAdapter(loss_fn))
    settings = {"model": type(model).__qualname__, "optimizer": type(optimizer).__qualname__,
                "precision": precision, "clip": clip, "semantics": dataclasses.asdict(sem),
                "groups": dict(probe.groups.items())}
    record = RunRecord(settings)
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    recorder = Recorder(record, sources=instruments, log_path=log_path, overwrite=overwrite,
                        attrs={"torch": torch.__version__, "device": str(device)})
    keeper = None
    if log_path is not None and keep_bundle:
        keeper = BundleKeeper(log_path, recorder, {
            "source": "byo", "model_class": import_path(type(model)), "loss_fn": import_path(loss_fn),
            "precision": precision, "clip": clip, "init_scale": init_scale, "semantics": dataclasses.asdict(sem)})
    # Observers and forward hooks go on last, once nothing above can fail and leave them behind.
    engine = RunEngine(train_step, instruments=instruments, recorder=recorder)
    return Session(engine, probe, instruments[1], tracer, acts, record, keeper)
