"""Every DataError case of the indexer: the message names the file, the trial and the field."""

import re

import h5py
import numpy as np
import pytest

from workbench.data import B2TDataset, DataError, index_file, list_sessions, summarize
from workbench.data.synth import session_names

SESSION = "t15.2023.08.11"
FRAMES = 30
IDS = [9, 34, 40, 37, 34, 40]


def write_file(path, labelled=True, n_trials=2):
    """A valid file: n_trials trials of FRAMES frames, labelled with IDS ('Do you') when `labelled`.

    The `session` attribute is the folder's name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        for i in range(n_trials):
            g = f.create_group(f"trial_{i:04d}")
            g.create_dataset("input_features", data=rng.standard_normal((FRAMES, 512)).astype(np.float32))
            g.attrs.update(n_time_steps=FRAMES, block_num=1, trial_num=i, session=path.parent.name, speaking_mode=1)
            if labelled:
                ids = np.zeros(500, np.int32)
                ids[: len(IDS)] = IDS
                g.create_dataset("seq_class_ids", data=ids)
                g.attrs.update(seq_len=len(IDS), sentence_label="Do you?")
    return path


def error_at(where, rest):
    """pytest.raises for a DataError whose message starts with `<where>: <rest>` (rest is a regex)."""
    return pytest.raises(DataError, match=rf"^{re.escape(str(where))}: {rest}")


def replace_features(g, data):
    del g["input_features"]
    g.create_dataset("input_features", data=data)


def set_ids(g, position, value):
    g["seq_class_ids"][position] = value


def repeated_labels(g):
    """26 labels with 5 repeats in 30 frames: 31 frames are needed (a blank between equal labels)."""
    g["seq_class_ids"][:26] = [3] * 6 + list(range(4, 24))
    g.attrs["seq_len"] = 26


def long_labels(g):
    g["seq_class_ids"][:FRAMES + 5] = 3
    g.attrs["seq_len"] = FRAMES + 5


def non_finite(g):
    g["input_features"][5, 3] = np.nan
    g["input_features"][7, 0] = np.inf


def beyond_float32(g):
    data = np.zeros((FRAMES, 512))
    data[4, 9] = 1e300
    replace_features(g, data)


TRIAL_CASES = {
    "missing features": (lambda g: g.__delitem__("input_features"), "input_features", "no such dataset"),
    "features rank 1": (lambda g: replace_features(g, np.zeros(FRAMES, np.float32)), "input_features", "(30,)"),
    "features 256 cols": (lambda g: replace_features(g, np.zeros((FRAMES, 256), np.float32)), "input_features",
                          "(30, 256)"),
    "features int": (lambda g: replace_features(g, np.zeros((FRAMES, 512), np.int16)), "input_features", "int16"),
    "rows != n_time_steps": (lambda g: g.attrs.__setitem__("n_time_steps", 31), "input_features",
                             "expected 31 rows (n_time_steps), got 30 rows"),
    "missing n_time_steps": (lambda g: g.attrs.__delitem__("n_time_steps"), "n_time_steps", "no such attribute"),
    "non-finite": (non_finite, "input_features", "got 2 non-finite values, the first in row 5"),
    "float64 beyond float32": (beyond_float32, "input_features", "got 1 non-finite values, the first in row 4"),
    "missing seq_len": (lambda g: g.attrs.__delitem__("seq_len"), "seq_len", "required in train/val"),
    "missing seq_class_ids": (lambda g: g.__delitem__("seq_class_ids"), "seq_class_ids", "required in train/val"),
    "seq_len 0": (lambda g: g.attrs.__setitem__("seq_len", 0), "seq_len", "expected 1..500, got 0"),
    "seq_len 501": (lambda g: g.attrs.__setitem__("seq_len", 501), "seq_len", "expected 1..500, got 501"),
    "id 41": (lambda g: set_ids(g, 2, 41), "seq_class_ids", "got 41 at position 2"),
    "padding within seq_len": (lambda g: g.attrs.__setitem__("seq_len", 8), "seq_class_ids", "got 0 at position 6"),
    "seq_len > frames": (long_labels, "seq_len", "at most n_time_steps = 30 (CTC needs a frame per label), got 35"),
    "no CTC alignment": (repeated_labels, "n_time_steps", "at least seq_len + repeated labels = 26 + 5 frames "
                                                          "(fewer admit no CTC alignment), got 30"),
    "missing block_num": (lambda g: g.attrs.__delitem__("block_num"), "block_num", "no such attribute"),
    "session mismatch": (lambda g: g.attrs.__setitem__("session", "t15.2023.08.13"), "session",
                         f"expected '{SESSION}' (the folder name)"),
    "sentence not text": (lambda g: g.attrs.__setitem__("sentence_label", 7), "sentence_label", "string"),
    "speaking_mode 2": (lambda g: g.attrs.__setitem__("speaking_mode", 2), "speaking_mode", "0 (silent) or 1"),
}


@pytest.mark.parametrize("case", TRIAL_CASES)
def test_trial_errors_name_file_trial_and_field(tmp_path, case):
    edit, field, fragment = TRIAL_CASES[case]
    path = write_file(tmp_path / SESSION / "data_train.hdf5")
    assert [r.label_len for r in index_file(path)] == [6, 6]
    with h5py.File(path, "r+") as f:
        edit(f["trial_0001"])
    with pytest.raises(DataError) as info:
        index_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: trial_0001: {field}: expected "), message
    assert fragment in message


def test_documented_example_message(tmp_path):
    path = write_file(tmp_path / SESSION / "data_train.hdf5")
    with h5py.File(path, "r+") as f:
        f["trial_0001"].attrs["seq_len"] = 0
    with pytest.raises(DataError) as info:
        index_file(path)
    assert str(info.value) == f"{path}: trial_0001: seq_len: expected 1..500, got 0"


def test_not_an_hdf5_file(tmp_path):
    path = tmp_path / SESSION / "data_train.hdf5"
    path.parent.mkdir()
    path.write_text("trial_0000,1,2,3\n")
    with error_at(path, "format: expected an HDF5 file, got unreadable"):
        index_file(path)


def test_empty_file(tmp_path):
    path = tmp_path / SESSION / "data_val.hdf5"
    path.parent.mkdir()
    h5py.File(path, "w").close()
    with error_at(path, "trials: expected at least one trial_NNNN group, got an empty"):
        index_file(path)


@pytest.mark.parametrize("name", ["trial_1", "trial_00001", "Trial_0001", "notes"])
def test_bad_group_name(tmp_path, name):
    path = write_file(tmp_path / SESSION / "data_train.hdf5")
    with h5py.File(path, "r+") as f:
        f.create_group(name)
    with error_at(path, f"{name}: group name: expected only trial_NNNN groups"):
        index_file(path)


def test_trial_that_is_a_dataset(tmp_path):
    path = write_file(tmp_path / SESSION / "data_train.hdf5")
    with h5py.File(path, "r+") as f:
        f["trial_0002"] = np.zeros(3)
    with error_at(path, "trial_0002: group: expected a trial group, got a dataset"):
        index_file(path)


@pytest.mark.parametrize("folder", ["t15.2023.02.30", "t15.2023.8.11", "t15_2023_08_11", "t15.2023.08.11.b"])
def test_bad_session_folder(tmp_path, folder):
    path = write_file(tmp_path / folder / "data_train.hdf5")
    with error_at(path, "session folder: expected a file inside a t15.YYYY.MM.DD session folder"):
        index_file(path)
    with pytest.raises(DataError, match="session folder"):
        list_sessions(tmp_path)


def test_root_must_exist_and_unrelated_entries_are_ignored(tmp_path):
    with error_at(tmp_path / "nope", "data root: expected a folder of t15.YYYY.MM.DD session folders, got nothing"):
        list_sessions(tmp_path / "nope")
    write_file(tmp_path / SESSION / "data_train.hdf5")
    (tmp_path / "README.md").write_text("hi")
    (tmp_path / "t15.notes.txt").write_text("a file, not a session folder")
    (tmp_path / "cache").mkdir()
    assert list_sessions(tmp_path) == [SESSION]


def test_labelled_inference(tmp_path):
    test = write_file(tmp_path / SESSION / "data_test.hdf5", labelled=False)
    assert [r.label_len for r in index_file(test)] == [0, 0]
    other = write_file(tmp_path / SESSION / "extra.hdf5")
    assert [r.label_len for r in index_file(other)] == [6, 6]
    plain = write_file(tmp_path / SESSION / "other.hdf5", labelled=False)
    assert [r.label_len for r in index_file(plain)] == [0, 0]
    # A labelled split without labels is an error, not an unlabelled file.
    val = write_file(tmp_path / SESSION / "data_val.hdf5", labelled=False)
    with error_at(val, "trial_0000: seq_class_ids"):
        index_file(val)


def test_dataset_checks_the_structure_of_every_file_at_construction(tmp_path):
    write_file(tmp_path / SESSION / "data_train.hdf5")
    path = write_file(tmp_path / "t15.2023.08.12" / "data_train.hdf5")
    with h5py.File(path, "r+") as f:
        f["trial_0001"].attrs["n_time_steps"] = FRAMES + 1
    with error_at(path, "trial_0001: input_features: expected 31 rows"):
        B2TDataset(tmp_path, "train")


def test_non_finite_features_fail_when_the_trial_is_read(tmp_path):
    write_file(tmp_path / SESSION / "data_train.hdf5")
    path = write_file(tmp_path / "t15.2023.08.12" / "data_train.hdf5")
    with h5py.File(path, "r+") as f:
        f["trial_0001"]["input_features"][29, 511] = np.nan
    dataset = B2TDataset(tmp_path, "train")
    assert len(dataset) == 4 and dataset[2].features.shape == (FRAMES, 512)
    with pytest.raises(DataError) as info:
        dataset[3]
    assert str(info.value) == (f"{path}: trial_0001: input_features: expected finite values, "
                               "got 1 non-finite values, the first in row 29")
    # The explicit full check still reads every value.
    with error_at(path, "trial_0001: input_features: expected finite values"):
        summarize(tmp_path)


def test_unreadable_features_fail_when_the_trial_is_read(tmp_path):
    path = write_file(tmp_path / SESSION / "data_train.hdf5")
    with h5py.File(path, "r+") as f:
        del f["trial_0000"]["input_features"]
        # Raw storage in a file that does not exist: the metadata is fine, every read of the values fails.
        f["trial_0000"].create_dataset("input_features", shape=(FRAMES, 512), dtype=np.float32,
                                       external=[(str(tmp_path / "missing.raw"), 0, h5py.h5f.UNLIMITED)])
    dataset = B2TDataset(tmp_path, "train")
    with error_at(path, "trial_0000: input_features: expected readable values, got a read error"):
        dataset[0]
    with error_at(path, "trial_0000: input_features: expected readable values"):
        index_file(path)


def test_construction_reads_no_feature_values(tmp_path, monkeypatch):
    write_file(tmp_path / SESSION / "data_train.hdf5", n_trials=300)
    reads = []
    for method in ("__getitem__", "read_direct"):
        original = getattr(h5py.Dataset, method)

        def counting(self, *args, _original=original, **kwargs):
            reads.append(self.name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(h5py.Dataset, method, counting)
    dataset = B2TDataset(tmp_path, "train")
    assert len(dataset) == 300
    assert not [name for name in reads if name.endswith("/input_features")]
    assert len([name for name in reads if name.endswith("/seq_class_ids")]) == 300  # labels stay checked up front
    reads.clear()
    dataset[7]
    assert [name for name in reads if name.endswith("/input_features")] == ["/trial_0007/input_features"]


def test_summarize_good_root_and_bad_file(synth_root, tmp_path):
    lines = summarize(synth_root)
    first = session_names(1)[0]
    assert len(lines) == 9
    assert lines[0].startswith(f"{first} train: trials=6 frames total=") and "labels min=" in lines[0]
    assert lines[1].startswith(f"{first} val: trials=2 ") and lines[2].endswith("unlabelled")
    assert summarize(synth_root / first / "data_test.hdf5") == [lines[2]]
    bad = write_file(tmp_path / SESSION / "data_train.hdf5")
    with h5py.File(bad, "r+") as f:
        del f["trial_0000"].attrs["n_time_steps"]
    with error_at(bad, "trial_0000: n_time_steps"):
        summarize(tmp_path)
    with pytest.raises(DataError, match=r"got nothing \(no such file or folder\)"):
        summarize(tmp_path / "missing.hdf5")


def test_misnamed_session_folder_is_named(tmp_path):
    write_file(tmp_path / "session_one" / "data_train.hdf5")
    expected = r"session folder: expected t15\.YYYY\.MM\.DD .*got 'session_one'"
    with error_at(tmp_path, expected):
        summarize(tmp_path)
    with pytest.raises(DataError, match="session_one"):
        B2TDataset(tmp_path, "train")
    # Not silently skipped next to a valid session either.
    write_file(tmp_path / SESSION / "data_train.hdf5")
    with error_at(tmp_path, expected):
        summarize(tmp_path)


def test_session_folder_passed_as_the_root(tmp_path):
    write_file(tmp_path / SESSION / "data_train.hdf5")
    with error_at(tmp_path / SESSION, "data root: expected t15.YYYY.MM.DD session folders .*got split files "
                                      "directly in this folder"):
        summarize(tmp_path / SESSION)


def test_summarize_says_what_a_path_is(tmp_path):
    (tmp_path / "notes").write_text("mine\n")
    (tmp_path / "loopA").symlink_to(tmp_path / "loopB")
    (tmp_path / "loopB").symlink_to(tmp_path / "loopA")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with error_at(tmp_path / "notes", "path: expected an .hdf5 data file or a data root folder, got a file that is "
                                      "not HDF5"):
        summarize(tmp_path / "notes")
    with error_at(tmp_path / "loopA", "path: .* got a symlink loop"):
        summarize(tmp_path / "loopA")
    with error_at(tmp_path / "dangling", f"path: .* got a dangling symlink to {re.escape(str(tmp_path))}/gone"):
        summarize(tmp_path / "dangling")
    loose = write_file(tmp_path / "data_train.hdf5")
    with error_at(loose, f"session folder: expected a file inside a t15.YYYY.MM.DD session folder .*, got a file "
                         f"in {re.escape(str(tmp_path))}"):
        summarize(loose)
