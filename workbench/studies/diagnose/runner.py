"""Run the control and every candidate of a diagnosis over the seeds, all forked from the failing run's
CTC-warm checkpoint with the same data order per seed, through the sweep's runner (parallel workers, resumable
folder). Runs already made with the same settings (notebook 01's sweep) are reused instead of run again."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Mapping, Sequence, TextIO

from workbench.records import RunRecord, read_record
from workbench.run.settings import RunSettings, SettingsError
from workbench.studies.sweep import Plan, Sweep
from workbench.studies.sweep.grid import code_stamp
from workbench.studies.sweep.runner import log_status


def same_run(settings: RunSettings) -> RunSettings:
    """`settings` without its name and its validations: two runs with equal keys train the same way (a
    validation changes no training number: same losses and updates with or without it), and `classify` reads only
    the training series."""
    return dataclasses.replace(settings, name="-", eval_at_start=False, eval_at_end=False, eval_after_attach=0)


def reusable(records: Mapping[str, RunRecord]) -> dict[RunSettings, RunRecord]:
    """Finished records indexed by `same_run` of their settings; records whose settings are not this version's
    RunSettings are left out."""
    out = {}
    for record in records.values():
        if record.status != "finished":
            continue
        try:
            out[same_run(RunSettings(**record.settings))] = record
        except (SettingsError, TypeError):
            continue
    return out


def _rid(name: str, settings: RunSettings) -> str:
    """`<candidate>-seed<s>-<hash of the settings and the code>`: a rerun reuses a log only when both match."""
    fields = {**same_run(settings).to_dict(), "code": code_stamp()}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
    return f"{name}-seed{settings.seed}-{digest}"


def run_all(runs: Mapping[tuple[str, int], RunSettings], *, checkpoint: str | Path, data: str | Path,
            out: str | Path, workers: int | None = None, device: str = "cpu",
            reuse: Mapping[RunSettings, RunRecord] | None = None,
            progress: bool | TextIO = False) -> tuple[dict[tuple[str, int], RunRecord], dict[tuple[str, int], str],
                                                      int]:
    """Every (candidate, seed) run: (records, errors of runs that failed, how many were reused). Runs not in
    `reuse` go into the sweep folder `out` (index.json, runs/*.h5), on `workers` processes (default one per
    core)."""
    reuse = reuse or {}
    records: dict[tuple[str, int], RunRecord] = {}
    todo: dict[str, tuple[str, int]] = {}
    planned: dict[str, RunSettings] = {}
    for key, settings in runs.items():
        found = reuse.get(same_run(settings))
        if found is not None:
            records[key] = found
            continue
        rid = _rid(key[0], settings)
        todo[rid] = key
        planned[rid] = dataclasses.replace(same_run(settings), name=rid)  # no validation: half a tiny run's time
    reused = len(records)
    errors: dict[tuple[str, int], str] = {}
    if todo:
        sweep = Sweep(out, checkpoint, data, Plan(planned, [{"axes": {"candidate": k[0], "seed": k[1]}, "run": rid,
                                                            "control": None} for rid, k in todo.items()]),
                      device=device)
        outcome = sweep.run(workers, progress=progress)
        for rid, key in todo.items():
            if log_status(sweep.log_path(rid)) == "finished":
                records[key] = read_record(sweep.log_path(rid))
            else:
                errors[key] = outcome.failed.get(rid, "the run did not finish")
    return records, errors, reused


def seeds_from(first: int, count: int) -> list[int]:
    """`count` seeds from `first` on."""
    return [first + k for k in range(count)]


def runs_for(named: Sequence[tuple[str, RunSettings]], seeds: Sequence[int]) -> dict[tuple[str, int], RunSettings]:
    """Every named settings at every seed."""
    return {(name, seed): dataclasses.replace(settings, seed=seed) for name, settings in named for seed in seeds}
