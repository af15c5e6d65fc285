"""Validating reader and batcher for Brain-to-Text '25 (T15) HDF5 files in their published layout.

Layout: `<root>/t15.YYYY.MM.DD/data_{train,val,test}.hdf5`, one group per trial (`trial_0000`, ...) with
`input_features` (T, 512) float32, and in train/val only `seq_class_ids` (500,) zero-padded ids and
`transcription` (500,) zero-padded ASCII codes; attributes `n_time_steps`, `seq_len` (train/val),
`block_num`, `trial_num`, `session`, `sentence_label` (train/val; str or bytes).
The optional `speaking_mode` attribute (0 = silent, 1 = vocalized) exists only in synthetic files:
the real release does not publish the speaking strategy.

Building a dataset checks the structure of every trial (shapes and dtypes from HDF5 metadata, `n_time_steps`
against the rows, attributes, and the label ids, which are small), so malformed files fail before training
starts without reading the features (about 20 GB over the full release). Feature values are checked (finite)
when a trial is read, so none reaches the model unchecked; `summarize` checks everything up front.
Every problem is a `DataError` naming the file, the trial, the field and what was expected; a labelled trial
with fewer frames than labels plus repeated labels (no CTC alignment exists) is one, so runs refuse it.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

from workbench.data.paths import describe_path
from workbench.data.vocab import SIL

SPLITS = ("train", "val", "test")
N_FEATURES = 512
MAX_LABEL_LEN = 500  # storage length of seq_class_ids in the real files (baseline max_seq_elements)

_SESSION_NAME = re.compile(r"t15\.(\d{4})\.(\d{2})\.(\d{2})")
_TRIAL_NAME = re.compile(r"trial_\d{4}")
_SPLIT_FILE = re.compile(r"data_(\w+)\.hdf5")


class DataError(ValueError):
    """Data does not match the B2T layout; the message names the file, trial, field and the expectation."""


def _error(path: Path, field: str, expected: str, got: object, trial: str | None = None) -> DataError:
    where = f"{path}: {trial}: " if trial else f"{path}: "
    return DataError(f"{where}{field}: expected {expected}, got {got}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")


def _session_name(folder: Path) -> str:
    """The folder's name when it is `t15.YYYY.MM.DD` with a real calendar date, else DataError."""
    match = _SESSION_NAME.fullmatch(folder.name)
    if match:
        try:
            datetime.date(*(int(part) for part in match.groups()))
            return folder.name
        except ValueError:
            pass
    raise _error(folder, "session folder", "t15.YYYY.MM.DD with a valid calendar date", repr(folder.name))


def list_sessions(root: str | Path, sessions: list[str] | None = None, max_sessions: int | None = None) -> list[str]:
    """Sorted session names under `root`, restricted to `sessions` (if given), then to the first `max_sessions`.

    Selection ignores which split files exist, so train/val/test datasets built with the same arguments
    share one session list and the same `session_index` for a session.
    Folders starting with `t15` must be valid session names; other entries are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise _error(root, "data root", "a folder of t15.YYYY.MM.DD session folders", describe_path(root))
    names = sorted(_session_name(p) for p in root.iterdir() if p.is_dir() and p.name.startswith("t15"))
    if sessions is not None:
        missing = sorted(set(sessions) - set(names))
        if missing:
            raise _error(root, "sessions", f"session folders present under the root ({', '.join(names) or 'none'})",
                         ", ".join(missing))
        names = [name for name in names if name in set(sessions)]
    if max_sessions is not None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions: expected at least 1, got {max_sessions}")
        names = names[:max_sessions]
    return names


def find_session_files(root: str | Path, split: str, sessions: list[str] | None = None,
                       max_sessions: int | None = None) -> list[Path]:
    """`data_{split}.hdf5` of each selected session (see `list_sessions`), sorted; sessions without one are skipped."""
    _check_split(split)
    root = Path(root)
    files = (root / name / f"data_{split}.hdf5" for name in list_sessions(root, sessions, max_sessions))
    return [path for path in files if path.is_file()]


@dataclass(frozen=True)
class TrialRef:
    """One validated trial: where it lives and its sizes (n_frames = T; label_len = L, 0 when unlabelled)."""

    path: Path
    session: str
    session_index: int
    group: str
    n_frames: int
    label_len: int
    block_num: int
    trial_num: int

    @property
    def trial_id(self) -> str:
        """`<session>/<file name>:<group>`, unique within a data root."""
        return f"{self.session}/{self.path.name}:{self.group}"


Fail = Callable[[str, str, object], DataError]


def _text(value: object) -> str:
    """An attribute written as str or bytes (both occur in h5py output) as str."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    raise TypeError(type(value).__name__)


def _int_attr(group: h5py.Group, name: str, fail: Fail, expected: str = "an integer attribute") -> int:
    if name not in group.attrs:
        raise fail(name, expected, "no such attribute")
    value = np.asarray(group.attrs[name])
    if value.size != 1 or value.dtype.kind not in "iu":
        raise fail(name, expected, f"{value.dtype} of shape {value.shape}")
    return int(value.reshape(()))


def _text_attr(group: h5py.Group, name: str, fail: Fail) -> str | None:
    if name not in group.attrs:
        return None
    try:
        return _text(group.attrs[name])
    except (TypeError, UnicodeDecodeError) as exc:
        raise fail(name, "a UTF-8 string attribute (str or bytes)", f"{type(exc).__name__}: {exc}") from None


def _check_feature_layout(group: h5py.Group, fail: Fail) -> int:
    """Validate `input_features` shape and dtype against `n_time_steps` from HDF5 metadata alone; returns T."""
    features = group.get("input_features")
    expected = f"a (T, {N_FEATURES}) float dataset"
    if not isinstance(features, h5py.Dataset):
        raise fail("input_features", expected, "no such dataset" if features is None else "a group")
    if features.ndim != 2 or features.shape[1] != N_FEATURES or features.dtype.kind != "f":
        raise fail("input_features", expected, f"shape {features.shape} dtype {features.dtype}")
    n_frames = _int_attr(group, "n_time_steps", fail)
    if n_frames < 1:
        raise fail("n_time_steps", "at least 1", n_frames)
    if features.shape[0] != n_frames:
        raise fail("input_features", f"{n_frames} rows (n_time_steps)", f"{features.shape[0]} rows")
    return n_frames


def _read_features(group: h5py.Group, fail: Fail) -> np.ndarray:
    """`input_features` (T, 512) as float32, every value finite; the layout must already be checked."""
    try:
        # Overflow in the cast is reported below as non-finite values, not as a numpy warning.
        with np.errstate(over="ignore"):
            values = np.asarray(group["input_features"][()], dtype=np.float32)
    except OSError as exc:
        # A truncated or corrupt file is found here, not when the dataset is built: name the trial.
        raise fail("input_features", "readable values", f"a read error ({exc})") from None
    # Checked after the cast, so float64 values beyond the float32 range are caught as well.
    finite = np.isfinite(values)
    if not finite.all():
        first_row = int(np.flatnonzero(~finite.all(axis=1))[0])
        raise fail("input_features", "finite values", f"{finite.size - int(finite.sum())} non-finite values, "
                                                      f"the first in row {first_row}")
    return values


def _check_labels(group: h5py.Group, n_frames: int, fail: Fail) -> int:
    """Validate `seq_len` and the first `seq_len` entries of `seq_class_ids`; returns L."""
    ids = group.get("seq_class_ids")
    expected = f"a 1-D integer dataset of {MAX_LABEL_LEN} zero-padded ids (required in train/val)"
    if not isinstance(ids, h5py.Dataset):
        raise fail("seq_class_ids", expected, "no such dataset" if ids is None else "a group")
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise fail("seq_class_ids", expected, f"shape {ids.shape} dtype {ids.dtype}")
    seq_len = _int_attr(group, "seq_len", fail, "an integer attribute (required in train/val)")
    if not 1 <= seq_len <= MAX_LABEL_LEN:
        raise fail("seq_len", f"1..{MAX_LABEL_LEN}", seq_len)
    if seq_len > ids.shape[0]:
        raise fail("seq_len", f"at most len(seq_class_ids) = {ids.shape[0]}", seq_len)
    if seq_len > n_frames:
        raise fail("seq_len", f"at most n_time_steps = {n_frames} (CTC needs a frame per label)", seq_len)
    labels = ids[:seq_len]
    bad = np.flatnonzero((labels < 1) | (labels > SIL))
    if bad.size:
        raise fail("seq_class_ids", f"ids in 1..{SIL} within the first seq_len = {seq_len} entries",
                   f"{labels[bad[0]]} at position {bad[0]}")
    # A CTC alignment puts a blank between two equal labels, so it needs seq_len + repeats frames; a trial with
    # fewer has an infinite CTC loss, which zero_infinity would drop from training without a word.
    repeats = int((labels[1:] == labels[:-1]).sum())
    if seq_len + repeats > n_frames:
        raise fail("n_time_steps", f"at least seq_len + repeated labels = {seq_len} + {repeats} frames (fewer admit "
                   f"no CTC alignment)", n_frames)
    return seq_len


def _trial_fail(path: Path, trial: str) -> Fail:
    def fail(field: str, expected: str, got: object) -> DataError:
        return _error(path, field, expected, got, trial)

    return fail


def _index_trial(path: Path, group: h5py.Group, session: str, session_index: int, labelled: bool,
                 check_values: bool) -> TrialRef:
    trial = group.name.lstrip("/")
    fail = _trial_fail(path, trial)
    n_frames = _check_feature_layout(group, fail)
    if check_values:
        _read_features(group, fail)
    label_len = _check_labels(group, n_frames, fail) if labelled else 0
    block_num = _int_attr(group, "block_num", fail)
    trial_num = _int_attr(group, "trial_num", fail)
    stored_session = _text_attr(group, "session", fail)
    if stored_session is not None and stored_session != session:
        raise fail("session", f"{session!r} (the folder name)", repr(stored_session))
    _text_attr(group, "sentence_label", fail)  # checked now so that reading it later cannot fail
    if "speaking_mode" in group.attrs and _int_attr(group, "speaking_mode", fail) not in (0, 1):
        raise fail("speaking_mode", "0 (silent) or 1 (vocalized)", group.attrs["speaking_mode"])
    return TrialRef(path, session, session_index, trial, n_frames, label_len, block_num, trial_num)


def _split_of(path: Path) -> str | None:
    match = _SPLIT_FILE.fullmatch(path.name)
    return match.group(1) if match and match.group(1) in SPLITS else None


def index_file(path: str | Path, labelled: bool | None = None, session_index: int = 0,
               check_values: bool = True) -> list[TrialRef]:
    """Validate every trial of one HDF5 file and return their refs in numeric group order.

    `labelled=None` infers it: `data_train`/`data_val` are labelled, `data_test` is not, and a file with
    another name is labelled when its first trial has `seq_class_ids`. Every ref carries `session_index`
    (the caller's position of this session in its session list). With `check_values` the feature values
    are read one trial at a time for the finiteness check and not kept; without it no feature value is
    read (shapes and dtypes come from HDF5 metadata). Raises DataError on the first problem.
    """
    path = Path(path)
    if not path.is_file():
        raise _error(path, "file", "an HDF5 file", describe_path(path))
    try:
        session = _session_name(path.absolute().parent)
    except DataError:
        raise _error(path, "session folder", "a file inside a t15.YYYY.MM.DD session folder (a valid calendar date)",
                     f"a file in {path.absolute().parent}") from None
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise _error(path, "format", "an HDF5 file", f"unreadable ({exc})") from None
    with handle:
        names = sorted(handle.keys())
        if not names:
            raise _error(path, "trials", "at least one trial_NNNN group", "an empty file")
        for name in names:
            if not _TRIAL_NAME.fullmatch(name):
                raise _error(path, "group name", "only trial_NNNN groups (4 digits) at the root", repr(name), name)
            if not isinstance(handle[name], h5py.Group):
                raise _error(path, "group", "a trial group", "a dataset", name)
        if labelled is None:
            split = _split_of(path)
            labelled = split != "test" if split else "seq_class_ids" in handle[names[0]]
        return [_index_trial(path, handle[name], session, session_index, labelled, check_values) for name in names]


@dataclass(frozen=True)
class Trial:
    """One dataset item: features (T, 512) float32, targets (L,) int64 (empty when unlabelled).

    `mode_label` is the synthetic-only `speaking_mode` (None for real data); `sentence` is `sentence_label`.
    """

    features: torch.Tensor
    targets: torch.Tensor
    session_index: int
    mode_label: int | None
    sentence: str | None
    ref: TrialRef


class B2TDataset(Dataset[Trial]):
    """All trials of one split, read lazily.

    Construction validates every trial except its feature values (`index_file(..., check_values=False)`);
    `__getitem__` checks those (finite, readable) and raises DataError naming the file, trial and field.

    Order is deterministic: sessions sorted by name, trials in numeric group order. `.sessions` is the
    selected session list (see `list_sessions`), including sessions with no file for this split, so
    `session_index` means the same session in every split built from the same root and arguments.
    """

    def __init__(self, root: str | Path, split: str = "train", sessions: list[str] | None = None,
                 max_sessions: int | None = None) -> None:
        _check_split(split)
        self.root = Path(root)
        self.split = split
        self.labelled = split != "test"
        self.sessions = list_sessions(self.root, sessions, max_sessions)
        files = find_session_files(self.root, split, self.sessions)
        if not files:
            raise _error(self.root, f"data_{split}.hdf5", "a file in at least one selected session folder",
                         f"none in {', '.join(self.sessions) or 'no sessions'}{_misnamed_hint(self.root)}")
        position = {name: i for i, name in enumerate(self.sessions)}
        self.refs: list[TrialRef] = [
            ref for path in files
            for ref in index_file(path, self.labelled, position[path.parent.name], check_values=False)]
        self._handles: dict[Path, h5py.File] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> Trial:
        ref = self.refs[index]
        group = self._file(ref.path)[ref.group]
        features = torch.from_numpy(_read_features(group, _trial_fail(ref.path, ref.group)))
        if ref.label_len:
            targets = torch.from_numpy(group["seq_class_ids"][: ref.label_len].astype(np.int64))
        else:
            targets = torch.zeros(0, dtype=torch.int64)
        mode = group.attrs.get("speaking_mode")
        sentence = group.attrs.get("sentence_label")
        return Trial(features, targets, ref.session_index, None if mode is None else int(mode),
                     None if sentence is None else _text(sentence), ref)

    def _file(self, path: Path) -> h5py.File:
        # HDF5 handles must not cross a fork: a DataLoader worker opens its own on first use.
        if self._pid != os.getpid():
            self._handles = {}
            self._pid = os.getpid()
        if path not in self._handles:
            self._handles[path] = h5py.File(path, "r")
        return self._handles[path]

    def close(self) -> None:
        """Close the HDF5 handles opened by this process; later reads reopen them."""
        for handle in self._handles.values():
            handle.close()
        self._handles = {}

    def __getstate__(self) -> dict[str, object]:
        # Open h5py handles cannot be pickled (spawned DataLoader workers); the copy reopens lazily.
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state


@dataclass
class Batch:
    """Zero-padded batch of B trials.

    features (B, T, 512) float32, feature_lengths (B,) int64, targets (B, U) int64 with U = max label
    length (0 columns when unlabelled), target_lengths (B,) int64, session_index (B,) int64,
    mode_labels (B,) int64 or None (None unless every trial has one), trial_ids and sentences (B,).
    """

    features: torch.Tensor
    feature_lengths: torch.Tensor
    targets: torch.Tensor
    target_lengths: torch.Tensor
    session_index: torch.Tensor
    mode_labels: torch.Tensor | None
    trial_ids: list[str]
    sentences: list[str | None]

    @property
    def batch_size(self) -> int:
        return len(self.trial_ids)

    def to(self, device: torch.device | str) -> Batch:
        """A copy with every tensor on `device`."""
        return replace(
            self,
            features=self.features.to(device),
            feature_lengths=self.feature_lengths.to(device),
            targets=self.targets.to(device),
            target_lengths=self.target_lengths.to(device),
            session_index=self.session_index.to(device),
            mode_labels=None if self.mode_labels is None else self.mode_labels.to(device),
        )


def collate(trials: list[Trial]) -> Batch:
    """Pad features and targets with zeros (0 is also the CTC blank) and stack the per-trial fields."""
    if not trials:
        raise ValueError("collate: expected at least one trial, got none")
    modes = [t.mode_label for t in trials]
    return Batch(
        features=pad_sequence([t.features for t in trials], batch_first=True),
        feature_lengths=torch.tensor([t.features.shape[0] for t in trials], dtype=torch.int64),
        targets=pad_sequence([t.targets for t in trials], batch_first=True),
        target_lengths=torch.tensor([t.targets.shape[0] for t in trials], dtype=torch.int64),
        session_index=torch.tensor([t.session_index for t in trials], dtype=torch.int64),
        mode_labels=None if None in modes else torch.tensor(modes, dtype=torch.int64),
        trial_ids=[t.ref.trial_id for t in trials],
        sentences=[t.sentence for t in trials],
    )


def make_loader(dataset: Dataset[Trial], batch_size: int, shuffle: bool, seed: int,
                drop_last: bool = False) -> DataLoader:
    """Single-process loader of `Batch`es whose shuffle order depends only on `seed` (and the epoch).

    With `drop_last` a dataset smaller than `batch_size` yields no batch at all, and a loop that cycles the
    loader forever would hang: that raises DataError naming the split (and root), trials and batch size.
    """
    n_trials = len(dataset)
    if drop_last and n_trials < batch_size:
        root, split = getattr(dataset, "root", None), getattr(dataset, "split", None)
        where = f"{root}: " if root is not None else ""
        what = f"the {split} split" if split is not None else "the dataset"
        raise DataError(f"{where}batch_size: expected at most the {n_trials} trials of {what} (drop_last=True "
                        f"yields only full batches, so none would be produced), got {batch_size}")
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, collate_fn=collate,
                      num_workers=0, generator=torch.Generator().manual_seed(seed))


def _summary_line(path: Path, refs: list[TrialRef]) -> str:
    frames = np.array([r.n_frames for r in refs])
    labels = np.array([r.label_len for r in refs])
    label_text = (f"labels min={labels.min()} mean={labels.mean():.1f} max={labels.max()}"
                  if labels.any() else "unlabelled")
    return (f"{refs[0].session} {_split_of(path) or path.name}: trials={len(refs)} frames total={frames.sum()} "
            f"min={frames.min()} mean={frames.mean():.1f} max={frames.max()} {label_text}")


def _holds_split_files(folder: Path) -> bool:
    return any(folder.glob("data_*.hdf5"))


def _misnamed_folders(root: Path) -> list[str]:
    """Folders under `root` that hold split files but that `list_sessions` ignores (no `t15` prefix)."""
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith("t15") and _holds_split_files(p))


def _misnamed_hint(root: Path) -> str:
    misnamed = _misnamed_folders(root)
    return f" (folders not named t15.YYYY.MM.DD are ignored: {', '.join(misnamed)})" if misnamed else ""


def summarize(path: str | Path) -> list[str]:
    """Validate a single .hdf5 file or every split file under a data root; one summary line per file.

    This is the full check: every feature value is read. A folder under the root that holds split files
    but is not named `t15.YYYY.MM.DD` is an error rather than silently skipped.
    """
    path = Path(path)
    if path.is_file():
        if not h5py.is_hdf5(path):
            raise _error(path, "path", "an .hdf5 data file or a data root folder", f"{describe_path(path)} that is "
                         "not HDF5")
        files = [path]
    elif path.is_dir():
        misnamed = _misnamed_folders(path)
        if misnamed:
            raise _error(path, "session folder", "t15.YYYY.MM.DD (one folder per session holding "
                         "data_{train,val,test}.hdf5)", ", ".join(repr(name) for name in misnamed))
        candidates = (path / name / f"data_{split}.hdf5" for name in list_sessions(path) for split in SPLITS)
        files = [file for file in candidates if file.is_file()]
        if not files:
            got = ("split files directly in this folder (pass its parent, or one file)"
                   if _holds_split_files(path) else "no such files")
            raise _error(path, "data root", "t15.YYYY.MM.DD session folders holding data_{train,val,test}.hdf5",
                         got)
    else:
        raise _error(path, "path", "an .hdf5 data file or a data root folder", describe_path(path))
    return [_summary_line(file, index_file(file)) for file in files]
