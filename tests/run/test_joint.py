"""Joint-stage runs forked from one CTC-warm checkpoint: determinism, coverage, run logs, CLI."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cli_fork  # tests/cli_fork.py: `python -m workbench` without its imports each time

from workbench.records import RunLog, read_record, summarize
from workbench.run.cache import ctc_warm_checkpoint
from workbench.run.joint import run_joint
from workbench.run.settings import RunSettings
from workbench.train.checkpoint import check_checkpoint

SAMPLE = Path(__file__).resolve().parents[2] / "data_samples"


@pytest.fixture()
def checkpoint(ctc_checkpoint):
    return ctc_checkpoint


def test_checkpoint_cache_is_keyed_by_settings(checkpoint, ctc_warmup):
    again, summary = ctc_warm_checkpoint(SAMPLE, cache_dir=checkpoint.parent, log=lambda s: None, **ctc_warmup)
    assert again == checkpoint and summary["stages"][0]["name"] == "ctc_warmup"
    other, _ = ctc_warm_checkpoint(SAMPLE, cache_dir=checkpoint.parent, log=lambda s: None,
                                   **{**ctc_warmup, "steps": 2})
    assert other != checkpoint and not list(checkpoint.parent.glob(".tmp_*"))


@pytest.mark.slow
def test_two_processes_build_one_cache_entry_at_once(tmp_path):
    code = ("import sys; from workbench.run.cache import ctc_warm_checkpoint; "
            "print(ctc_warm_checkpoint(sys.argv[1], 'tiny', steps=3, cache_dir=sys.argv[2], log=lambda s: None)[0])")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(SAMPLE), str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    (path,) = {Path(out.strip()) for out, _ in outs}
    check_checkpoint(path)
    assert {p.name for p in tmp_path.iterdir()} == {path.name, path.with_suffix(".json").name}


def test_two_forks_with_the_same_settings_are_bitwise_identical(checkpoint):
    settings = RunSettings(name="a", steps=3, lr=1e-4, precision="fp32", semantics="corrected", trace=False)
    a = run_joint(checkpoint, SAMPLE, settings)
    b = run_joint(checkpoint, SAMPLE, settings)
    assert a.losses == b.losses
    c = run_joint(checkpoint, SAMPLE, RunSettings(name="c", steps=3, lr=1e-3, precision="fp32",
                                                  semantics="corrected", trace=False))
    assert c.losses["total"][0] == a.losses["total"][0]  # same start, same first batch
    assert c.losses["total"][1:] != a.losses["total"][1:]


def test_coverage_sees_the_stale_optimizer_only_in_the_seed_loop(checkpoint):
    seed = summarize(run_joint(checkpoint, SAMPLE, RunSettings(steps=1, precision="fp32", trace=False)))
    assert seed["outside_optimizer"] and all(n.startswith("rnnt_decoder.") for n in seed["outside_optimizer"])
    fixed = run_joint(checkpoint, SAMPLE, RunSettings(steps=1, precision="fp32", semantics="corrected",
                                                      trace=False))
    assert summarize(fixed)["outside_optimizer"] == []


def test_run_log_holds_every_step(checkpoint, tmp_path):
    log_path = tmp_path / "run.h5"
    result = run_joint(checkpoint, SAMPLE, RunSettings(steps=3, precision="fp32", semantics="corrected",
                                                       policy="freeze_params", freeze_steps=1), log_path=log_path)
    with RunLog(log_path) as log:
        assert log.status == "finished"
        steps, total = log.series("loss/total")
        assert steps.tolist() == [1, 2, 3]
        np.testing.assert_array_equal(total, result.losses["total"])
        assert "grad_norm/encoder" in log.series_names()
        assert [(e["step"], e["event"]) for e in log.table("events")] == [(1, "stage"), (2, "unfreeze")]
        # a request replaces what is pending: step 2 unfreezes, so steps 2-3 are attributed "after unfreeze"
        assert [(a["step"], a["reason"]) for a in log.table("attribution")] == [
            (1, "joint stage start"), (2, "after unfreeze"), (3, "after unfreeze")]
        assert log.attrs["settings"]["policy"] == "freeze_params"
    assert summarize(read_record(log_path)) == summarize(result)


def test_ctc_only_control_never_runs_the_decoder(checkpoint):
    result = run_joint(checkpoint, SAMPLE, RunSettings(steps=2, precision="fp32", semantics="corrected",
                                                       ctc_only=True, trace=False))
    assert "rnnt" not in result.losses and result.attrs["val_rnnt_per"] is None


@pytest.mark.slow
def test_cli_run_and_trace(checkpoint, tmp_path):
    out = tmp_path / "cli.h5"
    proc = subprocess.run(cli_fork.command("run", "--checkpoint", str(checkpoint), "--data", str(SAMPLE), "--out",
                                           str(out), "--steps", "2", "--precision", "fp32"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Batch 2/2 (100%)" in proc.stdout
    proc = subprocess.run(cli_fork.command("trace", str(out)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "optimizer-coverage findings: 2 step(s)" in proc.stdout
    assert "\noutcome: " in proc.stdout and "causal chain: " in proc.stdout
    again = subprocess.run(cli_fork.command("run", "--checkpoint", str(checkpoint), "--out", str(out)),
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already exists" in again.stderr
