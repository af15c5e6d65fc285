"""One HDF5 file per training run: per-step series plus JSON event tables.

Layout of a run log (``format`` = "workbench-runlog", ``format_version`` = 1):

- root attributes: run metadata. ``format``, ``format_version``, ``created`` (ISO time), ``status``
  ("running", then "finished" or "failed"), ``finished`` (ISO time, set on close), ``error`` (one-line
  exception repr, set on failure) and ``last_step`` (the last step logged, set when a run closes as anything
  but "finished") are always managed by the writer. A log still "running" whose writer is gone was killed
  (SIGKILL, power loss): it keeps every flushed step. User attributes that are str, bool, int,
  float or numpy scalars are stored as native HDF5 attributes; anything else (dict, list, None, ...) is stored
  as a JSON string (see :func:`to_json`) and its name is listed in the ``json_attrs`` attribute (a JSON list),
  so the reader knows which strings to decode.
- ``series/<key>``: one group per series; ``key`` may contain '/' to nest (``grad_norm/encoder``). Group
  attributes: ``kind`` ("float", "int" or "bool") and, for vectors, optional ``labels`` (k column names).
  Datasets, both resizable and chunked, one row per logged step:
  ``step`` int64 (n,) and ``value`` (n,) for scalars or (n, k) for length-k vectors;
  float64 for floats, int64 for ints, uint8 for bools.
  Every series has its own step axis, so a series may start at any step and no fill values are invented.
- ``tables/<name>``: resizable (m,) dataset of variable-length UTF-8 strings, one JSON object per row.
"""

from __future__ import annotations

import itertools
import json
import math
import operator
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Mapping, Sequence

import h5py
import numpy as np

FORMAT = "workbench-runlog"
FORMAT_VERSION = 1

Value = float | int | bool | np.ndarray | Sequence[float]

_RESERVED_ATTRS = frozenset({"format", "format_version", "json_attrs"})
STATUSES = ("running", "finished", "failed")
_NATIVE_ATTR_TYPES = (str, bool, int, float, np.generic)
# numpy dtype kind -> (series kind, storage dtype); a series may widen bool -> int -> float but never narrow.
_KINDS = {"b": ("bool", np.uint8), "i": ("int", np.int64), "u": ("int", np.int64), "f": ("float", np.float64)}
_KIND_RANK = {"bool": 0, "int": 1, "float": 2}
_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
# Every flush rewrites each dirty chunk, so chunks stay small (about 8 KiB of values).
_CHUNK_VALUES = 1024


def to_json(obj: Any) -> str:
    """Encode ``obj`` as strict JSON, writing non-finite floats as the strings "inf", "-inf" and "nan".

    numpy scalars and arrays become Python numbers and (nested) lists. :func:`from_json` turns those three
    strings back into floats, so a genuine string "nan" in a row also reads back as a float.
    """
    return json.dumps(json_safe(obj), allow_nan=False)


def from_json(text: str) -> Any:
    """Decode a string written by :func:`to_json`, turning "inf", "-inf" and "nan" back into floats."""
    return _restore_non_finite(json.loads(text))


def json_safe(obj: Any) -> Any:
    """`obj` with numpy values as Python values and non-finite floats as the strings "inf", "-inf", "nan"."""
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _restore_non_finite(obj: Any) -> Any:
    if isinstance(obj, str):
        return _NON_FINITE.get(obj, obj)
    if isinstance(obj, dict):
        return {k: _restore_non_finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore_non_finite(v) for v in obj]
    return obj


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


@dataclass
class _Series:
    steps: h5py.Dataset
    values: h5py.Dataset
    kind: str


class RunLogError(ValueError):
    """A file that is not a readable run log; the message is one line naming the file and what was expected."""


class RunLogWriter:
    """Appends series and event rows to a new run log; use as a context manager or call :meth:`close`.

    ``flush_every`` is the number of :meth:`log_step` calls between flushes: a run killed by SIGKILL loses at
    most the rows of the ``flush_every - 1`` most recent steps. Events and attributes are flushed at once.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        attrs: Mapping[str, Any] | None = None,
        flush_every: int = 1,
        overwrite: bool = False,
    ) -> None:
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.path = Path(path)
        self._flush_every = flush_every
        self._unflushed_steps = 0
        self._last_step: int | None = None
        self._series: dict[str, _Series] = {}
        self._tables: dict[str, h5py.Dataset] = {}
        self._labels: dict[str, list[str]] = {}
        self._json_attrs: set[str] = set()
        _check_user_attrs(attrs or {})
        try:
            # The default libver (not 'latest') keeps the superblock free of the "open for write" flag that
            # would otherwise survive a SIGKILL and make the file unreadable until someone runs h5clear.
            # locking=False matches RunLog (which needs it to read while this writer holds the file's lock):
            # HDF5 refuses to open a file twice in one process with different locking flags.
            self._file = h5py.File(self.path, "w" if overwrite else "x", locking=False)
        except FileExistsError:
            raise FileExistsError(f"run log {self.path} already exists; pass overwrite=True to replace it") from None
        fixed = {"format": FORMAT, "format_version": FORMAT_VERSION, "created": _now(), "status": "running"}
        self._write_attrs({**(attrs or {}), **fixed})

    def __enter__(self) -> RunLogWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
        elif self._file:
            self._write_attrs({"error": repr(exc).replace("\n", " ")})
            self.close(status="failed")

    @property
    def _h5(self) -> h5py.File:
        if not self._file:
            raise RuntimeError(f"run log {self.path} is closed")
        return self._file

    def set_attrs(self, **attrs: Any) -> None:
        """Add or replace root attributes (dict/list/None values are stored as JSON strings)."""
        _check_user_attrs(attrs)
        self._write_attrs(attrs)

    def declare_vector(self, key: str, labels: Sequence[str]) -> None:
        """Name the k columns of vector series ``key`` (e.g. parameter names); may precede its first row."""
        labels = [str(label) for label in labels]
        series = self._series.get(key)
        if series is not None:
            if series.values.shape[1:] != (len(labels),):
                raise ValueError(f"series {key!r} has shape {series.values.shape[1:]}, but {len(labels)} labels given")
            series.values.parent.attrs["labels"] = labels
            self._h5.flush()
        self._labels[key] = labels

    def log_step(self, step: int, values: Mapping[str, Value]) -> None:
        """Append one row at ``step`` to each series named in ``values`` (scalars or fixed-length vectors).

        All values are checked before anything is written, so a bad key leaves every series untouched.
        """
        step = operator.index(step)
        h5 = self._h5
        rows = {key: self._check_row(key, value, values) for key, value in values.items()}
        for key, row in rows.items():
            series = self._series.get(key) or self._create_series(key, row)
            n = series.steps.shape[0]
            series.steps.resize((n + 1,))
            series.values.resize((n + 1, *series.values.shape[1:]))
            series.steps[n] = step
            series.values[n] = row.astype(series.values.dtype)
        self._last_step = step
        self._unflushed_steps += 1
        if self._unflushed_steps >= self._flush_every:
            h5.flush()
            self._unflushed_steps = 0

    def log_event(self, table: str, row: Mapping[str, Any]) -> None:
        """Append ``row`` (JSON-encoded by :func:`to_json`) to event table ``table`` and flush."""
        if not table or "/" in table:
            raise ValueError(f"table name must be non-empty and contain no '/', got {table!r}")
        text = to_json(dict(row))
        h5 = self._h5
        dataset = self._tables.get(table)
        if dataset is None:
            dataset = h5.require_group("tables").create_dataset(
                table, shape=(0,), maxshape=(None,), chunks=(64,), dtype=h5py.string_dtype("utf-8")
            )
            self._tables[table] = dataset
        n = dataset.shape[0]
        dataset.resize((n + 1,))
        dataset[n] = text
        h5.flush()

    def close(self, status: str = "finished") -> None:
        """Write ``status`` and the ``finished`` time (and, unless finished, the last step logged), then close the
        file; closing twice does nothing."""
        if self._file:
            if status != "finished":
                self._write_attrs({"last_step": self._last_step})
            self._file.attrs["status"] = status
            self._file.attrs["finished"] = _now()
            self._file.close()

    def _write_attrs(self, attrs: Mapping[str, Any]) -> None:
        h5 = self._h5
        for name, value in attrs.items():
            if isinstance(value, str):
                value = str(value)  # str subclasses (torch.__version__) have no HDF5 conversion path
            if isinstance(value, _NATIVE_ATTR_TYPES):
                h5.attrs[name] = value
                self._json_attrs.discard(name)
            else:
                h5.attrs[name] = to_json(value)
                self._json_attrs.add(name)
        h5.attrs["json_attrs"] = json.dumps(sorted(self._json_attrs))
        h5.flush()

    def _check_row(self, key: str, value: Value, batch: Mapping[str, Value]) -> np.ndarray:
        row = np.asarray(value)
        if row.dtype.kind not in _KINDS or row.ndim > 1 or (row.ndim == 1 and row.size == 0):
            raise ValueError(f"series {key!r}: expected a number or a non-empty 1-D numeric vector, "
                             f"got dtype {row.dtype} with shape {row.shape}")
        kind = _KINDS[row.dtype.kind][0]
        series = self._series.get(key)
        if series is None:
            if not key or not all(key.split("/")):
                raise ValueError(f"series key must be non-empty '/'-separated names, got {key!r}")
            # A series group holds only its own datasets, so one key may not nest inside another.
            for other in itertools.chain(self._series, batch):
                if other.startswith(key + "/") or key.startswith(other + "/"):
                    raise ValueError(f"series key {key!r} conflicts with series {other!r}: one would nest in the other")
            labels = self._labels.get(key)
            if labels is not None and row.shape != (len(labels),):
                raise ValueError(f"series {key!r} was declared with {len(labels)} labels, got shape {row.shape}")
            return row
        if row.shape != series.values.shape[1:]:
            raise ValueError(f"series {key!r} has shape {series.values.shape[1:]}, got shape {row.shape}")
        if _KIND_RANK[kind] > _KIND_RANK[series.kind]:
            raise ValueError(f"series {key!r} holds {series.kind} values, got {kind} values")
        return row

    def _create_series(self, key: str, row: np.ndarray) -> _Series:
        kind, dtype = _KINDS[row.dtype.kind]
        group = self._h5.require_group("series").create_group(key)
        group.attrs["kind"] = kind
        if key in self._labels:
            group.attrs["labels"] = self._labels[key]
        rows = max(1, _CHUNK_VALUES // row.size)
        steps = group.create_dataset("step", shape=(0,), maxshape=(None,), chunks=(rows,), dtype=np.int64)
        values = group.create_dataset(
            "value", shape=(0, *row.shape), maxshape=(None, *row.shape), chunks=(rows, *row.shape), dtype=dtype
        )
        self._series[key] = _Series(steps, values, kind)
        return self._series[key]


def _check_user_attrs(attrs: Mapping[str, Any]) -> None:
    reserved = _RESERVED_ATTRS.intersection(attrs)
    if reserved:
        raise ValueError(f"attribute names {sorted(reserved)} are reserved by the run-log format")


class RunLog:
    """Read-only view of a run log; may be opened while a writer (any process) still has the file open.

    A reader sees what the writer had flushed when the reader opened (in the writer's own process it shares
    the writer's open file and sees everything written so far); reopen it to see later steps. Without SWMR
    (which needs libver 'latest', see RunLogWriter.__init__) a read that races a flush in another process can
    fail with a transient OSError or ValueError; retry it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"run log {self.path} does not exist")
        expected = f"a run log (HDF5, format {FORMAT!r} version {FORMAT_VERSION})"
        try:
            # locking=False: the writer holds the file (and its lock) open for the whole run.
            self._file = h5py.File(self.path, "r", locking=False)
        except OSError as err:
            raise RunLogError(f"{self.path}: expected {expected}, got {_unopenable(self.path, err)}") from None
        try:
            raw = dict(self._file.attrs)
            if raw.get("format") != FORMAT or raw.get("format_version") != FORMAT_VERSION:
                got = (f"format {_to_python(raw.get('format'))!r} version {_to_python(raw.get('format_version'))!r}"
                       if "format" in raw else "no run-log attributes")
                raise RunLogError(f"{self.path}: expected {expected}, got an HDF5 file with {got}")
            json_names = set(json.loads(raw.pop("json_attrs", "[]")))
            self.attrs: dict[str, Any] = {
                name: from_json(value) if name in json_names else _to_python(value) for name, value in raw.items()
            }
            if self.attrs.get("status") not in STATUSES:
                raise RunLogError(f"{self.path}: status: expected one of {', '.join(STATUSES)}, "
                                  f"got {self.attrs.get('status')!r}")
        except (OSError, ValueError) as err:
            self._file.close()
            if isinstance(err, RunLogError):
                raise
            raise RunLogError(f"{self.path}: expected {expected}, got damaged attributes ({err})") from None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the file (the writer, if any, is unaffected)."""
        self._file.close()

    @property
    def status(self) -> str:
        """Run status: "running" (still running, or killed), "finished" or "failed"."""
        return self.attrs["status"]

    def series_names(self) -> list[str]:
        """Sorted keys of all series, e.g. ["grad_norm/encoder", "loss/ctc"]."""
        group = self._file.get("series")
        if group is None:
            return []
        names: list[str] = []

        def collect(name: str, obj: h5py.Group | h5py.Dataset) -> None:
            if "kind" in obj.attrs:
                names.append(name)

        group.visititems(collect)
        return sorted(names)

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """Return (steps int64 (n,), values (n,) or (n, k)); values are float64, int64 or bool."""
        group = self._series_group(key)
        # A writer killed mid-step may leave one dataset a row longer than the other; keep whole rows only.
        n = min(group["step"].shape[0], group["value"].shape[0])
        values = group["value"][:n]
        return group["step"][:n], values.astype(bool) if group.attrs["kind"] == "bool" else values

    def labels(self, key: str) -> list[str] | None:
        """Column names of vector series ``key``, or None when none were declared."""
        labels = self._series_group(key).attrs.get("labels")
        return None if labels is None else [str(label) for label in labels]

    def scalar_frame(self, prefix: str = "") -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """All scalar series whose key is ``prefix`` or lies under it ("loss" matches "loss/ctc", not "losses")."""
        stem = prefix.rstrip("/")
        frame = {}
        for key in self.series_names():
            under = not stem or key == stem or key.startswith(stem + "/")
            if under and self._file["series"][key]["value"].ndim == 1:
                frame[key] = self.series(key)
        return frame

    def table_names(self) -> list[str]:
        """Sorted names of the event tables."""
        return sorted(self._file.get("tables", {}).keys())

    def table(self, name: str) -> list[dict[str, Any]]:
        """Rows of event table ``name``, decoded by :func:`from_json`."""
        tables = self._file.get("tables", {})
        if name not in tables:
            raise KeyError(f"no table {name!r} in {self.path}; available: {self.table_names()}")
        return [from_json(text) for text in tables[name].asstr()[()]]

    def last_step(self) -> int | None:
        """Largest step among the latest rows of all series, or None when nothing was logged."""
        steps = [self._file["series"][key]["step"] for key in self.series_names()]
        return max((int(s[-1]) for s in steps if s.shape[0]), default=None)

    def _series_group(self, key: str) -> h5py.Group:
        group = self._file.get(f"series/{key}")
        if not isinstance(group, h5py.Group) or "kind" not in group.attrs:
            raise KeyError(f"no series {key!r} in {self.path}; available: {self.series_names()}")
        return group


def _unopenable(path: Path, err: OSError) -> str:
    """What a file HDF5 cannot open looks like, in a few words."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        return "an empty file"
    if head != b"\x89HDF\r\n\x1a\n":
        return f"a file that is not HDF5 (it starts with {head[:4]!r})"
    if "truncated" in str(err):
        return "a truncated HDF5 file (a copy cut short?)"
    return f"an HDF5 file that does not open ({str(err).splitlines()[0]})"


def describe_log(path: str | os.PathLike[str]) -> tuple[str, str]:
    """(state, one phrase for messages) of the file at `path`; state is "missing", "finished", "running" (killed
    or still writing), "failed" or "unreadable" (not a run log of this format version)."""
    path = Path(path)
    if not path.exists():
        return "missing", f"no file at {path}"
    try:
        with RunLog(path) as log:
            status, last = log.status, log.last_step()
            error = log.attrs.get("error")
    except (OSError, ValueError, KeyError) as err:  # KeyError: a series group without its datasets
        return "unreadable", str(err).removeprefix(f"{path}: ")
    where = "no step logged" if last is None else f"last step {last}"
    if status == "finished":
        return status, f"a finished run log ({where})"
    if status == "running":
        return status, f"an interrupted run log (status 'running': its process was killed or is still writing; {where})"
    return status, f"a failed run log ({where}; error: {error})"


def _to_python(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
