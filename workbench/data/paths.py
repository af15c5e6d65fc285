"""What is at a path the user gave, in words, for error lines that say what the path is and what was expected."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


def describe_path(path: str | Path) -> str:
    """"a file", "a folder", "a symlink loop", "a dangling symlink to X", "not reachable: this user cannot read
    FOLDER", "nothing (no such file or folder)" or the system's reason, for `path` as given."""
    path = Path(path)
    try:
        info = os.stat(path)
    except OSError as exc:
        return _why_not(path, exc)
    if stat.S_ISDIR(info.st_mode):
        return "a folder"
    if stat.S_ISREG(info.st_mode):
        return "an empty file" if info.st_size == 0 else "a file"
    return "a special file (not a regular file or folder)"


def _why_not(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "a symlink loop"
    if exc.errno == errno.EACCES:
        blocked = next((str(p) for p in reversed(path.absolute().parents) if not os.access(p, os.X_OK)), None)
        return f"not reachable: this user cannot enter {blocked}" if blocked else "not readable by this user"
    if exc.errno == errno.ENOTDIR:
        return "nothing: a part of the path is a file, not a folder"
    if path.is_symlink():
        return f"a dangling symlink to {os.readlink(path)}"
    if exc.errno == errno.ENOENT:
        return "nothing (no such file or folder)"
    return exc.strerror or type(exc).__name__


def require(path: str | Path, what: str, *, folder: bool) -> Path:
    """`path` when it is a folder (`folder`) or a regular file, else ValueError "<path>: expected <what>, got
    <what is there>" (the caller adds the flag or field)."""
    path = Path(path)
    got = describe_path(path)
    if got != ("a folder" if folder else "a file") and not (not folder and got == "an empty file"):
        raise ValueError(f"{path}: expected {what}, got {got}")
    return path
