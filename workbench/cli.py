"""Command line: `workbench SUBCOMMAND ...` or `python -m workbench SUBCOMMAND ...`.

Bad input ends with one clear line on stderr and a non-zero exit; nothing already written is removed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

EXIT_BAD_INPUT = 2


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def cmd_synth(args: argparse.Namespace) -> int:
    from workbench.data.synth import write_dataset

    paths = write_dataset(args.out, sessions=args.sessions, trials=args.trials, seed=args.seed)
    for p in paths:
        print(p)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from workbench.data import summarize

    for line in summarize(args.path):
        print(line)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from workbench.train import TrainConfig, run_training

    cfg = TrainConfig(
        preset=args.preset, data=args.data, out=args.out, seed=args.seed, batch_size=args.batch_size,
        ctc_steps=args.ctc_steps, joint_steps=args.joint_steps, mode_steps=args.mode_steps,
        ctc_lr=args.ctc_lr, joint_lr=args.joint_lr, mode_lr=args.mode_lr, precision=args.precision,
        clip=None if args.clip <= 0 else args.clip, semantics=args.semantics,
        rnnt_normalization=args.rnnt_normalization, device=args.device, max_sessions=args.max_sessions,
        resume_from=args.resume_from,
    )
    summary = run_training(cfg, log=lambda line: print(line, flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"Validation PER: untrained {summary['val_per_initial']:.3f} -> final {summary['val_per_final']:.3f}")
    print(f"Summary written to {out / 'train_summary.json'}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from workbench.experiment import RunSettings, run_joint

    out = Path(args.out)
    if out.exists():
        raise CliError(f"{out}: run log already exists; choose another --out (finished runs are never overwritten)")
    settings = RunSettings(
        name=args.name, steps=args.steps, lr=args.lr, precision=args.precision, semantics=args.semantics,
        policy=args.policy, warmup=args.warmup, rebuild_at_unfreeze=not args.no_rebuild,
        clip=None if args.clip <= 0 else args.clip, rnnt_normalization=args.rnnt_normalization,
        optimizer=args.optimizer, init_scale=args.init_scale, batch_size=args.batch_size, seed=args.seed,
        ctc_only=args.ctc_only)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = run_joint(args.checkpoint, args.data, settings, log_path=out, device=args.device,
                       on_step=lambda i, run: print(_run_progress(i, settings.steps, run), flush=True),
                       log=lambda line: print(line, flush=True))
    print(f"first non-finite loss step: {result.first_nonfinite_loss_step}; "
          f"first non-finite parameter step: {result.first_nonfinite_param_step}; "
          f"skipped steps: {len(result.skipped_steps)}; validation PER: {result.val_per}")
    if result.tracer_verdict:
        print(f"tracer: {result.tracer_verdict}")
    print(f"run log: {out}")
    return 0


def _run_progress(i: int, n: int, run) -> str:
    losses = {k: v[-1] for k, v in run.losses.items()}
    terms = " ".join(f"{k} {v:.4f}" for k, v in losses.items() if k != "total")
    flag = " | SKIPPED" if run.skipped and run.skipped[-1] == i else ""
    return f"  Batch {i}/{n} ({100 * i / n:.0f}%) | Loss {losses['total']:.4f} | {terms}{flag}"


def cmd_trace(args: argparse.Namespace) -> int:
    from workbench.records import RunLog

    with RunLog(args.runlog) as log:
        names = log.table_names()
        verdicts = log.table("tracer") if "tracer" in names else []
        coverage = log.table("coverage") if "coverage" in names else []
        print(f"{args.runlog}: status {log.status}, {log.last_step() or 0} steps")
        print(f"tracer verdicts: {len(verdicts)}")
        for v in verdicts:
            print(f"  {v['line']}")
        print(f"optimizer-coverage findings: {len(coverage)} step(s)")
        for c in coverage[: args.limit]:
            print(f"  {c['line']}")
        if len(coverage) > args.limit:
            print(f"  ... {len(coverage) - args.limit} more")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from workbench.report import write_report

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

    from workbench.notebook import REPO_ROOT

    available = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    chosen = [nb for nb in available if not args.only or nb.name[:2] in args.only.split(",")]
    if not chosen:
        raise CliError(f"--only {args.only}: no notebook matches; available: {', '.join(n.name for n in available)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for nb in chosen:
        params = {"preset": args.preset, "seed": args.seed, "output_dir": str(out / nb.stem), **dict(args.param)}
        print(f"{nb.name} -> {out / nb.name}", flush=True)
        pm.execute_notebook(str(nb), str(out / nb.name), parameters=params, kernel_name=args.kernel,
                            cwd=str(REPO_ROOT), progress_bar=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from workbench.device import PRECISIONS
    from workbench.losses import RNNT_NORMALIZATIONS
    from workbench.model import PRESETS
    from workbench.train import SEMANTICS
    from workbench.train.optim import OPTIMIZERS
    from workbench.train.unfreeze import POLICIES

    parser = argparse.ArgumentParser(prog="workbench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic dataset in the Brain-to-Text '25 HDF5 layout")
    p.add_argument("--out", required=True, help="data root to write (t15.YYYY.MM.DD/data_{split}.hdf5)")
    p.add_argument("--sessions", type=_positive_int, default=2)
    p.add_argument("--trials", type=_positive_int, default=20, help="train trials per session")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("validate", help="check a data file or data root and summarise it, one line per file")
    p.add_argument("path", help="an .hdf5 file or a data root such as hdf5_data_final/")
    p.set_defaults(func=cmd_validate)

    for name in ("train", "pretrain"):
        p = sub.add_parser(name, help="staged training (CTC warmup -> joint -> mode) with checkpoints" if name == "train"
                           else "CTC-warmup stage only (train with --joint-steps 0): the checkpoint runs fork from")
        p.add_argument("--preset", choices=sorted(PRESETS), default="small")
        p.add_argument("--data", default="data_samples", help="data root")
        p.add_argument("--out", default="runs/train", help="folder for checkpoints and the summary")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--batch-size", type=_positive_int, default=4)
        p.add_argument("--ctc-steps", type=_non_negative_int, default=300)
        p.add_argument("--joint-steps", type=_non_negative_int, default=0 if name == "pretrain" else 20)
        p.add_argument("--mode-steps", type=_non_negative_int, default=0)
        p.add_argument("--ctc-lr", type=_positive_float, default=1e-3)
        p.add_argument("--joint-lr", type=_positive_float, default=1e-5)
        p.add_argument("--mode-lr", type=_positive_float, default=1e-5)
        p.add_argument("--precision", choices=PRECISIONS, default="fp32")
        p.add_argument("--clip", type=float, default=1.0, help="max gradient norm; 0 turns clipping off")
        p.add_argument("--semantics", choices=sorted(SEMANTICS), default="corrected")
        p.add_argument("--rnnt-normalization", choices=RNNT_NORMALIZATIONS, default="seed_sqrt_tu")
        p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
        p.add_argument("--max-sessions", type=_positive_int, default=None)
        p.add_argument("--resume-from", default=None, help="checkpoint of a completed stage to continue from")
        p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", help="one instrumented joint-stage run from a CTC-warm checkpoint, logged to HDF5")
    p.add_argument("--checkpoint", required=True, help="CTC-warm checkpoint (e.g. OUT/ctc_warmup.pt from train)")
    p.add_argument("--data", default="data_samples")
    p.add_argument("--out", required=True, help="run log to write (.h5); must not exist")
    p.add_argument("--name", default="run")
    p.add_argument("--steps", type=_positive_int, default=20)
    p.add_argument("--lr", type=_positive_float, default=1e-5)
    p.add_argument("--precision", choices=PRECISIONS, default="fp16")
    p.add_argument("--semantics", choices=sorted(SEMANTICS), default="seed_faithful")
    p.add_argument("--policy", choices=POLICIES, default="none")
    p.add_argument("--warmup", type=_non_negative_int, default=0, help="warmup length N in steps")
    p.add_argument("--no-rebuild", action="store_true", help="keep the optimizer at unfreeze (decoder outside it)")
    p.add_argument("--clip", type=float, default=1.0, help="max gradient norm; 0 turns clipping off")
    p.add_argument("--rnnt-normalization", choices=RNNT_NORMALIZATIONS, default="seed_sqrt_tu")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--init-scale", type=_positive_float, default=65536.0, help="GradScaler initial scale (fp16)")
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ctc-only", action="store_true", help="control: the RNN-T decoder is never attached")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_run)

    from workbench.sweep import add_sweep_parser

    add_sweep_parser(sub)

    p = sub.add_parser("trace", help="print the tracer verdicts and optimizer-coverage findings of a run log")
    p.add_argument("runlog")
    p.add_argument("--limit", type=_positive_int, default=5, help="coverage findings to print")
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("report", help="figures and a summary table from one or more run logs")
    p.add_argument("runlogs", nargs="+", help="run logs (.h5) written by `run`, `sweep` or the notebooks")
    p.add_argument("--out", required=True, help="folder for training.png, outcomes.png, summary.json/.md")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("notebooks", help="execute the notebooks headlessly with papermill into a folder")
    p.add_argument("--out", required=True, help="folder for the executed notebooks and their artefacts")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="", help="comma-separated notebook numbers, e.g. 01,03")
    p.add_argument("-p", "--param", type=_parameter, action="append", default=[],
                   help="extra parameter NAME=VALUE (JSON values allowed), repeatable")
    p.add_argument("--kernel", default="rnnt-workbench", help="Jupyter kernel (registered by `make install`)")
    p.set_defaults(func=cmd_notebooks)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from workbench.data import DataError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataError, CliError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    raise SystemExit(main())
