"""Parallel, resumable sweeps of joint-stage runs forked from one CTC-warm checkpoint, with their figures and report.

A sweep is a grid over warmup length N, learning rate, unfreezing policy, rebuild at unfreeze, precision, loop
semantics, clipping, RNN-T loss normalisation and optimizer, plus one CTC-only control per combination of the
axes that matter to it (lr, precision, clipping, optimizer, semantics). Every run has the same number of joint
steps, max(N) + `steps`, so every run sees the same batches and the same amount of training.

Layout of a sweep folder:

    index.json          written by the parent process only, atomically (temp file + os.replace): the checkpoint
                        and data it belongs to and, per run id, settings, status, log path, summary (with the
                        default criteria.Rule) and error
    runs/<run_id>.h5    one run log per run, written by the worker that runs it
    .lock               held (flock) while a sweep runs here, so two sweeps never share a folder

Running the same sweep again redoes only runs whose log is missing or not "finished" (an incomplete log is
deleted first); a finished log is never recomputed or touched.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
from concurrent.futures.process import BrokenProcessPool
import dataclasses
import fcntl
import hashlib
import itertools
import json
import math
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TextIO

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from tqdm import tqdm

from workbench.criteria import (
    AXES, MapPanel, RunRecord, Rule, conclusions, first_nonfinite_step, run_summary, slice_label, stability_map,
    varying_axes, verdict,
)
from workbench.device import PRECISIONS
from workbench.experiment import RunSettings, json_safe, run_joint
from workbench.losses import RNNT_NORMALIZATIONS
from workbench.plots import LiveFigure, display_slot, training_figure
from workbench.records import RunLog
from workbench.train.optim import OPTIMIZERS
from workbench.train.step import SEMANTICS
from workbench.train.unfreeze import POLICIES

INDEX_FORMAT = "workbench-sweep"
INDEX_VERSION = 1
# Policies whose unfreeze rebuilds the optimizer (or, with rebuild False, keeps it): the only ones rebuild affects.
REBUILDING_POLICIES = ("freeze_params", "freeze_and_mute")
FIGURE_GROUPS = ("encoder", "rnnt_decoder.predictor", "rnnt_decoder.joint")
# Grid order: the slice axes outermost, then lr, N innermost, so a family of N finishes together.
GRID_ORDER = tuple(a for a in AXES if a != "warmup") + ("warmup",)


class SweepError(ValueError):
    """Bad sweep input (grid values, a folder that belongs to another checkpoint, a folder in use)."""


# ------------------------------------------------------------------------------------------------------ grid

def _axis(name: str, values: Any, check: Callable[[Any], Any], expected: str) -> tuple:
    """Coerce an axis to a tuple without duplicates, checking each value; raise a one-line SweepError."""
    seq = list(values) if isinstance(values, (list, tuple)) else [values]
    if not seq:
        raise SweepError(f"{name}: expected at least one value")
    out = []
    for v in seq:
        try:
            ok = check(v)
        except (TypeError, ValueError):
            ok = None
        if ok is None:
            raise SweepError(f"{name}: expected {expected}, got {v!r}")
        if ok not in out:
            out.append(ok)
    return tuple(out)


def _choice(options: Sequence[str]) -> Callable[[Any], str | None]:
    return lambda v: v if v in options else None


def _non_negative_int(v: Any) -> int | None:
    return int(v) if not isinstance(v, bool) and float(v) == int(v) and int(v) >= 0 else None


def _positive_float(v: Any) -> float | None:
    f = float(v)
    return f if not isinstance(v, bool) and math.isfinite(f) and f > 0 else None


def _clip_value(v: Any) -> float | None:
    f = float(v)
    return f if not isinstance(v, bool) and math.isfinite(f) and f >= 0 else None


def _bool(v: Any) -> bool | None:
    if isinstance(v, bool):
        return v
    return {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}.get(str(v).lower())


@dataclass(frozen=True)
class SweepGrid:
    """The axes of a sweep. Each axis takes a value or a list; `clip` 0 turns clipping off; `steps` is the number
    of joint steps after the longest warmup (every run has max(warmup) + steps steps); `controls` adds the
    CTC-only control runs."""

    warmup: tuple[int, ...] = (0, 1, 10, 30, 100)
    lr: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 5e-3)
    policy: tuple[str, ...] = ("freeze_params",)
    rebuild: tuple[bool, ...] = (True,)
    precision: tuple[str, ...] = ("fp16",)
    semantics: tuple[str, ...] = ("seed_faithful", "corrected")
    clip: tuple[float, ...] = (1.0, 0.0)
    rnnt_normalization: tuple[str, ...] = ("seed_sqrt_tu", "sum")
    optimizer: tuple[str, ...] = ("adamw", "sgd")
    steps: int = 20
    seed: int = 0
    batch_size: int = 4
    controls: bool = True

    def __post_init__(self) -> None:
        checks = {
            "warmup": (_non_negative_int, "a non-negative integer number of steps"),
            "lr": (_positive_float, "a positive learning rate"),
            "policy": (_choice(POLICIES), f"one of {', '.join(POLICIES)}"),
            "rebuild": (_bool, "yes or no"),
            "precision": (_choice(PRECISIONS), f"one of {', '.join(PRECISIONS)}"),
            "semantics": (_choice(tuple(SEMANTICS)), f"one of {', '.join(SEMANTICS)}"),
            "clip": (_clip_value, "a non-negative max gradient norm (0 turns clipping off)"),
            "rnnt_normalization": (_choice(RNNT_NORMALIZATIONS), f"one of {', '.join(RNNT_NORMALIZATIONS)}"),
            "optimizer": (_choice(OPTIMIZERS), f"one of {', '.join(OPTIMIZERS)}"),
        }
        for name, (check, expected) in checks.items():
            object.__setattr__(self, name, _axis(name, getattr(self, name), check, expected))
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SweepError(f"{name}: expected a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SweepError(f"seed: expected an integer, got {self.seed!r}")

    @property
    def total_steps(self) -> int:
        return max(self.warmup) + self.steps

    def points(self) -> Iterator[dict[str, Any]]:
        """Grid points as axis dicts, slice axes outermost and N innermost (a family of N finishes together)."""
        for values in itertools.product(*(getattr(self, a) for a in GRID_ORDER)):
            yield {a: v for a, v in sorted(zip(GRID_ORDER, values), key=lambda item: AXES.index(item[0]))}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def joint_settings(grid: SweepGrid, axes: Mapping[str, Any]) -> RunSettings:
    """The run a grid point stands for, with axes that cannot matter there set to one canonical value: with N = 0
    (or policy none) every policy is the plain joint stage, and only freeze_params / freeze_and_mute with N > 0
    have an optimizer rebuild to switch off. Grid points that are the same run therefore share one run id."""
    policy, n, rebuild = axes["policy"], axes["warmup"], axes["rebuild"]
    if n == 0 or policy == "none":
        policy, n = "none", 0
    if policy not in REBUILDING_POLICIES:
        rebuild = True
    return RunSettings(steps=grid.total_steps, lr=axes["lr"], precision=axes["precision"],
                       semantics=axes["semantics"], policy=policy, warmup=n, rebuild_at_unfreeze=rebuild,
                       clip=axes["clip"] or None, rnnt_normalization=axes["rnnt_normalization"],
                       optimizer=axes["optimizer"], batch_size=grid.batch_size, seed=grid.seed)


def control_settings(grid: SweepGrid, axes: Mapping[str, Any]) -> RunSettings:
    """The CTC-only control of a grid point: the RNN-T decoder is never attached, so policy, N, rebuild and the
    RNN-T normalisation do not exist for it; everything else is the grid point's."""
    return RunSettings(steps=grid.total_steps, lr=axes["lr"], precision=axes["precision"],
                       semantics=axes["semantics"], clip=axes["clip"] or None, optimizer=axes["optimizer"],
                       batch_size=grid.batch_size, seed=grid.seed, ctc_only=True)


def run_id(settings: RunSettings) -> str:
    """A readable name plus a short hash of every setting except the name: the same settings, the same id."""
    fields = settings.to_dict()
    fields.pop("name")
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
    clip = "clipoff" if settings.clip is None else f"clip{settings.clip:g}"
    if settings.ctc_only:
        stem = f"ctc_only-{settings.semantics}-lr{settings.lr:g}-{settings.precision}-{clip}-{settings.optimizer}"
    else:
        rebuild = "" if settings.rebuild_at_unfreeze else "-norebuild"
        stem = (f"{settings.semantics}-{settings.policy}-N{settings.warmup}{rebuild}-lr{settings.lr:g}-"
                f"{settings.precision}-{clip}-{settings.rnnt_normalization}-{settings.optimizer}")
    return f"{stem}-{digest}"


@dataclass
class Plan:
    """The unique runs of one or more grids (controls first) and every grid point's run and control."""

    runs: dict[str, RunSettings] = field(default_factory=dict)
    cells: list[dict[str, Any]] = field(default_factory=list)

    @property
    def controls(self) -> list[str]:
        return [rid for rid, s in self.runs.items() if s.ctc_only]


def make_plan(grids: SweepGrid | Sequence[SweepGrid]) -> Plan:
    grids = [grids] if isinstance(grids, SweepGrid) else list(grids)
    if not grids:
        raise SweepError("a sweep needs at least one grid")
    controls: dict[str, RunSettings] = {}
    joint: dict[str, RunSettings] = {}
    cells = []
    for grid in grids:
        for axes in grid.points():
            settings = joint_settings(grid, axes)
            rid = run_id(settings)
            joint.setdefault(rid, dataclasses.replace(settings, name=rid))
            cid = None
            if grid.controls:
                control = control_settings(grid, axes)
                cid = run_id(control)
                controls.setdefault(cid, dataclasses.replace(control, name=cid))
            cells.append({"axes": axes, "run": rid, "control": cid})
    return Plan({**controls, **joint}, cells)


# ---------------------------------------------------------------------------------------------- run records

def load_record(path: str | Path) -> RunRecord:
    """Read a run log into a RunRecord (series aligned to steps 1..n, None where a series has no row)."""
    with RunLog(path) as log:
        names = log.series_names()
        steps_total, _ = log.series("loss/total") if "loss/total" in names else (np.zeros(0, int), None)
        n = int(steps_total.max()) if steps_total.size else 0

        def dense(key: str) -> list:
            out: list = [None] * n
            if key in names:
                steps, values = log.series(key)
                for s, v in zip(steps.tolist(), values.tolist()):
                    if 1 <= s <= n:
                        out[s - 1] = v
            return out

        def sub(prefix: str) -> dict[str, list]:
            return {k[len(prefix):]: dense(k) for k in names if k.startswith(prefix) and k != "grad_norm/global"}

        def flagged(key: str) -> list[int]:
            return [i + 1 for i, v in enumerate(dense(key)) if v]

        tables = log.table_names()
        summary = log.attrs.get("summary") or {}
        return RunRecord(
            run_id=Path(path).stem, settings=log.attrs["settings"], status=log.status,
            losses=sub("loss/"), group_norms=sub("grad_norm/"), group_nonfinite=sub("grad_nonfinite/"),
            global_norm=dense("grad_norm/global"), scale=dense("scaler/scale_before"),
            params_finite=dense("params_finite"), skipped=flagged("skipped"), nonfinite_grad=flagged("nonfinite_grad"),
            events=log.table("events") if "events" in tables else [],
            coverage=log.table("coverage") if "coverage" in tables else [],
            tracer=[row["line"] for row in log.table("tracer")] if "tracer" in tables else [],
            val_per=summary.get("val_per"), val_rnnt_per=summary.get("val_rnnt_per"), wall_s=summary.get("wall_s"))


def log_status(path: Path) -> str:
    """"finished", "incomplete" (running when killed, failed, or unreadable) or "missing"."""
    if not path.exists():
        return "missing"
    try:
        with RunLog(path) as log:
            return "finished" if log.status == "finished" else "incomplete"
    except (OSError, ValueError, KeyError):
        return "incomplete"


# ---------------------------------------------------------------------------------------------------- workers

_PROGRESS: Any = None
_STOP: Any = None


class RunStopped(Exception):
    """Raised inside a worker's run when the sweep is interrupted; the run's log stays incomplete."""


def _watch_parent(parent_pid: int) -> None:
    """A worker whose sweep process died (SIGKILL leaves no chance to clean up) exits instead of running on."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)


def _init_worker(progress: Any, stop: Any, parent_pid: int) -> None:
    global _PROGRESS, _STOP
    _PROGRESS, _STOP = progress, stop
    torch.set_num_threads(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()


def _execute(rid: str, settings: dict[str, Any], checkpoint: str, data: str, log_path: str, device: str,
             on_step: Callable[[int, int], None]) -> None:
    run_joint(checkpoint, data, RunSettings(**settings), log_path=log_path, device=device,
              on_step=lambda i, run: on_step(i, run.settings.steps))


def _work(rid: str, settings: dict[str, Any], checkpoint: str, data: str, log_path: str, device: str) -> None:
    """One run in a worker process; steps are reported to the parent through the progress queue, and the run
    stops at the next step once the parent sets the stop event."""
    def on_step(i: int, n: int) -> None:
        if _STOP.is_set():
            raise RunStopped(f"sweep interrupted at step {i} of {rid}")
        _PROGRESS.put((rid, i, n))

    _execute(rid, settings, checkpoint, data, log_path, device, on_step)


# ------------------------------------------------------------------------------------------------------ sweep

@dataclass
class SweepOutcome:
    """What one `Sweep.run` call did: runs it found finished, runs it finished now, runs that failed."""

    reused: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    interrupted: bool = False

    def line(self, total: int) -> str:
        text = (f"{total} runs: {len(self.reused)} already finished, {len(self.done)} run now, "
                f"{len(self.failed)} failed")
        return text + (" (a worker process died; run the sweep again to finish the rest)" if self.interrupted else "")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Sweep:
    """The runs of `grids` from one CTC-warm checkpoint, kept in folder `out`."""

    def __init__(self, out: str | Path, checkpoint: str | Path, data: str | Path,
                 grids: SweepGrid | Sequence[SweepGrid], *, device: str = "cpu") -> None:
        self.out = Path(out)
        self.checkpoint = Path(checkpoint).resolve()
        self.data = Path(data).resolve()
        self.device = device
        self.grids = [grids] if isinstance(grids, SweepGrid) else list(grids)
        self.plan = make_plan(self.grids)
        self.index_path = self.out / "index.json"
        if not self.checkpoint.is_file():
            raise FileNotFoundError(f"checkpoint {self.checkpoint} does not exist")
        self.index = self._load_index()

    def log_path(self, rid: str) -> Path:
        return self.out / "runs" / f"{rid}.h5"

    def _load_index(self) -> dict[str, Any]:
        sha = file_sha256(self.checkpoint)
        if self.index_path.is_file():
            index = json.loads(self.index_path.read_text())
            if index.get("format") != INDEX_FORMAT or index.get("version") != INDEX_VERSION:
                raise SweepError(f"{self.index_path} is not a sweep index of format {INDEX_FORMAT!r} "
                                 f"version {INDEX_VERSION}")
            if index["checkpoint_sha256"] != sha or index["data"] != str(self.data):
                raise SweepError(f"{self.out} holds a sweep of checkpoint {index['checkpoint']} on data "
                                 f"{index['data']}; choose another output folder")
            return index
        return {"format": INDEX_FORMAT, "version": INDEX_VERSION, "checkpoint": str(self.checkpoint),
                "checkpoint_sha256": sha, "data": str(self.data), "runs": {}}

    def _write_index(self) -> None:
        """Write index.json atomically: a reader (or a crash) sees the old file or the new one, never half."""
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.index_path.with_name(f".index.json.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump(json_safe(self.index), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.index_path)

    @contextmanager
    def _lock(self) -> Iterator[None]:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / ".lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SweepError(f"another sweep is running in {self.out}") from None
            yield

    def _entry(self, rid: str) -> dict[str, Any]:
        return self.index["runs"].setdefault(rid, {
            "settings": self.plan.runs[rid].to_dict(), "log": str(self.log_path(rid).relative_to(self.out)),
            "status": "pending", "summary": None, "error": None})

    def scan(self) -> tuple[list[str], list[str]]:
        """(finished, to run) among the planned runs. Incomplete logs are deleted here, finished ones kept as they
        are; the index is brought in line with the logs on disk and written."""
        finished, pending = [], []
        for rid in self.plan.runs:
            entry = self._entry(rid)
            path = self.log_path(rid)
            state = log_status(path)
            if state == "finished":
                if entry["status"] != "finished" or entry["summary"] is None:
                    self._record_finished(rid)
                finished.append(rid)
                continue
            if state == "incomplete":
                path.unlink()
            entry.update(status="pending", summary=None)
            pending.append(rid)
        self._write_index()
        return finished, pending

    def _record_finished(self, rid: str) -> RunRecord:
        record = load_record(self.log_path(rid))
        self.index["runs"][rid].update(status=record.status, summary=run_summary(record, Rule()), error=None)
        return record

    def run(self, workers: int | None = None, *, progress: bool | TextIO = True,
            on_run_done: Callable[[str, RunRecord], None] | None = None) -> SweepOutcome:
        """Run every planned run that is not finished yet: in `workers` processes (default one per core), or in
        this process when one worker (or one run) is left. The progress bar goes to stderr, or to `progress`
        when it is a file-like object, or nowhere when it is False. `on_run_done(run_id, record)` is called in
        this process as each run finishes (live figures read it)."""
        if workers is not None and workers < 1:
            raise SweepError(f"workers: expected a positive number of processes, got {workers}")
        with self._lock():
            finished, pending = self.scan()
            outcome = SweepOutcome(reused=finished)
            (self.out / "runs").mkdir(parents=True, exist_ok=True)
            n_workers = min(workers or len(os.sched_getaffinity(0)), len(pending))
            order = {rid: k for k, rid in enumerate(self.plan.runs, 1)}
            bar = tqdm(total=len(self.plan.runs), initial=len(finished), desc="sweep", unit="run",
                       file=sys.stderr if isinstance(progress, bool) else progress, disable=progress is False,
                       mininterval=0.5, ncols=110)
            try:
                if n_workers <= 1:
                    self._run_here(pending, outcome, bar, order, on_run_done)
                else:
                    self._run_pool(pending, n_workers, outcome, bar, order, on_run_done)
            finally:
                bar.close()
                self._write_index()
        return outcome

    def _task(self, rid: str) -> tuple:
        return (rid, self.plan.runs[rid].to_dict(), str(self.checkpoint), str(self.data), str(self.log_path(rid)),
                self.device)

    def _finish(self, rid: str, outcome: SweepOutcome, bar: tqdm,
                on_run_done: Callable[[str, RunRecord], None] | None) -> None:
        record = self._record_finished(rid)
        self._write_index()
        outcome.done.append(rid)
        bar.update(1)
        if on_run_done is not None:
            on_run_done(rid, record)

    def _fail(self, rid: str, error: BaseException, outcome: SweepOutcome) -> None:
        message = repr(error).replace("\n", " ")
        self.index["runs"][rid].update(status="failed", error=message)
        self._write_index()
        outcome.failed[rid] = message

    def _started(self, rid: str) -> None:
        self.index["runs"][rid]["status"] = "running"
        self._write_index()

    def _run_here(self, pending: list[str], outcome: SweepOutcome, bar: tqdm, order: dict[str, int],
                  on_run_done: Callable[[str, RunRecord], None] | None) -> None:
        for rid in pending:
            self._started(rid)

            def on_step(i: int, n: int, rid: str = rid) -> None:
                bar.set_postfix_str(f"#{order[rid]} step {i}/{n}", refresh=False)

            try:
                _execute(*self._task(rid), on_step=on_step)
            except Exception as exc:  # noqa: BLE001  (one broken run must not stop the others)
                self._fail(rid, exc, outcome)
                continue
            self._finish(rid, outcome, bar, on_run_done)

    def _run_pool(self, pending: list[str], n_workers: int, outcome: SweepOutcome, bar: tqdm,
                  order: dict[str, int], on_run_done: Callable[[str, RunRecord], None] | None) -> None:
        ctx = mp.get_context("spawn")
        progress, stop = ctx.Queue(), ctx.Event()
        current: dict[str, tuple[int, int]] = {}
        ended: set[str] = set()
        pool = cf.ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=_init_worker,
                                      initargs=(progress, stop, os.getpid()))
        try:
            futures = {pool.submit(_work, *self._task(rid)): rid for rid in pending}
            waiting = set(futures)
            while waiting:
                done, waiting = cf.wait(waiting, timeout=0.5, return_when=cf.FIRST_COMPLETED)
                while True:
                    try:
                        rid, i, n = progress.get_nowait()
                    except queue.Empty:
                        break
                    if rid in ended:
                        continue  # a late report from a run whose result already arrived
                    if rid not in current:
                        self._started(rid)
                    current[rid] = (i, n)
                for future in done:
                    rid = futures[future]
                    current.pop(rid, None)
                    ended.add(rid)
                    try:
                        future.result()
                    except BrokenProcessPool:
                        outcome.interrupted = True
                        self.index["runs"][rid]["status"] = "pending"
                        continue
                    except Exception as exc:  # noqa: BLE001  (one broken run must not stop the others)
                        self._fail(rid, exc, outcome)
                        continue
                    self._finish(rid, outcome, bar, on_run_done)
                bar.set_postfix_str(" ".join(f"#{order[r]} {i}/{n}" for r, (i, n) in sorted(current.items())),
                                    refresh=False)
                bar.refresh()
        except BaseException:
            # Ctrl-C (or any error here): runs in flight stop at their next step and queued ones never start.
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)


# -------------------------------------------------------------------------------------------------- reporting

def records(sweep: Sweep) -> dict[str, RunRecord]:
    """The records of the planned runs whose logs are finished."""
    return {rid: load_record(sweep.log_path(rid)) for rid in sweep.plan.runs
            if log_status(sweep.log_path(rid)) == "finished"}


def evaluate_runs(plan: Plan, recs: Mapping[str, RunRecord],
                  rule: Rule) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(summaries, verdicts) of every finished run; a joint run's verdict uses its cell's control."""
    controls = {c["run"]: c["control"] for c in plan.cells}
    summaries = {rid: run_summary(rec, rule) for rid, rec in recs.items()}
    verdicts = {rid: verdict(rec, recs.get(controls.get(rid)) if controls.get(rid) else None, rule)
                for rid, rec in recs.items()}
    return summaries, verdicts


TABLE_COLUMNS = ("run", "warmup", "lr", "first_nonfinite_step", "steps_skipped", "max_grad_norm",
                 "nonfinite_grad_steps", "loss_ratio_k_after", "val_per", "val_rnnt_per", "outcome", "wall_s")
VERDICT_COLUMNS = ("run", "no_nonfinite", "clean_unfreeze", "stable_after_unfreeze", "per_vs_control",
                   "all_steps_complete", "all")


def report(sweep: Sweep, rule: Rule = Rule()) -> dict[str, Any]:
    """Everything the notebook shows and 02_summary.json holds, computed from the run logs."""
    recs = records(sweep)
    summaries, verdicts = evaluate_runs(sweep.plan, recs, rule)
    control_of = {c["run"]: c["control"] for c in sweep.plan.cells}
    runs = []
    for rid, settings in sweep.plan.runs.items():
        if rid not in recs:
            continue
        runs.append({"id": rid, "kind": "control" if settings.ctc_only else "joint", "settings": settings.to_dict(),
                     "log": str(sweep.log_path(rid)), "control": control_of.get(rid),
                     "summary": summaries[rid], "verdict": verdicts[rid]})
    missing = [rid for rid in sweep.plan.runs if rid not in recs]
    cells = [c for c in sweep.plan.cells if c["run"] in recs]
    return {
        "checkpoint": str(sweep.checkpoint), "data": str(sweep.data), "grids": [g.to_dict() for g in sweep.grids],
        "rule": dataclasses.asdict(rule), "criteria": rule.describe(), "runs": runs, "missing": missing,
        "cells": sweep.plan.cells, "conclusions": conclusions(cells, summaries, verdicts) if cells else [],
    }


def table_rows(rep: Mapping[str, Any], kind: str = "joint") -> list[dict[str, Any]]:
    """One flat row per run of `kind` for `criteria.format_table`: the axes, the summary and the verdict."""
    rows = []
    for run in rep["runs"]:
        if run["kind"] != kind:
            continue
        s = run["settings"]
        rows.append({"run": run["id"].rsplit("-", 1)[0], "warmup": s["warmup"], "lr": s["lr"],
                     **run["summary"], **{k: v for k, v in run["verdict"].items() if k != "reasons"}})
    return rows


# ---------------------------------------------------------------------------------------------------- figures

_STABLE, _EXPLODED, _MISSING = "#b7e4b0", "#fdb863", "#ffffff"


def stability_map_figure(panels: Sequence[MapPanel], *, title: str = "", max_step: int | None = None) -> Figure:
    """Heatmaps of warmup N x lr, one per panel: green = stable, orange = finite but the loss rule broke, red
    shades = steps to the first non-finite value (darker = earlier); each cell is annotated with the final
    validation PER (or the divergence step) and the success criteria passed."""
    ncols = min(4, len(panels)) or 1
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = Figure(figsize=(3.6 * ncols + 1.2, 3.0 * nrows + 0.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    steps = [c["first_nonfinite_step"] for p in panels for row in p.cells for c in row
             if c and c["first_nonfinite_step"]]
    top = max_step or max(steps, default=1)
    cmap = matplotlib.colormaps["Reds_r"]
    norm = matplotlib.colors.Normalize(vmin=1, vmax=max(top, 2) * 1.3)
    for ax, panel in zip(axes, panels):
        image = np.ones((len(panel.warmups), len(panel.lrs), 4))
        for i, row in enumerate(panel.cells):
            for j, cell in enumerate(row):
                if cell is None:
                    color, text = _MISSING, "..."
                elif cell["outcome"] == "diverged":
                    color, text = cmap(norm(cell["first_nonfinite_step"])), f"NaN@{cell['first_nonfinite_step']}"
                else:
                    color = _STABLE if cell["outcome"] == "stable" else _EXPLODED
                    text = "PER -" if cell["val_per"] is None else f"PER {cell['val_per']:.2f}"
                if cell is not None:
                    text += f"\n{cell['passed']}/{cell['applicable']} ok"
                image[i, j] = matplotlib.colors.to_rgba(color)
                dark = cell is not None and cell["outcome"] == "diverged" and norm(cell["first_nonfinite_step"]) < 0.45
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
        ax.imshow(image, aspect="auto")
        ax.set_xticks(range(len(panel.lrs)), [f"{lr:g}" for lr in panel.lrs], fontsize=7)
        ax.set_yticks(range(len(panel.warmups)), [str(n) for n in panel.warmups], fontsize=7)
        ax.set(xlabel="learning rate", ylabel="warmup N")
        ax.set_title(panel.title, fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes[:len(panels)].tolist(),
                 label="first non-finite step", shrink=0.8)
    fig.legend(handles=[Patch(color=_STABLE, label="stable"), Patch(color=_EXPLODED, label="loss exploded (finite)"),
                        Patch(color=cmap(0.3), label="non-finite")], loc="outside lower center", ncols=3, fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def families(plan: Plan) -> dict[str, list[dict[str, Any]]]:
    """Grid cells grouped by everything but N (one training figure each), keyed by a readable label."""
    varied = [a for a in varying_axes(plan.cells) if a != "warmup"]
    out: dict[str, list[dict[str, Any]]] = {}
    for cell in plan.cells:
        out.setdefault(slice_label(cell["axes"], varied), []).append(cell)
    return out


def notable_families(plan: Plan, summaries: Mapping[str, Mapping[str, Any]], limit: int = 4) -> list[str]:
    """Up to `limit` family labels worth a figure, most telling first: families where N changed whether a run
    went non-finite, then families with any non-finite run, then the rest by decreasing lr."""
    def rank(item: tuple[str, list[dict[str, Any]]]) -> tuple:
        cells = [c for c in item[1] if c["run"] in summaries]
        diverged = {summaries[c["run"]]["first_nonfinite_step"] is not None for c in cells}
        return (len(diverged) < 2, True not in diverged, -max(c["axes"]["lr"] for c in item[1]))
    return [label for label, _ in sorted(families(plan).items(), key=rank)[:limit]]


def family_figure(cells: Sequence[Mapping[str, Any]], recs: Mapping[str, RunRecord], *, title: str = "") -> Figure:
    """The training figure of one family, one run per N overlaid: loss per term, per-group gradient norms,
    GradScaler scale and non-finite gradient entries; unfreeze events as vertical lines, a dotted line at each
    run's first non-finite step."""
    runs, markers = {}, {}
    for cell in sorted(cells, key=lambda c: c["axes"]["warmup"]):
        rec = recs.get(cell["run"])
        label = f"N={cell['axes']['warmup']}"
        if rec is None or label in runs:
            continue
        runs[label] = rec
        bad = first_nonfinite_step(rec)
        markers[label] = [] if bad is None else [bad]
    return training_figure(runs, title=title, markers=markers, groups=list(FIGURE_GROUPS))


class DisplayLine:
    """A file-like target for a tqdm bar in a notebook: the latest bar line is shown in place through a display
    handle, so a long sweep leaves one line in the saved notebook instead of thousands of stream outputs.
    Outside IPython it writes to stderr."""

    def __init__(self) -> None:
        self.handle = display_slot()

    def write(self, text: str) -> int:
        if self.handle is None:
            return sys.stderr.write(text)
        line = text.rsplit("\r", 1)[-1].strip()
        if line:
            self.handle.update({"text/plain": line}, raw=True)
        return len(text)

    def flush(self) -> None:
        if self.handle is None:
            sys.stderr.flush()


class SweepDashboard:
    """Live figures of a running sweep in a notebook, redrawn in place (display handles) from the parent process
    as runs finish: a progress line, the training figure of the family of the run that finished last, and the
    stability map filling in. Outside IPython nothing is drawn. Pass it as
    `Sweep.run(progress=dashboard.progress, on_run_done=dashboard)`."""

    def __init__(self, sweep: Sweep, rule: Rule = Rule(), *, min_interval_s: float = 3.0) -> None:
        self.sweep, self.rule, self.min_interval_s = sweep, rule, min_interval_s
        self.recs: dict[str, RunRecord] = {}
        self.family_of = {c["run"]: label for label, cells in families(sweep.plan).items() for c in cells}
        self.progress = DisplayLine()
        self.family_live, self.map_live = LiveFigure(), LiveFigure()
        self.latest: str | None = None
        self._drawn = 0.0
        self._loaded_existing = False

    def __call__(self, rid: str, record: RunRecord) -> None:
        self.recs[rid] = record
        if not record.settings.get("ctc_only"):
            self.latest = rid
        if time.monotonic() - self._drawn >= self.min_interval_s:
            self.draw()

    def draw(self) -> None:
        """Redraw both figures from every record seen so far (call once more after the sweep)."""
        if not self.family_live.active:
            return
        if not self._loaded_existing:
            # runs a previous (interrupted) sweep finished are part of the picture too
            for rid in self.sweep.plan.runs:
                if rid not in self.recs and log_status(self.sweep.log_path(rid)) == "finished":
                    self.recs[rid] = load_record(self.sweep.log_path(rid))
            self._loaded_existing = True
        latest = self.latest or next((r for r in self.recs if r in self.family_of), None)
        if latest is not None:
            label = self.family_of[latest]
            self.family_live.show(family_figure(families(self.sweep.plan)[label], self.recs, title=label))
        summaries, verdicts = evaluate_runs(self.sweep.plan, self.recs, self.rule)
        done = sum(r in self.recs for r in self.sweep.plan.runs)
        self.map_live.show(stability_map_figure(
            stability_map(self.sweep.plan.cells, summaries, verdicts),
            title=f"stability map ({done}/{len(self.sweep.plan.runs)} runs)",
            max_step=max(s.total_steps for s in self.sweep.grids)))
        self._drawn = time.monotonic()


# -------------------------------------------------------------------------------------------------------- CLI

def _split(flag: str, text: str | None, convert: Callable[[str], Any], expected: str) -> list | None:
    if text is None:
        return None
    try:
        return [convert(part.strip()) for part in text.split(",")]
    except ValueError:
        raise SweepError(f"{flag}: expected comma-separated {expected}, got {text!r}") from None


def _int(flag: str, text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise SweepError(f"{flag}: expected an integer >= {minimum}, got {text!r}")
    return value


def add_sweep_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `workbench sweep`. Values are parsed in `cmd_sweep`, so every bad value is one line, exit 2."""
    from workbench.model import PRESETS

    p = subparsers.add_parser("sweep", help="parallel, resumable grid of joint-stage runs from one CTC-warm "
                                            "checkpoint, with CTC-only controls")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="CTC-warm checkpoint to fork every run from")
    source.add_argument("--preset", choices=sorted(PRESETS), help="train (or load from --cache-dir) the CTC-warm "
                                                                  "checkpoint of this model preset")
    p.add_argument("--ctc-steps", default="300", help="CTC warmup steps for --preset")
    p.add_argument("--cache-dir", default="runs/cache", help="where --preset keeps its checkpoints")
    p.add_argument("--data", default="data_samples", help="data root")
    p.add_argument("--out", required=True, help="sweep folder (index.json, runs/*.h5); rerun to resume")
    d = SweepGrid()
    lists = {"--warmup": d.warmup, "--lr": d.lr, "--policy": d.policy, "--rebuild": ("yes",),
             "--precision": d.precision, "--semantics": d.semantics, "--clip": d.clip,
             "--rnnt-normalization": d.rnnt_normalization, "--optimizer": d.optimizer}
    for flag, default in lists.items():
        shown = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default)
        p.add_argument(flag, help=f"comma-separated values (default {shown})")
    p.add_argument("--steps", default=str(d.steps), help="joint steps after the longest warmup")
    p.add_argument("--seed", default="0")
    p.add_argument("--batch-size", default="4")
    p.add_argument("--no-controls", action="store_true", help="leave out the CTC-only control runs")
    p.add_argument("--workers", default=None, help="worker processes (default: one per core)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_sweep)
    return p


def grid_from_args(args: argparse.Namespace) -> SweepGrid:
    """The SweepGrid of parsed `sweep` arguments; raises SweepError with one line on a bad value."""
    axes = {
        "warmup": _split("--warmup", args.warmup, int, "integers"),
        "lr": _split("--lr", args.lr, float, "numbers"),
        "policy": _split("--policy", args.policy, str, "names"),
        "rebuild": _split("--rebuild", args.rebuild, str, "yes/no values"),
        "precision": _split("--precision", args.precision, str, "names"),
        "semantics": _split("--semantics", args.semantics, str, "names"),
        "clip": _split("--clip", args.clip, float, "numbers"),
        "rnnt_normalization": _split("--rnnt-normalization", args.rnnt_normalization, str, "names"),
        "optimizer": _split("--optimizer", args.optimizer, str, "names"),
    }
    given = {k: v for k, v in axes.items() if v is not None}
    numbers = {"steps": _int("--steps", args.steps, 1), "seed": _int("--seed", args.seed, 0),
               "batch_size": _int("--batch-size", args.batch_size, 1)}
    try:
        return SweepGrid(**given, **numbers, controls=not args.no_controls)
    except SweepError as exc:
        # SweepGrid names the field ("rnnt_normalization: ..."); the command line names the flag.
        name, detail = str(exc).split(": ", 1)
        raise SweepError(f"--{name.replace('_', '-')}: {detail}") from None


def cmd_sweep(args: argparse.Namespace) -> int:
    """`workbench sweep`: 0 when every run is finished, 1 when some failed or a worker died, 2 on bad input."""
    from workbench.cli import CliError
    from workbench.criteria import format_table
    from workbench.data import B2TDataset
    from workbench.experiment import ctc_warm_checkpoint

    try:
        grid = grid_from_args(args)
        workers = None if args.workers is None else _int("--workers", args.workers, 1)
        ctc_steps = _int("--ctc-steps", args.ctc_steps, 1)
    except SweepError as exc:
        raise CliError(str(exc)) from None
    if not Path(args.data).is_dir():
        raise CliError(f"--data: {args.data} is not a directory")
    B2TDataset(args.data, "train")
    if args.checkpoint is not None:
        if not Path(args.checkpoint).is_file():
            raise CliError(f"--checkpoint: {args.checkpoint} does not exist")
        checkpoint = Path(args.checkpoint)
    else:
        checkpoint, _ = ctc_warm_checkpoint(args.data, args.preset, seed=grid.seed, steps=ctc_steps,
                                            batch_size=grid.batch_size, cache_dir=args.cache_dir,
                                            log=lambda line: print(line, flush=True))
    try:
        sweep = Sweep(args.out, checkpoint, args.data, grid, device=args.device)
        outcome = sweep.run(workers)
    except SweepError as exc:
        raise CliError(str(exc)) from None
    rep = report(sweep)
    print(format_table(table_rows(rep), TABLE_COLUMNS + ("all",)))
    for line in rep["conclusions"]:
        print(line)
    print(f"sweep {sweep.out}: {outcome.line(len(sweep.plan.runs))}; index: {sweep.index_path}")
    for rid, error in outcome.failed.items():
        print(f"failed: {rid}: {error}", file=sys.stderr)
    return 1 if outcome.failed or outcome.interrupted else 0
