"""Prescribe, not only explain: try the candidate fixes on a failing run and say which make it healthy.

    diagnosis = diagnose("runs/seed.h5", seeds=3)
    print(diagnosis.table())
    print("\\n".join(diagnosis.lines))

`diagnose` reads the run's outcome and evidence (`evidence.gather`: its causal chain, optimizer coverage, stall
reasons), derives the candidate single changes from the registry (`candidates`), runs the unchanged run (the
control, which must reproduce the failure) and every candidate over the seeds, classifies every run and recommends
the healthy candidate that changes least (`report`). Two kinds of run log:

- joint-stage runs forked from a CTC-warm checkpoint (`workbench run`, sweeps, the notebooks): every run starts
  from that checkpoint with the same data order per seed, through the sweep's runner (`runner`);
- `byo.instrument` sessions and Lightning runs with `WorkbenchCallback`: every run continues the replay bundle the
  run kept beside its log (its first non-finite step, else its first step with a tensor outside the optimizer,
  else its earliest), for K steps on the bundle's captured batches (`continued`); the user's model and loss
  function (or LightningModule) are passed in Python or imported from the class the log names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TextIO

from workbench.records import OutcomeRules, RunRecord, read_record
from workbench.run.settings import RunSettings, SettingsError
from workbench.studies.diagnose import continued
from workbench.studies.diagnose.candidates import CANDIDATES, Candidate, changed, derive
from workbench.studies.diagnose.evidence import KINDS, Evidence, gather
from workbench.studies.diagnose.loop import Loop
from workbench.studies.diagnose.report import Diagnosis, recommend, row
from workbench.studies.diagnose.runner import reusable, run_all, runs_for, same_run, seeds_from
from workbench.train.checkpoint import CheckpointError, check_checkpoint, checkpoint_config, describe_config

__all__ = ["CANDIDATES", "Candidate", "DiagnoseError", "Diagnosis", "Evidence", "KINDS", "diagnose", "gather",
           "notebook_section"]


class DiagnoseError(ValueError):
    """A run log diagnose cannot work from; the message is one line naming the log and what was expected."""


def _control(record: RunRecord, where: str, steps: int | None) -> RunSettings:
    """The run's own settings as the control: its length, or `steps` after its first failing step."""
    if "checkpoint" not in record.attrs:
        why = record.attrs.get("replay_error") or record.attrs.get("tracer_off") or \
            "a byo or Lightning log written without a log path, or before runs kept one"
        raise DiagnoseError(f"{where}: expected the log of a joint-stage run forked from a CTC-warm checkpoint "
                            f"(workbench run, a sweep, the notebooks) or of a byo.instrument or Lightning run that "
                            f"kept a replay bundle, got one with neither a checkpoint nor a replay attribute "
                            f"({why}); diagnose cannot rerun it")
    try:
        control = dataclasses.replace(RunSettings(**record.settings), name="control")
    except (SettingsError, TypeError) as exc:
        raise DiagnoseError(f"{where}: settings: expected this version's run settings, got {exc}") from None
    if steps is not None:
        if steps < 1:
            raise DiagnoseError(f"steps: expected a positive number of steps after the failing step, got {steps}")
        failing = record.first_nonfinite_step() or 0
        try:
            control = dataclasses.replace(control, steps=failing + steps)
        except SettingsError as exc:
            raise DiagnoseError(f"steps: {exc}") from None
    return control


def _source(record: RunRecord, where: str, data: str | Path | None) -> tuple[Path, Path, str]:
    """(checkpoint, data root, model description) of the run; `data` overrides the log's."""
    checkpoint = Path(record.attrs["checkpoint"])
    if not checkpoint.is_file():
        raise DiagnoseError(f"{where}: checkpoint: expected the run's CTC-warm checkpoint at {checkpoint}, got no "
                            f"file there")
    try:
        model = describe_config(checkpoint_config(check_checkpoint(checkpoint), checkpoint))
    except CheckpointError as exc:
        raise DiagnoseError(f"{where}: {exc}") from None
    root = data if data is not None else record.attrs.get("data")
    if root is None:
        raise DiagnoseError(f"{where}: data: the log does not say which data the run trained on (written before "
                            f"runs recorded it); pass the data root (--data)")
    return checkpoint, Path(root), model


@dataclass(frozen=True)
class Tried:
    """One change tried: a candidate, or a candidate followed by one the first one's runs called for (named
    `first+second`), with its settings and what it stands for."""

    name: str
    settings: RunSettings | Loop
    code: str
    coverage: bool
    what: str
    answers: tuple[str, ...]

    @classmethod
    def of(cls, candidate: type[Candidate], settings: RunSettings | Loop) -> Tried:
        return cls(candidate.name, settings, candidate.code, candidate.coverage, candidate.describe(),
                   candidate.answers)

    def then(self, candidate: type[Candidate], settings: RunSettings | Loop) -> Tried:
        return Tried(f"{self.name}+{candidate.name}", settings, f"{self.code}; and {candidate.code}",
                     self.coverage or candidate.coverage, f"{self.what} {candidate.describe()}", candidate.answers)


def _settings(tried: Tried) -> RunSettings:
    assert isinstance(tried.settings, RunSettings)  # a joint-stage run's candidates change its settings
    return tried.settings


def _loop(tried: Tried) -> Loop:
    assert isinstance(tried.settings, Loop)  # a kept bundle's candidates change the loop that continues it
    return tried.settings


def _follow_ups(tried: Sequence[Tried], records: Mapping[tuple[str, int], RunRecord], seeds: Sequence[int],
                only: Sequence[str], rules: OutcomeRules) -> list[Tried]:
    """The second round: a candidate whose runs stayed finite with every tensor in the optimizer but whose loss
    fell too slowly in every seed (evidence `slow_loss`) is tried again with each candidate that answers a slow
    loss (among `only` when given)."""
    out = []
    for first in tried:
        runs = [records.get((first.name, seed)) for seed in seeds]
        if any(r is None for r in runs):
            continue
        kinds = [gather(r, rules).kinds for r in runs]
        if not all("slow_loss" in k and "outside_optimizer" not in k for k in kinds):
            continue
        for cls, settings in derive({"slow_loss": kinds[0]["slow_loss"]}, first.settings):
            if not only or cls.name in only:
                out.append(first.then(cls, settings))
    return out


def diagnose(run: RunRecord | str | Path, *, seeds: int = 3, steps: int | None = None,
             candidates: Sequence[str] = (), out: str | Path | None = None, data: str | Path | None = None,
             workers: int | None = None, device: str = "cpu", reuse: Mapping[str, RunRecord] | None = None,
             reuse_only: bool = False, rules: OutcomeRules = OutcomeRules(),
             progress: bool | TextIO = False, model: Any = None, loss_fn: Any = None,
             module: Any = None) -> Diagnosis:
    """Diagnose a failing run (its record or its log's path): a joint-stage run, or a byo.instrument or Lightning
    run that kept a replay bundle (`_diagnose_kept`; `model` and `loss_fn`, or `module`, are the user's objects;
    there `steps` is the length of every continuation, seeds count from 0, and `data`, `workers` and `reuse` do
    not apply).

    seeds: how many seeds, from the run's own. steps: the candidate runs' length as K steps after the run's first
    non-finite step (default: the run's length). candidates: names to try instead of those the evidence calls for.
    out: the folder of the candidate runs (default `<log>_diagnose/` beside the log). data: the data root when the
    log does not record it. reuse: finished records to take instead of running the same settings again (notebook
    01's sweep); with `reuse_only`, candidates without a reusable run in every seed are left out (named in the
    sentences and `scope["left_out"]`) instead of run. Raises DiagnoseError for a log it cannot rerun, ValueError
    for an unknown candidate name.

    Two rounds: the candidates the run's evidence calls for, then (`_follow_ups`) those their own runs call for.
    """
    record = run if isinstance(run, RunRecord) else read_record(run)
    where = record.path or record.name
    if seeds < 1:
        raise DiagnoseError(f"seeds: expected at least 1, got {seeds}")
    if "checkpoint" not in record.attrs and "replay" in record.attrs:
        return _diagnose_kept(record, where, seeds=seeds, steps=steps, only=tuple(candidates), out=out,
                              device=device, rules=rules, model=model, loss_fn=loss_fn, module=module)
    control = _control(record, where, steps)
    checkpoint, root, model = _source(record, where, data)
    found = gather(record, rules)
    only = tuple(candidates)
    seed_list = seeds_from(control.seed, seeds)
    out = _out(record, where, out)
    known = reusable(reuse or {})
    left_out: list[str] = []
    records: dict[tuple[str, int], RunRecord] = {}
    errors: dict[tuple[str, int], str] = {}
    reused = 0

    def run_round(tried: list[Tried]) -> list[Tried]:
        nonlocal reused
        if reuse_only:
            ready = [t for t in tried if all(same_run(s) in known
                                             for s in runs_for([("", _settings(t))], seed_list).values())]
            left_out.extend(t.name for t in tried if t not in ready)
            tried = ready
        done, failed, n = run_all(runs_for([(t.name, _settings(t)) for t in tried], seed_list), checkpoint=checkpoint,
                                  data=root, out=out, workers=workers, device=device, reuse=known, progress=progress)
        records.update(done)
        errors.update(failed)
        reused += n
        return tried

    tried = _rounds(control, found, only, records, seed_list, rules, run_round)
    scope = {"log": record.path, "run": record.name, "run_outcome": found.outcome.kind, "model": model,
             "checkpoint": str(checkpoint), "data": str(root), "device": device, "steps": control.steps,
             "seeds": seed_list, "lr": control.lr, "precision": control.precision, "semantics": control.semantics,
             "runs": len(records) + len(errors), "reused_runs": reused, "left_out": left_out, "out": str(out)}
    scope_text = (f"{model}, data {root.name}, {device}, {control.precision}, lr {control.lr:g}, {control.steps} "
                  f"steps, seeds {seed_list}")
    found_ = _conclude(control, tried, records, errors, found, seed_list, rules, scope, scope_text)
    if left_out:
        found_.lines.append(f"Left out (no run of theirs to reuse in every seed): {', '.join(left_out)}.")
    return found_


def _out(record: RunRecord, where: str, out: str | Path | None) -> Path:
    """The folder of the candidate runs: `out`, or `<log>_diagnose/` beside the log."""
    if out is not None:
        return Path(out)
    if record.path is None:
        raise DiagnoseError(f"{where}: out: expected a folder for the candidate runs (the record has no log "
                            f"path to put them beside)")
    return Path(record.path).with_name(Path(record.path).stem + "_diagnose")


CONTROL = ("control", "", False, "the run unchanged", ())


def _rounds(control: RunSettings | Loop, found: Evidence, only: tuple[str, ...],
            records: Mapping[tuple[str, int], RunRecord], seeds: Sequence[int], rules: OutcomeRules,
            run_round: Callable[[list[Tried]], list[Tried]]) -> list[Tried]:
    """Run the control and the candidates the evidence calls for, then (`_follow_ups`) those their own runs call
    for; the candidates tried, in order."""
    first = [Tried.of(cls, settings) for cls, settings in derive(found.kinds, control, only)]
    first = run_round([Tried(CONTROL[0], control, *CONTROL[1:]), *first])[1:]
    return first + run_round(_follow_ups(first, records, seeds, only, rules))


def _conclude(control: RunSettings | Loop, tried: Sequence[Tried], records: Mapping[tuple[str, int], RunRecord],
              errors: Mapping[tuple[str, int], str], found: Evidence, seeds: list[int], rules: OutcomeRules,
              scope: dict[str, Any], scope_text: str) -> Diagnosis:
    """The rows of the control and every candidate tried, and the recommendation."""
    def of(name: str) -> tuple[dict[int, RunRecord], dict[int, str]]:
        return ({s: r for (n, s), r in records.items() if n == name},
                {s: e for (n, s), e in errors.items() if n == name})

    def extra(t: Tried) -> dict[str, Any]:
        runs = of(t.name)[0]
        return {"code": t.code, "coverage": t.coverage, "what": t.what,
                "answers": {k: found.kinds[k] for k in t.answers if k in found.kinds},
                "runs": [runs[s].name if s in runs else None for s in seeds]}

    rows = [row(t.name, changed(control, t.settings), *of(t.name), seeds, rules, **extra(t)) for t in tried]
    control_row = row("control", {}, *of("control"), seeds, rules, **extra(Tried(CONTROL[0], control, *CONTROL[1:])))
    control_row["reproduced"] = control_row["outcomes"].count(found.outcome.kind) == len(seeds)
    recommended, lines = recommend(control_row, rows, found.outcome.kind, scope_text)
    return Diagnosis(control_row, rows, recommended, lines, found.kinds, scope)


def _diagnose_kept(record: RunRecord, where: str, *, seeds: int, steps: int | None, only: tuple[str, ...],
                   out: str | Path | None, device: str, rules: OutcomeRules, model: Any, loss_fn: Any,
                   module: Any) -> Diagnosis:
    """Diagnose a byo.instrument or Lightning run from the bundle it kept (`continued`): the control and every
    candidate continue the bundle's step for `steps` steps (default: the run's length) on its captured batches,
    over seeds 0..seeds-1 (a seed sets torch's RNG for those steps)."""
    try:
        kept = continued.load(record, where, model=model, loss_fn=loss_fn, module=module, device=device)
    except continued.KeptError as exc:
        raise DiagnoseError(str(exc)) from None
    if steps is None:
        steps = len(record.steps)
    if steps < 1:
        raise DiagnoseError(f"steps: expected a positive number of steps to continue the kept bundle, got {steps}")
    found = gather(record, rules)
    seed_list = seeds_from(0, seeds)
    folder = _out(record, where, out)
    records: dict[tuple[str, int], RunRecord] = {}
    errors: dict[tuple[str, int], str] = {}

    def run_round(tried: list[Tried]) -> list[Tried]:
        done, failed = continued.run_all(kept, {(t.name, seed): _loop(t) for t in tried for seed in seed_list},
                                         steps, folder)
        records.update(done)
        errors.update(failed)
        return tried

    control = kept.control
    tried = _rounds(control, found, only, records, seed_list, rules, run_round)
    replay = kept.replay
    scope = {"log": record.path, "run": record.name, "run_outcome": found.outcome.kind, "source": replay["source"],
             "model": record.settings.get("model"), "bundle": replay["bundle"], "bundle_step": replay["step"],
             "bundle_why": replay["why"], "batches": f"the bundle's {len(kept.bundle.batches)} captured "
             f"micro-batch(es), repeated every step", "device": device, "steps": steps, "seeds": seed_list,
             "seeds_vary": "torch's RNG during the continued steps (dropout and other draws); the starting state "
                           "and batches are the same in every seed",
             "precision": control.precision, "runs": len(records) + len(errors), "out": str(folder)}
    scope_text = (f"{replay['source']} run of {scope['model']}, its kept bundle of step {replay['step']} "
                  f"({replay['why']}) continued {steps} steps on its captured batches, {device}, "
                  f"{control.precision}, seeds {seed_list}")
    return _conclude(control, tried, records, errors, found, seed_list, rules, scope, scope_text)


def notebook_section(run: RunRecord, records: Mapping[str, RunRecord], *, seeds: int, out: str | Path,
                     configs: Sequence[Mapping[str, Any]] = (), **kwargs: Any) -> tuple[list[dict[str, Any]],
                                                                                        list[str], dict[str, Any]]:
    """Notebook 01's last section in one call: the diagnosis of its seed's run, reusing the sweep's `records`
    where a candidate is one of its configurations (`kwargs` go to `diagnose`). Returns (table rows, sentences,
    summary dict); the sentences end with whether diagnose found, on its own, a change that the notebook's
    configurations (`reproduce.config_rows`: name, outcomes) found healthy in every seed."""
    found = diagnose(run, seeds=seeds, out=out, reuse=records, **kwargs)
    healthy_configs = [c["name"] for c in configs if c["outcomes"].get("healthy", 0) == sum(c["outcomes"].values())]
    lines = list(found.lines)
    same = False
    listed = f" ({', '.join(healthy_configs)})" if healthy_configs else ""
    if found.recommended is None:
        lines.append(f"Diagnose recommended nothing; the notebook's configurations healthy in every seed: "
                     f"{len(healthy_configs)}{listed}.")
    else:
        best = next(r for r in found.candidates if r["name"] == found.recommended)
        configs_run = sorted({name.split("-seed")[0] for name in best["runs"] if name})
        same = bool(set(configs_run) & set(healthy_configs))
        lines.append(f"Diagnose, from the run's evidence alone, recommended {found.recommended} (its runs: "
                     f"{', '.join(configs_run)}): " + ("one of" if same else "not one of")
                     + f" the {len(healthy_configs)} configurations the notebook found healthy in every seed{listed}.")
    summary = {**found.to_json(), "lines": lines, "table": found.table(), "same_as_notebook": same}
    return found.rows(), lines, summary
