"""Fault injection: every command run as a user would, as a subprocess, with bad input, damaged files, files in the
way and signals. Each case asserts the exit status, exactly one `error: ...` line on stderr naming the file, field
or value, and that every file in the case's folder is byte-identical afterwards (no file added, changed or
removed) unless the case says which files the command may write.

Each command is its own process, forked from a server that did the imports once (tests/cli_fork.py: a fresh
interpreter would spend ~2-3 s importing torch first), except where a signal must reach the command's own process
(`FRESH`). All cases run in one session fixture, one at a time per core this process may use (two at most: a
pytest-xdist worker has one); one test per case then asserts on its result. The README's "Reliability" section
lists the same cases, and a test checks that it does.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import fnmatch
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import h5py
import numpy as np
import pytest
import torch

import cli_fork  # tests/cli_fork.py

from workbench.model import get_config
from workbench.records import RunLog
from workbench.run.joint import run_joint
from workbench.run.settings import RunSettings
from workbench.studies.sweep import SweepGrid, make_plan
from workbench.train.checkpoint import check_checkpoint

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data_samples"
TIMEOUT = 180
WORKERS = min(2, len(os.sched_getaffinity(0)))  # one per core this process may use: more only adds contention


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    before: dict[str, str]
    after: dict[str, str]


@dataclass(frozen=True)
class Case:
    """One fault: `args` after `python -m workbench` ({ck}: the session's CTC-warm checkpoint, {data}: the
    committed sample), run in a folder that `setup` fills; `expect`: texts the one error line must hold;
    `writes`: glob patterns of files the command may add or replace (checked by `check`); `drive`: a custom way
    to run it (signals); `traceback`: the case expects the traceback (--debug) instead of one line; `quiet`: the
    case expects nothing at all on stderr."""

    id: str
    what: str
    args: Sequence[str]
    rc: int
    expect: Sequence[str] = ()
    setup: Callable[[Path, Inputs], None] | None = None
    writes: Sequence[str] = ()
    check: Callable[[Path, Result], None] | None = None
    drive: Callable[[list[str], Path], Result] | None = None
    traceback: bool = False
    quiet: bool = False


# ------------------------------------------------------------------------------------------------------- inputs

@dataclass
class Inputs:
    """Damaged and ordinary files every case copies what it needs from ("ck.pt": the session's checkpoint)."""

    folder: Path
    checkpoint: Path

    def put(self, w: Path, name: str, as_name: str | None = None) -> Path:
        target = w / (as_name or name)
        target.parent.mkdir(parents=True, exist_ok=True)
        source = self.checkpoint if name == "ck.pt" else self.folder / name
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copyfile(source, target)
        return target


def _make_inputs(folder: Path, checkpoint: Path) -> Inputs:
    folder.mkdir()
    ck = checkpoint.read_bytes()
    (folder / "text.pt").write_text("these are my notes, not a checkpoint\n")
    (folder / "trunc.pt").write_bytes(ck[: len(ck) // 3])
    (folder / "empty.pt").write_bytes(b"")
    torch.save({"weights": torch.zeros(3)}, folder / "foreign.pt")
    state = torch.load(checkpoint, weights_only=True)
    torch.save({**state, "model_config": dataclasses.asdict(get_config("small"))}, folder / "mixed.pt")

    settings = RunSettings(steps=2, precision="fp32", trace=False)
    run_joint(checkpoint, SAMPLE, settings, log_path=folder / "finished.h5")

    def crash(i: int, record: object) -> None:
        if i == 2:
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        run_joint(checkpoint, SAMPLE, settings, log_path=folder / "failed.h5", on_step=crash)
    log = (folder / "finished.h5").read_bytes()
    (folder / "trunc.h5").write_bytes(log[:5000])
    (folder / "text.h5").write_text("step,loss\n1,0.5\n")
    (folder / "empty.h5").write_bytes(b"")
    with h5py.File(folder / "other.h5", "w") as other:
        other["x"] = np.arange(3)
    shutil.copyfile(folder / "finished.h5", folder / "v2.h5")
    with h5py.File(folder / "v2.h5", "a") as v2:
        v2.attrs["format_version"] = 2

    shutil.copytree(SAMPLE, folder / "data")
    shutil.copytree(SAMPLE, folder / "noval")
    for path in (folder / "noval").glob("*/data_val.hdf5"):
        path.unlink()
    shutil.copytree(SAMPLE, folder / "misnamed")
    (folder / "misnamed" / "t15.2023.08.13").rename(folder / "misnamed" / "t15_2023_08_13")
    shutil.copytree(SAMPLE, folder / "badtrial")
    with h5py.File(folder / "badtrial" / "t15.2023.08.13" / "data_train.hdf5", "a") as f:
        f["trial_0003/input_features"][5, 7] = np.nan
    shutil.copytree(SAMPLE, folder / "noalign")
    with h5py.File(folder / "noalign" / "t15.2023.08.13" / "data_train.hdf5", "a") as f:
        # L equal labels need 2L - 1 frames (a blank between each two): T // 2 + 2 of them fit T frames one per
        # frame, yet admit no alignment
        labels = int(f["trial_0002"].attrs["n_time_steps"]) // 2 + 2
        f["trial_0002/seq_class_ids"][:labels] = 3
        f["trial_0002"].attrs["seq_len"] = labels
    (folder / "notes").write_text("these are my notes, not data\n")
    (folder / "afolder").mkdir()
    return Inputs(folder, checkpoint)


def _put(*names: str, **renamed: str) -> Callable[[Path, Inputs], None]:
    """A setup copying inputs into the case folder (`renamed`: target name -> input name)."""
    def setup(w: Path, inputs: Inputs) -> None:
        for name in names:
            inputs.put(w, name)
        for target, name in renamed.items():
            inputs.put(w, name, target.replace("__", "/"))
    return setup


def _links(**links: str) -> Callable[[Path, Inputs], None]:
    """A setup making symlinks (name -> target, relative); "loopA"/"loopB" pointing at each other make a loop."""
    def setup(w: Path, inputs: Inputs) -> None:
        for name, target in links.items():
            (w / name).symlink_to(target)
    return setup


def _write(files: dict[str, str], *names: str) -> Callable[[Path, Inputs], None]:
    def setup(w: Path, inputs: Inputs) -> None:
        for name in names:
            inputs.put(w, name)
        for name, text in files.items():
            (w / name).parent.mkdir(parents=True, exist_ok=True)
            (w / name).write_text(text)
    return setup


# ------------------------------------------------------------------------------------------------------ drivers

def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _command(args: Sequence[str], inputs: Inputs, fresh: bool = False) -> list[str]:
    """The command line, through the fork server (tests/cli_fork.py), or a fresh interpreter when `fresh`."""
    fill = {"ck": str(inputs.checkpoint), "data": str(SAMPLE)}
    args = [a.format(**fill) for a in args]
    return [*cli_fork.EXEC, *args] if fresh else cli_fork.command(*args)


def _plain(cmd: list[str], w: Path) -> Result:
    before = _snapshot(w)
    proc = subprocess.run(cmd, cwd=w, capture_output=True, text=True, timeout=TIMEOUT)
    return Result(proc.returncode, proc.stdout, proc.stderr, before, _snapshot(w))


def _after_first_step(cmd: list[str], w: Path, sig: int) -> subprocess.CompletedProcess:
    """Start the command, send `sig` once it printed its first progress line, and wait for it."""
    proc = subprocess.Popen(cmd, cwd=w, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "Batch 1/" in line:
            break
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=TIMEOUT)
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(lines) + out, err)


def _signalled(sig: int) -> Callable[[list[str], Path], Result]:
    def drive(cmd: list[str], w: Path) -> Result:
        before = _snapshot(w)
        proc = _after_first_step(cmd, w, sig)
        return Result(proc.returncode, proc.stdout, proc.stderr, before, _snapshot(w))
    return drive


def _stderr_pump(proc: subprocess.Popen) -> tuple[bytearray, threading.Thread]:
    """Collect `proc`'s stderr in a thread (a progress bar rewrites one line with carriage returns); the only
    reader of that pipe, so join the thread before reading the bytes."""
    err = bytearray()

    def pump() -> None:
        while chunk := os.read(proc.stderr.fileno(), 4096):
            err.extend(chunk)
    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return err, thread


def _ctrl_c_to_group(cmd: list[str], w: Path) -> Result:
    """Start a sweep in its own process group, wait until its two runs (one in a spawned worker) report steps,
    then send SIGINT to the whole group, as a terminal's Ctrl-C does."""
    before = _snapshot(w)
    proc = subprocess.Popen(cmd, cwd=w, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    err, pump = _stderr_pump(proc)
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None and \
            len(re.findall(rb"#\d+ \d+/", bytes(err).split(b"\r")[-1])) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.stdout.read()
    proc.wait(timeout=TIMEOUT)
    pump.join(timeout=TIMEOUT)  # until every process holding the pipe (the workers too) has closed it
    return Result(proc.returncode, out.decode(), bytes(err).decode(), before, _snapshot(w))


def _closed_pipe(cmd: list[str], w: Path) -> Result:
    """The command's stdout is a pipe whose reader is gone (`... | head` after head exited)."""
    before = _snapshot(w)
    proc = subprocess.Popen(cmd, cwd=w, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=TIMEOUT)
    return Result(proc.returncode, "", err, before, _snapshot(w))


def _http_server(cmd: list[str], w: Path) -> Result:
    """An HTTP server (not Ray) listening on a free port of 127.0.0.1, given as `{port}` in the command."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        return _plain([a.replace("{port}", str(server.server_address[1])) for a in cmd], w)
    finally:
        server.shutdown()
        server.server_close()


def _rerun_after_failure(cmd: list[str], w: Path) -> Result:
    """Run a command that fails, then run it again: the second run's result."""
    subprocess.run(cmd, cwd=w, capture_output=True, text=True, timeout=TIMEOUT)
    return _plain(cmd, w)


def _rerun_after_sigkill(cmd: list[str], w: Path) -> Result:
    """SIGKILL the run after its first step (its log stays "running"), then run the same command again."""
    killed = _after_first_step(cmd, w, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    return _plain(cmd, w)


# The drivers whose signal must reach the command's own process: SIGKILL cannot be passed on by the fork server's
# client, and a terminal's Ctrl-C reaches a sweep's workers too.
FRESH = {_ctrl_c_to_group, _rerun_after_sigkill}

# ------------------------------------------------------------------------------------------------------- checks

def _status(path: Path) -> tuple[str, dict]:
    with RunLog(path) as log:
        return log.status, log.attrs


def _failed_with(error: str) -> Callable[[Path, Result], None]:
    def check(w: Path, r: Result) -> None:
        status, attrs = _status(w / "r.h5")
        assert status == "failed" and error in attrs["error"] and attrs["last_step"] >= 1, attrs
    return check


def _killed_log_kept(w: Path, r: Result) -> None:
    status, _ = _status(w / "r.h5")
    assert status == "running"


def _bad_trial_logged(w: Path, r: Result) -> None:
    status, attrs = _status(w / "r.h5")
    assert status == "failed" and "DataError" in attrs["error"] and "last_step" in attrs, attrs


def _replaced(w: Path, r: Result) -> None:
    status, _ = _status(w / "failed.h5")
    assert status == "finished" and not list(w.glob(".*.tmp"))


def _failed_notebook_kept(w: Path, r: Result) -> None:
    assert not (w / "nb" / "03_interactive_explorer.ipynb").exists()
    assert (w / "nb" / "03_interactive_explorer.failed.ipynb").is_file()
    assert "already exist" not in r.stderr and not list((w / "nb").glob(".*.tmp"))


def _two_rows(w: Path, r: Result) -> None:
    rows = json.loads((w / "rep" / "summary.json").read_text())["runs"]
    assert sorted(row["name"] for row in rows) == ["run (a.h5)", "run (b.h5)"]


def _sweep_run_id() -> str:
    plan = make_plan(SweepGrid(freeze_steps=[0], lr=[1e-4], precision=["fp32"], semantics=["corrected"], steps=1,
                               controls=False))
    (rid,) = plan.runs
    return rid


def _sweep_in_the_way(w: Path, inputs: Inputs) -> None:
    (w / "sw" / "runs").mkdir(parents=True)
    (w / "sw" / ".lock").write_text("my notes about this sweep\n")
    inputs.put(w, "v2.h5", f"sw/runs/{_sweep_run_id()}.h5")


def _set_aside(w: Path, r: Result) -> None:
    rid = _sweep_run_id()
    assert (w / "sw" / ".lock").read_text() == "my notes about this sweep\n"
    (kept,) = (w / "sw" / "runs" / "set_aside").glob(f"{rid}.*.h5")
    assert _snapshot(kept.parent)[kept.name] == r.before[f"sw/runs/{rid}.h5"]
    assert "format 'workbench-runlog' version 2" in kept.with_name(kept.name + ".reason.txt").read_text()
    assert _status(w / "sw" / "runs" / f"{rid}.h5")[0] == "finished"
    assert "set aside: " in r.stdout


def _index(text: str) -> Callable[[Path, Inputs], None]:
    return _write({"sw/index.json": text})


OTHER_INDEX = json.dumps({"format": "workbench-sweep", "version": 1, "checkpoint": "/elsewhere/ck.pt",
                          "checkpoint_sha256": "0" * 64, "data": str(SAMPLE), "runs": {}})


def _run(*extra: str, checkpoint: str = "{ck}", data: str = "{data}", out: str = "r.h5", steps: str = "2") -> list[str]:
    return ["run", "--checkpoint", checkpoint, "--data", data, "--out", out, "--steps", steps, "--precision", "fp32",
            *extra]


def _sweep(*extra: str, checkpoint: str = "{ck}", out: str = "sw", steps: str = "1", workers: str = "1",
           lr: str = "1e-4") -> list[str]:
    return ["sweep", "--checkpoint", checkpoint, "--data", "{data}", "--out", out, "--freeze-steps", "0", "--lr",
            lr, "--precision", "fp32", "--semantics", "corrected", "--steps", steps, "--no-controls", "--workers",
            workers, *extra]


SWEEP = _sweep()
LONG_RUN = _run("--no-trace", steps="400")
PRETRAIN = ["pretrain", "--preset", "tiny", "--data", "{data}", "--ctc-steps", "2"]

CASES = [
    # checkpoints
    Case("ckpt-text", "a text file as the checkpoint", _run(checkpoint="text.pt"), 2,
         ["text.pt", "not a torch zip archive"], _put("text.pt")),
    Case("ckpt-truncated", "a checkpoint cut short", _run(checkpoint="trunc.pt"), 2,
         ["trunc.pt", "truncated"], _put("trunc.pt")),
    Case("ckpt-empty", "an empty checkpoint file", _run(checkpoint="empty.pt"), 2,
         ["empty.pt", "an empty file"], _put("empty.pt")),
    Case("ckpt-foreign", "a torch file that is not a workbench checkpoint",
         _run(checkpoint="foreign.pt"), 2, ["foreign.pt", "without model, model_config"],
         _put("foreign.pt")),
    Case("ckpt-missing", "a checkpoint that does not exist", _run(checkpoint="none.pt"), 2,
         ["--checkpoint none.pt", "got nothing (no such file or folder)"]),
    Case("ckpt-folder", "a folder given as --checkpoint", _run(checkpoint="afolder"), 2,
         ["--checkpoint afolder", "expected a checkpoint file", "got a folder"], _put("afolder")),
    Case("ckpt-mismatch", "weights that do not fit the checkpoint's model_config",
         _run(checkpoint="mixed.pt"), 2, ["mixed.pt", "expected weights of the 'small'"],
         _put("mixed.pt")),
    Case("resume-other-preset", "--resume-from a checkpoint of another preset",
         ["train", "--preset", "small", "--data", "{data}", "--resume-from", "ck.pt", "--ctc-steps", "0",
          "--joint-steps", "1", "--out", "o"], 2, ["ck.pt", "expected the 'small' preset, got the 'tiny' preset"],
         _put("ck.pt")),
    Case("resume-text", "--resume-from a text file", [*PRETRAIN, "--resume-from", "text.pt", "--out", "o"], 2,
         ["text.pt", "not a torch zip archive"], _put("text.pt")),
    Case("sweep-ckpt-text", "a sweep from a text checkpoint",
         _sweep(checkpoint="text.pt"), 2, ["text.pt", "expected a workbench checkpoint"], _put("text.pt")),
    # devices
    Case("device-unknown", "--device foo", _run("--device", "foo"), 2, ["--device", "'foo'"]),
    Case("device-absent", "--device cuda:99 (no such GPU)", _run("--device", "cuda:99"), 2,
         ["--device", "'cuda:99'"]),
    Case("train-device-unknown", "train --device foo", [*PRETRAIN, "--out", "o", "--device", "foo"], 2,
         ["--device", "'foo'"]),
    Case("sweep-device-unknown", "sweep --device foo", _sweep("--device", "foo"), 2, ["--device", "'foo'"]),
    # settings that would make the findings false
    Case("clip-nan", "--clip nan", _run("--clip", "nan"), 2, ["--clip", "'nan'"]),
    Case("init-scale-inf", "--init-scale inf", _run("--init-scale", "inf"), 2, ["--init-scale", "'inf'"]),
    Case("seed-negative", "run --seed -1", _run("--seed", "-1"), 2, ["--seed", "'-1'"]),
    Case("sweep-seed-negative", "sweep --seed -1", _sweep("--seed", "-1"), 2, ["--seed", "'-1'"]),
    Case("synth-seed-negative", "synth --seed -1", ["synth", "--out", "d", "--seed", "-1"], 2, ["--seed", "'-1'"]),
    Case("freeze-too-long", "a freeze as long as the run",
         _run("--policy", "freeze_params", "--freeze-steps", "2"), 2, ["--freeze-steps", "never unfreeze"]),
    Case("pretrain-no-steps", "pretrain --ctc-steps 0", ["pretrain", "--ctc-steps", "0", "--out", "o"], 2,
         ["--ctc-steps", "got 0"]),
    Case("run-batch-too-big", "run --batch-size 41 with 40 training trials (hung before)",
         _run("--batch-size", "41"), 2, ["batch_size", "40 trials of the train split", "got 41"]),
    Case("train-batch-too-big", "pretrain --batch-size 41", [*PRETRAIN, "--out", "o", "--batch-size", "41"], 2,
         ["batch_size", "got 41"]),
    Case("sweep-batch-too-big", "sweep --batch-size 41", _sweep("--batch-size", "41"), 2,
         ["batch_size", "got 41"]),
    # files in the way: never overwritten without --overwrite
    Case("run-over-finished", "run --out onto a finished run log", _run(out="finished.h5"), 2,
         ["finished.h5", "a finished run log", "--overwrite"], _put("finished.h5")),
    Case("run-over-failed", "run --out onto a failed run log", _run(out="failed.h5"), 2,
         ["failed.h5", "a failed run log", "disk on fire", "--overwrite"], _put("failed.h5")),
    Case("run-over-killed", "run again where a SIGKILLed run left its log", LONG_RUN, 2,
         ["r.h5", "an interrupted run log", "last step", "--overwrite"], writes=["r.h5"], check=_killed_log_kept,
         drive=_rerun_after_sigkill),
    Case("run-over-notes", "run --out onto a file that is not a run log", _run(out="notes.h5"), 2,
         ["notes.h5", "not a run log"], _put(**{"notes.h5": "text.h5"})),
    Case("run-overwrite", "run --overwrite onto a failed run log", _run("--overwrite", out="failed.h5"),
         0, setup=_put("failed.h5"), writes=["failed.h5"], check=_replaced),
    Case("pretrain-twice", "pretrain --out a folder holding a checkpoint", [*PRETRAIN, "--out", "o"], 2,
         ["o/ctc_warmup.pt", "--overwrite"], _put(**{"o__ctc_warmup.pt": "ck.pt"})),
    Case("train-summary-there", "train --out a folder holding train_summary.json",
         ["train", "--preset", "tiny", "--data", "{data}", "--ctc-steps", "1", "--joint-steps", "1", "--out", "o"], 2,
         ["o/train_summary.json", "--overwrite"], _write({"o/train_summary.json": "{}"})),
    Case("report-over-summary", "report --out a folder holding summary.md",
         ["report", "finished.h5", "--out", "rep"], 2, ["rep/summary.md", "--overwrite"],
         _write({"rep/summary.md": "my table\n"}, "finished.h5")),
    Case("notebooks-over-executed", "notebooks --out a folder holding an executed notebook",
         ["notebooks", "--only", "03", "--out", "nb"], 2, ["nb/03_interactive_explorer.ipynb", "--overwrite"],
         _write({"nb/03_interactive_explorer.ipynb": "{}"})),
    Case("synth-over-data", "synth --out a data root", ["synth", "--out", "data", "--sessions", "2"], 2,
         ["data", "overwrite"], _put("data")),
    Case("sweep-set-aside", "sweep resume with a log of another format version and a user's .lock file", SWEEP, 0,
         setup=_sweep_in_the_way, writes=["sw/index.json", "sw/runs/*"], check=_set_aside),
    # sweep index
    Case("index-truncated", "sweep with a truncated index.json", SWEEP, 2,
         ["sw/index.json", "does not parse", "move it away"], _index('{"format": "workbench-sweep", "vers')),
    Case("index-empty", "sweep with an empty index.json", SWEEP, 2, ["sw/index.json", "an empty file"], _index("")),
    Case("index-list", "sweep with an index.json holding a list", SWEEP, 2, ["sw/index.json", "a JSON list"],
         _index("[1, 2]")),
    Case("index-fields", "sweep with an index.json missing its fields", SWEEP, 2,
         ["sw/index.json", "missing or malformed fields"], _index('{"format": "workbench-sweep", "version": 1}')),
    Case("index-other-checkpoint", "sweep into a folder of another checkpoint's sweep", SWEEP, 2,
         ["holds a sweep of checkpoint"], _index(OTHER_INDEX)),
    Case("sweep-out-file", "sweep --out a file", _sweep(out="notes.txt"), 2,
         ["--out", "notes.txt", "is a file"], _write({"notes.txt": "mine\n"})),
    # run logs
    Case("trace-text", "trace a text file", ["trace", "text.h5"], 2, ["text.h5", "not HDF5"], _put("text.h5")),
    Case("trace-empty", "trace an empty file", ["trace", "empty.h5"], 2, ["empty.h5", "an empty file"],
         _put("empty.h5")),
    Case("trace-truncated", "trace a run log cut short", ["trace", "trunc.h5"], 2, ["trunc.h5", "truncated"],
         _put("trunc.h5")),
    Case("trace-folder", "trace a folder", ["trace", "afolder"], 2,
         ["runlog afolder", "expected a run log file", "got a folder"], _put("afolder")),
    Case("trace-broken-pipe", "trace into a pipe whose reader is gone (| head)", ["trace", "finished.h5"], 141,
         setup=_put("finished.h5"), drive=_closed_pipe, quiet=True),
    Case("trace-other-hdf5", "trace an HDF5 file that is not a run log", ["trace", "other.h5"], 2,
         ["other.h5", "no run-log attributes"], _put("other.h5")),
    Case("report-text", "report a text file", ["report", "finished.h5", "text.h5", "--out", "rep"], 2,
         ["text.h5", "not HDF5"], _put("finished.h5", "text.h5")),
    Case("report-missing", "report a run log that does not exist", ["report", "none.h5", "--out", "rep"], 2,
         ["none.h5", "does not exist"]),
    Case("report-same-names", "report two runs both named `run`", ["report", "a.h5", "b.h5", "--out", "rep"], 0,
         setup=_put(**{"a.h5": "finished.h5", "b.h5": "finished.h5"}), writes=["rep/*"], check=_two_rows),
    # data
    Case("validate-plain-file", "validate a plain file (not HDF5)", ["validate", "notes"], 2,
         ["notes", "expected an .hdf5 data file or a data root folder", "a file that is not HDF5"], _put("notes")),
    Case("validate-dangling", "validate a dangling symlink", ["validate", "gone"], 2,
         ["gone", "a dangling symlink to nowhere"], _links(gone="nowhere")),
    Case("validate-loop", "validate a symlink loop", ["validate", "loopA"], 2, ["loopA", "a symlink loop"],
         _links(loopA="loopB", loopB="loopA")),
    Case("run-data-file", "a plain file as --data", _run(data="notes"), 2,
         ["--data notes", "expected a data root folder", "got a file"], _put("notes")),
    Case("validate-no-alignment", "validate data with a trial no CTC alignment fits (T // 2 + 2 equal labels)",
         ["validate", "noalign"], 2, ["data_train.hdf5", "trial_0002", "n_time_steps", "no CTC alignment"],
         _put("noalign")),
    Case("run-no-alignment", "run on data with a trial no CTC alignment fits", _run(data="noalign"), 2,
         ["data_train.hdf5", "trial_0002", "no CTC alignment"], _put("noalign")),
    Case("validate-misnamed", "validate a root whose session folder is misnamed", ["validate", "misnamed"], 2,
         ["t15_2023_08_13", "t15.YYYY.MM.DD"], _put("misnamed")),
    Case("run-no-val", "run on data without a validation split", _run(data="noval"), 2,
         ["noval", "val"], _put("noval")),
    Case("run-bad-trial", "run on data with a NaN feature in one trial",
         _run(data="badtrial", steps="20"), 2, ["data_train.hdf5", "trial_0003"], _put("badtrial"),
         writes=["r.h5"], check=_bad_trial_logged),
    # where the output cannot go
    Case("run-out-loop", "run --out a symlink loop", _run(out="loopA"), 2, ["--out loopA", "a symlink loop"],
         _links(loopA="loopB", loopB="loopA")),
    Case("run-out-loop-overwrite", "run --out a symlink loop with --overwrite", _run("--overwrite", out="loopA"), 2,
         ["--out loopA", "a symlink loop"], _links(loopA="loopB", loopB="loopA")),
    Case("run-out-dangling", "run --out a dangling symlink", _run(out="gone.h5"), 2,
         ["--out gone.h5", "a dangling symlink to nowhere"], _links(**{"gone.h5": "nowhere/r.h5"})),
    Case("run-out-readonly", "run --out on a read-only file system", _run(out="/sys/r.h5"), 2,
         ["--out", "/sys"]),
    Case("report-out-under-file", "report --out below a file", ["report", "finished.h5", "--out", "notes.txt/rep"],
         2, ["--out", "notes.txt"], _write({"notes.txt": "mine\n"}, "finished.h5")),
    Case("pretrain-out-under-file", "pretrain --out below a file", [*PRETRAIN, "--out", "notes.txt/o"], 2,
         ["--out", "notes.txt"], _write({"notes.txt": "mine\n"})),
    # signals and usage
    Case("run-sigterm", "SIGTERM during a run", LONG_RUN, 143, ["interrupted by SIGTERM", "closed as failed"],
         writes=["r.h5"], check=_failed_with("Terminated"), drive=_signalled(signal.SIGTERM)),
    Case("run-ctrl-c", "Ctrl-C (SIGINT) during a run", LONG_RUN, 130, ["interrupted by Ctrl-C", "closed as failed"],
         writes=["r.h5"], check=_failed_with("KeyboardInterrupt"), drive=_signalled(signal.SIGINT)),
    Case("sweep-ctrl-c-group", "Ctrl-C to the process group of a sweep with a spawned worker",
         _sweep(steps="400", workers="2", lr="1e-4,1e-3"), 130, ["sweep interrupted by Ctrl-C", "resume"],
         writes=["sw/*"], drive=_ctrl_c_to_group),
    Case("ray-not-ray", "sweep --backend ray --address of an HTTP server (hung before)",
         _sweep("--backend", "ray", "--address", "127.0.0.1:{{port}}"), 2,
         ["--address", "127.0.0.1:", "no gRPC handshake", "not a Ray head"], drive=_http_server),
    # notebooks: parameters checked before any cell runs, a failure never blocks the retry
    Case("notebooks-unknown-param", "notebooks -p nosuchparam=3",
         ["notebooks", "--only", "03", "--out", "nb", "-p", "nosuchparam=3"], 2,
         ["nosuchparam", "expected a parameter of 03_interactive_explorer.ipynb"]),
    Case("notebooks-param-type", "notebooks -p seeds=\"zero\"",
         ["notebooks", "--only", "01", "--out", "nb", "-p", 'seeds="zero"'], 2,
         ["seeds (01_reproduce_nan_explosion.ipynb)", "expected a number of seeds >= 1", "'zero'"]),
    Case("notebooks-bad-json", "notebooks -p freeze_steps=[1,2 (malformed JSON)",
         ["notebooks", "--only", "01", "--out", "nb", "-p", "freeze_steps=[1,2"], 2,
         ["freeze_steps", "expected a JSON value", "'[1,2'"]),
    Case("notebooks-no-kernel", "notebooks --kernel that is not installed",
         ["notebooks", "--only", "03", "--out", "nb", "--kernel", "nosuchkernel"], 2,
         ["--kernel", "expected an installed Jupyter kernel", "'nosuchkernel'"]),
    Case("notebooks-retry-after-failure", "notebooks run again after a run that failed in a cell",
         ["notebooks", "--only", "03", "--out", "nb", "--preset", "tiny", "-p", "data=\"nodata\""], 1,
         ["03_interactive_explorer.ipynb", "NotebookFailed: In [", "DataError", "nodata", "kept as",
          "03_interactive_explorer.failed.ipynb"],
         writes=["nb/*"], check=_failed_notebook_kept, drive=_rerun_after_failure),
    # the boundary search's and diagnose's arguments (a search or a diagnosis interrupted resumes from its finished
    # runs: tests/studies/test_boundary.py and the sweep's resume cases above)
    Case("boundary-lo-negative", "notebooks --only 02 -p boundary_lo=-1",
         ["notebooks", "--only", "02", "--out", "nb", "-p", "boundary_lo=-1"], 2,
         ["boundary_lo (02_compare_freeze_lengths.ipynb)", "expected a positive learning rate", "-1"]),
    Case("boundary-precision-unknown", "notebooks --only 02 -p boundary_precisions=[\"fp8\"]",
         ["notebooks", "--only", "02", "--out", "nb", "-p", 'boundary_precisions=["fp8"]'], 2,
         ["boundary_precisions (02_compare_freeze_lengths.ipynb)", "expected one of fp32, bf16, fp16", "'fp8'"]),
    Case("diagnose-missing-log", "diagnose a run log that does not exist", ["diagnose", "none.h5"], 2,
         ["runlog none.h5", "expected a run log file (.h5)", "no such file"]),
    Case("diagnose-seeds-zero", "diagnose --seeds 0", ["diagnose", "finished.h5", "--seeds", "0"], 2,
         ["--seeds", "'0'"], _put("finished.h5")),
    Case("usage-missing-out", "run without --out", ["run", "--checkpoint", "x.pt"], 2,
         ["the following arguments are required: --out"]),
    Case("debug-traceback", "--debug shows the traceback", ["--debug", "run", "--checkpoint", "text.pt", "--out",
                                                             "r.h5"], 1, ["CheckpointError", "text.pt"],
         _put("text.pt"), traceback=True),
]


def _unreadable(w: Path, inputs: Inputs) -> None:
    inputs.put(w, "ck.pt", "locked/ck.pt")
    (w / "locked").chmod(0)


if os.geteuid() != 0:  # root enters any folder: the case cannot happen there
    CASES.append(Case("ckpt-unreadable-folder", "a checkpoint in a folder this user cannot enter",
                      _run(checkpoint="locked/ck.pt"), 2, ["--checkpoint locked/ck.pt", "cannot enter"], _unreadable))

# -------------------------------------------------------------------------------------------------------- tests

@pytest.fixture(scope="session")
def results(ctc_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory,
            request: pytest.FixtureRequest) -> dict[str, tuple[Path, Result]]:
    root = tmp_path_factory.mktemp("faults")
    inputs = _make_inputs(root / "inputs", ctc_checkpoint)
    folders = {}
    # only the cases this session selected (`-k`), all when no test_fault case was selected
    chosen = {item.callspec.params["case"].id for item in request.session.items
              if hasattr(item, "callspec") and isinstance(item.callspec.params.get("case"), Case)}
    cases = [case for case in CASES if case.id in chosen] or CASES
    for case in cases:
        folders[case.id] = root / case.id
        folders[case.id].mkdir()
        if case.setup is not None:
            case.setup(folders[case.id], inputs)
    # The cases that run steps start first, so the pool's last minutes are not one long case alone.
    order = sorted(cases, key=lambda c: c.drive is None and not c.writes)
    with cf.ThreadPoolExecutor(WORKERS) as pool:
        futures = {case.id: pool.submit(case.drive or _plain, _command(case.args, inputs, case.drive in FRESH),
                                        folders[case.id])
                   for case in order}
        return {cid: (folders[cid], future.result()) for cid, future in futures.items()}


# progress on stderr (a sweep's bar, papermill's bar rewritten in place) and the kernel's start-up notice
PROGRESS_BAR = re.compile(r"(sweep|Executing): +\d+%\||\[IPKernelApp\] WARNING")


def test_cases_are_distinct_and_at_least_forty():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault(case: Case, results: dict[str, tuple[Path, Result]]) -> None:
    folder, r = results[case.id]
    assert r.rc == case.rc, f"stdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-4000:]}"
    if case.traceback:
        assert "Traceback" in r.stderr and all(text in r.stderr for text in case.expect), r.stderr
    elif case.quiet:
        assert r.stderr == "", r.stderr
    elif case.rc != 0:
        lines = [line for line in re.split(r"[\r\n]+", r.stderr) if line.strip() and not PROGRESS_BAR.match(line)]
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        for text in case.expect:
            assert text in lines[0], lines[0]
    kept = {name: digest for name, digest in r.before.items()
            if not any(fnmatch.fnmatch(name, pattern) for pattern in case.writes)}
    assert {name: r.after.get(name) for name in kept} == kept, "a file that existed was changed or removed"
    added = set(r.after) - set(r.before)
    assert all(any(fnmatch.fnmatch(name, pattern) for pattern in case.writes) for name in added), added
    if case.check is not None:
        case.check(folder, r)


def test_shared_inputs_are_untouched(results: dict[str, tuple[Path, Result]], ctc_checkpoint: Path) -> None:
    sums = dict(line.split()[::-1] for line in (SAMPLE / "SHA256SUMS").read_text().splitlines())
    for name, digest in sums.items():
        assert hashlib.sha256((SAMPLE / name).read_bytes()).hexdigest() == digest, name
    check_checkpoint(ctc_checkpoint)


def test_readme_lists_every_case() -> None:
    section = (ROOT / "README.md").read_text().split("## Reliability", 1)[1].split("\n## ", 1)[0]
    missing = [c.id for c in CASES if f"`{c.id}`" not in section]
    assert not missing, f"add these fault cases to the README's Reliability table: {missing}"


def test_make_clean_keeps_user_runs(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    shutil.copyfile(ROOT / "Makefile", tmp_path / "Makefile")
    for folder in ("runs/demo/train", "runs/cache", "runs/browser", "runs/real", "runs/nb01", ".pytest_cache"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "x.h5").write_text("x")
    proc = subprocess.run(["make", "clean"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("x.h5"))
    assert left == ["runs/nb01/x.h5", "runs/real/x.h5"]
