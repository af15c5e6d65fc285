"""Wall time of `workbench diagnose` on the seed's run at a preset, as a user runs it on a failing log.

Trains (or loads from the cache) the preset's CTC-warm checkpoint of notebook 01, runs the seed's joint stage
(`reproduce.seed_run`, the preset's joint steps, seed 0) into a log, then times `diagnose(log, seeds=S)`: the
control and every candidate the run's evidence calls for, over S seeds, on the machine's cores (fresh folder: no
run is reused). The checkpoint and the failing run are not timed (the user has them). Prints the table, the
recommendation, the load average before and after, and last `diagnose wall s: X`.

`--configs all` instead diagnoses each of notebook 01's configurations (`reproduce.configurations`, the preset's
freeze lengths) whose own run (seed 0) is not healthy, one after the other, and prints one line per
configuration (its outcome, the recommendation, healthy n/m, seeds, steps); `--json FILE` writes those rows.

    python benchmarks/bench_diagnose.py --preset tiny --seeds 3
    python benchmarks/bench_diagnose.py --preset tiny --configs all --json runs/diagnose_configs.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from workbench.run.cache import ctc_warm_checkpoint
from workbench.run.joint import run_joint
from workbench.studies import reproduce
from workbench.records import classify
from workbench.studies.diagnose import diagnose

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(reproduce.SIZES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="default: one per core")
    parser.add_argument("--cache", default=str(ROOT / "runs" / "cache"), help="CTC-warm checkpoint cache")
    parser.add_argument("--configs", default="", help="'all': every notebook-01 configuration that is not healthy")
    parser.add_argument("--json", default=None, help="with --configs: write the rows here")
    args = parser.parse_args()
    size = reproduce.SIZES[args.preset]
    data = reproduce.study_data(size, ROOT)
    checkpoint, _ = ctc_warm_checkpoint(data, args.preset, seed=0, steps=size.ctc_steps, lr=1e-3, batch_size=4,
                                        cache_dir=args.cache, log=lambda line: None)
    if args.configs:
        configs(args, size, data, checkpoint)
        return
    with tempfile.TemporaryDirectory(prefix="bench_diagnose_") as tmp:
        log = Path(tmp) / "seed.h5"
        run_joint(checkpoint, data, reproduce.seed_run(size.steps), log_path=log)
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        found = diagnose(log, seeds=args.seeds, workers=args.workers)
        wall = time.perf_counter() - t0
    print(found.table())
    print("\n".join(found.lines))
    print(f"preset {args.preset}, {found.scope['steps']} steps, seeds {found.scope['seeds']}, {found.scope['runs']} "
          f"runs on {args.workers or len(os.sched_getaffinity(0))} workers ({os.cpu_count()} CPUs); 1-min load "
          f"average {load:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"diagnose wall s: {wall:.1f}")


def configs(args: argparse.Namespace, size: reproduce.StudySize, data: Path, checkpoint: Path) -> None:
    """Diagnose every notebook-01 configuration whose seed-0 run is not healthy; one row each."""
    rows = []
    t_all = time.perf_counter()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_diagnose_configs_") as tmp:
        for settings in reproduce.configurations(reproduce.seed_run(size.steps), size.freeze_steps):
            log = Path(tmp) / f"{settings.name}.h5"
            outcome = classify(run_joint(checkpoint, data, settings, log_path=log)).kind
            if outcome == "healthy":
                rows.append({"config": settings.name, "outcome": outcome, "recommended": None})
                print(f"{settings.name}: healthy; not diagnosed", flush=True)
                continue
            t0 = time.perf_counter()
            found = diagnose(log, seeds=args.seeds, workers=args.workers)
            best = next((c for c in found.candidates if c["name"] == found.recommended), None)
            rows.append({"config": settings.name, "outcome": outcome, "control": found.control["label"],
                         "recommended": found.recommended, "healthy": best["healthy"] if best else None,
                         "seeds": found.scope["seeds"], "steps": found.scope["steps"], "lines": found.lines,
                         "wall_s": round(time.perf_counter() - t0, 1)})
            r = rows[-1]
            print(f"{settings.name}: {outcome}; control {r['control']}; recommended {r['recommended']}"
                  + (f" healthy {r['healthy']}/{len(r['seeds'])}" if best else f" ({found.lines[-1]})")
                  + f"; seeds {r['seeds']}, {r['steps']} steps; {r['wall_s']} s", flush=True)
    print(f"preset {args.preset}, 1-min load average {load:.1f} before, {os.getloadavg()[0]:.1f} after; "
          f"total wall s {time.perf_counter() - t_all:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
