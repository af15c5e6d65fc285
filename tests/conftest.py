"""Shared fixtures: a synthetic data root, a small batch from the committed sample, and the session's one CTC-warm
checkpoint (trained once, cached in `ctc_cache`); and how the suite shares two cores under pytest-xdist (each worker
pinned to one, the files with a shared set-up handed out first)."""

import os

# One thread per process: several times faster for these small models on a 2-core CPU, and inherited by the
# subprocesses (CLI, papermill kernels) the tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _pin_xdist_worker() -> None:
    """Under `pytest -n <cores>` (make test): each worker and everything it starts on a core of its own. What
    sizes itself by the cores it may use (a sweep's or a notebook's worker pool, the fault cases) then takes one
    instead of starting a process per core on both workers at once."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if worker and count and int(count) == len(cpus) > 1:
        os.sched_setaffinity(0, {cpus[int(worker.removeprefix("gw")) % len(cpus)]})


_pin_xdist_worker()

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
    """The session's checkpoint cache folder (pass it as the notebooks' `cache_dir`). Under pytest-xdist the
    workers share one (beside their own temporary folders): the cache builds an entry once however many processes
    ask for it at the same time."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = tmp_path_factory.getbasetemp().parent / "ctc_cache"
        shared.mkdir(exist_ok=True)
        return shared
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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules with a module- or session-scoped fixture of their own (a notebook executed once, the fault cases
    run once: the longest) first, so that `--dist loadfile` with `--no-loadscope-reorder` (make test) hands them
    out first and the short ones fill in behind them."""
    def shared_setup(item: pytest.Item) -> bool:
        info = getattr(item, "_fixtureinfo", None)
        return info is not None and any(d.scope in ("module", "session") and Path(d.func.__code__.co_filename) == item.path
                                        for defs in info.name2fixturedefs.values() for d in defs)
    heavy = {item.path for item in items if shared_setup(item)}
    items.sort(key=lambda item: item.path not in heavy)   # stable: each module keeps its order
