"""Synthetic generator: real layout, determinism, the committed sample, learnable structure."""

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from workbench.data import (
    B2TDataset, b2t_lengths, index_file, large_val_dataset, real_length_dataset, sentence_to_ids, summarize, synth,
    write_dataset,
)
from workbench.data.synth import (
    B2T_FRAMES, B2T_MIN_FRAMES, B2T_PHONEMES_PER_FRAME, SENTENCES, VAL_TRIALS, session_names,
)

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


def test_b2t_lengths_match_the_published_statistics():
    for split, (mean, median, most) in B2T_FRAMES.items():
        frames, labels = b2t_lengths(split, 20_000, np.random.default_rng(0))
        assert frames.dtype == labels.dtype == np.int64
        assert abs(frames.mean() / mean - 1) < 0.01 and abs(np.median(frames) / median - 1) < 0.01
        assert B2T_MIN_FRAMES <= frames.min() and frames.max() <= most
        assert abs(labels.mean() / (mean * B2T_PHONEMES_PER_FRAME) - 1) < 0.02
        assert labels.min() >= 1 and (labels <= frames // 2).all()
        # Longer trials carry more phonemes.
        assert np.corrcoef(frames, labels)[0, 1] > 0.5
    _, val_labels = b2t_lengths("val", 20_000, np.random.default_rng(1))
    assert abs(val_labels.mean() - 22.4) < 0.5
    first, second = (b2t_lengths("train", 50, np.random.default_rng(7)) for _ in range(2))
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def _sentences_of(text):
    return [part.strip() for part in re.findall(r"[^.?!]+[.?!]", text)]


def test_real_length_set_joins_real_sentences_to_real_lengths(tmp_path):
    paths = write_dataset(tmp_path / "a", sessions=1, trials=8, seed=5, lengths="b2t")
    again = write_dataset(tmp_path / "b", sessions=1, trials=8, seed=5, lengths="b2t")
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(paths, again))
    frames = []
    for path in paths:
        index_file(path)
        split = path.stem.removeprefix("data_")
        with h5py.File(path, "r") as f:
            for g in f.values():
                T = int(g.attrs["n_time_steps"])
                frames.append(T)
                assert B2T_MIN_FRAMES <= T <= B2T_FRAMES[split][2] and g["input_features"].shape == (T, 512)
                if split == "test":
                    continue
                sentence, seq_len = g.attrs["sentence_label"], int(g.attrs["seq_len"])
                assert all(part in SENTENCES for part in _sentences_of(sentence))
                assert g["seq_class_ids"][:seq_len].tolist() == sentence_to_ids(sentence)
                assert 1 <= seq_len <= T // 2
    assert len(frames) == 12 and np.mean(frames) > 400  # the sample's trials are 71-138 frames
    with pytest.raises(ValueError, match="lengths: expected one of sample, b2t"):
        write_dataset(tmp_path / "c", lengths="real")


def _files(folder):
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_existing_files_are_kept_unless_overwrite(tmp_path):
    paths = write_dataset(tmp_path, sessions=1, trials=2, seed=0)
    before = _files(tmp_path)
    with pytest.raises(FileExistsError, match=f"^{re.escape(str(paths[0]))}: exists .*overwrite=True"):
        write_dataset(tmp_path, sessions=1, trials=2, seed=1)
    assert _files(tmp_path) == before
    assert write_dataset(tmp_path, sessions=1, trials=2, seed=1, overwrite=True) == paths
    assert paths[0].read_bytes() != before[paths[0]][0]
    assert sorted(_files(tmp_path)) == sorted(before)


def test_an_interrupted_write_leaves_no_truncated_file(tmp_path, monkeypatch):
    paths = write_dataset(tmp_path, sessions=1, trials=4, seed=0)
    before = _files(tmp_path)
    original = h5py.Group.create_dataset
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) == 14:  # the val file, after the train file's 12 datasets
            raise RuntimeError("interrupted")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        write_dataset(tmp_path, sessions=1, trials=4, seed=1, overwrite=True)
    monkeypatch.undo()
    after = _files(tmp_path)
    assert sorted(after) == sorted(before)  # no temporary file left behind
    assert after[paths[0]][0] != before[paths[0]][0]  # train was complete, so it was replaced
    for path in paths[1:] + [tmp_path / "SHA256SUMS"]:
        assert after[path][0] == before[path][0], path
    assert [len(index_file(path)) for path in paths] == [4, 1, 1]


def test_real_length_dataset_is_made_once_and_reused(tmp_path, monkeypatch):
    calls = []
    real = synth.write_dataset

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(synth, "write_dataset", counting)
    cache = tmp_path / "cache"
    root = real_length_dataset(cache, sessions=1, trials=2, seed=3)
    assert root == cache / "b2t_lengths_s1_t2_seed3" and calls[0]["lengths"] == "b2t"
    assert real_length_dataset(cache, sessions=1, trials=2, seed=3) == root and len(calls) == 1
    assert [p.name for p in cache.iterdir()] == [root.name]
    assert len(summarize(root)) == 3
    assert real_length_dataset(cache, sessions=1, trials=2, seed=4) != root and len(calls) == 2


def test_real_length_dataset_race_loser_uses_the_winners_folder(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    root = cache / "b2t_lengths_s1_t2_seed0"
    real = synth.write_dataset

    def finished_second(out_dir, **kwargs):
        written = real(out_dir, **kwargs)
        real(root, **kwargs)  # another process renamed its copy into place first
        (root / "winner").touch()
        return written

    monkeypatch.setattr(synth, "write_dataset", finished_second)
    assert real_length_dataset(cache, sessions=1, trials=2, seed=0) == root
    assert (root / "winner").is_file() and [p.name for p in cache.iterdir()] == [root.name]


@pytest.mark.slow
def test_real_length_dataset_two_processes_race(tmp_path):
    code = ("import sys; from workbench.data import real_length_dataset; "
            "print(real_length_dataset(sys.argv[1], sessions=1, trials=4, seed=0))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert outputs[0] == outputs[1] == str(tmp_path / "b2t_lengths_s1_t4_seed0")
    assert [p.name for p in tmp_path.iterdir()] == ["b2t_lengths_s1_t4_seed0"]
    assert len(summarize(outputs[0])) == 3


def test_the_large_validation_set_keeps_the_samples_training_data(tmp_path):
    root = large_val_dataset(tmp_path, val_trials=VAL_TRIALS)
    assert root == tmp_path / f"sample_val{VAL_TRIALS}" and large_val_dataset(tmp_path) == root
    for session in session_names(2):
        assert (root / session / "data_train.hdf5").read_bytes() == (SAMPLE / session / "data_train.hdf5").read_bytes()
    val, sample_val, train = B2TDataset(root, "val"), B2TDataset(SAMPLE, "val"), B2TDataset(root, "train")
    assert len(val) == 2 * VAL_TRIALS and len(sample_val) == 10
    assert {sample_val[i].sentence for i in range(10)} <= {val[i].sentence for i in range(len(val))}
    for session in session_names(2):  # within a session, validation sentences are distinct and unseen in training
        labels = [t.sentence for t in (val[i] for i in range(len(val))) if t.ref.session == session]
        seen = {t.sentence for t in (train[i] for i in range(len(train))) if t.ref.session == session}
        assert len(labels) == VAL_TRIALS == len(set(labels)) and not set(labels) & seen
    assert sum(len(val[i].targets) for i in range(len(val))) > 1000  # one error is below 0.001 PER


def test_a_fraction_beyond_the_limit_is_refused(tmp_path):
    with pytest.raises(ValueError, match="val_fraction: expected 0..5.0, got 6"):
        write_dataset(tmp_path, sessions=1, trials=2, val_fraction=6)
