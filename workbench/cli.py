"""Command line: `workbench SUBCOMMAND ...` or `python -m workbench SUBCOMMAND ...`.

The flags of `train`, `pretrain`, `run` and `sweep` are derived from the settings schema
(`workbench.run.settings`): one flag per setting, checked by the setting's own rules. Bad input ends with one
clear line on stderr and exit status 2; nothing already written is removed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

EXIT_BAD_INPUT = 2


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


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


def _positive(flag: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise CliError(f"{flag}: expected an integer >= 1, got {text!r}")
    return value


# ---------------------------------------------------------------------------------------------- commands

def cmd_synth(args: argparse.Namespace) -> int:
    from workbench.data.synth import write_dataset

    paths = write_dataset(args.out, sessions=_positive("--sessions", args.sessions),
                          trials=_positive("--trials", args.trials), seed=int(args.seed), overwrite=args.overwrite)
    for p in paths:
        print(p)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from workbench.data import summarize

    for line in summarize(args.path):
        print(line)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from workbench.run.settings import TrainSettings
    from workbench.run.staged import run_training

    defaults = {"joint_steps": 0} if args.command == "pretrain" else {}
    cfg = settings_from(TrainSettings, args, defaults=defaults)
    if args.command == "pretrain" and cfg.ctc_steps == 0:
        raise CliError("--ctc-steps: expected at least 1 for pretrain (it writes the CTC-warm checkpoint), got 0")
    summary = run_training(cfg, log=lambda line: print(line, flush=True))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"Validation PER: untrained {summary['val_per_initial']:.3f} -> final {summary['val_per_final']:.3f}")
    print(f"Summary written to {out / 'train_summary.json'}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from workbench.run.joint import run_joint
    from workbench.run.settings import RunSettings
    from workbench.run.staged import progress_line

    settings = settings_from(RunSettings, args)
    out = Path(args.out)
    if out.exists():
        raise CliError(f"{out}: run log already exists; choose another --out (finished runs are never overwritten)")
    out.parent.mkdir(parents=True, exist_ok=True)

    def on_step(i: int, record: Any) -> None:
        losses = {term: values[-1] for term, values in record.losses.items()}
        print(progress_line(i, settings.steps, losses, None, bool(record.values("skipped")[-1])), flush=True)

    record = run_joint(args.checkpoint, args.data, settings, log_path=out, device=args.device, on_step=on_step,
                       log=lambda line: print(line, flush=True))
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
    from workbench.data import B2TDataset
    from workbench.run.cache import ctc_warm_checkpoint
    from workbench.studies.criteria import format_table
    from workbench.studies.sweep import TABLE_COLUMNS, Sweep, SweepError, SweepGrid, report, table_rows

    try:
        grid = SweepGrid(**axis_values(args), steps=_positive("--steps", args.steps),
                         batch_size=_positive("--batch-size", args.batch_size), controls=not args.no_controls)
    except SweepError as exc:
        name, _, detail = str(exc).partition(": ")
        raise CliError(f"{_flag(name)}: {detail}") from None
    workers = None if args.workers is None else _positive("--workers", args.workers)
    ctc_steps = _positive("--ctc-steps", args.ctc_steps)
    if not Path(args.data).is_dir():
        raise CliError(f"--data: {args.data} is not a directory")
    B2TDataset(args.data, "train")
    if args.checkpoint is not None:
        if not Path(args.checkpoint).is_file():
            raise CliError(f"--checkpoint: {args.checkpoint} does not exist")
        checkpoint = Path(args.checkpoint)
    else:
        checkpoint, _ = ctc_warm_checkpoint(args.data, args.preset, seed=grid.seed[0], steps=ctc_steps,
                                            batch_size=grid.batch_size, cache_dir=args.cache_dir,
                                            log=lambda line: print(line, flush=True))
    try:
        sweep = Sweep(args.out, checkpoint, args.data, grid, device=args.device)
        outcome = sweep.run(workers)
    except SweepError as exc:
        raise CliError(str(exc)) from None
    rep = report(sweep)
    print(format_table(table_rows(rep), TABLE_COLUMNS + ("all",)))
    for line in rep["conclusions"]:
        print(line)
    print(f"sweep {sweep.out}: {outcome.line(len(sweep.plan.runs))}; index: {sweep.index_path}")
    for rid, error in outcome.failed.items():
        print(f"failed: {rid}: {error}", file=sys.stderr)
    return 1 if outcome.failed or outcome.interrupted else 0


def cmd_trace(args: argparse.Namespace) -> int:
    from workbench.records import read_record

    record = read_record(args.runlog)
    verdicts = record.tables.get("tracer", [])
    coverage = record.tables.get("coverage", [])
    print(f"{args.runlog}: status {record.status}, {len(record.steps)} steps")
    print(f"tracer verdicts: {len(verdicts)}")
    for v in verdicts:
        print(f"  {v['line']}")
    print(f"optimizer-coverage findings: {len(coverage)} step(s)")
    limit = _positive("--limit", args.limit)
    for c in coverage[:limit]:
        print(f"  {c['line']}")
    if len(coverage) > limit:
        print(f"  ... {len(coverage) - limit} more")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from workbench.views.report import write_report

    for path in write_report(args.runlogs, args.out):
        print(path)
    return 0


def _parameter(text: str) -> tuple[str, object]:
    """`name=value` with value parsed as JSON when it parses (numbers, lists, true/false), else kept as text."""
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def cmd_notebooks(args: argparse.Namespace) -> int:
    import papermill as pm

    from workbench.views.notebook import REPO_ROOT

    available = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    chosen = [nb for nb in available if not args.only or nb.name[:2] in args.only.split(",")]
    if not chosen:
        raise CliError(f"--only {args.only}: no notebook matches; available: {', '.join(n.name for n in available)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for nb in chosen:
        params = {"preset": args.preset, "seed": int(args.seed), "output_dir": str(out / nb.stem),
                  **dict(args.param)}
        print(f"{nb.name} -> {out / nb.name}", flush=True)
        pm.execute_notebook(str(nb), str(out / nb.name), parameters=params, kernel_name=args.kernel,
                            cwd=str(REPO_ROOT), progress_bar=True)
    return 0


# ------------------------------------------------------------------------------------------------ parser

def build_parser() -> argparse.ArgumentParser:
    from workbench.model.config import PRESETS
    from workbench.run.settings import RunSettings, TrainSettings

    parser = argparse.ArgumentParser(prog="workbench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic dataset in the Brain-to-Text '25 HDF5 layout")
    p.add_argument("--out", required=True, help="data root to write (t15.YYYY.MM.DD/data_{split}.hdf5)")
    p.add_argument("--sessions", default="2")
    p.add_argument("--trials", default="20", help="train trials per session")
    p.add_argument("--seed", default="0")
    p.add_argument("--overwrite", action="store_true", help="replace data files already in --out")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("validate", help="check a data file or data root and summarise it, one line per file")
    p.add_argument("path", help="an .hdf5 file or a data root such as hdf5_data_final/")
    p.set_defaults(func=cmd_validate)

    for name in ("train", "pretrain"):
        p = sub.add_parser(name, help="staged training (CTC warmup -> joint -> mode) with checkpoints"
                           if name == "train" else "CTC-warmup stage only: the checkpoint joint-stage runs fork from")
        add_settings(p, TrainSettings, defaults={"joint_steps": 0} if name == "pretrain" else None)
        p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", help="one instrumented joint-stage run from a CTC-warm checkpoint, logged to HDF5")
    p.add_argument("--checkpoint", required=True, help="CTC-warm checkpoint (e.g. OUT/ctc_warmup.pt from train)")
    p.add_argument("--data", default="data_samples")
    p.add_argument("--out", required=True, help="run log to write (.h5); must not exist")
    p.add_argument("--device", default="cpu")
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
    p.add_argument("--workers", default=None, help="worker processes (default: one per core)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("trace", help="print the tracer verdicts and optimizer-coverage findings of a run log")
    p.add_argument("runlog")
    p.add_argument("--limit", default="5", help="coverage findings to print")
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("report", help="figures and a summary table from one or more run logs")
    p.add_argument("runlogs", nargs="+", help="run logs (.h5) written by `run`, `sweep` or the notebooks")
    p.add_argument("--out", required=True, help="folder for training.png, outcomes.png, summary.json/.md")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("notebooks", help="execute the notebooks headlessly with papermill into a folder")
    p.add_argument("--out", required=True, help="folder for the executed notebooks and their artefacts")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--seed", default="0")
    p.add_argument("--only", default="", help="comma-separated notebook numbers, e.g. 01,03")
    p.add_argument("-p", "--param", type=_parameter, action="append", default=[],
                   help="extra parameter NAME=VALUE (JSON values allowed), repeatable")
    p.add_argument("--kernel", default="rnnt-workbench", help="Jupyter kernel (registered by `make install`)")
    p.set_defaults(func=cmd_notebooks)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from workbench.data import DataError
    from workbench.run.settings import SettingsError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataError, CliError, SettingsError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    raise SystemExit(main())
