"""The one record of a run: its per-step series and event tables, filled live by a `Recorder` or read back from its
run log by `read_record`. Plots, summaries, criteria and reports all read this type.

Series keys are the run log's (`loss/total`, `grad_norm/encoder.layers.0`, `scaler/scale_before`, `skipped`, ...,
see `workbench.records.recorder`); each series is a list aligned with `steps`, None where that step logged no
value for it (a step skipped before backward has no gradient statistics).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from workbench.records.runlog import RunLog

Value = float | int | bool | None


def _finite(v: Value) -> bool:
    return v is not None and math.isfinite(v)


@dataclass
class RunRecord:
    """Per-step series (scalars only; vectors such as per-parameter norms stay in the run log) and event tables.

    settings: the run's settings as a dict. status: "running", "finished" or "failed". attrs: everything else
    the run stored once (results such as `val_per`, `val_rnnt_per`, `wall_s`; `error` on failure; device...).
    path: the run log's path, when the run has one.
    """

    settings: dict[str, Any] = field(default_factory=dict)
    status: str = "running"
    steps: list[int] = field(default_factory=list)
    series: dict[str, list[Value]] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    # ------------------------------------------------------------------------------------------- building it

    def append(self, step: int, row: Mapping[str, Value]) -> None:
        """Add one step's scalar values; keys first seen now get None for the earlier steps."""
        n = len(self.steps)
        self.steps.append(step)
        for key, value in row.items():
            self.series.setdefault(key, [None] * n).append(value)
        for values in self.series.values():
            if len(values) == n:
                values.append(None)

    def add_event(self, table: str, row: dict[str, Any]) -> None:
        self.tables.setdefault(table, []).append(row)

    # ------------------------------------------------------------------------------------------- reading it

    @property
    def name(self) -> str:
        return str(self.settings.get("name", Path(self.path).stem if self.path else "run"))

    def values(self, key: str) -> list[Value]:
        """The series `key` aligned with `steps` (all None when the run never logged it)."""
        return self.series.get(key, [None] * len(self.steps))

    def prefixed(self, prefix: str) -> dict[str, list[Value]]:
        """Series under `prefix/`, keyed by the rest of the name ("loss" -> {"total": ..., "ctc": ...})."""
        stem = prefix.rstrip("/") + "/"
        return {k[len(stem):]: v for k, v in self.series.items() if k.startswith(stem)}

    def flagged(self, key: str) -> list[int]:
        """Steps whose boolean series `key` is true."""
        return [s for s, v in zip(self.steps, self.values(key)) if v]

    # What plots, summaries and criteria read; each view is computed from the series on every access.
    losses = property(lambda self: self.prefixed("loss"), doc="loss term -> values")
    group_nonfinite = property(lambda self: self.prefixed("grad_nonfinite"), doc="group -> non-finite gradient entries")
    scale = property(lambda self: self.values("scaler/scale_before"), doc="GradScaler scale per step (fp16 only)")
    skipped = property(lambda self: self.flagged("skipped"), doc="steps whose update was skipped")
    events = property(lambda self: self.tables.get("events", []), doc="stage changes and unfreezes")

    @property
    def group_norms(self) -> dict[str, list[Value]]:
        """group -> gradient L2 norm before clipping."""
        return {k: v for k, v in self.prefixed("grad_norm").items() if k != "global"}

    @property
    def overflow(self) -> list[int]:
        """Steps with a non-finite gradient entry (caught by the GradScaler or not)."""
        counts = self.group_nonfinite.values()
        return [s for k, s in enumerate(self.steps)
                if self.values("nonfinite_grad")[k] or any(c[k] for c in counts)]

    def first_nonfinite_loss_step(self, start: int = 1) -> int | None:
        """The first step >= `start` with a non-finite loss term."""
        return min((s for values in self.losses.values() for s, v in zip(self.steps, values)
                    if s >= start and v is not None and not math.isfinite(v)), default=None)

    def first_nonfinite_param_step(self, start: int = 1) -> int | None:
        """The first step >= `start` after whose update some parameter was non-finite."""
        return next((s for s, ok in zip(self.steps, self.values("params_finite")) if s >= start and ok is False),
                    None)

    def first_nonfinite_step(self, start: int = 1) -> int | None:
        """The first step >= `start` with a non-finite loss term or parameter: where the run diverged."""
        found = [s for s in (self.first_nonfinite_loss_step(start), self.first_nonfinite_param_step(start))
                 if s is not None]
        return min(found, default=None)

    @property
    def max_grad_norm(self) -> float | None:
        return max((v for v in self.values("grad_norm/global") if _finite(v)), default=None)


def read_record(path: str | Path) -> RunRecord:
    """Read a run log into a RunRecord: every scalar series aligned on the union of their steps, every table,
    every root attribute (the run's settings from `settings`, its status, the rest in `attrs`).

    The whole log is verified against its manifest first (`RunLog.verify`): a damaged log, or one with a series
    missing, is a `RunLogDamaged` naming the file and the series, never a record with that series left out."""
    with RunLog(path) as log:
        log.verify()
        frame = log.scalar_frame()
        steps = sorted({int(s) for key_steps, _ in frame.values() for s in key_steps})
        position = {s: k for k, s in enumerate(steps)}
        series: dict[str, list[Value]] = {}
        for key, (key_steps, values) in frame.items():
            column: list[Value] = [None] * len(steps)
            for s, v in zip(key_steps.tolist(), values.tolist()):
                column[position[s]] = v
            series[key] = column
        tables = {name: log.table(name) for name in log.table_names()}
        attrs = {k: v for k, v in log.attrs.items() if k not in ("settings", "status")}
        settings = log.attrs.get("settings") or {}
        return RunRecord(settings=settings, status=log.status, steps=steps, series=series, tables=tables,
                         attrs=attrs, path=str(path))
