"""Shared data-only fixtures."""

from pathlib import Path

import pytest

from workbench.data import write_dataset


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small read-only synthetic data root: 3 sessions x (6 train, 2 val, 2 test) trials, speaking modes on.

    Tests that need to change files copy it first.
    """
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, sessions=3, trials=6, seed=1, val_fraction=1 / 3, test_fraction=1 / 3)
    return root
