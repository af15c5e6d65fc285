"""Whether a view (`report`, `export`, `trace`) may read a run log now: one still being written is refused unless
the caller reads it partially, and then it gets no outcome.

Still being written: status "running" and modified in the last `RECENT_S` seconds, or inside a sweep folder whose
`.lock` another process holds. A "running" log that has not changed for longer is an interrupted run (its process
was killed) and is read as it is.
"""

from __future__ import annotations

import fcntl
import time
from pathlib import Path

from workbench.records.runlog import RunLogError, describe_log

RECENT_S = 120.0


class LogBusy(ValueError):
    """A run log still being written; the message is one line saying what to do."""


def _sweep_lock_held(path: Path) -> bool:
    """Whether the log sits in a sweep folder (`<sweep>/runs/<run>.h5`) whose `.lock` another process holds."""
    lock = path.resolve().parent.parent / ".lock"
    if not lock.is_file():
        return False
    with open(lock, "rb") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def being_written(path: Path) -> str | None:
    """Why the "running" log at `path` is taken to be still written (a few words), or None."""
    if _sweep_lock_held(path):
        return "its sweep holds the folder's lock"
    age = time.time() - path.stat().st_mtime
    return f"modified {age:.0f} s ago" if age < RECENT_S else None


def check_readable(path: str | Path, *, partial: bool = False, verb: str = "export") -> str:
    """The log's state: "finished", "failed", "running" (interrupted: its process was killed) or "in_progress"
    (still being written, only with `partial`). FileNotFoundError, RunLogError (damaged, not a run log, no
    checksums) or LogBusy (still being written, without `partial`), one line naming the file, otherwise.
    `verb` names what the caller does with it (export, report)."""
    path = Path(path)
    state, description = describe_log(path)
    if state == "missing":
        raise FileNotFoundError(f"{path}: no such run log (the file does not exist)")
    if state == "unreadable":
        raise RunLogError(f"{path}: {description}")
    why = being_written(path) if state == "running" else None
    if why and not partial:
        raise LogBusy(f"{path}: a run log still being written (status 'running', {why}); {verb} it once its run "
                      f"has ended, or pass --partial to {verb} the steps flushed so far (without an outcome)")
    return "in_progress" if why else state
