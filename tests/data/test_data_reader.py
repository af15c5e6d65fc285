"""B2TDataset, collate and make_loader on synthetic data in the real layout."""

import pickle
import shutil

import h5py
import numpy as np
import pytest
import torch

from workbench.data import (
    B2TDataset, DataError, Trial, TrialRef, collate, find_session_files, list_sessions, make_loader,
)
from workbench.data.synth import session_names

SESSIONS = session_names(3)


def test_length_and_deterministic_order(synth_root):
    ds = B2TDataset(synth_root, "train")
    assert len(ds) == 3 * 6 and ds.sessions == SESSIONS and ds.labelled
    expected = [(s, i, f"trial_{g:04d}") for i, s in enumerate(SESSIONS) for g in range(6)]
    assert [(r.session, r.session_index, r.group) for r in ds.refs] == expected
    assert B2TDataset(synth_root, "train").refs == ds.refs


def test_items_match_the_file_and_targets_exclude_padding(synth_root):
    ds = B2TDataset(synth_root, "val")
    for i in range(len(ds)):
        trial = ds[i]
        with h5py.File(trial.ref.path, "r") as f:
            group = f[trial.ref.group]
            stored = group["seq_class_ids"][()]
            seq_len = int(group.attrs["seq_len"])
            assert trial.features.dtype == torch.float32
            assert trial.features.shape == (group.attrs["n_time_steps"], 512)
            assert np.array_equal(trial.features.numpy(), group["input_features"][()])
            assert trial.sentence == group.attrs["sentence_label"]
            assert trial.mode_label == group.attrs["speaking_mode"]
        assert trial.targets.dtype == torch.int64
        assert trial.targets.tolist() == stored[:seq_len].tolist() and len(stored) == 500
        assert 0 not in trial.targets.tolist() and stored[seq_len:].sum() == 0
        assert trial.ref.label_len == seq_len and trial.session_index == trial.ref.session_index


def test_collate_pads_with_zeros_and_keeps_lengths(synth_root):
    ds = B2TDataset(synth_root, "train")
    trials = [ds[i] for i in (0, 7, 13)]
    batch = collate(trials)
    T = max(t.features.shape[0] for t in trials)
    U = max(len(t.targets) for t in trials)
    assert batch.batch_size == 3
    assert batch.features.shape == (3, T, 512) and batch.targets.shape == (3, U)
    assert batch.feature_lengths.tolist() == [t.features.shape[0] for t in trials]
    assert batch.target_lengths.tolist() == [len(t.targets) for t in trials]
    assert batch.session_index.tolist() == [0, 1, 2]
    assert batch.mode_labels.tolist() == [t.mode_label for t in trials]
    for row, t in enumerate(trials):
        n, u = t.features.shape[0], len(t.targets)
        assert torch.equal(batch.features[row, :n], t.features) and not batch.features[row, n:].any()
        assert torch.equal(batch.targets[row, :u], t.targets) and not batch.targets[row, u:].any()
    assert batch.trial_ids[1] == f"{SESSIONS[1]}/data_train.hdf5:trial_0001"
    assert batch.sentences == [t.sentence for t in trials]
    moved = batch.to("cpu")
    assert all(x.dtype == torch.int64 for x in (moved.feature_lengths, moved.targets, moved.session_index))


def test_mode_labels_are_none_unless_every_trial_has_one(synth_root):
    trial = B2TDataset(synth_root, "train")[0]
    unlabelled = Trial(trial.features, trial.targets, 0, None, None, trial.ref)
    assert collate([trial, unlabelled]).mode_labels is None
    with pytest.raises(ValueError):
        collate([])


def test_test_split_has_no_targets(synth_root):
    ds = B2TDataset(synth_root, "test")
    assert not ds.labelled and len(ds) == 3 * 2
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch.targets.shape == (6, 0) and batch.target_lengths.tolist() == [0] * 6
    assert batch.sentences == [None] * 6 and all(r.label_len == 0 for r in ds.refs)


def test_session_selection(synth_root):
    only = B2TDataset(synth_root, "train", sessions=[SESSIONS[2], SESSIONS[0]])
    assert only.sessions == [SESSIONS[0], SESSIONS[2]]
    assert {(r.session, r.session_index) for r in only.refs} == {(SESSIONS[0], 0), (SESSIONS[2], 1)}
    first = B2TDataset(synth_root, "train", max_sessions=2)
    assert first.sessions == SESSIONS[:2] and len(first) == 12
    assert list_sessions(synth_root, sessions=SESSIONS[1:], max_sessions=1) == [SESSIONS[1]]
    with pytest.raises(DataError, match="t15.2031.01.01"):
        B2TDataset(synth_root, "train", sessions=["t15.2031.01.01"])


def test_sessions_lacking_a_split_are_skipped_with_stable_session_index(synth_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(synth_root, root)
    (root / SESSIONS[0] / "data_val.hdf5").unlink()
    (root / "notes").mkdir()
    assert [p.parent.name for p in find_session_files(root, "val")] == SESSIONS[1:]
    val = B2TDataset(root, "val")
    # Session indices stay aligned with the train split (day-specific layers).
    assert val.sessions == B2TDataset(root, "train").sessions == SESSIONS
    assert sorted({r.session_index for r in val.refs}) == [1, 2]
    assert len(val) == 4


def test_no_file_for_the_split_is_an_error(synth_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(synth_root, root)
    for path in root.glob("*/data_val.hdf5"):
        path.unlink()
    assert find_session_files(root, "val") == []
    with pytest.raises(DataError, match="data_val.hdf5"):
        B2TDataset(root, "val")


def test_sentence_label_stored_as_bytes(synth_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(synth_root, root)
    path = root / SESSIONS[0] / "data_train.hdf5"
    with h5py.File(path, "r+") as f:
        text = f["trial_0000"].attrs["sentence_label"]
        f["trial_0000"].attrs["sentence_label"] = np.bytes_(text.encode())
        assert isinstance(f["trial_0000"].attrs["sentence_label"], bytes)
    assert B2TDataset(root, "train", max_sessions=1)[0].sentence == text


def test_make_loader_order_depends_only_on_seed(synth_root):
    ds = B2TDataset(synth_root, "train")

    def order(seed, shuffle=True):
        return [tid for batch in make_loader(ds, 4, shuffle, seed) for tid in batch.trial_ids]

    assert order(5) == order(5) != order(6)
    assert sorted(order(5)) == sorted(r.trial_id for r in ds.refs)
    assert order(5, shuffle=False) == [r.trial_id for r in ds.refs]
    assert [b.batch_size for b in make_loader(ds, 4, True, 0, drop_last=True)] == [4] * 4


def test_drop_last_with_fewer_trials_than_a_batch_is_an_error(synth_root):
    ds = B2TDataset(synth_root, "val")
    assert len(ds) == 6
    # Such a loader yields no batch, so cycling it forever (the train loop) would hang.
    with pytest.raises(DataError) as info:
        make_loader(ds, 8, True, 0, drop_last=True)
    assert str(info.value) == (f"{synth_root}: batch_size: expected at most the 6 trials of the val split "
                               "(drop_last=True yields only full batches, so none would be produced), got 8")
    with pytest.raises(DataError, match="^batch_size: expected at most the 2 trials of the dataset"):
        make_loader(torch.utils.data.Subset(ds, [0, 1]), 3, False, 0, drop_last=True)
    assert [b.batch_size for b in make_loader(ds, 6, True, 0, drop_last=True)] == [6]
    assert [b.batch_size for b in make_loader(ds, 8, True, 0)] == [6]


def test_dataset_pickles_without_open_handles(synth_root):
    ds = B2TDataset(synth_root, "train")
    first = ds[0]
    copy = pickle.loads(pickle.dumps(ds))
    assert torch.equal(copy[0].features, first.features) and copy.refs == ds.refs
    ds.close()
    assert torch.equal(ds[0].targets, first.targets)
    assert isinstance(first.ref, TrialRef)
