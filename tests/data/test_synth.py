"""Synthetic generator: real layout, determinism, the committed sample, learnable structure."""

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from workbench.data import B2TDataset, index_file, sentence_to_ids, summarize, write_dataset
from workbench.data.synth import SENTENCES, session_names

SAMPLE = Path(__file__).resolve().parents[2] / "data_samples"


def test_embedded_sentences_are_short_known_and_distinct():
    assert len(SENTENCES) >= 200 and len(set(SENTENCES)) == len(SENTENCES)
    for sentence in SENTENCES:
        assert 2 <= len(sentence.split()) <= 5, sentence
        assert 8 <= len(sentence_to_ids(sentence)) <= 20, sentence


def test_two_generations_are_byte_identical(tmp_path):
    paths_a = write_dataset(tmp_path / "a", sessions=1, trials=4, seed=3)
    paths_b = write_dataset(tmp_path / "b", sessions=1, trials=4, seed=3)
    assert [p.relative_to(tmp_path / "a") for p in paths_a] == [p.relative_to(tmp_path / "b") for p in paths_b]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(paths_a, paths_b))
    write_dataset(tmp_path / "c", sessions=1, trials=4, seed=4)
    assert (tmp_path / "a" / "SHA256SUMS").read_text() != (tmp_path / "c" / "SHA256SUMS").read_text()


def test_regeneration_reproduces_the_committed_sample(tmp_path):
    write_dataset(tmp_path, sessions=2, trials=20, seed=0)
    manifest = (SAMPLE / "SHA256SUMS").read_text()
    assert (tmp_path / "SHA256SUMS").read_text() == manifest
    for line in manifest.splitlines():
        digest, name = line.split("  ")
        assert hashlib.sha256((SAMPLE / name).read_bytes()).hexdigest() == digest, name
    assert len(summarize(SAMPLE)) == 6


def test_output_has_the_real_layout_and_valid_labels(synth_root):
    for path in sorted(synth_root.glob("t15.*/data_*.hdf5")):
        labelled = path.name != "data_test.hdf5"
        index_file(path)
        with h5py.File(path, "r") as f:
            assert sorted(f) == [f"trial_{i:04d}" for i in range(len(f))]
            for g in f.values():
                features = g["input_features"][()]
                T = int(g.attrs["n_time_steps"])
                assert features.dtype == np.float32 and features.shape == (T, 512)
                assert np.array_equal(features * 64, np.round(features * 64))
                assert abs(features.mean()) < 1e-2 and abs(features.std() - 1) < 1e-2
                assert g.attrs["session"] == path.parent.name and int(g.attrs["speaking_mode"]) in (0, 1)
                if not labelled:
                    assert set(g) == {"input_features"} and "seq_len" not in g.attrs
                    assert "sentence_label" not in g.attrs
                    continue
                ids, text = g["seq_class_ids"][()], g["transcription"][()]
                seq_len = int(g.attrs["seq_len"])
                assert ids.shape == text.shape == (500,) and ids.dtype == text.dtype == np.int32
                assert seq_len <= T and all(1 <= i <= 40 for i in ids[:seq_len]) and not ids[seq_len:].any()
                sentence = g.attrs["sentence_label"]
                assert "".join(map(chr, text[text > 0])) == sentence
                assert ids[:seq_len].tolist() == sentence_to_ids(sentence)


def test_split_counts_and_missing_splits(tmp_path):
    write_dataset(tmp_path, sessions=2, trials=8, seed=0, val_fraction=0.25, test_fraction=0)
    assert [len(B2TDataset(tmp_path, split)) for split in ("train", "val")] == [16, 4]
    assert not list(tmp_path.glob("*/data_test.hdf5"))
    (tmp_path / "t15.2020.01.01").mkdir()
    with pytest.raises(ValueError, match="t15.2020.01.01"):
        write_dataset(tmp_path, sessions=2, trials=8, seed=0)


def test_sessions_do_not_depend_on_the_session_count(tmp_path):
    one = write_dataset(tmp_path / "one", sessions=1, trials=3, seed=2, mode_labels=False)
    two = write_dataset(tmp_path / "two", sessions=2, trials=3, seed=2, mode_labels=False)
    assert [p.parent.name for p in two[::3]] == session_names(2)
    assert one[0].read_bytes() == two[0].read_bytes()
    with h5py.File(one[0], "r") as f:
        assert all("speaking_mode" not in g.attrs for g in f.values())


def test_speaking_mode_changes_the_features(synth_root):
    # Silent trials have weaker smoothed modulation, so less of their variance is temporally correlated.
    ds = B2TDataset(synth_root, "train")
    lag1 = {0: [], 1: []}
    for i in range(len(ds)):
        trial = ds[i]
        x = trial.features.numpy() - trial.features.numpy().mean(0)
        lag1[trial.mode_label].append(((x[1:] * x[:-1]).sum(0) / (x * x).sum(0)).mean())
    assert lag1[0] and lag1[1] and max(lag1[0]) < min(lag1[1])
