"""The one per-step recorder: a TrainStep observer that, after every step, writes one row into the run's
RunRecord and, when the run has a log, into its HDF5 run log.

A row holds what the step itself returned and what each source instrument measured at that step
(`source.row(step)`), plus the events the sources produced (`source.events(step)`). Keys written by the recorder
itself:

    loss/<term>           every loss term and loss/total (the step's mean over micro-batches)
    skipped               the update was skipped (non-finite loss or gradient)
    nonfinite_grad        the step saw a non-finite gradient (a GradScaler overflow or a non-finite norm)
    step_ms               wall time of the step
    scaler/scale_before   GradScaler scale the step's backward used (fp16 only)
    clip/total_norm       the norm the clip measured (over the clip scope's parameters)
    clip/coefficient      the factor the clip applied to every gradient (1 when the norm is below the limit)
    lr/<group>            learning rate of each optimizer group
    weight/<term>         the loss weight of each term at this step (the reference model's runs)
    params_finite         every parameter finite after the update; params_nonfinite/tensors and
                          params_nonfinite/elements count what is not (the step's shared non-finite check,
                          `HostPacket.params_nonfinite`, in the step's one host copy; elements are counted,
                          with a read per non-finite tensor, only on a step that has one). Checked after the
                          update, so when the step's one copy was taken before it (a `skip_step` decision), it
                          crosses in the next step's copy and the row is written then, under its own step

Rows are written in step order; `TrainStep.settle()` writes a row still waiting for the next step's copy.

Attach it after the instruments it reads, so their values for the step are final when it records.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from workbench.instrument.observer import StepObserver
from workbench.records.record import RunRecord
from workbench.records.runlog import RunLogWriter
from workbench.train.host import nonfinite_elements, nonfinite_flags, to_host
from workbench.train.step import StepContext

FLUSH_SECONDS = 1.0
FLUSH_EVERY = 256  # steps kept in memory at most, for runs faster than 256 steps a second


def nonfinite_params(model: torch.nn.Module, flags: np.ndarray | None = None) -> tuple[int, int]:
    """(tensors, elements) of `model`'s parameters holding a non-finite value. `flags`: the step's per-parameter
    check already on the host (`HostPacket.params_nonfinite`); without it, one reduction and one host read.
    Elements are counted only when a tensor is non-finite (one read each)."""
    if flags is not None and not flags.any():
        return 0, 0
    params = [p.detach() for p in model.parameters()]
    if flags is None:
        flags = to_host(nonfinite_flags(params))
    counts = [c for c in nonfinite_elements(params, flags.tolist()) if c]
    return len(counts), sum(counts)


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """`lr/<group>` of each optimizer group (a tensor lr as a float, so a live figure never reads a tensor)."""
    return {f"lr/{group.get('name', f'group{k}')}": float(group["lr"]) if isinstance(group["lr"], torch.Tensor)
            else group["lr"] for k, group in enumerate(optimizer.param_groups)}


def step_row(ctx: StepContext, lrs: Mapping[str, float] | None = None) -> dict[str, Any]:
    """What the step itself says about itself (see the module docstring). `lrs`: the learning rates the step
    used, when taken earlier than this call (the run engine may set the next step's before a late call)."""
    result = ctx.result
    row: dict[str, Any] = {f"loss/{k}": v for k, v in result.losses.items()}
    row.update({"skipped": result.skipped, "nonfinite_grad": result.reason == "nonfinite_grad",
                "step_ms": result.ms})
    if result.scale is not None:
        row["scaler/scale_before"] = result.scale
    if result.grad_norm is not None:
        row["clip/total_norm"] = result.grad_norm
    if result.clip_coef is not None:
        row["clip/coefficient"] = result.clip_coef
    row.update(learning_rates(ctx.optimizer) if lrs is None else lrs)
    if dataclasses.is_dataclass(ctx.weights):
        row.update({f"weight/{k}": float(v) for k, v in dataclasses.asdict(ctx.weights).items()})
    tensors, elements = nonfinite_params(ctx.model, ctx.packet.params_nonfinite(ctx.model).value)
    row.update({"params_finite": tensors == 0, "params_nonfinite/tensors": tensors,
                "params_nonfinite/elements": elements})
    return row


class Recorder(StepObserver):
    """Records every step of a run into `record` and, with `log_path`, a new run log.

    sources: instruments offering `row(step)` / `events(step)` (and optionally `vector_labels`, the column names
    of their vector series). attrs: root attributes of the run log (the run's settings under "settings").
    flush_seconds: the log's step rows are written at the first step at least this long after the last flush
    (and at every event, and at close; see `RunLogWriter`), so a SIGKILL loses at most the steps of the last
    `flush_seconds` before it, while a fast run pays one write per series a second instead of one per step
    (about 6 ms a step for ~50 series). A step slower than that is written as it ends; 0 writes every step.
    """

    def __init__(self, record: RunRecord, *, sources: Sequence[Any] = (),
                 log_path: str | os.PathLike[str] | None = None, overwrite: bool = False,
                 attrs: Mapping[str, Any] | None = None, flush_seconds: float = FLUSH_SECONDS) -> None:
        self.record = record
        self.sources = list(sources)
        self.writer: RunLogWriter | None = None
        if log_path is not None:
            self.writer = RunLogWriter(log_path, overwrite=overwrite, flush_every=FLUSH_EVERY,
                                       flush_seconds=flush_seconds,
                                       attrs={"settings": record.settings, **(attrs or {})})
            record.path = str(log_path)
            for source in self.sources:
                for key, labels in getattr(source, "vector_labels", {}).items():
                    self.writer.declare_vector(key, labels)
        record.attrs.update(attrs or {})
        self._lrs: dict[int, dict[str, float]] = {}

    def on_pack(self, ctx: StepContext) -> None:
        """TrainStep event: queue the step's shared non-finite check over the parameters for its host copy (which
        may be the next step's: then `on_step_end` comes during that step) and note the step's learning rates."""
        ctx.packet.params_nonfinite(ctx.model)
        self._lrs = {ctx.step: learning_rates(ctx.optimizer)}

    def on_step_end(self, ctx: StepContext) -> None:
        self.record_step(ctx.step, step_row(ctx, self._lrs.pop(ctx.step, None)))

    def record_step(self, step: int, row: Mapping[str, Any]) -> None:
        """Record one step: `row` (what the step says about itself, `step_row`'s keys) and what every source
        measured and reported at that step. A training loop without a TrainStep (Lightning) calls it directly."""
        row = dict(row)
        for source in self.sources:
            row.update(source.row(step))
        self.record.append(step, {k: v for k, v in row.items() if isinstance(v, (int, float)) or np.ndim(v) == 0})
        if self.writer is not None:
            self.writer.log_step(step, row)
        for source in self.sources:
            for table, event in source.events(step):
                self.event(table, event)

    def event(self, table: str, row: dict[str, Any]) -> None:
        """Record an event row (a stage change, an unfreeze, a coverage finding, a tracer verdict, ...)."""
        self.record.add_event(table, row)
        if self.writer is not None:
            self.writer.log_event(table, row)

    def note(self, **attrs: Any) -> None:
        """Store run-level facts (the GradScaler's settings, ...) in the record and the run log."""
        self.record.attrs.update(attrs)
        if self.writer is not None:
            self.writer.set_attrs(**attrs)

    def close(self, status: str = "finished", **attrs: Any) -> None:
        """Store the run's results (`val_per=...`) and its final status; closing twice does nothing."""
        if self.record.status != "running":
            return
        self.record.attrs.update(attrs)
        self.record.status = status
        if self.writer is not None:
            if attrs:
                self.writer.set_attrs(**attrs)
            self.writer.close(status=status)
