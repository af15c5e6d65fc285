"""Integrity of what the workbench reads back: checkpoints (archive CRCs, non-finite state, the CTC-warm cache) and
run logs (manifest and checksum trailer, declared series, logs still being written, runs without a finished step).

The property tests damage small files many times with a seeded generator: every trial either reads back exactly
what was written or is refused with an error naming the file (and the member, series or tensor where there is
one); none reads damaged content silently or changes a run's outcome.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import cli_fork  # tests/cli_fork.py: `python -m workbench` without its imports each time

from workbench.cli import main
from workbench.model import HybridModel, get_config
from workbench.records import RunLog, RunLogError, RunLogWriter, read_record, summarize, to_json
from workbench.records.runlog import RunLogDamaged, check_trailer
from workbench.run.cache import ctc_warm_checkpoint
from workbench.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data_samples"
TRIALS = 60  # per property test


# ------------------------------------------------------------------------------------------------- checkpoints

def _checkpoint(path: Path, *, poison: str | None = None) -> Path:
    """A tiny checkpoint with AdamW state after one update and a GradScaler's state. `poison` names what holds a
    NaN when saved (a damaged state that still has valid archive CRCs): "model", "optimizer" or "scaler"."""
    torch.manual_seed(0)
    model = HybridModel(get_config("tiny"))
    optimizer = torch.optim.AdamW([{"name": "all", "params": list(model.parameters())}], lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    if poison == "model":
        with torch.no_grad():
            next(model.parameters())[0] = math.nan
    if poison == "optimizer":
        optimizer.state[next(model.parameters())]["exp_avg_sq"].fill_(math.nan)
    save_checkpoint(path, model, stage="ctc_warmup", step=1, seed=0, optimizer=optimizer, scaler=scaler)
    if poison == "scaler":
        state = torch.load(path, weights_only=True)
        state["scaler"]["scale"] = math.inf
        torch.save(state, path)
    return path


def _same(a: object, b: object) -> bool:
    """Equal content (NaN equal to NaN), type by type."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.nan_to_num(), b.nan_to_num()))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _flip(data: bytes, rng: random.Random, sizes: tuple[int, ...] = (1, 4, 16, 256, 4096)) -> bytes:
    """`data` with a random byte range (of a random size) XORed with random non-zero bytes."""
    out = bytearray(data)
    n = min(rng.choice(sizes), len(out))
    start = rng.randrange(0, len(out) - n + 1)
    for k in range(start, start + n):
        out[k] ^= rng.randrange(1, 256)
    return bytes(out)


def test_checkpoint_with_4k_flipped_names_file_and_member(tmp_path):
    path = _checkpoint(tmp_path / "ck.pt")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(b ^ 0xFF for b in data[middle:middle + 4096])
    (tmp_path / "flipped.pt").write_bytes(data)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "flipped.pt")
    message = str(exc.value)
    assert message.startswith(f"{tmp_path / 'flipped.pt'}: ") and "/data/" in message and "CRC-32" in message
    assert "\n" not in message


@pytest.mark.parametrize("poison, named", [("optimizer", "optimizer.state.0.exp_avg_sq"),
                                           ("model", "model.preprocessor"), ("scaler", "scaler.scale")])
def test_checkpoint_with_nonfinite_state_names_file_and_tensor(tmp_path, poison, named):
    path = _checkpoint(tmp_path / "ck.pt", poison=poison)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: {named}") and "non-finite" in message, message


def test_run_refuses_damaged_checkpoints_before_any_run(tmp_path):
    good = _checkpoint(tmp_path / "ck.pt")
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / "bit.pt").write_bytes(data)
    _checkpoint(tmp_path / "nan.pt", poison="optimizer")
    for name, text in [("bit.pt", "CRC-32"), ("nan.pt", "exp_avg_sq")]:
        out = tmp_path / f"{name}.h5"
        proc = subprocess.run(cli_fork.command("run", "--checkpoint", str(tmp_path / name),
                                                "--data", str(SAMPLE), "--out", str(out), "--steps", "2"),
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / name}: ") and text in lines[0], lines
        assert not out.exists()


def test_damaged_ctc_warm_cache_entry_is_rebuilt_with_one_line(tmp_path):
    said: list[str] = []
    path, summary = ctc_warm_checkpoint(SAMPLE, "tiny", steps=2, batch_size=4, cache_dir=tmp_path, log=said.append)
    intact = load_checkpoint(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    path.write_bytes(data)
    said.clear()
    again, summary_again = ctc_warm_checkpoint(SAMPLE, "tiny", steps=2, batch_size=4, cache_dir=tmp_path,
                                               log=said.append)
    damaged = [line for line in said if "damaged" in line]
    assert again == path and len(damaged) == 1 and str(path) in damaged[0] and "rebuilding" in damaged[0]
    assert _same(load_checkpoint(path)["model"], intact["model"])  # rebuilt: same seed, same numbers
    assert summary_again["val_per_final"] == summary["val_per_final"]
    path.with_suffix(".json").write_text("{not json")
    said.clear()
    ctc_warm_checkpoint(SAMPLE, "tiny", steps=2, batch_size=4, cache_dir=tmp_path, log=said.append)
    assert sum("damaged" in line and ".json" in line for line in said) == 1
    said.clear()
    ctc_warm_checkpoint(SAMPLE, "tiny", steps=2, batch_size=4, cache_dir=tmp_path, log=said.append)
    assert said == [f"Loaded CTC-warm checkpoint from cache: {path}"]


def test_property_checkpoint_flips_are_reported_or_change_nothing(tmp_path):
    path = _checkpoint(tmp_path / "ck.pt")
    data, intact = path.read_bytes(), load_checkpoint(path)
    rng = random.Random(21)
    damaged = unchanged = 0
    for trial in range(TRIALS):
        flipped = tmp_path / f"flip{trial}.pt"
        flipped.write_bytes(_flip(data, rng))
        try:
            state = load_checkpoint(flipped)
        except CheckpointError as exc:
            assert str(exc).startswith(f"{flipped}: ") and "\n" not in str(exc)
            damaged += 1
        else:
            assert _same(state, intact), f"trial {trial}: damaged content read silently"
            unchanged += 1
        flipped.unlink()
    assert damaged + unchanged == TRIALS and damaged >= TRIALS * 0.9, (damaged, unchanged)


# ---------------------------------------------------------------------------------------------------- run logs

def write_log(path: Path, steps: int = 24, *, close: bool = True) -> RunLogWriter:
    """A run log shaped like a real run's (losses, flags, per-group norms and update ratios, a vector series, event
    tables, results), with a falling loss, so `classify` finds it healthy; left open (running) unless `close`."""
    rng = np.random.default_rng(0)
    w = RunLogWriter(path, attrs={"settings": {"name": "prop", "lr": 1e-3, "steps": steps}, "device": "cpu"})
    w.declare_vector("param_grad_norm", ["enc.w", "enc.b", "joint.w"])
    for s in range(1, steps + 1):
        loss = 8.0 * math.exp(-s / 10) + 0.05 * rng.standard_normal()
        row = {"loss/total": loss, "loss/ctc": loss / 2, "loss/rnnt": loss / 2, "skipped": False,
               "nonfinite_grad": False, "step_ms": 10.0 + s, "params_finite": True, "clip/coefficient": 1.0,
               "clip/total_norm": 2.0 + rng.random(), "param_grad_norm": rng.random(3)}
        for group in ("encoder", "decoder"):
            row[f"grad_norm/{group}"] = 1.0 + rng.random()
            row[f"update_ratio/{group}"] = 1e-3 * (1 + rng.random())
        w.log_step(s, row)
        if s % 8 == 0:
            w.log_event("events", {"step": s, "line": f"checkpoint at step {s}"})
    w.log_event("coverage", {"step": 1, "line": "every tensor with a gradient is in the optimizer"})
    w.set_attrs(val_per=0.25, wall_s=1.5)
    if close:
        w.close()
    return w


def _content(path: Path) -> str:
    record = read_record(path)
    with RunLog(path) as log:
        vectors = {key: log.series(key)[1].tolist() for key in log.series_names() if log.series(key)[1].ndim == 2}
    return to_json([record.settings, record.status, record.steps, record.series, record.tables, record.attrs,
                    vectors])


def _chunk_offset(path: Path, dataset: str) -> int:
    with h5py.File(path, "r") as f:
        return f[dataset].id.get_chunk_info(0).byte_offset


def test_flipped_series_bytes_are_damage_naming_file_and_series(tmp_path):
    path = tmp_path / "run.h5"
    write_log(path)
    data = bytearray(path.read_bytes())
    at = _chunk_offset(path, "series/loss/ctc/value") + 8
    data[at:at + 16] = bytes(b ^ 0x5A for b in data[at:at + 16])
    path.write_bytes(data)
    with pytest.raises(RunLogDamaged) as exc:
        read_record(path)
    assert str(exc.value).startswith(f"{path}: series loss/ctc: damaged")


def test_deleted_series_is_damage_in_closed_and_running_logs(tmp_path):
    for close in (True, False):
        path = tmp_path / f"run_{close}.h5"
        writer = write_log(path, close=close)
        if not close:
            writer._h5.flush()
            shutil.copyfile(path, tmp_path / "copy.h5")  # what a killed run leaves: status "running"
            writer.close()
            shutil.move(tmp_path / "copy.h5", path)
        with h5py.File(path, "a") as f:
            del f["series/clip"]
        with pytest.raises(RunLogDamaged, match=rf"^{path}: series clip/\w+: damaged: missing"):
            read_record(path)


def test_metadata_damage_names_the_file(tmp_path):
    path = tmp_path / "run.h5"
    write_log(path)
    data = bytearray(path.read_bytes())
    data[200:216] = bytes(b ^ 0xFF for b in data[200:216])  # HDF5's metadata near the root group
    path.write_bytes(data)
    with pytest.raises(RunLogError) as exc:
        read_record(path)
    assert str(exc.value).startswith(f"{path}: ") and "\n" not in str(exc.value)


def test_log_without_checksums_is_refused_as_written_by_an_older_version(tmp_path):
    path = tmp_path / "old.h5"
    with h5py.File(path, "w") as f:  # the layout of format version 1 before run logs carried a manifest
        f.attrs.update({"format": "workbench-runlog", "format_version": 1, "status": "finished",
                        "json_attrs": "[]"})
        f.create_dataset("series/loss/step", data=np.arange(3))
        f.create_dataset("series/loss/value", data=np.ones(3))
        f["series/loss"].attrs["kind"] = "float"
    with pytest.raises(RunLogError, match=rf"^{path}: no checksums: written by an older version"):
        read_record(path)


def test_report_refuses_a_log_being_written_and_partial_gives_no_outcome(tmp_path, capsys):
    path = tmp_path / "live.h5"
    writer = write_log(path, close=False)
    try:
        assert main(["report", str(path), "--out", str(tmp_path / "rep")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "a run log still being written" in err[0] and "--partial" in err[0]
        assert main(["report", str(path), "--out", str(tmp_path / "rep"), "--partial"]) == 0
        row = json.loads((tmp_path / "rep" / "summary.json").read_text())["runs"][0]
        assert row["outcome"] is None and row["outcome_reasons"] == ["no outcome: in progress (24 steps flushed so "
                                                                     "far)"]
        assert "no outcome: in progress" in (tmp_path / "rep" / "summary.md").read_text()
        assert main(["trace", str(path)]) == 0
        out = capsys.readouterr().out
        assert "no outcome: in progress" in out and "outcome: healthy" not in out
    finally:
        writer.close()
    assert main(["trace", str(path)]) == 0
    assert "outcome: healthy" in capsys.readouterr().out


def test_a_run_without_a_finished_step_gets_no_outcome(tmp_path, capsys):
    path = tmp_path / "none.h5"
    with pytest.raises(OSError), RunLogWriter(path, attrs={"settings": {"name": "r"}}):
        raise OSError(28, "No space left on device")
    assert summarize(read_record(path))["outcome"] is None  # the one summary every table and notebook shows
    assert main(["trace", str(path)]) == 0
    out = capsys.readouterr().out
    assert "no outcome: interrupted before its first step" in out and "outcome: " not in out.replace("no outcome: ", "")
    assert main(["report", str(path), "--out", str(tmp_path / "rep")]) == 0
    row = json.loads((tmp_path / "rep" / "summary.json").read_text())["runs"][0]
    assert row["outcome"] is None and row["outcome_reasons"] == ["no outcome: interrupted before its first step"]


def _outcome(path: Path) -> str:
    return summarize(read_record(path))["outcome"]


@pytest.mark.parametrize("close", [True, False], ids=["closed", "running"])
def test_property_run_log_flips_are_reported_or_change_nothing(tmp_path, close):
    path = tmp_path / "run.h5"
    writer = write_log(path, close=close)
    if not close:  # a killed run's log (no trailer yet): checked against its manifest as HDF5 parses it
        writer._h5.flush()
        shutil.copyfile(path, tmp_path / "killed.h5")
        writer.close()
        path = tmp_path / "killed.h5"
    data, intact = path.read_bytes(), _content(path)
    rng = random.Random(23)
    damaged = 0
    for trial in range(TRIALS):
        flipped = tmp_path / f"flip{trial}.h5"
        flipped.write_bytes(_flip(data, rng, sizes=(1, 4, 16, 256)))
        try:
            content = _content(flipped)
        except RunLogError as exc:
            assert str(exc).startswith(f"{flipped}: ") and "\n" not in str(exc)
            damaged += 1
        else:
            assert content == intact, f"trial {trial}: damaged content read silently"
        flipped.unlink()
    # a closed log's trailer covers every byte; a running log's free space and unused chunk rows are not content
    assert damaged >= TRIALS * (0.9 if close else 0.5), damaged


@pytest.mark.parametrize("close", [True, False], ids=["closed", "running"])
def test_property_truncation_and_deletion_never_change_the_outcome_silently(tmp_path, close):
    path = tmp_path / "run.h5"
    writer = write_log(path, close=close)
    if not close:
        writer._h5.flush()
        shutil.copyfile(path, tmp_path / "killed.h5")  # a killed run's log: status "running", every step flushed
        writer.close()
        path = tmp_path / "killed.h5"
    data, intact = path.read_bytes(), _outcome(path)
    assert intact == "healthy"
    with h5py.File(path, "r") as f:
        names: list[str] = []
        f["series"].visititems(lambda name, obj: names.append(name) if "kind" in obj.attrs else None)
    rng = random.Random(24)
    errors = 0
    for trial in range(TRIALS):
        damaged = tmp_path / f"t{trial}.h5"
        if trial % 2:
            damaged.write_bytes(data[:rng.randrange(0, len(data))])
        else:
            damaged.write_bytes(data)
            with h5py.File(damaged, "a") as f:
                for key in rng.sample(names, rng.randint(1, 3)):
                    del f[f"series/{key}"]
        try:
            outcome = _outcome(damaged)
        except RunLogError as exc:
            assert str(exc).startswith(f"{damaged}: ") and "\n" not in str(exc)
            errors += 1
        else:
            assert outcome == intact, f"trial {trial}: outcome {outcome} read without a word of damage"
        damaged.unlink()
    assert errors >= TRIALS * 0.9, errors


def test_closed_log_bytes_are_checked_before_hdf5_parses_them(tmp_path):
    path = tmp_path / "run.h5"
    write_log(path)
    assert check_trailer(path) is True
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(data)
    with pytest.raises(RunLogDamaged, match="HDF5 metadata"):
        check_trailer(path)


def test_sweep_resume_reruns_a_damaged_finished_run_with_one_line(ctc_checkpoint, tmp_path):
    from workbench.studies.sweep import Sweep, SweepGrid

    grid = SweepGrid(freeze_steps=[0], lr=[1e-3], policy="freeze_params", precision="fp32", steps=2,
                     controls=False)
    sweep = Sweep(tmp_path / "sw", ctc_checkpoint, SAMPLE, grid)
    first = sweep.run(workers=1, progress=False)
    rid = first.done[0]
    log = sweep.log_path(rid)
    data = bytearray(log.read_bytes())
    at = _chunk_offset(log, "series/loss/total/value")
    data[at:at + 16] = bytes(b ^ 0x5A for b in data[at:at + 16])
    log.write_bytes(data)
    again = sweep.run(workers=1, progress=False)
    assert again.done == [rid] and sorted(again.reused) == sorted(first.done[1:]) and not again.failed
    (line,) = again.set_aside
    assert line.startswith(f"runs/{rid}.h5 -> runs/set_aside/") and "series loss/total: damaged" in line
    assert read_record(log).status == "finished"


@pytest.mark.parametrize("limit, at", [(200 * 1024, "at step 1"), (1024, "before its first step")])
def test_full_disk_during_a_run_is_one_line_and_every_reader_says_where_it_stopped(ctc_checkpoint, tmp_path, limit,
                                                                                  at):
    out = tmp_path / "r.h5"
    # torch 2.6 writes a generated module into the temp folder whenever torch._dynamo is imported (the optimizer
    # does); that write is torch's, not the run log's, so the child imports it first, then takes the file size
    # limit (as `ulimit -f` would), then runs the command. No bytecode writes: a .pyc cut short by the limit would
    # break every later import of that module from this checkout.
    child = (f"import resource, runpy, torch._dynamo; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
             f"runpy.run_module('workbench', run_name='__main__', alter_sys=True)")
    proc = subprocess.run([sys.executable, "-c", child, "run", "--checkpoint", str(ctc_checkpoint), "--data",
                           str(SAMPLE), "--out", str(out), "--steps", "3"], capture_output=True, text=True,
                          timeout=180, cwd=ROOT, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 1, proc.stderr[-3000:]  # not 139 (a segmentation fault)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{out}: write failed {at} (File too large)" in lines[0], lines[:5]
    said = f"{out}: interrupted {at}, write failed (File too large)"
    with pytest.raises(RunLogError, match=said.replace("(", r"\(").replace(")", r"\)")):
        read_record(out)
    for command in (["trace", str(out)], ["report", str(out), "--out", str(tmp_path / "rep")],
                    ["export", str(out), "--tensorboard", str(tmp_path / "tb")]):
        if command[0] == "export":
            pytest.importorskip("tensorboard")
        reader = subprocess.run(cli_fork.command(*command), capture_output=True, text=True,
                                timeout=120, cwd=ROOT)
        assert reader.returncode == 2 and reader.stderr.strip() == f"error: {said}: its run stopped there and its " \
                                                                   f"steps cannot be verified; run it again", command


INTEGRITY_CASES = ("ckpt-bytes-flipped", "ckpt-nonfinite-state", "cache-damaged", "runlog-bytes-flipped",
                   "runlog-series-deleted", "runlog-metadata-damaged", "runlog-no-checksums", "report-being-written",
                   "no-step-no-outcome", "sweep-damaged-finished", "run-disk-full")


def test_readme_lists_every_integrity_case():
    section = (ROOT / "README.md").read_text().split("## Reliability", 1)[1].split("\n## ", 1)[0]
    assert [c for c in INTEGRITY_CASES if f"| `{c}` |" not in section or "(integrity)" not in section] == []


@pytest.mark.parametrize("damage", ["flip loss/ctc", "delete clip"])
def test_trace_report_and_export_refuse_a_damaged_log_in_one_line(tmp_path, capsys, damage):
    path = tmp_path / "run.h5"
    write_log(path)
    if damage == "flip loss/ctc":
        data = bytearray(path.read_bytes())
        at = _chunk_offset(path, "series/loss/ctc/value")
        data[at:at + 16] = bytes(b ^ 0x5A for b in data[at:at + 16])
        path.write_bytes(data)
        named = "series loss/ctc: damaged"
    else:
        with h5py.File(path, "a") as f:
            del f["series/clip"]
        named = "series clip/coefficient: damaged: missing"
    commands = [["trace", str(path)], ["report", str(path), "--out", str(tmp_path / "rep")]]
    try:
        import tensorboard  # noqa: F401
        commands.append(["export", str(path), "--tensorboard", str(tmp_path / "tb")])
    except ImportError:
        pass
    for command in commands:
        assert main(command) == 2, command
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}: {named}"), (command, lines)
        assert "outcome" not in captured.out
    assert not (tmp_path / "rep").exists() and not (tmp_path / "tb").exists()
