"""Parallel, resumable execution of a sweep's runs, all forked from one CTC-warm checkpoint.

Layout of a sweep folder:

    index.json          written by the parent process only, atomically (temp file + os.replace): the checkpoint
                        and data it belongs to and, per run id, settings, status, log path, summary (with the
                        default criteria.Rule) and error
    runs/<run_id>.h5    one run log per run, written by the worker that runs it
    runs/set_aside/     logs the sweep could not use (failed, interrupted, unreadable, another format version),
                        moved here with a `<name>.reason.txt` beside each instead of being deleted
    .lock               held (flock) while a sweep runs here, so two sweeps never share a folder; opened without
                        truncating, so a file of that name keeps its content

Running the same sweep again redoes only runs whose log is missing or not "finished" (any other log is set aside
first); a finished log is never recomputed or touched.
"""

from __future__ import annotations

import concurrent.futures as cf
from concurrent.futures.process import BrokenProcessPool
import fcntl
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TextIO

import torch
from tqdm import tqdm

from workbench.data import B2TDataset, make_loader
from workbench.records import RunRecord, json_safe, read_record
from workbench.records.runlog import describe_log
from workbench.run.joint import run_joint
from workbench.run.settings import RunSettings
from workbench.studies.criteria import Rule, run_summary
from workbench.studies.sweep.grid import Plan, SweepError, SweepGrid, make_plan
from workbench.train.checkpoint import check_checkpoint

INDEX_FORMAT = "workbench-sweep"
INDEX_VERSION = 1


def log_status(path: Path) -> str:
    """"finished", "incomplete" (running when killed, failed, or unreadable) or "missing"."""
    state, _ = describe_log(path)
    return state if state in ("finished", "missing") else "incomplete"


def check_data(data: str | Path, batch_sizes: Sequence[int], max_sessions: int | None = None) -> None:
    """Open the train and validation splits (DataError when either is missing or malformed) and check that every
    batch size yields full batches, before any run starts (a run would otherwise fail only once it is under way)."""
    train = B2TDataset(data, "train", max_sessions=max_sessions)
    B2TDataset(data, "val", max_sessions=max_sessions)
    for batch_size in sorted(set(batch_sizes)):
        make_loader(train, batch_size, shuffle=False, seed=0, drop_last=True)


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
    n = settings["steps"]
    run_joint(checkpoint, data, RunSettings(**settings), log_path=log_path, device=device,
              on_step=lambda i, record: on_step(i, n))


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
    set_aside: list[str] = field(default_factory=list)
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
    """The runs of `grids` (or of a ready `Plan`) from one CTC-warm checkpoint, kept in folder `out`."""

    def __init__(self, out: str | Path, checkpoint: str | Path, data: str | Path,
                 grids: SweepGrid | Sequence[SweepGrid] | Plan, *, device: str = "cpu") -> None:
        self.out = Path(out)
        self.checkpoint = Path(checkpoint).resolve()
        self.data = Path(data).resolve()
        self.device = device
        if isinstance(grids, Plan):  # runs planned elsewhere (notebook 01's configurations x seeds)
            self.grids, self.plan = [], grids
        else:
            self.grids = [grids] if isinstance(grids, SweepGrid) else list(grids)
            self.plan = make_plan(self.grids)
        self.index_path = self.out / "index.json"
        if not self.checkpoint.is_file():
            raise FileNotFoundError(f"checkpoint {self.checkpoint} does not exist")
        check_checkpoint(self.checkpoint)
        check_data(self.data, [settings.batch_size for settings in self.plan.runs.values()])
        self.index = self._load_index()
        self.set_aside: list[str] = []

    def log_path(self, rid: str) -> Path:
        return self.out / "runs" / f"{rid}.h5"

    def _load_index(self) -> dict[str, Any]:
        sha = file_sha256(self.checkpoint)
        if self.index_path.exists():
            index = self._read_index()
            if index["checkpoint_sha256"] != sha or index["data"] != str(self.data):
                raise SweepError(f"{self.out} holds a sweep of checkpoint {index['checkpoint']} on data "
                                 f"{index['data']}; choose another output folder")
            return index
        return {"format": INDEX_FORMAT, "version": INDEX_VERSION, "checkpoint": str(self.checkpoint),
                "checkpoint_sha256": sha, "data": str(self.data), "runs": {}}

    def _read_index(self) -> dict[str, Any]:
        """index.json checked for its shape; a SweepError naming it and saying how to recover otherwise."""
        expected = f"a sweep index (JSON object of format {INDEX_FORMAT!r} version {INDEX_VERSION})"
        recover = (f"move it away (e.g. to {self.index_path.name}.bad) and rerun the sweep: finished run logs in "
                   f"{self.out / 'runs'} are kept and indexed again")
        try:
            index = json.loads(self.index_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            got = "an empty file" if self.index_path.is_file() and not self.index_path.stat().st_size else \
                f"a file that does not parse ({type(exc).__name__}: {exc})"
            raise SweepError(f"{self.index_path}: expected {expected}, got {got}; {recover}") from None
        if not isinstance(index, dict):
            raise SweepError(f"{self.index_path}: expected {expected}, got a JSON {type(index).__name__}; {recover}")
        if index.get("format") != INDEX_FORMAT or index.get("version") != INDEX_VERSION:
            raise SweepError(f"{self.index_path}: expected {expected}, got format {index.get('format')!r} version "
                             f"{index.get('version')!r}; {recover}")
        shape = {"checkpoint": str, "checkpoint_sha256": str, "data": str, "runs": dict}
        wrong = [k for k, kind in shape.items() if not isinstance(index.get(k), kind)]
        runs = index["runs"] if isinstance(index.get("runs"), dict) else {}
        wrong += [f"runs.{rid}" for rid, entry in runs.items()
                  if not isinstance(entry, dict) or not {"settings", "log", "status", "summary", "error"} <= set(entry)]
        if wrong:
            raise SweepError(f"{self.index_path}: expected {expected}, got missing or malformed fields "
                             f"{', '.join(wrong[:3])}; {recover}")
        return index

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
        with open(self.out / ".lock", "a") as handle:
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
        """(finished, to run) among the planned runs. A log it cannot use is set aside (`set_aside`), finished ones
        are kept as they are; the index is brought in line with the logs on disk and written."""
        finished, pending = [], []
        self.set_aside = []
        for rid in self.plan.runs:
            entry = self._entry(rid)
            path = self.log_path(rid)
            state, description = describe_log(path)
            if state == "finished":
                if entry["status"] != "finished" or entry["summary"] is None:
                    self._record_finished(rid)
                finished.append(rid)
                continue
            if state != "missing":
                self._set_aside(path, description)
            entry.update(status="pending", summary=None)
            pending.append(rid)
        self._write_index()
        return finished, pending

    def _set_aside(self, path: Path, reason: str) -> Path:
        """Move a log the sweep cannot use into runs/set_aside/ under a name not taken yet, with its reason beside
        it: nothing in the folder is ever deleted."""
        folder = path.parent / "set_aside"
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for k in itertools.count():
            target = folder / f"{path.stem}.{stamp}{f'.{k}' if k else ''}{path.suffix}"
            if not target.exists():
                break
        os.replace(path, target)
        target.with_name(target.name + ".reason.txt").write_text(f"set aside from {path}: {reason}\n")
        self.set_aside.append(f"{path.relative_to(self.out)} -> {target.relative_to(self.out)}: {reason}")
        return target

    def _record_finished(self, rid: str) -> RunRecord:
        record = read_record(self.log_path(rid))
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
            outcome = SweepOutcome(reused=finished, set_aside=list(self.set_aside))
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
        message = f"{type(error).__name__}: {error}".replace("\n", " ")
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
