"""`workbench report`: figures and a summary table read back from run logs, including a killed run."""

import json
import subprocess
from pathlib import Path

import pytest

import cli_fork  # tests/cli_fork.py: `python -m workbench` without its imports each time

from workbench.records import Recorder, RunRecord, read_record, summarize
from workbench.run.joint import run_joint
from workbench.run.settings import RunSettings
from workbench.views.report import labelled

SAMPLE = Path(__file__).resolve().parents[2] / "data_samples"


@pytest.mark.slow
def test_report_from_two_runs(ctc_checkpoint, tmp_path):
    logs = []
    for name, precision in (("a", "fp32"), ("b", "fp16")):
        logs.append(tmp_path / f"{name}.h5")
        run_joint(ctc_checkpoint, SAMPLE, RunSettings(name=name, steps=3, precision=precision),
                  log_path=logs[-1])
    proc = subprocess.run(cli_fork.command("report", *map(str, logs), "--out", str(tmp_path / "rep")),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "rep" / "summary.json").read_text())["runs"]
    assert [r["name"] for r in rows] == ["a", "b"] and all(r["steps"] == 3 for r in rows)
    assert (tmp_path / "rep" / "training.png").stat().st_size > 10_000
    assert "| a | finished | 3 |" in (tmp_path / "rep" / "summary.md").read_text()


def test_runs_with_the_same_name_keep_apart():
    a, b = RunRecord({"name": "run"}, path="x/one.h5"), RunRecord({"name": "run"}, path="y/two.h5")
    assert list(labelled([a, b])) == ["run (one.h5)", "run (two.h5)"]
    assert list(labelled([a, RunRecord({"name": "other"})])) == ["run", "other"]


def test_partial_run_is_reported_up_to_its_last_step(tmp_path):
    path = tmp_path / "partial.h5"
    recorder = Recorder(RunRecord(RunSettings(name="partial").to_dict()), log_path=path, flush_seconds=0.0)
    for i, v in enumerate([3.0, 2.5, float("nan")], start=1):
        recorder.writer.log_step(i, {"loss/total": v, "params_finite": i < 3, "skipped": i == 3})
    # never closed: status stays "running", as after a SIGKILL
    row = summarize(read_record(path))
    assert row["status"] == "running" and row["steps"] == 3
    assert row["first_nonfinite_loss_step"] == 3 and row["first_nonfinite_param_step"] == 3
    assert row["skipped_steps"] == [3] and read_record(path).losses["total"][:2] == [3.0, 2.5]
