"""Sweep runner: grid validation, canonical run ids, resume after a killed worker and a killed sweep, bad CLI input."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workbench.cli import main
from workbench.data import DataError
from workbench.records import RunLog, read_record
from workbench.run.joint import run_joint
from workbench.studies.criteria import Rule, run_summary, verdict
from workbench.studies.sweep import Sweep, SweepError, SweepGrid, log_status, make_plan, run_id

SAMPLE = Path(__file__).resolve().parents[2] / "data_samples"
TINY = dict(lr=(1e-4, 1e-3), policy="freeze_params", precision="fp32", semantics="corrected", clip=1.0,
            rnnt_normalization="seed_sqrt_tu", optimizer="adamw", steps=3)


@pytest.fixture()
def checkpoint(ctc_checkpoint):
    return ctc_checkpoint


@pytest.mark.parametrize("axis, value, message", [
    ("freeze_steps", [-1], "freeze_steps: expected an integer >= 0"),
    ("lr", [0.0], "lr: expected a positive learning rate"),
    ("lr", [float("nan")], "lr: expected a positive learning rate"),
    ("policy", ["thaw"], "policy: expected one of none, freeze_params"),
    ("precision", ["fp8"], "precision: expected one of fp32, bf16, fp16"),
    ("clip", [-1.0], "clip: expected a positive max gradient norm"),
    ("optimizer", ["adam"], "optimizer: expected one of adamw, sgd"),
    ("semantics", [], "semantics: expected at least one value"),
    ("steps", 0, "steps: expected a positive integer"),
    ("warmup", [1], "warmup: not a sweep axis"),
])
def test_bad_grid_values_raise_one_line(axis, value, message):
    with pytest.raises(SweepError, match=message):
        SweepGrid(**{axis: value})


def test_grid_points_that_are_the_same_run_share_one_deterministic_id():
    grid = SweepGrid(freeze_steps=[0, 3], policy=["freeze_params", "loss_ramp"], rebuild_at_unfreeze=[True, False], **{
        k: v for k, v in TINY.items() if k != "policy"})
    plan = make_plan(grid)
    assert len(plan.cells) == 2 * 2 * 2 * 2
    n0 = {c["run"] for c in plan.cells if c["axes"]["freeze_steps"] == 0}
    assert len(n0) == 2  # one per lr: every policy and rebuild with N = 0 is the plain joint stage
    # rebuild only matters for freeze_params with N > 0; loss_ramp never rebuilds
    n3 = {(c["axes"]["policy"], c["axes"]["rebuild_at_unfreeze"], c["axes"]["lr"]): c["run"] for c in plan.cells
          if c["axes"]["freeze_steps"] == 3}
    assert n3[("freeze_params", True, 1e-3)] != n3[("freeze_params", False, 1e-3)]
    assert n3[("loss_ramp", True, 1e-3)] == n3[("loss_ramp", False, 1e-3)]
    # one control per lr and run length (3 and 6 steps): a CTC-only run never depends on the decoder's axes
    assert len(plan.controls) == 4 and all(plan.runs[c].ctc_only for c in plan.controls)
    # every run trains the decoder for `steps` after its unfreeze, and its control exactly as many steps
    expected = {(True, "freeze_params", 3): 6, (True, "loss_ramp", 3): 3, (True, "none", 0): 3}
    for cell in plan.cells:
        s = plan.runs[cell["run"]]
        assert s.steps == expected[(True, s.policy, s.freeze_steps)], s
        assert plan.runs[cell["control"]].steps == s.steps
    assert list(make_plan(grid).runs) == list(plan.runs)
    assert all(run_id(s) == rid and s.name == rid for rid, s in plan.runs.items())


def test_the_control_measures_the_attach_step_of_its_run():
    grid = SweepGrid(freeze_steps=[0, 3], fixed={"eval_after_attach": 2}, **{k: v for k, v in TINY.items()
                                                                             if k != "lr"}, lr=1e-3)
    plan = make_plan(grid)
    for cell in plan.cells:
        run, control = plan.runs[cell["run"]], plan.runs[cell["control"]]
        # the run measures at step N + 2 (its attach step N + 1, plus 1); the control at that same step
        assert control.eval_after_attach == run.freeze_steps + 2 and control.steps == run.steps


def test_incomplete_log_is_redone_and_finished_log_kept(checkpoint, tmp_path):
    grid = SweepGrid(freeze_steps=[1], **TINY, controls=False)
    sweep = Sweep(tmp_path / "sw", checkpoint, SAMPLE, grid)
    first, second = list(sweep.plan.runs)
    sweep.log_path(first).parent.mkdir(parents=True)
    run_joint(checkpoint, SAMPLE, sweep.plan.runs[first], log_path=sweep.log_path(first))

    def crash(i, record):
        if i == 2:
            raise KeyboardInterrupt  # a real partial log, as a kill mid-run leaves it
    with pytest.raises(KeyboardInterrupt):
        run_joint(checkpoint, SAMPLE, sweep.plan.runs[second], log_path=sweep.log_path(second), on_step=crash)
    assert log_status(sweep.log_path(second)) == "incomplete"
    kept = sweep.log_path(first).read_bytes()
    partial = sweep.log_path(second).read_bytes()
    # a sweep killed while it wrote index.json leaves its temp file behind
    (sweep.out / ".index.json.99999.tmp").write_text('{"runs": {')

    outcome = sweep.run(workers=1, progress=False)
    assert outcome.reused == [first] and outcome.done == [second] and not outcome.failed
    assert not list(sweep.out.glob(".index.json.*.tmp"))
    assert sweep.log_path(first).read_bytes() == kept
    # the partial log was moved aside with its reason, never deleted
    (aside,) = (sweep.out / "runs" / "set_aside").glob(f"{second}.*.h5")
    assert aside.read_bytes() == partial and len(outcome.set_aside) == 1
    assert "a failed run log (last step 2; error: KeyboardInterrupt()" in \
        aside.with_name(aside.name + ".reason.txt").read_text()
    index = json.loads(sweep.index_path.read_text())
    assert {e["status"] for e in index["runs"].values()} == {"finished"}
    with RunLog(sweep.log_path(second)) as log:
        assert log.status == "finished" and log.last_step() == 4
    record = read_record(sweep.log_path(second))
    assert index["runs"][second]["summary"]["val_per"] == record.attrs["val_per"]
    assert verdict(record, None, Rule())["per_vs_control"] is False  # no control in this sweep
    assert run_summary(record, Rule())["first_nonfinite_step"] == record.first_nonfinite_step() is None


def test_sweep_folder_belongs_to_one_checkpoint(checkpoint, tmp_path):
    grid = SweepGrid(freeze_steps=[0], **TINY, controls=False)
    Sweep(tmp_path / "sw", checkpoint, SAMPLE, grid).scan()
    other = tmp_path / "other.pt"
    other.write_bytes(checkpoint.read_bytes() + b"\0")
    with pytest.raises(SweepError, match="holds a sweep of checkpoint"):
        Sweep(tmp_path / "sw", other, SAMPLE, grid)


@pytest.mark.parametrize("text, message", [
    ('{"format": "workbench-sweep", "ver', "got a file that does not parse"),
    ("", "got an empty file"),
    ('{"format": "workbench-sweep", "version": 1, "runs": []}', "malformed fields checkpoint, checkpoint_sha256, data"),
    ("[]", "got a JSON list"),
])
def test_a_damaged_index_names_itself_and_the_way_out(checkpoint, tmp_path, text, message):
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / "index.json").write_text(text)
    with pytest.raises(SweepError, match=message) as exc:
        Sweep(tmp_path / "sw", checkpoint, SAMPLE, SweepGrid(freeze_steps=[0], **TINY, controls=False))
    assert str(exc.value).startswith(f"{tmp_path / 'sw' / 'index.json'}: expected a sweep index")
    assert "move it away" in str(exc.value) and "\n" not in str(exc.value)


def test_lock_file_keeps_its_content_and_failures_are_one_line(checkpoint, tmp_path, monkeypatch):
    sweep = Sweep(tmp_path / "sw", checkpoint, SAMPLE, SweepGrid(freeze_steps=[0], **TINY, controls=False))
    sweep.out.mkdir()
    (sweep.out / ".lock").write_text("my notes\n")

    def broken(*args, **kwargs):
        raise KeyError(101)
    monkeypatch.setattr("workbench.studies.sweep.runner._execute", broken)
    outcome = sweep.run(workers=1, progress=False)
    assert (sweep.out / ".lock").read_text() == "my notes\n"
    assert set(outcome.failed.values()) == {"KeyError: 101"}


def test_batch_larger_than_the_split_is_refused_before_any_run(checkpoint, tmp_path):
    with pytest.raises(DataError, match="batch_size: expected at most the 40 trials"):
        Sweep(tmp_path / "sw", checkpoint, SAMPLE, SweepGrid(freeze_steps=[0], **TINY, batch_size=41, controls=False))
    assert not (tmp_path / "sw").exists()


def _sweep_cmd(checkpoint, out):
    return [sys.executable, "-m", "workbench", "sweep", "--checkpoint", str(checkpoint), "--data", str(SAMPLE),
            "--out", str(out), "--freeze-steps", "0,2", "--lr", "1e-4,1e-3,3e-3", "--policy", "freeze_params",
            "--precision", "fp32", "--semantics", "corrected", "--clip", "1", "--rnnt-normalization", "seed_sqrt_tu",
            "--optimizer", "adamw", "--steps", "6", "--no-controls", "--workers", "2"]


def _finished(out: Path) -> dict[str, tuple[str, int]]:
    """Finished run logs by name: (sha256, mtime_ns)."""
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted((out / "runs").glob("*.h5")) if log_status(p) == "finished"}


def _start_and_wait(cmd, out: Path, at_least: int, timeout: float = 60.0) -> subprocess.Popen:
    """Start the sweep in its own process group; return once `at_least` runs are finished in its index."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            index = json.loads((out / "index.json").read_text())
            if sum(e["status"] == "finished" for e in index["runs"].values()) >= at_least:
                return proc
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("the sweep did not finish a run in time")


def _worker_pids(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_resume_after_a_killed_worker_and_a_killed_sweep(checkpoint, tmp_path):
    out = tmp_path / "sweep"
    cmd = _sweep_cmd(checkpoint, out)

    # 1. SIGKILL one worker: the sweep notices, records what finished, and exits with status 1
    proc = _start_and_wait(cmd, out, at_least=1)
    os.kill(_worker_pids(proc.pid)[0], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr
    assert "a worker process died" in stdout
    after_worker_kill = _finished(out)
    assert 1 <= len(after_worker_kill) < 6

    # 2. SIGKILL the sweep process alone once it finished one more run: its orphaned workers stop by themselves
    proc = _start_and_wait(cmd, out, at_least=len(after_worker_kill) + 1)
    workers = _worker_pids(proc.pid)
    proc.kill()
    proc.communicate(timeout=10)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert workers and not any(_alive(pid) for pid in workers)
    after_sweep_kill = _finished(out)
    assert set(after_worker_kill) < set(after_sweep_kill)
    for name, stamp in after_worker_kill.items():
        assert after_sweep_kill[name] == stamp

    # 3. the rerun completes only the missing runs and leaves every finished log byte-identical and untouched
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    k = len(after_sweep_kill)
    assert f"6 runs: {k} already finished, {6 - k} run now, 0 failed" in proc.stdout
    final = _finished(out)
    assert len(final) == 6 and len(list((out / "runs").glob("*.h5"))) == 6
    for name, stamp in after_sweep_kill.items():
        assert final[name] == stamp
    index = json.loads((out / "index.json").read_text())
    assert {e["status"] for e in index["runs"].values()} == {"finished"}
    assert not list(out.glob(".index.json.*.tmp"))


@pytest.mark.parametrize("args, message", [
    (["--freeze-steps", "-1"], "error: --freeze-steps: expected an integer >= 0 (steps), got '-1'"),
    (["--freeze-steps", "1.5"], "error: --freeze-steps: expected an integer >= 0 (steps), got '1.5'"),
    (["--lr", "0"], "error: --lr: expected a positive learning rate, got '0'"),
    (["--lr", "1e-5,x"], "error: --lr: expected a positive learning rate, got 'x'"),
    (["--policy", "thaw"], "error: --policy: expected one of none, freeze_params, freeze_and_mute, add_param_group, "
                           "loss_ramp, lr_warmup, got 'thaw'"),
    (["--precision", "fp8"], "error: --precision: expected one of fp32, bf16, fp16, got 'fp8'"),
    (["--rnnt-normalization", "mean"], "error: --rnnt-normalization: expected one of torchaudio_mean"),
    (["--rebuild-at-unfreeze", "maybe"], "error: --rebuild-at-unfreeze: expected yes or no, got 'maybe'"),
    (["--steps", "0"], "error: --steps: expected an integer >= 1, got '0'"),
    (["--workers", "0"], "error: --workers: expected an integer >= 1, got '0'"),
])
def test_bad_sweep_arguments_exit_2_with_one_line(checkpoint, tmp_path, capsys, args, message):
    rc = main(["sweep", "--checkpoint", str(checkpoint), "--data", str(SAMPLE), "--out", str(tmp_path / "s"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "s").exists()


def test_missing_checkpoint_exits_2(tmp_path, capsys):
    rc = main(["sweep", "--checkpoint", str(tmp_path / "none.pt"), "--data", str(SAMPLE), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --checkpoint ") and "expected a checkpoint file (.pt), got nothing" in err


def _measured(after, final, errors_after=(1, 1), rnnt_errors=(3, 3), ratio=1.0):
    """A measure dict as `freeze_lengths.measure` returns it, on two validation utterances of 5 tokens each."""
    return {"ctc_per_after_attach": after, "val_per": final, "val_rnnt_per": sum(rnnt_errors) / 10,
            "rnnt_length_ratio": ratio, "rnnt_functional": 0.5 <= ratio <= 2.0, "rnnt_loss_end": 1.0,
            "steps_to_target": None, "diverged": False, "ctc_errors_after_attach": list(errors_after),
            "rnnt_errors": list(rnnt_errors), "ref_lengths": [5, 5]}


def test_freeze_length_rows_compare_each_run_with_its_step_matched_control():
    from workbench.studies.freeze_lengths import aggregate, conclusions

    # N=100 looks better right after attaching (0.116 vs 0.138), but only as good as its control at step 105
    measured = {"a0": _measured(0.138, 0.2), "a100": _measured(0.116, 0.2), "c5": _measured(0.14, 0.3),
                "c105": _measured(0.116, 0.25)}
    axes = {"policy": "freeze_and_mute", "lr": 1e-5}
    cells = [{"axes": {**axes, "freeze_steps": 0}, "run": "a0", "control": "c5"},
             {"axes": {**axes, "freeze_steps": 100}, "run": "a100", "control": "c105"}]
    rows = aggregate(cells, measured)
    assert [r["ctc_per_after_attach_vs_control"]["median"] for r in rows] == pytest.approx([-0.002, 0.0])
    assert [r["control_ctc_per_after_attach"]["median"] for r in rows] == [0.14, 0.116]
    text = " ".join(conclusions(rows, "test"))
    assert "N=100 0.116 (0.116)" in text and "final CTC PER (its control trained as many steps)" in text
    # the paired comparisons are counted, with what chance alone would give
    assert "2 two-way comparisons across 1 seeds" in text


def _two_seed_rows(ratio_n100):
    from workbench.studies.freeze_lengths import aggregate

    measured, cells = {}, []
    for seed in (0, 1):
        measured[f"a0s{seed}"] = _measured(0.2, 0.2, errors_after=(2, 2), rnnt_errors=(4, 4))
        measured[f"a100s{seed}"] = _measured(0.2, 0.2, errors_after=(3, 2), rnnt_errors=(1, 1), ratio=ratio_n100)
        measured[f"c{seed}"] = _measured(0.2, 0.2, errors_after=(1, 1))
        for n in (0, 100):
            cells.append({"axes": {"policy": "freeze_params", "lr": 1e-3, "freeze_steps": n, "seed": seed},
                          "run": f"a{n}s{seed}", "control": f"c{seed}"})
    return aggregate(cells, measured)


def test_n_is_compared_as_paired_effects_in_errors_and_a_decoder_that_is_not_functional_is_never_ranked():
    from workbench.studies.freeze_lengths import comparisons, conclusions

    compared, tally = comparisons(_two_seed_rows(ratio_n100=1.0))
    ctc, rnnt = compared
    # per seed: (3+2 - 2) - (2+2 - 2) = +1 error after attaching (against each run's own control)
    assert ctc["effect"]["per_seed"] == [1, 1] and ctc["effect"]["diff_errors"] == 1
    assert rnnt["effect"]["per_seed"] == [-6, -6] and rnnt["effect"]["ref_tokens"] == 10
    assert tally.to_dict()["comparisons"] == 2 and tally.to_dict()["all_same_direction"] == 2
    # the N=100 decoder emits 5x the reference: its fewer errors are not a quality, so nothing is compared
    rows = _two_seed_rows(ratio_n100=5.0)
    compared, tally = comparisons(rows)
    assert compared[1]["effect"] is None and "0/2 at N=100" in compared[1]["reason"]
    assert tally.to_dict()["comparisons"] == 1
    text = " ".join(conclusions(rows, "test"))
    assert "N=100 0.2 (length ratio 5, 0/2 functional)" in text
    assert "functional at the end in 2/4 runs" in text
