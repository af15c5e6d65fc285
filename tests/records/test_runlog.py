"""Run log: round trips, refusals and errors, status, live reads, and durability under SIGKILL."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from runlog_writer import step_values
from workbench.records import RunLog, RunLogWriter
from workbench.records.runlog import (
    MANIFEST, TRAILER_MAGIC, USERBLOCK, RunLogDamaged, RunLogError, check_trailer, describe_log,
)

ROOT = Path(__file__).resolve().parents[2]
HELPER = Path(__file__).resolve().parent / "runlog_writer.py"


def test_round_trip(tmp_path):
    path = tmp_path / "run.h5"
    params, vec = ["enc.w", "enc.b", "joint.w"], "grad_norm/per_param"
    attrs = {"seed": 3, "lr": 1e-3, "preset": "tiny", "stages": {"ctc": 300, "joint": 20}}
    with RunLogWriter(path, attrs=attrs) as w:
        w.declare_vector(vec, params)
        w.log_step(0, {"loss/ctc": 2.5, "skipped": 0, "nonfinite": False, vec: np.array([1, 2, 3.5])})
        w.log_step(1, {"loss/ctc": math.inf, "skipped": 1, "nonfinite": True, vec: [0.5, 0.0, math.nan]})
        w.log_step(2, {"loss/ctc": 1.5, "loss/rnnt": 7.0, "loss_scale": 2.0**16, "skipped": 1, "nonfinite": False})
        w.set_attrs(note=["late", 1])
        w.log_event("verdicts", {"step": 1, "module": "joint", "max_abs": math.inf, "min": -math.inf, "mean": math.nan})
        w.log_event("verdicts", {"step": 2, "ok": True, "values": [1.0, math.nan]})
    with RunLog(path) as log:
        assert log.attrs["seed"] == 3 and log.attrs["lr"] == 1e-3 and log.attrs["preset"] == "tiny"
        assert log.attrs["stages"] == {"ctc": 300, "joint": 20}
        assert log.attrs["note"] == ["late", 1]
        assert log.series_names() == [vec, "loss/ctc", "loss/rnnt", "loss_scale", "nonfinite", "skipped"]
        steps, loss = log.series("loss/ctc")
        assert steps.dtype == np.int64 and steps.tolist() == [0, 1, 2]
        assert loss.dtype == np.float64 and loss.tolist() == [2.5, math.inf, 1.5]
        assert log.series("loss/rnnt")[0].tolist() == [2]  # a late series starts at its first step, no fill
        skipped = log.series("skipped")[1]
        assert skipped.dtype == np.int64 and skipped.tolist() == [0, 1, 1]
        flags = log.series("nonfinite")[1]
        assert flags.dtype == np.bool_ and flags.tolist() == [False, True, False]
        steps, grads = log.series(vec)
        assert steps.tolist() == [0, 1] and grads.shape == (2, 3)
        np.testing.assert_array_equal(grads, [[1, 2, 3.5], [0.5, 0.0, math.nan]])
        assert log.labels(vec) == params and log.labels("loss/ctc") is None
        assert sorted(log.scalar_frame("loss")) == ["loss/ctc", "loss/rnnt"]  # not "loss_scale"
        assert sorted(log.scalar_frame()) == ["loss/ctc", "loss/rnnt", "loss_scale", "nonfinite", "skipped"]
        assert log.table_names() == ["verdicts"]
        first, second = log.table("verdicts")
        assert first["module"] == "joint" and first["max_abs"] == math.inf and first["min"] == -math.inf
        assert math.isnan(first["mean"])
        assert second["ok"] is True and second["values"][0] == 1.0 and math.isnan(second["values"][1])
        assert log.last_step() == 2
    with h5py.File(path, "r") as raw:  # the documented layout, read without the reader
        assert raw["series/grad_norm/per_param/value"].dtype == np.float64
        assert raw["series/nonfinite/value"].dtype == np.uint8
        assert raw["series/skipped/step"].maxshape == (None,)
        assert "NaN" not in raw["tables/verdicts"].asstr()[0]  # strict JSON, no allow_nan literals


def test_refuses_to_overwrite(tmp_path):
    path = tmp_path / "run.h5"
    with RunLogWriter(path) as w:
        w.log_step(0, {"loss": 1.0})
    with pytest.raises(FileExistsError, match=str(path)):
        RunLogWriter(path)
    with RunLog(path) as log:
        assert log.series("loss")[1].tolist() == [1.0]
    RunLogWriter(path, overwrite=True).close()
    with RunLog(path) as log:
        assert log.series_names() == []


def test_shape_and_dtype_errors_leave_series_untouched(tmp_path):
    with RunLogWriter(tmp_path / "run.h5") as w:
        w.log_step(0, {"loss": 1.0, "vec": [1.0, 2.0], "count": 3})
        with pytest.raises(ValueError, match="'vec'"):
            w.log_step(1, {"loss": 2.0, "vec": [1.0, 2.0, 3.0]})
        with pytest.raises(ValueError, match="'loss'"):
            w.log_step(1, {"loss": [2.0]})
        with pytest.raises(ValueError, match="'count'"):
            w.log_step(1, {"count": 2.5})
        with pytest.raises(ValueError, match="'loss/ctc'"):
            w.log_step(1, {"loss/ctc": 1.0})
        w.declare_vector("named", ["a", "b"])
        with pytest.raises(ValueError, match="'named'"):
            w.log_step(1, {"named": [1.0, 2.0, 3.0]})
        w.log_step(1, {"count": True})  # widening bool -> int is allowed
    with RunLog(tmp_path / "run.h5") as log:
        assert log.series("loss")[0].tolist() == [0]
        assert log.series("count")[1].tolist() == [3, 1]


def test_missing_names_and_bad_files(tmp_path):
    path = tmp_path / "run.h5"
    with RunLogWriter(path) as w:
        w.log_step(0, {"loss/ctc": 1.0, "loss/rnnt": 2.0})
        w.log_event("stages", {"name": "joint"})
    with RunLog(path) as log:
        with pytest.raises(KeyError, match=r"'loss/joint'.*\['loss/ctc', 'loss/rnnt'\]"):
            log.series("loss/joint")
        with pytest.raises(KeyError, match=r"'loss'.*\['loss/ctc', 'loss/rnnt'\]"):
            log.labels("loss")
        with pytest.raises(KeyError, match=r"'verdicts'.*\['stages'\]"):
            log.table("verdicts")
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        RunLog(tmp_path / "nope.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match="text.h5"):
        RunLog(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as other:
        other["x"] = 1
    with pytest.raises(ValueError, match="other.h5"):
        RunLog(tmp_path / "other.h5")


def test_status_running_finished_failed(tmp_path):
    writer = RunLogWriter(tmp_path / "running.h5")
    with RunLog(tmp_path / "running.h5") as log:
        assert log.status == "running" and log.attrs["format"] == "workbench-runlog" and "created" in log.attrs
        assert log.last_step() is None
    writer.close()
    with RunLog(tmp_path / "running.h5") as log:
        assert log.status == "finished" and "finished" in log.attrs
    with pytest.raises(FloatingPointError, match="boom"):
        with RunLogWriter(tmp_path / "failed.h5") as w:
            w.log_step(0, {"loss": 1.0})
            raise FloatingPointError("boom\nsecond line")
    with RunLog(tmp_path / "failed.h5") as log:
        assert log.status == "failed"
        assert log.attrs["error"] == "FloatingPointError('boom\\nsecond line')"


def test_failed_log_keeps_error_and_last_step(tmp_path):
    with pytest.raises(KeyboardInterrupt), RunLogWriter(tmp_path / "stopped.h5") as w:
        for step in range(1, 4):
            w.log_step(step, {"loss": 1.0})
        raise KeyboardInterrupt
    with RunLog(tmp_path / "stopped.h5") as log:
        assert log.status == "failed" and log.attrs["last_step"] == 3 and log.attrs["error"] == "KeyboardInterrupt()"
    RunLogWriter(tmp_path / "empty_run.h5").close(status="failed")
    with RunLog(tmp_path / "empty_run.h5") as log:
        assert log.attrs["last_step"] is None
    RunLogWriter(tmp_path / "done.h5").close()
    with RunLog(tmp_path / "done.h5") as log:
        assert "last_step" not in log.attrs


def test_unreadable_files_are_one_line_run_log_errors(tmp_path):
    with RunLogWriter(tmp_path / "run.h5") as w:
        w.log_step(1, {"loss": 1.0})
    data = (tmp_path / "run.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[:4000])
    (tmp_path / "empty.h5").write_bytes(b"")
    (tmp_path / "text.h5").write_text("step,loss\n")
    with h5py.File(tmp_path / "v2.h5", "w") as f:
        f.attrs.update({"format": "workbench-runlog", "format_version": 2})
    for name, got in [("cut.h5", "a truncated HDF5 file"), ("empty.h5", "an empty file"),
                      ("text.h5", "a file that is not HDF5"), ("v2.h5", "format 'workbench-runlog' version 2")]:
        with pytest.raises(RunLogError) as exc:
            RunLog(tmp_path / name)
        message = str(exc.value)
        assert message.startswith(f"{tmp_path / name}: expected a run log") and got in message
        assert "\n" not in message


def test_describe_log_names_each_state(tmp_path):
    assert describe_log(tmp_path / "none.h5")[0] == "missing"
    with RunLogWriter(tmp_path / "done.h5") as w:
        w.log_step(4, {"loss": 1.0})
    assert describe_log(tmp_path / "done.h5") == ("finished", "a finished run log (last step 4)")
    writer = RunLogWriter(tmp_path / "killed.h5")
    writer.log_step(2, {"loss": 1.0})
    state, text = describe_log(tmp_path / "killed.h5")
    assert state == "running" and "an interrupted run log" in text and "last step 2" in text
    writer.set_attrs(error="OSError('disk full')")
    writer.close(status="failed")
    failed = "a failed run log (last step 2; error: OSError('disk full'))"
    assert describe_log(tmp_path / "killed.h5") == ("failed", failed)
    (tmp_path / "notes.h5").write_text("mine")
    state, text = describe_log(tmp_path / "notes.h5")
    assert state == "unreadable" and text.startswith("expected a run log")


def test_reader_sees_flushed_steps_while_writer_open(tmp_path):
    path = tmp_path / "run.h5"
    with RunLogWriter(path, flush_every=2) as w:
        for step in range(4):
            w.log_step(step, {"loss": float(step)})
        with RunLog(path) as log:  # the first step flushes at once, then every second one: step 3 waits
            assert log.status == "running"
            assert log.series("loss")[1].tolist() == [0.0, 1.0, 2.0]
        w.log_step(4, {"loss": 4.0})  # closing the reader leaves the writer usable
    with RunLog(path) as log:
        assert log.last_step() == 4 and log.status == "finished"
        assert log.series("loss")[1].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_rows_wait_for_the_flush_that_events_and_time_force(tmp_path, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("workbench.records.runlog.time.monotonic", lambda: clock[0])
    path = tmp_path / "run.h5"
    with RunLogWriter(path, flush_every=100, flush_seconds=1.0) as w:

        def flushed() -> list[float]:
            with RunLog(path) as log:
                return log.series("loss")[1].tolist()

        rows = {"loss": np.zeros(()), "grad": np.zeros(3)}
        w.log_step(1, rows)
        rows["loss"] += 2.0
        w.log_step(2, rows)
        rows["loss"] += 40.0  # the caller reuses its arrays: the pending rows keep the values logged
        rows["grad"] += 1.0
        w.log_step(3, {"loss": 3.0, "grad": [1.0, 2.0, 3.0]})
        assert flushed() == [0.0]  # the first step at once, the next two within the second
        clock[0] += 0.5
        w.log_event("findings", {"kind": "x"})  # an event writes the rows before it
        assert flushed() == [0.0, 2.0, 3.0]
        w.log_step(4, {"loss": 4.0, "grad": [0.0] * 3})
        clock[0] += 1.0
        w.log_step(5, {"loss": 5.0, "grad": [0.0] * 3})  # a second after the last flush: both rows
        assert flushed() == [0.0, 2.0, 3.0, 4.0, 5.0]
        w.log_step(6, {"loss": 6.0, "grad": [0.0] * 3})
    with RunLog(path) as log:
        log.verify()
        assert log.series("loss")[1].tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 6.0]
        assert log.series("grad")[0].tolist() == [1, 2, 3, 4, 5, 6]
        assert log.series("grad")[1][:3].tolist() == [[0.0] * 3, [0.0] * 3, [1.0, 2.0, 3.0]]
    with pytest.raises(ValueError, match="flush_seconds"):
        RunLogWriter(tmp_path / "bad.h5", flush_seconds=-1.0)


def _start_writer(path: Path, n_steps: int, flush_every: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, str(HELPER), str(path), str(n_steps), str(flush_every)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)


def _read_printed(proc: subprocess.Popen, count: int) -> list[int]:
    printed = []
    while len(printed) < count:
        line = proc.stdout.readline()
        assert line, f"writer exited early with code {proc.poll()}"
        printed.append(int(line))
    return printed


def _assert_values(log: RunLog, steps_wanted: list[int]) -> None:
    for key in ("loss", "grad_norm/encoder"):
        steps, values = log.series(key)
        row = {int(s): v for s, v in zip(steps, values)}
        for step in steps_wanted:
            np.testing.assert_array_equal(row[step], step_values(step)[key])


@pytest.mark.timeout(30)
def test_reader_in_other_process_while_writer_holds_file(tmp_path):
    path = tmp_path / "run.h5"
    proc = _start_writer(path, n_steps=25, flush_every=1)
    try:
        printed = _read_printed(proc, 25)  # the writer now idles with the file open
        assert proc.poll() is None
        with RunLog(path) as log:
            assert log.status == "running" and log.last_step() == 24
            _assert_values(log, printed)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("flush_every", [1, 5])
def test_sigkill_keeps_flushed_steps(tmp_path, flush_every):
    path = tmp_path / "run.h5"
    proc = _start_writer(path, n_steps=10**6, flush_every=flush_every)
    try:
        printed = _read_printed(proc, 22)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # Steps 0, 1, 2, ... are printed once log_step returns; only those after the last flush may be lost.
    flushed = printed[: len(printed) // flush_every * flush_every]
    with RunLog(path) as log:
        assert log.status == "running" and log.attrs["run"] == "killed"
        _assert_values(log, flushed)


def _running_copy(tmp_path: Path) -> Path:
    """A copy of a log whose writer is still open after 3 steps and an event: what a killed run leaves."""
    with RunLogWriter(tmp_path / "live.h5", attrs={"seed": 1}) as w:
        for step in range(3):
            w.log_step(step, step_values(step))
        w.log_event("events", {"step": 2, "line": "stage"})
        shutil.copyfile(tmp_path / "live.h5", tmp_path / "killed.h5")
    return tmp_path / "killed.h5"


def test_manifest_declares_what_the_file_holds_and_a_closed_log_ends_with_its_trailer(tmp_path):
    path = tmp_path / "run.h5"
    with RunLogWriter(path, attrs={"seed": 1, "settings": {"lr": 1e-3}}) as w:
        for step in range(3):
            w.log_step(step, step_values(step))
        w.log_event("events", {"step": 2})
    with h5py.File(path, "r") as raw:
        manifest = json.loads(raw[MANIFEST][()].tobytes())
        assert raw.userblock_size == USERBLOCK and raw["series/loss/value"].fletcher32
    assert {k: v["rows"] for k, v in manifest["series"].items()} == {"loss": 3, "grad_norm/encoder": 3}
    assert manifest["tables"]["events"]["rows"] == 1
    assert {"seed", "settings", "status", "created", "finished", "format"} <= set(manifest["attrs"])
    assert path.read_bytes().endswith(TRAILER_MAGIC) and check_trailer(path)
    with RunLog(path) as log:
        log.verify()


def test_a_running_log_keeps_its_declared_rows_and_cannot_be_relabelled_finished(tmp_path):
    path = _running_copy(tmp_path)
    with h5py.File(path, "a") as raw:  # a row flushed after the manifest (a writer killed between the two)
        for name in ("step", "value"):
            raw[f"series/loss/{name}"].resize((4,))
    with RunLog(path) as log:
        assert log.status == "running" and log.series("loss")[0].tolist() == [0, 1, 2]
        log.verify()
        with pytest.raises(KeyError):
            log.series("nope")
    with h5py.File(path, "a") as raw:
        raw.attrs["status"] = "finished"
    with pytest.raises(RunLogDamaged, match="attribute status: damaged"):
        RunLog(path)


def test_attribute_damage_in_a_running_log_names_the_attribute(tmp_path):
    path = _running_copy(tmp_path)
    with h5py.File(path, "a") as raw:
        raw.attrs["seed"] = 2
    with pytest.raises(RunLogDamaged, match=rf"^{path}: attribute seed: damaged"):
        RunLog(path)
    (tmp_path / "again").mkdir()
    path = _running_copy(tmp_path / "again")
    with h5py.File(path, "a") as raw:
        del raw["tables/events"]
    with RunLog(path) as log, pytest.raises(RunLogDamaged, match=rf"^{path}: table events: damaged"):
        log.verify()
