"""Wall time of `workbench diagnose` on the seed's run at a preset, as a user runs it on a failing log.

Trains (or loads from the cache) the preset's CTC-warm checkpoint of notebook 01, runs the seed's joint stage
(`reproduce.seed_run`, the preset's joint steps, seed 0) into a log, then times `diagnose(log, seeds=S)`: the
control and every candidate the run's evidence calls for, over S seeds, on the machine's cores (fresh folder: no
run is reused). The checkpoint and the failing run are not timed (the user has them). Prints the table, the
recommendation, the load average before and after, and last `diagnose wall s: X`.

    python benchmarks/bench_diagnose.py --preset tiny --seeds 3
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from workbench.run.cache import ctc_warm_checkpoint
from workbench.run.joint import run_joint
from workbench.studies import reproduce
from workbench.studies.diagnose import diagnose

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(reproduce.SIZES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="default: one per core")
    parser.add_argument("--cache", default=str(ROOT / "runs" / "cache"), help="CTC-warm checkpoint cache")
    args = parser.parse_args()
    size = reproduce.SIZES[args.preset]
    data = reproduce.study_data(size, ROOT)
    checkpoint, _ = ctc_warm_checkpoint(data, args.preset, seed=0, steps=size.ctc_steps, lr=1e-3, batch_size=4,
                                        cache_dir=args.cache, log=lambda line: None)
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


if __name__ == "__main__":
    main()
