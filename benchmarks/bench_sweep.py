"""Speedup of the parallel sweep (2 worker processes) over the same runs one after another in one process.

Both sweeps run the same grid from the same CTC-warm checkpoint, side by side in this one invocation, each in its
own fresh folder; the parallel time includes starting the worker processes. The runs are deterministic, so the
two sweeps must also record identical losses, which is checked. The last line is
`parallel sweep speedup: X.XX` (target >= 1.8 on a 2-core machine; other load on the machine lowers it).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sweep.py [--preset tiny] [--steps 115] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after the thread setting)

from workbench.run.cache import ctc_warm_checkpoint  # noqa: E402
from workbench.studies.sweep import Sweep, SweepGrid, records  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def timed_sweep(out: Path, checkpoint: Path, grid: SweepGrid, workers: int) -> tuple[float, Sweep]:
    sweep = Sweep(out, checkpoint, ROOT / "data_samples", grid)
    t0 = time.perf_counter()
    outcome = sweep.run(workers, progress=False)
    seconds = time.perf_counter() - t0
    if outcome.failed or outcome.interrupted or len(outcome.done) != len(sweep.plan.runs):
        raise SystemExit(f"sweep in {out} did not complete: {outcome.line(len(sweep.plan.runs))}")
    return seconds, sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    # 115 + the longest warmup (5) = 120 joint steps per run, the length of the default grid's runs (N 100 + 20)
    parser.add_argument("--steps", type=int, default=115, help="joint steps after the longest warmup")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint, _ = ctc_warm_checkpoint(ROOT / "data_samples", args.preset, seed=0, steps=20,
                                            cache_dir=tmp / "cache", log=lambda line: None)
        grid = SweepGrid(freeze_steps=(0, 5), lr=(1e-4, 1e-3), policy="freeze_params", precision="fp32",
                         semantics=("seed_faithful", "corrected"), clip=1.0, rnnt_normalization="seed_sqrt_tu",
                         optimizer="adamw", steps=args.steps, controls=False)
        serial_s, serial = timed_sweep(tmp / "serial", checkpoint, grid, workers=1)
        parallel_s, parallel = timed_sweep(tmp / "parallel", checkpoint, grid, workers=args.workers)
        a, b = records(serial), records(parallel)
        same = all(repr(a[rid].losses) == repr(b[rid].losses) for rid in a)  # repr: exact floats, nan == nan
        print(f"{len(a)} runs of {grid.total_steps} joint steps ({args.preset}, fp32), {os.cpu_count()} cores")
        print(f"one after another, one process: {serial_s:.1f} s")
        print(f"parallel, {args.workers} worker processes: {parallel_s:.1f} s")
        print(f"identical losses in both sweeps: {same}")
        if not same:
            raise SystemExit("the two sweeps recorded different losses")
        print(f"parallel sweep speedup: {serial_s / parallel_s:.2f}")


if __name__ == "__main__":
    main()
