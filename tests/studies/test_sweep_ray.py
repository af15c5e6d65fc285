"""The Ray backend of the sweep: the same grid as the local process pool gives the same run logs and index, a run
whose Ray worker is killed is redone by the next run of the sweep, and bad backend input is one line, exit 2.

What "the same run logs" means here: two runs of one setting write identical bytes except where a log records
the wall clock, so the comparison reads both files and requires equal: every series' steps and values but
`step_ms` (a step's wall time), every event table row, and every root attribute but `created`, `finished` (times
of day) and `wall_s` (the run's wall time). The index entries must be equal except each summary's `wall_s` and
`log` path.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from workbench.cli import main
from workbench.studies.sweep import Sweep, SweepGrid, log_status

SAMPLE = Path(__file__).resolve().parents[2] / "data_samples"
GRID = dict(lr=(1e-4, 1e-3), policy="freeze_params", precision="fp32", semantics="corrected", clip=1.0,
            rnnt_normalization="seed_sqrt_tu", optimizer="adamw", controls=False)
CLOCK_ATTRS = ("created", "finished", "wall_s")
CLOCK_SERIES = ("step_ms",)


def _content(path: Path) -> dict:
    """The deterministic content of a run log (see the module docstring)."""
    out: dict = {"series": {}, "tables": {}, "attrs": {}}
    with h5py.File(path, "r", locking=False) as f:
        f["series"].visititems(lambda name, obj: out["series"].__setitem__(name, obj[()].tobytes())
                               if isinstance(obj, h5py.Dataset) and name.rsplit("/", 1)[0] not in CLOCK_SERIES
                               else None)
        for name in f.get("tables", {}):
            out["tables"][name] = [s.decode() if isinstance(s, bytes) else s for s in f["tables"][name][()]]
        out["attrs"] = {k: np.asarray(v).tobytes() for k, v in f.attrs.items() if k not in CLOCK_ATTRS}
    return out


def _index(out: Path) -> dict:
    runs = json.loads((out / "index.json").read_text())["runs"]
    for entry in runs.values():
        entry["summary"] = {k: v for k, v in (entry["summary"] or {}).items() if k not in ("wall_s", "log")}
    return runs


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    import logging

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_backend_writes_the_same_logs_and_index_as_the_process_pool(ctc_checkpoint, tmp_path, local_ray):
    grid = SweepGrid(freeze_steps=[1], steps=3, **GRID)
    pool = Sweep(tmp_path / "pool", ctc_checkpoint, SAMPLE, grid)
    ray = Sweep(tmp_path / "ray", ctc_checkpoint, SAMPLE, grid, backend="ray")
    done = []
    a = pool.run(2, progress=False)
    b = ray.run(progress=False, on_run_done=lambda rid, record: done.append((rid, record.status)))
    assert sorted(a.done) == sorted(b.done) == sorted(pool.plan.runs) and not a.failed and not b.failed
    assert sorted(done) == [(rid, "finished") for rid in sorted(pool.plan.runs)]
    for rid in pool.plan.runs:
        assert _content(pool.log_path(rid)) == _content(ray.log_path(rid)), rid
    assert _index(pool.out) == _index(ray.out)


def _ray_tasks_writing_logs(folder: Path) -> list[int]:
    """Pids of the Ray workers running a sweep task that hold one of `folder`'s run logs open."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if not (entry / "cmdline").read_bytes().startswith(b"ray::_ray_run"):
                    continue
                targets = [os.readlink(fd) for fd in (entry / "fd").iterdir()]
            except OSError:
                continue
            if any(t.startswith(str(folder)) and t.endswith(".h5") for t in targets):
                pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_a_killed_ray_task_is_redone_by_the_next_run_and_finished_logs_stay(ctc_checkpoint, tmp_path, local_ray):
    grid = SweepGrid(freeze_steps=[0], lr=(1e-4, 1e-3, 3e-3), **{k: v for k, v in GRID.items() if k != "lr"},
                     steps=40)
    sweep = Sweep(tmp_path / "sw", ctc_checkpoint, SAMPLE, grid, backend="ray")
    killed: list[int] = []

    def kill_one_task() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            pids = _ray_tasks_writing_logs((sweep.out / "runs").resolve())
            if pids:
                time.sleep(0.5)  # some steps in
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_task)
    killer.start()
    first = sweep.run(progress=False)
    killer.join()
    assert killed and first.interrupted and not first.failed
    assert len(first.done) == 2, first
    (lost,) = set(sweep.plan.runs) - set(first.done)
    assert log_status(sweep.log_path(lost)) == "incomplete"
    kept = {rid: (sweep.log_path(rid).read_bytes(), sweep.log_path(rid).stat().st_mtime_ns) for rid in first.done}

    second = sweep.run(progress=False)
    assert second.done == [lost] and sorted(second.reused) == sorted(first.done) and len(second.set_aside) == 1
    for rid, (data, mtime) in kept.items():
        assert (sweep.log_path(rid).read_bytes(), sweep.log_path(rid).stat().st_mtime_ns) == (data, mtime)
    index = json.loads(sweep.index_path.read_text())
    assert {e["status"] for e in index["runs"].values()} == {"finished"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args, message", [
    (["--backend", "dask"], "error: --backend: expected one of local, ray, got 'dask'"),
    (["--address", "127.0.0.1:6379"], "error: --address: only the ray backend connects to a cluster"),
    (["--backend", "ray", "--address", "nohost:port"], "error: --address: expected HOST:PORT of a Ray cluster's head"),
])
def test_bad_backend_input_is_one_line_exit_2(ctc_checkpoint, tmp_path, capsys, args, message):
    rc = main(["sweep", "--checkpoint", str(ctc_checkpoint), "--data", str(SAMPLE), "--out", str(tmp_path / "s"),
               *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "s").exists()


def test_an_unreachable_ray_address_is_one_line_exit_2(ctc_checkpoint, tmp_path, capsys):
    pytest.importorskip("ray")
    address = f"127.0.0.1:{_free_port()}"
    rc = main(["sweep", "--checkpoint", str(ctc_checkpoint), "--data", str(SAMPLE), "--out", str(tmp_path / "s"),
               "--backend", "ray", "--address", address])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --address: no Ray cluster answers at {address} (Connection refused)")
    assert not (tmp_path / "s").exists()
