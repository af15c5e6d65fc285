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

Where the runs execute (`backend`): "local" (the default) is a pool of workers on this machine, the sweep's own
process and spawned worker processes; "ray" runs each run as a Ray task (`num_cpus` / `num_gpus` per task) on a
Ray cluster, a local one by default or the one at `address`. Both call the same worker function (`_execute`, which
calls `run_joint`), write the same run logs, and report progress to the parent process, which alone writes
`index.json`, drives the progress bar and calls `on_run_done`; so resuming, the index and the live figures are the
same whichever runs the runs. On a cluster
every node must see the checkpoint, the data and the sweep folder at the same paths (a shared file system) and have
this package installed.
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
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TextIO

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
from workbench.train.device import pick_device

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


def warm_up() -> None:
    """Pay a worker process's one-off costs before its first run: the first optimizer step imports
    torch._dynamo (about 1.4 s of CPU on the 2-core reference machine), which every run's AdamW step needs."""
    torch.set_num_threads(1)
    p = torch.zeros(1, requires_grad=True)
    p.grad = torch.zeros(1)
    torch.optim.AdamW([p], lr=1e-3).step()


def _init_worker(progress: Any, stop: Any, parent_pid: int) -> None:
    global _PROGRESS, _STOP
    # Ctrl-C in a terminal goes to the whole process group: the sweep process stops its workers through the stop
    # event (and says so in one line), so a worker ignores SIGINT rather than print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _PROGRESS, _STOP = progress, stop
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    warm_up()


def _execute(rid: str, settings: dict[str, Any], checkpoint: str, data: str, log_path: str, device: str,
             on_step: Callable[[int, int], None]) -> None:
    """The one worker function of every backend: one run into its log; `on_step(i, n)` after each step."""
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


def _ray_run(rid: str, settings: dict[str, Any], checkpoint: str, data: str, log_path: str, device: str,
             board: Any, threads: int) -> None:
    """One run as a Ray task: the same `_execute`, its steps reported to the sweep's progress board (an actor);
    the parent cancels the task to stop it (the run's log then closes as failed)."""
    torch.set_num_threads(max(1, threads))
    _execute(rid, settings, checkpoint, data, log_path, device, lambda i, n: board.put.remote((rid, i, n)))


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
                 grids: SweepGrid | Sequence[SweepGrid] | Plan, *, device: str = "auto", backend: str = "local",
                 address: str | None = None, resources: Mapping[str, float] | None = None) -> None:
        """`device` "auto" (CUDA when present, else the CPU), "cpu", "cuda" or "cuda:N": every run trains there.
        `backend` "local" (workers on this machine) or "ray" (Ray tasks on the cluster at `address`, default a
        local Ray started for the sweep, or the one this process already joined); `resources` are each Ray task's
        `num_cpus` (default 1) and `num_gpus` (default 1 on a CUDA device, else 0). A backend that cannot work
        (an unknown name, Ray not installed, nothing listening at `address`) is a SweepError before any work."""
        self.out = Path(out)
        self.checkpoint = Path(checkpoint).resolve()
        self.data = Path(data).resolve()
        self.device = str(pick_device(device))   # resolved here: the workers and Ray's num_gpus see the same one
        self.backend, self.address = check_backend(backend, address)
        self.resources = {"num_cpus": 1.0, "num_gpus": 1.0 if self.device.startswith("cuda") else 0.0,
                          **dict(resources or {})}
        unknown = sorted(set(self.resources) - {"num_cpus", "num_gpus"})
        if unknown:
            raise SweepError(f"resources: expected num_cpus and num_gpus, got {unknown[0]!r}")
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
            # a sweep killed while writing index.json left its temp file; with the lock held no writer is alive
            for stale in self.out.glob(".index.json.*.tmp"):
                stale.unlink(missing_ok=True)
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
        """Run every planned run that is not finished yet. Locally on `workers` workers (default one per core):
        this process and `workers - 1` spawned processes, or this process alone when one worker (or one run) is
        left; with Ray as Ray tasks, at most `workers` at once (default: as many as the cluster's resources
        allow). The progress bar goes to stderr, or to `progress` when it is a file-like object, or nowhere when
        it is False. `on_run_done(run_id, record)` is called in this process as each run finishes (live figures
        read it)."""
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
                if pending and self.backend == "ray":
                    self._drive(_RayExecutor(self.address, self.resources, workers), pending, outcome, bar, order,
                                on_run_done)
                elif n_workers <= 1:
                    self._run_here(pending, outcome, bar, order, on_run_done)
                else:
                    self._drive(_PoolExecutor(n_workers), pending, outcome, bar, order, on_run_done)
            finally:
                bar.close()
                self._write_index()
        return outcome

    def _task(self, rid: str) -> tuple:
        return (rid, self.plan.runs[rid].to_dict(), str(self.checkpoint), str(self.data), str(self.log_path(rid)),
                self.device)

    def dispatch_order(self, pending: Sequence[str]) -> list[str]:
        """The order runs are handed to the workers: plan order family by family (the runs of one grid point but
        its freeze length N finish together, as the live figures want), and within a family the longest run
        first, so the last family's long run does not start last while the other workers idle."""
        family: dict[str, int] = {}
        keys: dict[tuple, int] = {}
        for cell in self.plan.cells:
            key = tuple(sorted((k, repr(v)) for k, v in cell["axes"].items() if k != "freeze_steps"))
            index = keys.setdefault(key, len(keys))
            for rid in (cell["control"], cell["run"]):
                if rid is not None:
                    # controls come first in the plan; a run shared by several families goes with the first
                    family.setdefault(rid, -1 if self.plan.runs[rid].ctc_only else index)
        position = {rid: k for k, rid in enumerate(self.plan.runs)}
        # runs in no cell (a plan made elsewhere) keep their plan order
        return sorted(pending, key=lambda rid: (family.get(rid, -1), -self.plan.runs[rid].steps if rid in family
                                                else 0, position[rid]))

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

    def _drive(self, executor: _Executor, pending: list[str], outcome: SweepOutcome, bar: tqdm,
               order: dict[str, int], on_run_done: Callable[[str, RunRecord], None] | None) -> None:
        """The one loop over an executor's reports, whichever backend runs the runs: index entries, the progress
        bar and `on_run_done`, all in this process."""
        current: dict[str, tuple[int, int]] = {}
        ended: set[str] = set()
        try:
            executor.start([(rid, self._task(rid)) for rid in self.dispatch_order(pending)])
            while executor.busy:
                for report in executor.poll(0.5):
                    rid = report[0]
                    if report[1] == "step":
                        if rid in ended:
                            continue  # a late report from a run whose result already arrived
                        if rid not in current:
                            self._started(rid)
                        current[rid] = report[2]
                        continue
                    current.pop(rid, None)
                    ended.add(rid)
                    kind, error = report[1], report[2]
                    if kind == "lost":
                        outcome.interrupted = True
                        self.index["runs"][rid]["status"] = "pending"
                    elif kind == "failed":
                        self._fail(rid, error, outcome)
                    else:
                        self._finish(rid, outcome, bar, on_run_done)
                bar.set_postfix_str(" ".join(f"#{order[r]} {i}/{n}" for r, (i, n) in sorted(current.items())),
                                    refresh=False)
                bar.refresh()
        except BaseException:
            # Ctrl-C (or any error here): runs in flight stop at their next step and queued ones never start.
            executor.stop()
            raise
        finally:
            executor.close()


# -------------------------------------------------------------------------------------------------- executors

BACKENDS: tuple[str, ...] = ("local", "ray")
RAY_PORT = 6379
RAY_HANDSHAKE_S = 5.0  # the pre-check's bound on a Ray head's answer
RAY_ANSWER_S = 60.0  # how long a sweep waits for its progress actor before it counts the cluster as lost


def check_backend(backend: str, address: str | None) -> tuple[str, str | None]:
    """(backend, address) checked before any work: a known backend, Ray importable, and something listening at
    `address` ("HOST:PORT" of a cluster's head, `ray://HOST:PORT` for Ray Client, or "auto" for a cluster started
    on this machine with `ray start --head`). A one-line SweepError otherwise."""
    if backend not in BACKENDS:
        raise SweepError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "ray":
        if address is not None:
            raise SweepError(f"address: only the ray backend connects to a cluster, got backend {backend!r} and "
                             f"address {address!r}")
        return backend, None
    try:
        import ray  # noqa: F401
    except ImportError:
        raise SweepError("backend: 'ray' needs the ray package, which is not installed; install it with "
                         "pip install 'rnnt-workbench[ray]'") from None
    if address in (None, "", "local"):
        return backend, None
    if address == "auto":
        return backend, address
    hostport = address.removeprefix("ray://")
    host, sep, port_text = hostport.rpartition(":")
    if not sep:
        host, port_text = hostport, str(RAY_PORT)
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise SweepError(f"address: expected HOST:PORT of a Ray cluster's head (e.g. 10.0.0.5:{RAY_PORT}), 'auto' or "
                         f"ray://HOST:PORT, got {address!r}")
    reason = _ray_handshake(host.strip("[]"), int(port_text), RAY_HANDSHAKE_S)
    if reason is not None:
        raise SweepError(f"address: no Ray cluster answers at {address} ({reason}); start one there with "
                         f"`ray start --head --port {port_text}`, or leave the address out to run Ray on this "
                         f"machine") from None
    return backend, address


def _ray_handshake(host: str, port: int, timeout: float) -> str | None:
    """None when a gRPC server (a Ray head's GCS, or a Ray Client server) completes the HTTP/2 handshake at
    host:port within `timeout` seconds; else why not. An open port alone proves nothing: Ray's own connect
    retries without limit against a server that speaks something else."""
    import grpc

    try:
        with socket.create_connection((host, port), timeout=min(timeout, 3.0)):
            pass
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        return f"something listens there but gave no gRPC handshake within {timeout:g} s: not a Ray head"
    finally:
        channel.close()
    return None


class _Executor:
    """How the runs execute. `start(tasks)` queues (run id, `_task` tuple) pairs in dispatch order; `poll(timeout)`
    returns the reports since the last call: (rid, "step", (i, n)), (rid, "done", None), (rid, "failed", error) or
    (rid, "lost", None) when the process running it died; `busy` is True while a run is queued or in flight;
    `stop()` stops runs in flight at their next step and drops queued ones; `close()` releases the workers."""

    busy = False

    def start(self, tasks: list[tuple[str, tuple]]) -> None:
        raise NotImplementedError

    def poll(self, timeout: float) -> list[tuple]:
        raise NotImplementedError

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass


class _PoolExecutor(_Executor):
    """`n` workers on this machine: this process itself, in a thread, and `n - 1` spawned worker processes
    (`_work`); progress through queues. This process is a worker because it is one already: it has torch and
    the package imported (and, after its first run, torch's lazily imported optimizer machinery), where a spawned
    worker first spends about 3.5 s of CPU starting (spawn, imports, `warm_up`), time a 2-core sweep of a few
    minutes cannot win back otherwise. While the sweep runs, torch uses one thread in this process (restored
    after), as in the workers.

    Runs are handed out one at a time to whichever worker is free, in dispatch order. A worker process that dies
    breaks the pool: every run in flight in the processes is then "lost", no further run starts, the run in this
    process finishes, and the sweep stops (rerun it to finish)."""

    def __init__(self, n: int) -> None:
        ctx = mp.get_context("spawn")
        self.progress, self.stop_event = ctx.Queue(), ctx.Event()
        self.processes = n - 1
        self.pool = cf.ProcessPoolExecutor(self.processes, mp_context=ctx, initializer=_init_worker,
                                           initargs=(self.progress, self.stop_event, os.getpid()))
        self.futures: dict[cf.Future, str] = {}
        self.queued: list[tuple[str, tuple]] = []
        self.lock = threading.Lock()
        self.here: queue.Queue = queue.Queue()  # reports of the run in this process
        self.thread: threading.Thread | None = None
        self.broken = False
        self.threads = torch.get_num_threads()

    @property
    def busy(self) -> bool:  # type: ignore[override]
        return bool((self.queued and not self.broken) or self.futures or not self.here.empty()
                    or (self.thread is not None and self.thread.is_alive()))

    def start(self, tasks: list[tuple[str, tuple]]) -> None:
        self.queued = list(tasks)
        torch.set_num_threads(1)
        self._submit()
        self.thread = threading.Thread(target=self._work_here, name="sweep-worker", daemon=True)
        self.thread.start()

    def _next(self) -> tuple[str, tuple] | None:
        with self.lock:
            return self.queued.pop(0) if self.queued and not self.broken and not self.stop_event.is_set() else None

    def _submit(self) -> None:
        while len(self.futures) < self.processes:
            task = self._next()
            if task is None:
                return
            with _sigint_blocked():
                self.futures[self.pool.submit(_work, *task[1])] = task[0]

    def _work_here(self) -> None:
        """The worker in this process: the same `_execute`, stopping at the next step once the sweep stops."""
        while (task := self._next()) is not None:
            rid = task[0]

            def on_step(i: int, n: int, rid: str = rid) -> None:
                if self.stop_event.is_set():
                    raise RunStopped(f"sweep interrupted at step {i} of {rid}")
                self.here.put((rid, "step", (i, n)))

            try:
                _execute(*task[1], on_step=on_step)
            except RunStopped:
                return
            except Exception as exc:  # noqa: BLE001  (one broken run must not stop the others)
                self.here.put((rid, "failed", exc))
            else:
                self.here.put((rid, "done", None))

    def poll(self, timeout: float) -> list[tuple]:
        reports: list[tuple] = []
        if self.futures:
            done, _ = cf.wait(set(self.futures), timeout=timeout, return_when=cf.FIRST_COMPLETED)
        else:
            done = set()
            try:
                reports.append(self.here.get(timeout=timeout))
            except queue.Empty:
                pass
        while True:
            try:
                rid, i, n = self.progress.get_nowait()
            except queue.Empty:
                break
            reports.append((rid, "step", (i, n)))
        while True:
            try:
                reports.append(self.here.get_nowait())
            except queue.Empty:
                break
        for future in done:
            rid = self.futures.pop(future)
            try:
                future.result()
            except BrokenProcessPool:
                self.broken = True
                reports.append((rid, "lost", None))
            except Exception as exc:  # noqa: BLE001  (one broken run must not stop the others)
                reports.append((rid, "failed", exc))
            else:
                reports.append((rid, "done", None))
        if not self.broken:
            self._submit()
        return reports

    def stop(self) -> None:
        self.stop_event.set()
        with self.lock:
            self.queued = []
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.thread is not None:
            self.thread.join()

    def close(self) -> None:
        # Every run has ended: the worker processes exit on their own (their interpreter shutdown, about a second,
        # is not waited for); the executor's thread reaps them.
        self.pool.shutdown(wait=False)
        if self.thread is not None:
            self.thread.join()
        torch.set_num_threads(self.threads)


@contextmanager
def _sigint_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread while worker processes may be spawned: a spawned process inherits the mask,
    so a Ctrl-C while it imports (before `_init_worker` ignores SIGINT) prints no traceback there. This process
    still gets the signal: another thread takes it, or it is delivered when the mask is restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _progress_board(ray: Any) -> Any:
    """A Ray actor the tasks post their step reports to and the parent drains."""

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        def __init__(self) -> None:
            self.items: list[tuple] = []

        def put(self, item: tuple) -> None:
            self.items.append(item)

        def drain(self) -> list[tuple]:
            items, self.items = self.items, []
            return items

    return ProgressBoard.remote()


class ClusterLost(RuntimeError):
    """The Ray cluster stopped answering during a sweep (exit 1: the sweep failed; its index keeps what finished)."""


class _RayExecutor(_Executor):
    """Ray tasks (`_ray_run`), each with the sweep's `num_cpus` / `num_gpus`, at most `limit` in flight (default:
    all, and Ray schedules them as resources free up). Joins the Ray this process already joined, else starts a
    local one (shut down again at the end) or connects to `address`. Tasks are never retried: a task whose worker
    process died is "lost", its partial log stays and is set aside by the next run of the sweep, as with the
    local pool; the other runs go on."""

    def __init__(self, address: str | None, resources: Mapping[str, float], limit: int | None) -> None:
        import logging

        import ray

        self.ray = ray
        self.address = address
        self.started = not ray.is_initialized()
        if self.started:
            try:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False,
                         include_dashboard=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise SweepError(f"address: could not join the Ray cluster at {address or 'this machine'}: "
                                 f"{' '.join(str(exc).split())}") from None
        self.board = _progress_board(ray)
        self.remote = ray.remote(_ray_run).options(num_cpus=resources["num_cpus"], num_gpus=resources["num_gpus"],
                                                   max_retries=0)
        self.threads = max(1, int(resources["num_cpus"]))
        self.limit = limit
        self.queued: list[tuple[str, tuple]] = []
        self.refs: dict[Any, str] = {}

    @property
    def busy(self) -> bool:  # type: ignore[override]
        return bool(self.queued or self.refs)

    def _launch(self) -> None:
        while self.queued and (self.limit is None or len(self.refs) < self.limit):
            rid, task = self.queued.pop(0)
            rid, settings, checkpoint, data, log_path, device = task
            ref = self.remote.remote(rid, settings, checkpoint, data, str(Path(log_path).resolve()), device,
                                     self.board, self.threads)
            self.refs[ref] = rid

    def start(self, tasks: list[tuple[str, tuple]]) -> None:
        self.queued = list(tasks)
        self._launch()

    def poll(self, timeout: float) -> list[tuple]:
        ray = self.ray
        ready, _ = ray.wait(list(self.refs), num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(list(self.refs), num_returns=len(self.refs), timeout=0)
        try:
            drained = ray.get(self.board.drain.remote(), timeout=RAY_ANSWER_S)
        except ray.exceptions.GetTimeoutError:
            raise ClusterLost(f"the Ray cluster at {self.address or 'this machine'} gave no answer within "
                              f"{RAY_ANSWER_S:g} s; finished runs are kept in the index") from None
        except ray.exceptions.RayError as exc:
            raise ClusterLost(f"lost the Ray cluster at {self.address or 'this machine'} ({type(exc).__name__}); "
                              f"finished runs are kept in the index") from None
        reports = [(rid, "step", (i, n)) for rid, i, n in drained]
        for ref in ready:
            rid = self.refs.pop(ref)
            try:
                ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
                reports.append((rid, "failed", cause))
            except ray.exceptions.RayError:
                # the worker process or its node died (SIGKILL, out of memory): like a broken local pool
                reports.append((rid, "lost", None))
            else:
                reports.append((rid, "done", None))
        self._launch()
        return reports

    def stop(self) -> None:
        self.queued = []
        for ref in list(self.refs):
            self.ray.cancel(ref)
        if self.refs:
            self.ray.wait(list(self.refs), num_returns=len(self.refs), timeout=30)
        self.refs = {}

    def close(self) -> None:
        try:
            self.ray.kill(self.board)
        except Exception:  # noqa: BLE001  (the cluster may already be gone)
            pass
        if self.started:
            self.ray.shutdown()
