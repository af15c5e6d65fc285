"""Command line: `workbench SUBCOMMAND ...` or `python -m workbench SUBCOMMAND ...`.

The flags of `train`, `pretrain`, `run` and `sweep` are derived from the settings schema
(`workbench.run.settings`): one flag per setting, checked by the setting's own rules. Every failure ends with one
line on stderr: exit status 2 for bad input (checked before any work starts), 1 for a failure during a run, 130
for Ctrl-C and 143 for SIGTERM (a run log then closes as "failed"), 141 quietly when the reader of the output
went away (`| head`); `--debug` shows the traceback instead.
Nothing that exists is overwritten without `--overwrite`, and replacements go through a temporary file and a
rename, so a failed write leaves the old file as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Iterator, NoReturn, Sequence

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a tool killed by the signal reports


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class NotebookFailed(Exception):
    """A notebook's cell raised: the cell and its error, without the notebook's traceback."""


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so runs end as they do on Ctrl-C: their logs close as "failed"."""


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line (`error: workbench run: ...`), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_settings(parser: argparse.ArgumentParser, cls: type, *, exclude: Sequence[str] = (),
                 defaults: dict[str, Any] | None = None, lists: bool = False) -> None:
    """One flag per setting of `cls` (values parsed later by `settings_from`, so errors name the flag).

    With `lists`, sweepable settings take comma-separated values.
    """
    from workbench.run.settings import defaults_of, settings_of

    shown = {**defaults_of(cls), **(defaults or {})}
    for name, setting in settings_of(cls).items():
        if name in exclude:
            continue
        check = setting.check
        choices = f" ({', '.join(check.choices())})" if check.choices is not None else ""
        many = lists and setting.axis
        default = shown[name]
        shown_default = str(default).lower() if isinstance(default, bool) else default
        help_text = f"{setting.help}{choices}; default {shown_default}"
        if many:
            parser.add_argument(_flag(name), dest=name, help=f"comma-separated values: {help_text}")
        elif check.kind is bool and not check.optional:
            parser.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=setting.help)
        else:
            parser.add_argument(_flag(name), dest=name, help=help_text)


def settings_from(cls: type, args: argparse.Namespace, *, exclude: Sequence[str] = (),
                  defaults: dict[str, Any] | None = None, **fixed: Any) -> Any:
    """An instance of `cls` from parsed flags (flags not given take `defaults`, then the class's defaults)."""
    from workbench.run.settings import SettingsError, settings_of

    values: dict[str, Any] = {**(defaults or {}), **fixed}
    for name, setting in settings_of(cls).items():
        raw = getattr(args, name, None)
        if name in exclude or name in fixed or raw is None:
            continue
        values[name] = raw if isinstance(raw, bool) else _parse(name, setting, raw)
    try:
        return cls(**values)
    except SettingsError as exc:
        name, _, detail = str(exc).partition(": ")
        raise CliError(f"{_flag(name)}: {detail}") from None


def _parse(name: str, setting: Any, text: str) -> Any:
    try:
        return setting.check.parse(text)
    except ValueError as exc:
        raise CliError(f"{_flag(name)}: expected {exc}, got {text!r}") from None


def axis_values(args: argparse.Namespace) -> dict[str, list[Any]]:
    """The sweep axes given on the command line, each a list of checked values."""
    from workbench.run.settings import axes

    out = {}
    for name, setting in axes().items():
        raw = getattr(args, name, None)
        if raw is not None:
            out[name] = [_parse(name, setting, part) for part in raw.split(",")]
    return out


def _integer(flag: str, text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise CliError(f"{flag}: expected an integer >= {minimum}, got {text!r}")
    return value


def _positive(flag: str, text: str) -> int:
    return _integer(flag, text, 1)


def check_device(flag: str, text: str) -> str:
    """`auto`, `cpu`, `cuda` or `cuda:N` for a GPU that is there; CliError naming what is available otherwise."""
    import torch

    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if text in ("auto", "cpu"):
        return text
    if match is None:
        raise CliError(f"{flag}: expected auto, cpu, cuda or cuda:N, got {text!r}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise CliError(f"{flag}: expected a device that is available (auto, cpu; no CUDA GPU is visible), got "
                       f"{text!r}")
    if match.group(1) is not None and int(match.group(1)) >= count:
        raise CliError(f"{flag}: expected auto, cpu, cuda or cuda:0 to cuda:{count - 1}, got {text!r}")
    return text


def _writable(flag: str, folder: Path) -> None:
    """Create `folder` when needed and write a probe file in it, so an unwritable --out fails before any work."""
    if folder.exists() and not folder.is_dir():
        raise CliError(f"{flag}: expected a folder, got {folder}, which is a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CliError(f"{flag}: expected a folder this user can write to, got {folder} "
                       f"({exc.strerror or exc})") from None


def _input(flag: str, path: str | Path, what: str, *, folder: bool = False) -> Path:
    """`path` when it is a regular file (or a folder, with `folder`), else CliError saying what is there instead
    (a folder, a symlink loop, a dangling symlink, nothing, a folder this user cannot enter)."""
    from workbench.data.paths import require

    try:
        return require(path, what, folder=folder)
    except ValueError as exc:
        raise CliError(f"{flag} {exc}") from None


def _output_file(flag: str, path: Path) -> None:
    """An output file path must be new, a file, or a symlink to one: a symlink loop or a dangling symlink is
    refused, also with --overwrite (writing through it would fail or land somewhere unexpected)."""
    from workbench.data.paths import describe_path

    what = describe_path(path)
    if path.is_symlink() and what not in ("a file", "an empty file"):
        raise CliError(f"{flag} {path}: expected a new file or a run log to replace, got {what}")


def _refuse_existing(flag: str, paths: Sequence[Path], overwrite: bool) -> None:
    """Refuse to write over files that exist unless `--overwrite` was given."""
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise CliError(f"{flag}: {', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; choose "
                       f"another {flag}, or pass --overwrite to replace "
                       f"{'it' if len(existing) == 1 else 'them'}")


def _write_text(path: Path, text: str) -> None:
    """Write through a temporary file of this process and a rename: a failed write leaves the old file intact."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _say(line: str) -> None:
    """A progress line; a stop requested by a signal whose exception got lost takes effect here."""
    _raise_stop()
    print(line, flush=True)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ---------------------------------------------------------------------------------------------- commands

def cmd_synth(args: argparse.Namespace) -> int:
    from workbench.data.synth import write_dataset

    sessions, trials = _positive("--sessions", args.sessions), _positive("--trials", args.trials)
    seed = _integer("--seed", args.seed, 0)
    _writable("--out", Path(args.out))
    paths = write_dataset(args.out, sessions=sessions, trials=trials, seed=seed, lengths=args.lengths,
                          overwrite=args.overwrite)
    for p in paths:
        print(p)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from workbench.data import summarize

    for line in summarize(args.path):
        print(line)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from workbench.model import get_config
    from workbench.run.settings import TrainSettings
    from workbench.run.staged import run_training
    from workbench.studies.sweep.runner import check_data
    from workbench.train.checkpoint import check_checkpoint
    from workbench.train.stages import STAGE_NAMES, seed_stages

    defaults = {"joint_steps": 0} if args.command == "pretrain" else {}
    cfg = settings_from(TrainSettings, args, defaults=defaults)
    if args.command == "pretrain" and cfg.ctc_steps == 0:
        raise CliError("--ctc-steps: expected at least 1 for pretrain (it writes the CTC-warm checkpoint), got 0")
    check_device("--device", cfg.device)
    done: tuple[str, ...] = ()
    if cfg.resume_from:
        _input("--resume-from", cfg.resume_from, "a checkpoint file (.pt)")
        state = check_checkpoint(cfg.resume_from, get_config(cfg.preset), stages=STAGE_NAMES)
        done = STAGE_NAMES[: STAGE_NAMES.index(state["stage"]) + 1]
    check_data(cfg.data, [cfg.batch_size], cfg.max_sessions)
    out = Path(cfg.out)
    stages = [s.name for s in seed_stages(cfg.ctc_steps, cfg.joint_steps, cfg.mode_steps) if s.name not in done]
    _refuse_existing("--out", [out / f"{name}.pt" for name in stages] + [out / "train_summary.json"],
                     args.overwrite)
    _writable("--out", out)
    summary = run_training(cfg, log=_say)
    _write_text(out / "train_summary.json", json.dumps(summary, indent=2, default=str))
    print(f"Validation PER: untrained {summary['val_per_initial']:.3f} -> final {summary['val_per_final']:.3f}")
    print(f"Summary written to {out / 'train_summary.json'}")
    return 0


def _existing_log(out: Path, overwrite: bool) -> None:
    """Refuse to run into a file that exists, saying what it holds, unless --overwrite."""
    from workbench.records.runlog import describe_log

    if not out.exists() or overwrite:
        return
    state, description = describe_log(out)
    if state == "finished":
        raise CliError(f"--out {out}: {description} already exists; choose another --out, or pass --overwrite to "
                       f"replace it")
    if state == "unreadable":
        raise CliError(f"--out {out}: a file that is not a run log is already there ({description}); choose "
                       f"another --out, or pass --overwrite to replace it")
    raise CliError(f"--out {out}: {description} is there; rerun with --overwrite to start the run again and replace "
                   f"it, or choose another --out")


def cmd_run(args: argparse.Namespace) -> int:
    from workbench.run.joint import run_joint
    from workbench.run.settings import RunSettings
    from workbench.run.staged import progress_line
    from workbench.studies.sweep.runner import check_data
    from workbench.train.checkpoint import check_checkpoint

    settings = settings_from(RunSettings, args)
    device = check_device("--device", args.device)
    check_checkpoint(_input("--checkpoint", args.checkpoint, "a checkpoint file (.pt)"))
    check_data(_input("--data", args.data, "a data root folder (t15.YYYY.MM.DD session folders)", folder=True),
               [settings.batch_size])
    out = Path(args.out)
    _output_file("--out", out)
    if out.is_dir():
        raise CliError(f"--out: expected a run log file (.h5), got {out}, which is a folder")
    _existing_log(out, args.overwrite)
    _writable("--out", out.parent)
    # A replacement is written beside the old file and renamed over it only once the run finished.
    log_path = out.with_name(f".{out.name}.{os.getpid()}.tmp") if out.exists() else out

    note = f"run log {out} closed as failed" if log_path == out else f"{out} left as it was"

    def on_step(i: int, record: Any) -> None:
        _raise_stop()
        args.at, args.note = f"step {i} of {settings.steps}", note
        losses = {term: values[-1] for term, values in record.losses.items()}
        print(progress_line(i, settings.steps, losses, None, bool(record.values("skipped")[-1])), flush=True)

    try:
        record = run_joint(args.checkpoint, args.data, settings, log_path=log_path, device=device,
                           on_step=on_step, log=_say)
    except BaseException:
        if log_path != out:
            log_path.unlink(missing_ok=True)
        raise
    if log_path != out:
        os.replace(log_path, out)
    print(f"first non-finite loss step: {record.first_nonfinite_loss_step()}; "
          f"first non-finite parameter step: {record.first_nonfinite_param_step()}; "
          f"skipped steps: {len(record.skipped)}; validation PER: {record.attrs.get('val_per')}")
    tracer = record.tables.get("tracer", [])
    if tracer:
        print(f"tracer: {tracer[0]['line']}")
    print(f"run log: {out}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """0 when every run is finished, 1 when some failed or a worker died, 2 on bad input."""
    from workbench.run.cache import ctc_warm_checkpoint
    from workbench.studies.criteria import format_table
    from workbench.studies.sweep import TABLE_COLUMNS, Sweep, SweepError, SweepGrid, report, table_rows
    from workbench.studies.sweep.runner import check_data

    try:
        grid = SweepGrid(**axis_values(args), steps=_positive("--steps", args.steps),
                         batch_size=_positive("--batch-size", args.batch_size), controls=not args.no_controls)
    except SweepError as exc:
        name, _, detail = str(exc).partition(": ")
        raise CliError(f"{_flag(name)}: {detail}") from None
    workers = None if args.workers is None else _positive("--workers", args.workers)
    backend, address = _sweep_backend(args.backend, args.address)
    ctc_steps = _positive("--ctc-steps", args.ctc_steps)
    device = check_device("--device", args.device)
    check_data(_input("--data", args.data, "a data root folder (t15.YYYY.MM.DD session folders)", folder=True),
               [grid.batch_size])
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out: expected a sweep folder, got {out}, which is a file")
    if args.checkpoint is not None:
        checkpoint = _input("--checkpoint", args.checkpoint, "a checkpoint file (.pt)")
    else:
        _writable("--cache-dir", Path(args.cache_dir))
        checkpoint, _ = ctc_warm_checkpoint(args.data, args.preset, seed=grid.seed[0], steps=ctc_steps,
                                            batch_size=grid.batch_size, cache_dir=args.cache_dir,
                                            log=_say)
    # checks the checkpoint and the index
    sweep = Sweep(out, checkpoint, args.data, grid, device=device, backend=backend, address=address)
    _writable("--out", out)
    args.note = "rerun the same command to resume: finished runs are kept"
    outcome = sweep.run(workers)
    rep = report(sweep)
    print(format_table(table_rows(rep), TABLE_COLUMNS + ("all",)))
    for line in rep["conclusions"]:
        print(line)
    for line in outcome.set_aside:
        print(f"set aside: {line}")
    print(f"sweep {sweep.out}: {outcome.line(len(sweep.plan.runs))}; index: {sweep.index_path}")
    for rid, error in outcome.failed.items():
        print(f"failed: {rid}: {error}", file=sys.stderr)
    return EXIT_FAILED if outcome.failed or outcome.interrupted else 0


def _sweep_backend(backend: str, address: str | None) -> tuple[str, str | None]:
    """--backend and --address checked before any work (Ray installed, something listening at the address)."""
    from workbench.studies.sweep import SweepError
    from workbench.studies.sweep.runner import check_backend

    try:
        return check_backend(backend, address)
    except SweepError as exc:
        name, _, detail = str(exc).partition(": ")
        raise CliError(f"{_flag(name)}: {detail}") from None


def cmd_trace(args: argparse.Namespace) -> int:
    from workbench.records import read_record, summarize
    from workbench.records.unjudged import no_outcome
    from workbench.run.watch import findings_text
    from workbench.views.logstate import check_readable

    limit = _positive("--limit", args.limit)
    path = _input("runlog", args.runlog, "a run log file (.h5)")
    state = check_readable(path, partial=True)
    record = read_record(path)
    summary = summarize(record)
    verdicts = record.tables.get("tracer", [])
    coverage = record.tables.get("coverage", [])
    print(f"{args.runlog}: status {record.status}, {len(record.steps)} steps")
    if record.status != "finished":
        print(f"  error: {record.attrs.get('error')}; last step: {record.attrs.get('last_step')}"
              if record.status == "failed" else "  still being written: the steps flushed so far"
              if state == "in_progress" else "  interrupted: the run's process was killed")
    missing = no_outcome(record, in_progress=state == "in_progress")
    print(f"outcome: {summary['outcome']}" if missing is None else missing)
    for reason in summary["outcome_reasons"] + summary["outcome_warnings"]:
        print(f"  {reason}")
    print(f"causal chain: {len(summary['causal_chain'])} link(s)")
    for link in summary["causal_chain"]:
        print(f"  {link['line']}")
    print(f"tracer verdicts (the first non-finite tensor of each replayed step): {len(verdicts)}")
    for v in verdicts:
        print(f"  {v['line']}")
    for u in record.tables.get("tracer_unreproduced", []):
        print(f"  step {u['step']}: not traced: {u['why']}")
    print(f"optimizer-coverage findings: {len(coverage)} step(s)")
    for c in coverage[:limit]:
        print(f"  {c['line']}")
    if len(coverage) > limit:
        print(f"  ... {len(coverage) - limit} more")
    print(findings_text(record, limit), end="")  # a watched run's findings (workbench.run.watch)
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from workbench.records import json_safe
    from workbench.studies.diagnose import DiagnoseError, diagnose

    log = _input("runlog", args.runlog, "a run log file (.h5)")
    json_out = Path(args.json) if args.json else None
    if json_out is not None:
        _output_file("--json", json_out)
        _refuse_existing("--json", [json_out], args.overwrite)
    names = tuple(n.strip() for n in args.candidates.split(",") if n.strip()) if args.candidates else ()
    try:
        found = diagnose(log, seeds=_positive("--seeds", args.seeds),
                         steps=None if args.steps is None else _positive("--steps", args.steps), candidates=names,
                         out=args.out, data=args.data, workers=None if args.workers is None else
                         _positive("--workers", args.workers), device=check_device("--device", args.device),
                         progress=True)
    except (DiagnoseError, ValueError) as exc:
        raise CliError(_one_line(exc)) from None
    if json_out is not None:  # before printing: a reader that goes away (| head) does not lose it
        _write_text(json_out, json.dumps(json_safe(found.to_json()), indent=1))
    print(f"{log}: {found.scope['run_outcome']}; evidence: {', '.join(found.evidence) or 'none'}")
    print(found.table())
    for line in found.lines:
        print(line)
    if json_out is not None:
        print(f"wrote {json_out}")
    return 0


REPORT_FILES = ("training.png", "outcomes.png", "summary.json", "summary.md")


def cmd_report(args: argparse.Namespace) -> int:
    from workbench.views.logstate import LogBusy, check_readable

    try:
        states = [check_readable(path, partial=args.partial, verb="report") for path in args.runlogs]
    except LogBusy as exc:
        raise CliError(str(exc)) from None
    out = Path(args.out)
    _refuse_existing("--out", [out / name for name in REPORT_FILES], args.overwrite)
    _writable("--out", out)
    from workbench.views.report import write_report  # matplotlib: imported only once the input is known good

    # Written into a folder of this process first, then renamed into place file by file.
    work = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    try:
        busy = [path for path, state in zip(args.runlogs, states) if state == "in_progress"]
        written = [out / Path(path).name for path in write_report(args.runlogs, work, in_progress=busy)]
        for path in written:
            os.replace(work / path.name, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for path in written:
        print(path)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Run logs as TensorBoard event files, one folder per run under --tensorboard."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise CliError("--tensorboard: needs the tensorboard package, which is not installed; install it with "
                       "pip install 'rnnt-workbench[tensorboard]'") from None
    from workbench.views.logstate import LogBusy, check_readable
    from workbench.views.tensorboard import ExportError, export_tensorboard

    out = Path(args.tensorboard)
    try:
        for path in args.runlogs:
            check_readable(path, partial=args.partial)
        if out.exists() and not out.is_dir():
            raise CliError(f"--tensorboard: expected a folder, got {out}, which is a file")
        _writable("--tensorboard", out)
        exported = export_tensorboard(args.runlogs, out, partial=args.partial, overwrite=args.overwrite)
    except (ExportError, LogBusy) as exc:
        raise CliError(str(exc)) from None
    for e in exported:
        print(f"{e.log} -> {e.folder}: {e.tags} scalar tags, {e.points} points, {e.texts} texts")
    print(f"view them side by side: tensorboard --logdir {out}")
    return 0


def _parameter(text: str) -> tuple[str, object]:
    """`name=value` with value parsed as JSON when it parses (numbers, lists, true/false), else kept as text;
    text that starts like a JSON list, object or string must parse."""
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError as exc:
        if value.lstrip()[:1] in ('[', '{', '"'):
            raise argparse.ArgumentTypeError(f"{name}: expected a JSON value, got {value!r} ({exc.msg} at "
                                             f"character {exc.pos})") from None
        return name, value


def cmd_notebooks(args: argparse.Namespace) -> int:
    """Every notebook's parameters are checked before the first cell of any runs; each executes into a hidden
    file renamed into place once it finished (a failed one is kept as NAME.failed.ipynb, which blocks no retry)."""
    from workbench.views.notebook import REPO_ROOT, NotebookError, check_parameters, copy_notebooks, \
        declared_parameters, notebook_kernel, notebooks_dir

    if args.copy is not None:
        try:
            written = copy_notebooks(args.copy)
        except OSError as exc:
            raise CliError(f"--copy: {exc}") from None
        print("\n".join(f"wrote {path}" for path in written))
        return 0
    if args.out is None:
        raise CliError("notebooks: expected --out FOLDER (to run them) or --copy FOLDER (to write them out)")
    available = sorted(notebooks_dir().glob("[0-9][0-9]_*.ipynb"))
    if not available:
        raise CliError(f"notebooks: expected the notebooks in {notebooks_dir()}, got none")
    chosen = [nb for nb in available if not args.only or nb.name[:2] in args.only.split(",")]
    if not chosen:
        raise CliError(f"--only {args.only}: no notebook matches; available: {', '.join(n.name for n in available)}")
    seed = _integer("--seed", args.seed, 0)
    out = Path(args.out).resolve()
    runs = []
    try:
        for nb in chosen:
            params = {"preset": args.preset, "seed": seed, "output_dir": str(out / nb.stem), **dict(args.param)}
            if args.overwrite and "overwrite" in declared_parameters(nb):
                params.setdefault("overwrite", True)  # the notebook's own switch for its artefacts
            check_parameters(nb, params)
            runs.append((nb, params))
    except NotebookError as exc:
        raise CliError(f"-p {exc}") from None
    import papermill as pm

    from workbench.views.html import write_html

    try:
        with notebook_kernel(args.kernel) as (kernel, line):
            _refuse_existing("--out", [out / nb.name for nb in chosen], args.overwrite)
            _writable("--out", out)
            print(line, flush=True)
            for nb, params in runs:
                args.at = nb.name
                target, work = out / nb.name, out / f".{nb.stem}.{os.getpid()}.tmp.ipynb"
                failed = target.with_suffix(".failed.ipynb")
                print(f"{nb.name} -> {target}", flush=True)
                try:
                    pm.execute_notebook(str(nb), str(work), parameters=params, kernel_name=kernel,
                                        cwd=str(REPO_ROOT), progress_bar=True)
                except BaseException as exc:
                    if work.exists():
                        os.replace(work, failed)
                        args.note = f"the partial notebook is kept as {failed}"
                    if isinstance(exc, pm.PapermillExecutionError):
                        raise NotebookFailed(f"In [{exc.exec_count}]: {exc.ename}: {exc.evalue}") from None
                    raise
                os.replace(work, target)
                print(f"{nb.name} -> {write_html(target)}", flush=True)  # a page to read without Jupyter
                failed.unlink(missing_ok=True)
    except NotebookError as exc:
        raise CliError(str(exc)) from None
    return 0


# ------------------------------------------------------------------------------------------------ parser

def build_parser() -> argparse.ArgumentParser:
    from workbench.data.synth import LENGTHS
    from workbench.model.config import PRESETS
    from workbench.run.settings import RunSettings, TrainSettings

    parser = _Parser(prog="workbench", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the full traceback of any error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic dataset in the Brain-to-Text '25 HDF5 layout")
    p.add_argument("--out", required=True, help="data root to write (t15.YYYY.MM.DD/data_{split}.hdf5)")
    p.add_argument("--sessions", default="2")
    p.add_argument("--trials", default="20", help="train trials per session")
    p.add_argument("--seed", default="0")
    p.add_argument("--lengths", choices=LENGTHS, default="sample",
                   help="trial lengths: sample (the committed sample's, 71-138 frames) or b2t (drawn from the real "
                        "release's published statistics: about 875 frames and 22 phonemes per trial)")
    p.add_argument("--overwrite", action="store_true", help="replace data files already in --out")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("validate", help="check a data file or data root and summarise it, one line per file")
    p.add_argument("path", help="an .hdf5 file or a data root such as hdf5_data_final/")
    p.set_defaults(func=cmd_validate)

    for name in ("train", "pretrain"):
        p = sub.add_parser(name, help="staged training (CTC warmup -> joint -> mode) with checkpoints"
                           if name == "train" else "CTC-warmup stage only: the checkpoint joint-stage runs fork from")
        add_settings(p, TrainSettings, defaults={"joint_steps": 0} if name == "pretrain" else None)
        p.add_argument("--overwrite", action="store_true", help="replace checkpoints and train_summary.json "
                                                                "already in --out")
        p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", help="one instrumented joint-stage run from a CTC-warm checkpoint, logged to HDF5")
    p.add_argument("--checkpoint", required=True, help="CTC-warm checkpoint (e.g. OUT/ctc_warmup.pt from train)")
    p.add_argument("--data", default="data_samples")
    p.add_argument("--out", required=True, help="run log to write (.h5); must not exist unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace the file at --out once the new run finished")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")
    add_settings(p, RunSettings)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sweep", help="parallel, resumable grid of joint-stage runs from one CTC-warm checkpoint, "
                                     "with CTC-only controls")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="CTC-warm checkpoint to fork every run from")
    source.add_argument("--preset", choices=sorted(PRESETS), help="train (or load from --cache-dir) the CTC-warm "
                                                                  "checkpoint of this model preset")
    p.add_argument("--ctc-steps", default="300", help="CTC warmup steps for --preset")
    p.add_argument("--cache-dir", default="runs/cache", help="where --preset keeps its checkpoints")
    p.add_argument("--data", default="data_samples", help="data root")
    p.add_argument("--out", required=True, help="sweep folder (index.json, runs/*.h5); rerun to resume")
    add_settings(p, RunSettings, lists=True, exclude=[n for n in ("name", "steps", "batch_size", "ctc_only",
                                                                  "attribution_steps", "trace",
                                                                  "rebuild_at_stage_change", "clip_scope",
                                                                  "zero_grad_scope")])
    p.add_argument("--steps", default="20", help="joint steps after the longest freeze")
    p.add_argument("--batch-size", default="4")
    p.add_argument("--no-controls", action="store_true", help="leave out the CTC-only control runs")
    p.add_argument("--workers", default=None, help="worker processes, or Ray tasks at once with --backend ray "
                                                   "(default: one per core; with Ray as the cluster allows)")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--backend", default="local", help="where the runs execute: local (worker processes here) or ray "
                                                      "(Ray tasks; the run logs' folder must be shared); default local")
    p.add_argument("--address", default=None, help="with --backend ray: HOST:PORT of a Ray cluster's head (`ray start "
                                                   "--head` there), or auto; default: a Ray started on this machine")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("trace", help="print the tracer verdicts and optimizer-coverage findings of a run log")
    p.add_argument("runlog")
    p.add_argument("--limit", default="5", help="coverage findings to print")
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("diagnose", help="try the candidate fixes on a failing run's log and say which make it "
                                        "healthy")
    p.add_argument("runlog", help="run log (.h5) of a joint-stage run, or of a byo/Lightning run that kept a bundle")
    p.add_argument("--seeds", default="3", help="seeds per candidate, from the run's own (default 3)")
    p.add_argument("--steps", default=None, help="run K steps after the first failing step (a kept bundle: K steps "
                                                 "from its step); default: the run's length")
    p.add_argument("--candidates", default="", help="comma-separated candidate names to try instead of those the "
                                                    "run's evidence calls for")
    p.add_argument("--out", default=None, help="folder for the candidate runs (default: <log>_diagnose beside the "
                                               "log); rerun to resume")
    p.add_argument("--data", default=None, help="data root, for a joint-stage log that does not record its own "
                                                "(a kept bundle carries its batches)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the diagnosis as JSON")
    p.add_argument("--workers", default=None, help="worker processes for a joint-stage log (default: one per "
                                                   "core); a kept bundle's runs go one after another")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--overwrite", action="store_true", help="replace the --json file")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("report", help="figures and a summary table from one or more run logs")
    p.add_argument("runlogs", nargs="+", help="run logs (.h5) written by `run`, `sweep` or the notebooks")
    p.add_argument("--out", required=True, help="folder for training.png, outcomes.png, summary.json/.md")
    p.add_argument("--overwrite", action="store_true", help="replace report files already in --out")
    p.add_argument("--partial", action="store_true", help="also report a run log still being written, as far as it "
                                                          "was flushed (without an outcome)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="write run logs as TensorBoard event files, one folder per run")
    p.add_argument("runlogs", nargs="+", help="run logs (.h5) written by `run`, `sweep`, the notebooks or the "
                                              "Lightning callback")
    p.add_argument("--tensorboard", required=True, metavar="DIR", help="folder for the event files (one subfolder "
                                                                       "per run); view with tensorboard --logdir DIR")
    p.add_argument("--partial", action="store_true", help="also export a run log still being written, as far as it "
                                                          "was flushed")
    p.add_argument("--overwrite", action="store_true", help="replace a run's earlier export in DIR")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("notebooks", help="execute the notebooks headlessly with papermill into a folder")
    p.add_argument("--out", help="folder for the executed notebooks and their artefacts")
    p.add_argument("--copy", metavar="DIR", help="only write the notebooks and data_samples/ into DIR (to open in "
                                                 "JupyterLab there)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--seed", default="0")
    p.add_argument("--only", default="", help="comma-separated notebook numbers, e.g. 01,03")
    p.add_argument("-p", "--param", type=_parameter, action="append", default=[],
                   help="extra parameter NAME=VALUE (JSON values allowed), repeatable")
    p.add_argument("--kernel", default=None, help="an installed Jupyter kernel (default: this interpreter)")
    p.add_argument("--overwrite", action="store_true", help="replace executed notebooks already in --out (and "
                                                            "pass overwrite=True to notebooks that take it)")
    p.set_defaults(func=cmd_notebooks)
    return parser


def _bad_input() -> tuple[type[BaseException], ...]:
    """The exceptions that mean the input is wrong (exit 2) rather than that a run failed (exit 1)."""
    from workbench.data import DataError
    from workbench.records.runlog import RunLogError
    from workbench.run.settings import SettingsError
    from workbench.studies.sweep import SweepError
    from workbench.train.checkpoint import CheckpointError

    return (CliError, DataError, SettingsError, SweepError, CheckpointError, RunLogError, FileNotFoundError,
            FileExistsError)


# The signal that asked the command to stop. A handler's exception raised while Python runs a weakref callback
# or a __del__ is printed and dropped, and the run would go on: the progress callbacks raise it again.
_STOP_REQUESTED: list[int] = []


def _stop(signum: int, frame: FrameType | None) -> None:
    _STOP_REQUESTED.append(signum)
    _raise_stop()


def _raise_stop() -> None:
    if _STOP_REQUESTED:
        if _STOP_REQUESTED[-1] == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated("SIGTERM")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with _sigterm_raises():
        try:
            return args.func(args)
        except BaseException as exc:
            if args.debug or isinstance(exc, SystemExit):
                raise
            if isinstance(exc, BrokenPipeError):
                # The reader went away (`workbench trace log.h5 | head`): end quietly, as a Unix tool does.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return EXIT_BROKEN_PIPE
            code, line = _failure(args, exc)
            print(f"error: {line}", file=sys.stderr)
            return code


def _failure(args: argparse.Namespace, exc: BaseException) -> tuple[int, str]:
    """Exit status and the one line that reports `exc`."""
    note = f"; {args.note}" if getattr(args, "note", None) else ""
    at = f" at {args.at}" if getattr(args, "at", None) else ""
    if isinstance(exc, (KeyboardInterrupt, Terminated)):
        code, cause = (EXIT_INTERRUPTED, "Ctrl-C") if isinstance(exc, KeyboardInterrupt) else \
            (EXIT_TERMINATED, "SIGTERM")
        return code, f"{args.command} interrupted by {cause}{at}{note}"
    if isinstance(exc, _bad_input()):
        return EXIT_BAD_INPUT, _one_line(exc) + (note if at else "")
    return EXIT_FAILED, f"{args.command} failed{at}: {type(exc).__name__}: {_one_line(exc)}{note}"


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While a command runs, SIGTERM raises `Terminated` and SIGINT KeyboardInterrupt in the main thread (run logs
    close as "failed"), and again at the next step should the first one be dropped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _STOP_REQUESTED.clear()
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


if __name__ == "__main__":
    raise SystemExit(main())
