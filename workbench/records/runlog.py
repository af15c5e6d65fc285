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
- ``manifest``: resizable uint8 dataset holding one JSON object, rewritten by the writer with every row, event and
  attribute it writes, so it always describes what the file holds: ``series`` (key -> ``rows`` and ``sha256``
  over its kind, labels, shape and the bytes of its first ``rows`` steps and values), ``tables`` (name -> ``rows``
  and ``sha256`` over its rows) and ``attrs`` (name -> ``sha256`` of its decoded value). Every numeric dataset
  also carries HDF5's fletcher32 checksum per chunk (HDF5 allows no filter on the tables' variable-length strings).

When the writer closes the file it appends a checksum trailer after the HDF5 data (HDF5 ignores bytes past its end
of allocation): JSON naming the byte range of every chunk of every series dataset and of the manifest with a
sha256 of each, and a sha256 of every other byte (HDF5's metadata: the layout of groups, datasets, attributes and
tables), then the JSON's length (8 bytes, little-endian) and ``TRAILER_MAGIC``. A reader checks those bytes before
HDF5 parses any of them, so a damaged closed log is named, never parsed (damaged HDF5 metadata can crash the
library). A log that is no longer "running" but has no trailer was changed after it was closed, or cut short.

Readers check a log against its manifest before they use it (:meth:`RunLog.verify`; :meth:`RunLog.series` and
:meth:`RunLog.table` check what they read): a series, table or attribute that the manifest declares and the file
lacks, holds fewer rows, or whose bytes do not match, and anything the manifest does not declare in a log that is
no longer running, is damage: :class:`RunLogDamaged`, one line naming the file and the series (or table, or
attribute). A log still "running" may hold rows flushed after its manifest: readers keep only the declared ones.
A log without a manifest was written by an older version of the workbench (before run logs carried checksums) and
is refused rather than read unverified.

A write that fails during a run (a full disk, a file size limit, an I/O error) cannot close the file "failed": the
writer writes ``WRITE_FAILED`` and the step into the file's HDF5 user block (its first ``USERBLOCK`` bytes, space
HDF5 leaves to the user, so writing it needs no new space), sends HDF5's remaining writes to /dev/null so that
closing the file cannot crash or damage it further, and raises :class:`RunLogWriteError`, one line. Every reader
then refuses the log with "interrupted at step k, write failed" before HDF5 parses it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import math
import operator
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Iterator, Mapping, Sequence

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
MANIFEST = "manifest"
TRAILER_MAGIC = b"WBRLSUM1"
USERBLOCK = 512
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
WRITE_FAILED = b"WRITE FAILED\n"
_DIGEST_CHARS = 32  # of a sha256 hex digest: 128 bits tell damage from data


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
    dtype: np.dtype
    width: tuple[int, ...]  # () for scalars, (k,) for length-k vectors
    steps_hash: Any  # hashlib sha256 over the bytes of every step written
    values_hash: Any  # ... and of every row of values, as stored
    rows: int = 0  # written rows, kept here: h5py's shape property costs more than the rest of a row's bookkeeping
    pending_steps: list[int] = field(default_factory=list)  # rows logged since the last flush, not yet written
    pending_values: list[np.ndarray] = field(default_factory=list)


class RunLogError(ValueError):
    """A file that is not a readable run log; the message is one line naming the file and what was expected."""


class RunLogWriteError(OSError):
    """A write to a run log failed during the run; the message is one line naming the file, the step and why."""


class RunLogDamaged(RunLogError):
    """A run log whose content does not match its manifest (see the module docstring); one line naming the file
    and the series, table or attribute."""


def _series_digest(kind: str, labels: Sequence[str] | None, width: tuple[int, ...], steps: bytes,
                   values: bytes) -> str:
    """The manifest's digest of one series from the sha256 digests of its steps' and values' bytes."""
    head = json.dumps([kind, None if labels is None else list(labels), list(width)]).encode()
    return hashlib.sha256(head + b"\0" + steps + values).hexdigest()[:_DIGEST_CHARS]


def _attr_digest(name: str, value: Any) -> str:
    """The manifest's digest of a root attribute's decoded value."""
    return hashlib.sha256(f"{name}\0{to_json(value)}".encode()).hexdigest()[:_DIGEST_CHARS]


def _row_bytes(text: str) -> bytes:
    """One table row as the table digest hashes it (length-prefixed, so rows cannot run into each other)."""
    data = text.encode("utf-8")
    return len(data).to_bytes(8, "little") + data


class RunLogWriter:
    """Appends series and event rows to a new run log; use as a context manager or call :meth:`close`.

    Step rows are kept in memory and written at a flush: after ``flush_every`` :meth:`log_step` calls, or at the
    first step logged ``flush_seconds`` or more after the last flush, and always at the first step, at every
    event, attribute or label written, and at :meth:`close`. Writing the rows of several steps at once costs one
    resize and one write per series instead of one per row. A run killed by SIGKILL loses at most the rows not
    yet flushed: the ``flush_every - 1`` most recent steps, and with ``flush_seconds`` no step logged more than
    that long before the last one.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        attrs: Mapping[str, Any] | None = None,
        flush_every: int = 1,
        flush_seconds: float | None = None,
        overwrite: bool = False,
    ) -> None:
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        if flush_seconds is not None and not flush_seconds >= 0:
            raise ValueError(f"flush_seconds must be >= 0 or None, got {flush_seconds}")
        self.path = Path(path)
        self._flush_every = flush_every
        self._flush_seconds = flush_seconds
        self._unflushed_steps = 0
        self._flushed_at = time.monotonic()  # of the last flush
        self._rows_flushed = False  # no step row reached the file yet: the first one flushes at once
        self._last_step: int | None = None
        self._series: dict[str, _Series] = {}
        self._tables: dict[str, h5py.Dataset] = {}
        self._labels: dict[str, list[str]] = {}
        self._json_attrs: set[str] = set()
        self._table_hashes: dict[str, Any] = {}
        self._attr_digests: dict[str, str] = {}
        self._write_failed: RunLogWriteError | None = None
        _check_user_attrs(attrs or {})
        try:
            # The default libver (not 'latest') keeps the superblock free of the "open for write" flag that
            # would otherwise survive a SIGKILL and make the file unreadable until someone runs h5clear.
            # locking=False matches RunLog (which needs it to read while this writer holds the file's lock):
            # HDF5 refuses to open a file twice in one process with different locking flags.
            self._file = h5py.File(self.path, "w" if overwrite else "x", locking=False, userblock_size=USERBLOCK)
        except FileExistsError:
            raise FileExistsError(f"run log {self.path} already exists; pass overwrite=True to replace it") from None
        with self._writing(None):
            self._manifest = self._file.create_dataset(MANIFEST, shape=(0,), maxshape=(None,), chunks=(4096,),
                                                       dtype=np.uint8, fletcher32=True)
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
            self.set_attrs(error=repr(exc).replace("\n", " "))
            self.close(status="failed")

    @property
    def _h5(self) -> h5py.File:
        if not self._file:
            raise RuntimeError(f"run log {self.path} is closed")
        return self._file

    def set_attrs(self, **attrs: Any) -> None:
        """Add or replace root attributes (dict/list/None values are stored as JSON strings); nothing after a
        failed write (the log is marked, see the module docstring)."""
        _check_user_attrs(attrs)
        if self._write_failed is None:
            with self._writing(self._last_step):
                self._write_attrs(attrs)

    def declare_vector(self, key: str, labels: Sequence[str]) -> None:
        """Name the k columns of vector series ``key`` (e.g. parameter names); may precede its first row."""
        labels = [str(label) for label in labels]
        series = self._series.get(key)
        if series is not None:
            if series.width != (len(labels),):
                raise ValueError(f"series {key!r} has shape {series.width}, but {len(labels)} labels given")
            with self._writing(self._last_step):
                series.values.parent.attrs["labels"] = labels
        self._labels[key] = labels
        if series is not None:
            with self._writing(self._last_step):
                self._flush()

    def log_step(self, step: int, values: Mapping[str, Value]) -> None:
        """Append one row at ``step`` to each series named in ``values`` (scalars or fixed-length vectors); the
        rows reach the file at the next flush (see the class docstring).

        All values are checked before anything is kept, so a bad key leaves every series untouched.
        """
        step = operator.index(step)
        if self._write_failed is not None:
            raise self._write_failed
        _ = self._h5  # a closed log raises here, before any row is kept
        rows = {key: self._check_row(key, value, values) for key, value in values.items()}
        with self._writing(step):
            for key, row in rows.items():
                series = self._series.get(key) or self._create_series(key, row)
                series.pending_steps.append(step)
                series.pending_values.append(row.astype(series.dtype))  # a copy: the caller may reuse its array
            self._last_step = step
            self._unflushed_steps += 1
            due = self._flush_seconds is not None and time.monotonic() - self._flushed_at >= self._flush_seconds
            if due or self._unflushed_steps >= self._flush_every or not self._rows_flushed:
                self._flush()

    def _flush(self) -> None:
        """Write the pending step rows (per series, one resize and one write), the manifest, and flush."""
        for series in self._series.values():
            k = len(series.pending_steps)
            if not k:
                continue
            n = series.rows
            steps = np.asarray(series.pending_steps, dtype=np.int64)
            stored = np.stack(series.pending_values)
            series.steps.resize((n + k,))
            series.values.resize((n + k, *series.width))
            series.steps[n:] = steps
            series.values[n:] = stored
            series.rows = n + k
            series.steps_hash.update(steps.tobytes())
            series.values_hash.update(np.ascontiguousarray(stored).tobytes())
            series.pending_steps.clear()
            series.pending_values.clear()
            self._rows_flushed = True
        self._write_manifest()
        self._h5.flush()
        self._unflushed_steps = 0
        self._flushed_at = time.monotonic()

    def log_event(self, table: str, row: Mapping[str, Any]) -> None:
        """Append ``row`` (JSON-encoded by :func:`to_json`) to event table ``table`` and flush."""
        if not table or "/" in table:
            raise ValueError(f"table name must be non-empty and contain no '/', got {table!r}")
        text = to_json(dict(row))
        if self._write_failed is None:
            with self._writing(self._last_step):
                self._append_event(table, text, self._h5)

    def _append_event(self, table: str, text: str, h5: h5py.File) -> None:
        dataset = self._tables.get(table)
        if dataset is None:
            dataset = h5.require_group("tables").create_dataset(
                table, shape=(0,), maxshape=(None,), chunks=(64,), dtype=h5py.string_dtype("utf-8")
            )
            self._tables[table] = dataset
            self._table_hashes[table] = hashlib.sha256()
        n = dataset.shape[0]
        dataset.resize((n + 1,))
        dataset[n] = text
        self._table_hashes[table].update(_row_bytes(text))
        self._flush()

    def close(self, status: str = "finished") -> None:
        """Write ``status`` and the ``finished`` time (and, unless finished, the last step logged), then close the
        file; closing twice, or after a failed write, does nothing."""
        if self._file and self._write_failed is None:
            last = {} if status == "finished" else {"last_step": self._last_step}
            with self._writing(self._last_step):
                self._write_attrs({**last, "status": status, "finished": _now()})
                regions = self._regions()
                self._file.close()
                _append_trailer(self.path, regions)

    @contextlib.contextmanager
    def _writing(self, step: int | None) -> Iterator[None]:
        """A failed write inside (HDF5 reports one as OSError or RuntimeError) abandons the file (see the module
        docstring) and raises RunLogWriteError naming the file and `step`."""
        try:
            yield
        except (OSError, RuntimeError) as err:
            if self._write_failed is not None or isinstance(err, RunLogWriteError):
                raise
            code = next((e for e in (getattr(err, "errno", None), *_errnos(str(err))) if e), None)
            why = os.strerror(code) if code else _first_line(err)
            at = "before its first step" if step is None else f"at step {step}"
            self._abandon(at, why)
            self._write_failed = RunLogWriteError(f"{self.path}: write failed {at} ({why}); the run log is marked "
                                                  f"'interrupted {at}, write failed'")
            self._write_failed.errno = code or errno.EIO
            raise self._write_failed from None

    def _abandon(self, at: str, why: str) -> None:
        """Mark the file as a failed write in its user block, then close it with HDF5's writes sent to /dev/null."""
        marker = WRITE_FAILED + f"interrupted {at}, write failed ({why})".encode()[:USERBLOCK - len(WRITE_FAILED)]
        with contextlib.suppress(OSError):
            fd = os.open(self.path, os.O_WRONLY)
            try:
                os.pwrite(fd, marker.ljust(USERBLOCK, b" "), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
        with contextlib.suppress(Exception):
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, self._file.id.get_vfd_handle())
            os.close(null)
        with contextlib.suppress(Exception):
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
            self._attr_digests[name] = _attr_digest(name, value)
        h5.attrs["json_attrs"] = json.dumps(sorted(self._json_attrs))
        self._flush()

    def _regions(self) -> list[tuple[str, int, int]]:
        """(what, byte offset, size) of every stored chunk of the series datasets and the manifest (flushed)."""
        out = []
        datasets = [(f"series {key}", d) for key, s in self._series.items() for d in (s.steps, s.values)]
        for what, dataset in datasets + [(MANIFEST, self._manifest)]:
            for k in range(dataset.id.get_num_chunks()):
                info = dataset.id.get_chunk_info(k)
                out.append((what, int(info.byte_offset), int(info.size)))
        return out

    def _write_manifest(self) -> None:
        """Rewrite the manifest: what the file holds now (see the module docstring)."""
        series = {key: {"rows": s.rows,
                        "sha256": _series_digest(s.kind, self._labels.get(key), s.width,
                                                 s.steps_hash.digest(), s.values_hash.digest())}
                  for key, s in self._series.items()}
        tables = {name: {"rows": d.shape[0], "sha256": self._table_hashes[name].hexdigest()[:_DIGEST_CHARS]}
                  for name, d in self._tables.items()}
        data = np.frombuffer(json.dumps({"series": series, "tables": tables, "attrs": self._attr_digests},
                                        sort_keys=True).encode(), dtype=np.uint8)
        self._manifest.resize((data.size,))
        self._manifest[:] = data

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
        if row.shape != series.width:
            raise ValueError(f"series {key!r} has shape {series.width}, got shape {row.shape}")
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
        steps = group.create_dataset("step", shape=(0,), maxshape=(None,), chunks=(rows,), dtype=np.int64,
                                     fletcher32=True)
        values = group.create_dataset(
            "value", shape=(0, *row.shape), maxshape=(None, *row.shape), chunks=(rows, *row.shape), dtype=dtype,
            fletcher32=True,
        )
        self._series[key] = _Series(steps, values, kind, np.dtype(dtype), row.shape, hashlib.sha256(),
                                    hashlib.sha256())
        return self._series[key]


def _errnos(text: str) -> list[int]:
    """The errno values HDF5 writes into its messages ("errno = 28")."""
    return [int(n) for n in re.findall(r"errno = (\d+)", text)]


def _hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()[:_DIGEST_CHARS]


def _rest_digest(data: bytes, regions: Sequence[Sequence[Any]]) -> str:
    """sha256 of every byte of `data` outside `regions` ((what, offset, size), in any order)."""
    view, rest, at = memoryview(data), hashlib.sha256(), 0
    for offset, size in sorted((r[1], r[2]) for r in regions):
        rest.update(view[at:max(at, offset)])
        at = max(at, offset + size)
    rest.update(view[at:])
    return rest.hexdigest()[:_DIGEST_CHARS]


def _append_trailer(path: Path, regions: Sequence[tuple[str, int, int]]) -> None:
    """Append the checksum trailer (see the module docstring) to the closed file at `path`."""
    data = path.read_bytes()
    view = memoryview(data)
    trailer = {"size": len(data), "rest": _rest_digest(data, regions),
               "regions": [[what, offset, size, _hex(view[offset:offset + size])] for what, offset, size in regions]}
    text = json.dumps(trailer).encode()
    with open(path, "ab") as f:
        f.write(text + len(text).to_bytes(8, "little") + TRAILER_MAGIC)
        f.flush()
        os.fsync(f.fileno())


def check_trailer(path: Path) -> bool:
    """Check a closed log's bytes against its trailer before HDF5 parses them: True when they match, False when
    the file has no trailer, RunLogDamaged naming the series (or the HDF5 metadata) whose bytes changed."""
    data = path.read_bytes()
    if len(data) < 16 or data[-8:] != TRAILER_MAGIC:
        return False
    length = int.from_bytes(data[-16:-8], "little")
    body = data[:-16 - length] if 0 < length <= len(data) - 16 else b""
    try:
        trailer = json.loads(data[-16 - length:-16])
        regions = [(str(w), int(o), int(n), str(h)) for w, o, n, h in trailer["regions"]]
        size, rest = int(trailer["size"]), str(trailer["rest"])
    except Exception as err:  # noqa: BLE001
        raise RunLogDamaged(f"{path}: checksum trailer: damaged ({_first_line(err)})") from None
    if size != len(body):
        raise RunLogDamaged(f"{path}: checksum trailer: damaged: it describes {size} bytes of HDF5 data, the file "
                            f"holds {len(body)}")
    view = memoryview(body)
    for what, offset, n, digest in regions:
        if _hex(view[offset:offset + n]) != digest:
            raise RunLogDamaged(f"{path}: {what}: damaged: its stored bytes (offset {offset}, {n} bytes) do not "
                                f"match the checksum written when the log was closed")
    if _rest_digest(body, regions) != rest:
        raise RunLogDamaged(f"{path}: HDF5 metadata (the layout of its series, tables and attributes): damaged: its "
                            f"bytes do not match the checksum written when the log was closed")
    return True


def _check_user_attrs(attrs: Mapping[str, Any]) -> None:
    reserved = _RESERVED_ATTRS.intersection(attrs)
    if reserved:
        raise ValueError(f"attribute names {sorted(reserved)} are reserved by the run-log format")


class RunLog:
    """Read-only view of a run log; may be opened while a writer (any process) still has the file open.

    Everything it returns is checked against the log's manifest (see the module docstring): opening checks the
    attributes, :meth:`series` and :meth:`table` check what they read, and :meth:`verify` checks the whole log.
    Every error reading it is a RunLogError naming the file (RunLogDamaged for damage); a name the log does not
    hold is a KeyError.

    A reader sees what the writer had flushed when the reader opened (in the writer's own process it shares
    the writer's open file and sees what the writer has flushed so far); reopen it to see later steps. Without SWMR
    (which needs libver 'latest', see RunLogWriter.__init__) a read that races a flush in another process can
    fail with a transient OSError or ValueError; retry it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"run log {self.path} does not exist")
        expected = f"a run log (HDF5, format {FORMAT!r} version {FORMAT_VERSION})"
        try:
            with open(self.path, "rb") as f:
                head = f.read(USERBLOCK)
            closed = check_trailer(self.path)
        except OSError as err:
            raise RunLogError(f"{self.path}: expected {expected}, got a file this user cannot read "
                              f"({err.strerror or err})") from None
        except RunLogDamaged:
            if not head.startswith(WRITE_FAILED):
                raise
        if head.startswith(WRITE_FAILED):
            raise RunLogError(f"{self.path}: {head[len(WRITE_FAILED):].decode(errors='replace').strip()}: its run "
                              f"stopped there and its steps cannot be verified; run it again")
        try:
            # locking=False: the writer holds the file (and its lock) open for the whole run.
            self._file = h5py.File(self.path, "r", locking=False)
        except Exception as err:  # noqa: BLE001  (h5py reports a damaged file with many exception types)
            raise RunLogError(f"{self.path}: expected {expected}, got {_unopenable(self.path, err)}") from None
        self._checked: dict[str, tuple[np.ndarray, np.ndarray]] = {}
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
                raise RunLogDamaged(f"{self.path}: status: expected one of {', '.join(STATUSES)}, "
                                    f"got {self.attrs.get('status')!r}")
            self._manifest = self._read_manifest()
            self._check_attrs()
            if not closed and self.attrs["status"] != "running":
                for key in self.series_names():
                    self._series_group(key)
                for name in self.table_names():
                    if name not in self._file.get("tables", {}):
                        raise RunLogDamaged(f"{self.path}: table {name}: damaged: missing (its manifest declares it)")
                raise RunLogDamaged(f"{self.path}: checksum trailer: missing from a log its writer closed "
                                    f"({self.attrs['status']}): the file was changed after it was closed, or cut "
                                    f"short")
        except Exception as err:  # noqa: BLE001
            self._file.close()
            if isinstance(err, RunLogError):
                raise
            raise RunLogDamaged(f"{self.path}: expected {expected}, got damaged attributes "
                                f"({_first_line(err)})") from None

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
        """Sorted keys of all series the manifest declares, e.g. ["grad_norm/encoder", "loss/ctc"]."""
        return sorted(self._manifest["series"])

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """Return (steps int64 (n,), values (n,) or (n, k)), checked against the manifest; values are float64,
        int64 or bool. RunLogDamaged naming the series when they do not match it."""
        if key not in self._checked:
            group = self._series_group(key)
            declared = self._manifest["series"][key]
            with self._reading(f"series {key}"):
                kind = str(group.attrs["kind"])
                labels = group.attrs.get("labels")
                labels = None if labels is None else [str(label) for label in labels]
                steps_set, values_set = group["step"], group["value"]
                n = self._rows(f"series {key}", declared, steps_set.shape[0], values_set.shape[0])
                steps, values = steps_set[:n], values_set[:n]
                digest = _series_digest(kind, labels, values_set.shape[1:],
                                        hashlib.sha256(steps.astype("<i8").tobytes()).digest(),
                                        hashlib.sha256(np.ascontiguousarray(values).tobytes()).digest())
            if digest != declared["sha256"]:
                raise RunLogDamaged(f"{self.path}: series {key}: damaged: its {n} rows do not match the checksum "
                                    f"written with them")
            self._checked[key] = (steps, values.astype(bool) if kind == "bool" else values)
        return self._checked[key]

    def labels(self, key: str) -> list[str] | None:
        """Column names of vector series ``key``, or None when none were declared."""
        self.series(key)
        with self._reading(f"series {key}"):
            labels = self._series_group(key).attrs.get("labels")
        return None if labels is None else [str(label) for label in labels]

    def scalar_frame(self, prefix: str = "") -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """All scalar series whose key is ``prefix`` or lies under it ("loss" matches "loss/ctc", not "losses")."""
        stem = prefix.rstrip("/")
        frame = {}
        for key in self.series_names():
            if not stem or key == stem or key.startswith(stem + "/"):
                steps, values = self.series(key)
                if values.ndim == 1:
                    frame[key] = (steps, values)
        return frame

    def table_names(self) -> list[str]:
        """Sorted names of the event tables the manifest declares."""
        return sorted(self._manifest["tables"])

    def table(self, name: str) -> list[dict[str, Any]]:
        """Rows of event table ``name``, decoded by :func:`from_json` after checking them against the manifest."""
        if name not in self._manifest["tables"]:
            raise KeyError(f"no table {name!r} in {self.path}; available: {self.table_names()}")
        declared = self._manifest["tables"][name]
        with self._reading(f"table {name}"):
            dataset = self._file["tables"][name]
            n = self._rows(f"table {name}", declared, dataset.shape[0])
            texts = list(dataset.asstr()[:n])
        digest = hashlib.sha256(b"".join(_row_bytes(text) for text in texts)).hexdigest()[:_DIGEST_CHARS]
        if digest != declared["sha256"]:
            raise RunLogDamaged(f"{self.path}: table {name}: damaged: its {n} rows do not match the checksum "
                                f"written with them")
        with self._reading(f"table {name}"):
            return [from_json(text) for text in texts]

    def last_step(self) -> int | None:
        """Largest step among the latest rows of all series, or None when nothing was logged."""
        steps = [self.series(key)[0] for key in self.series_names()]
        return max((int(s[-1]) for s in steps if s.shape[0]), default=None)

    def verify(self) -> None:
        """Check the whole log against its manifest: every declared series and table present and intact, and,
        unless the log is still "running", nothing there that the manifest does not declare."""
        for key in self.series_names():
            self.series(key)
        for name in self.table_names():
            self.table(name)
        if self.status == "running":
            return
        with self._reading("series"):
            found: list[str] = []
            group = self._file.get("series")
            if group is not None:
                group.visititems(lambda name, obj: found.append(name) if "kind" in obj.attrs else None)
            tables = list(self._file.get("tables", {}).keys())
        extra = [f"series {k}" for k in sorted(set(found) - set(self._manifest["series"]))]
        extra += [f"table {k}" for k in sorted(set(tables) - set(self._manifest["tables"]))]
        if extra:
            raise RunLogDamaged(f"{self.path}: {extra[0]}: damaged: the file holds it but its manifest does not "
                                f"declare it")

    def _read_manifest(self) -> dict[str, Any]:
        if MANIFEST not in self._file:
            raise RunLogError(f"{self.path}: no checksums: written by an older version of the workbench (before run "
                              f"logs carried a manifest), or its manifest was removed; this version reads only run "
                              f"logs it can verify: run it again")
        try:
            manifest = json.loads(self._file[MANIFEST][()].tobytes())
            ok = isinstance(manifest, dict) and all(
                isinstance(manifest.get(part), dict) for part in ("series", "tables", "attrs"))
            ok = ok and all(isinstance(entry, dict) and isinstance(entry.get("rows"), int)
                            and isinstance(entry.get("sha256"), str)
                            for part in ("series", "tables") for entry in manifest[part].values())
        except Exception as err:  # noqa: BLE001
            raise RunLogDamaged(f"{self.path}: manifest: damaged ({_first_line(err)})") from None
        if not ok:
            raise RunLogDamaged(f"{self.path}: manifest: damaged (not the object of series, tables and attrs the "
                                f"writer writes)")
        return manifest

    def _check_attrs(self) -> None:
        declared: dict[str, str] = self._manifest["attrs"]
        for name in sorted(set(declared) | set(self.attrs)):
            if name not in self.attrs:
                raise RunLogDamaged(f"{self.path}: attribute {name}: damaged: missing (its manifest declares it)")
            if name not in declared:
                raise RunLogDamaged(f"{self.path}: attribute {name}: damaged: its manifest does not declare it")
            if _attr_digest(name, self.attrs[name]) != declared[name]:
                raise RunLogDamaged(f"{self.path}: attribute {name}: damaged: its value does not match the checksum "
                                    f"written with it")

    def _rows(self, what: str, declared: dict[str, Any], *found: int) -> int:
        """The declared row count, after checking that the datasets hold that many (more only while running)."""
        n = declared["rows"]
        if min(found) < n or (max(found) > n and self.status != "running"):
            raise RunLogDamaged(f"{self.path}: {what}: damaged: {n} rows declared, {min(found)} found")
        return n

    @contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        """Any error of h5py or numpy while reading `what` as a RunLogDamaged naming the file and `what`."""
        try:
            yield
        except RunLogError:
            raise
        except Exception as err:  # noqa: BLE001  (damaged metadata surfaces as many exception types)
            raise RunLogDamaged(f"{self.path}: {what}: damaged: unreadable ({_first_line(err)})") from None

    def _series_group(self, key: str) -> h5py.Group:
        if key not in self._manifest["series"]:
            raise KeyError(f"no series {key!r} in {self.path}; available: {self.series_names()}")
        with self._reading(f"series {key}"):
            group = self._file.get(f"series/{key}")
            if not isinstance(group, h5py.Group) or "kind" not in group.attrs:
                raise RunLogDamaged(f"{self.path}: series {key}: damaged: missing (its manifest declares it)")
        return group


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text[:160]}"


def _unopenable(path: Path, err: Exception) -> str:
    """What a file HDF5 cannot open looks like, in a few words."""
    with open(path, "rb") as f:
        head = f.read(USERBLOCK + 8)
    if not head:
        return "an empty file"
    if _HDF5_SIGNATURE not in (head[:8], head[USERBLOCK:]):  # at the start, or after a run log's user block
        return f"a file that is not HDF5 (it starts with {head[:4]!r})"
    if "truncated" in str(err):
        return "a truncated HDF5 file (a copy cut short?)"
    return f"an HDF5 file that does not open ({_first_line(err)})"


def describe_log(path: str | os.PathLike[str]) -> tuple[str, str]:
    """(state, one phrase for messages) of the file at `path`; state is "missing", "finished", "running" (killed
    or still writing), "failed" or "unreadable" (not a run log of this format version, one without checksums, or
    a damaged one: the whole log is verified, `RunLog.verify`)."""
    path = Path(path)
    if not path.exists():
        return "missing", f"no file at {path}"
    try:
        with RunLog(path) as log:
            log.verify()
            status, last = log.status, log.last_step()
            error = log.attrs.get("error")
    except (OSError, ValueError) as err:
        return "unreadable", str(err).removeprefix(f"{path}: ")
    where = "no step logged" if last is None else f"last step {last}"
    if status == "finished":
        return status, f"a finished run log ({where})"
    if status == "running":
        return status, f"an interrupted run log (status 'running': its process was killed or is still writing; {where})"
    return status, f"a failed run log ({where}; error: {error})"


def _to_python(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
