"""Shared fixtures: a synthetic data root, a small batch from the committed sample, and the session's one CTC-warm
checkpoint (trained once, cached in `ctc_cache`)."""

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


# The one CTC-warm checkpoint of the test session: every test and notebook run that forks joint-stage runs uses
# these settings and `ctc_cache`, so the warmup trains once per session.
CTC_WARMUP = dict(preset="tiny", seed=0, steps=40, lr=1e-3, batch_size=4)


@pytest.fixture(scope="session")
def ctc_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's checkpoint cache folder (pass it as the notebooks' `cache_dir`)."""
    return tmp_path_factory.mktemp("ctc_cache")


@pytest.fixture(scope="session")
def ctc_warmup() -> dict:
    """The settings of the session's CTC-warm checkpoint (as the notebooks' ctc_steps, ctc_lr, ...)."""
    return dict(CTC_WARMUP)


@pytest.fixture(scope="session")
def ctc_checkpoint(ctc_cache: Path) -> Path:
    """The session's CTC-warm tiny checkpoint that joint-stage runs fork from (trained once, then cached)."""
    from workbench.run.cache import ctc_warm_checkpoint

    path, _ = ctc_warm_checkpoint(SAMPLE, cache_dir=ctc_cache, log=lambda s: None, **CTC_WARMUP)
    return path
