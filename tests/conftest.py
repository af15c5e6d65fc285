"""Shared fixtures: a synthetic data root and a small batch from the committed sample."""

import os

# One thread per process: several times faster for these small models on a 2-core CPU, and inherited by the
# subprocesses (CLI, papermill kernels) the tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from workbench.data import B2TDataset, collate, write_dataset  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "data_samples"


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small read-only synthetic data root: 3 sessions x (6 train, 2 val, 2 test) trials, speaking modes on.

    Tests that need to change files copy it first.
    """
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, sessions=3, trials=6, seed=1, val_fraction=1 / 3, test_fraction=1 / 3)
    return root


@pytest.fixture()
def tiny_batch():
    """The first two training trials of the committed sample as one Batch."""
    dataset = B2TDataset(SAMPLE, "train")
    return collate([dataset[0], dataset[1]])


@pytest.fixture(scope="session")
def ctc_checkpoint(tmp_path_factory) -> Path:
    """A CTC-warm tiny checkpoint (8 steps) that joint-stage runs fork from."""
    from workbench.experiment import ctc_warm_checkpoint

    path, _ = ctc_warm_checkpoint(SAMPLE, "tiny", seed=0, steps=8, lr=3e-3,
                                  cache_dir=tmp_path_factory.mktemp("cache"), log=lambda s: None)
    return path
