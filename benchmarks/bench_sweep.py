"""Speedup of the parallel sweep (2 worker processes) over the same runs one after another in one process, and the
time of the same sweep as Ray tasks on a local Ray over the process pool's.

All sweeps run the same grid from the same CTC-warm checkpoint, side by side in this one invocation, each in its
own fresh folder; the parallel time includes starting the worker processes, the Ray time does not include starting
Ray (printed on its own). This process is warmed up first (`runner.warm_up`: torch's lazily imported optimizer
code), so no sweep's time holds that one-off cost of the benchmark's own process; the local pool uses this process
as one of its workers. The runs are deterministic, so every sweep must also record identical losses, which is
checked. Where the time goes is printed too: the runs' own wall time (`wall_s` of each run log) summed per sweep,
so what a sweep spends outside its runs (start-up, dispatch, an idle worker at the end) is the rest. The last line
is `parallel sweep speedup: X.XX` (target >= 1.8 on a 2-core machine; other load on the machine lowers it).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sweep.py [--preset tiny] [--steps 115] [--workers 2] [--no-ray]
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
from workbench.studies.sweep.runner import warm_up  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def timed_sweep(out: Path, checkpoint: Path, grid: SweepGrid, workers: int | None,
                backend: str = "local") -> tuple[float, Sweep]:
    sweep = Sweep(out, checkpoint, ROOT / "data_samples", grid, backend=backend)
    t0 = time.perf_counter()
    outcome = sweep.run(workers, progress=False)
    seconds = time.perf_counter() - t0
    if outcome.failed or outcome.interrupted or len(outcome.done) != len(sweep.plan.runs):
        raise SystemExit(f"sweep in {out} did not complete: {outcome.line(len(sweep.plan.runs))}")
    return seconds, sweep


def in_runs(sweep: Sweep) -> float:
    """The runs' own wall time, summed (each run log's wall_s)."""
    return sum(r.attrs["wall_s"] for r in records(sweep).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    # 115 + the longest warmup (5) = 120 joint steps per run, the length of the default grid's runs (N 100 + 20)
    parser.add_argument("--steps", type=int, default=115, help="joint steps after the longest warmup")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-ray", action="store_true", help="leave out the Ray backend")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warm_up()  # this process's one-off torch._dynamo import, so neither sweep's time holds it

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint, _ = ctc_warm_checkpoint(ROOT / "data_samples", args.preset, seed=0, steps=20,
                                            cache_dir=tmp / "cache", log=lambda line: None)
        grid = SweepGrid(freeze_steps=(0, 5), lr=(1e-4, 1e-3), policy="freeze_params", precision="fp32",
                         semantics=("seed_faithful", "corrected"), clip=1.0, rnnt_normalization="seed_sqrt_tu",
                         optimizer="adamw", steps=args.steps, controls=False)
        serial_s, serial = timed_sweep(tmp / "serial", checkpoint, grid, workers=1)
        parallel_s, parallel = timed_sweep(tmp / "parallel", checkpoint, grid, workers=args.workers)
        sweeps = {"serial": serial, "parallel": parallel}
        ray_s = ray_init_s = None
        if not args.no_ray:
            import logging

            import ray

            t0 = time.perf_counter()
            ray.init(num_cpus=args.workers, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=False)
            ray_init_s = time.perf_counter() - t0
            try:
                ray_s, sweeps["ray"] = timed_sweep(tmp / "ray", checkpoint, grid, workers=None, backend="ray")
            finally:
                ray.shutdown()
        recs = {name: records(sweep) for name, sweep in sweeps.items()}
        # repr: exact floats, nan == nan
        same = all(repr(recs["serial"][rid].losses) == repr(other[rid].losses)
                   for other in recs.values() for rid in recs["serial"])
        n = len(recs["serial"])
        print(f"{n} runs of {grid.total_steps} joint steps ({args.preset}, fp32), {os.cpu_count()} cores")
        print(f"one after another, one process: {serial_s:.1f} s (inside the runs {in_runs(serial):.1f} s)")
        inside = in_runs(parallel)
        print(f"parallel, {args.workers} worker processes: {parallel_s:.1f} s (inside the runs {inside:.1f} s, "
              f"{inside / args.workers:.1f} s per worker; outside them {parallel_s - inside / args.workers:.1f} s)")
        if ray_s is not None:
            inside = in_runs(sweeps["ray"])
            print(f"Ray tasks on a local Ray ({args.workers} CPUs): {ray_s:.1f} s (inside the runs {inside:.1f} s; "
                  f"starting Ray took {ray_init_s:.1f} s more)")
        print(f"identical losses in every sweep: {same}")
        if not same:
            raise SystemExit("the sweeps recorded different losses")
        if ray_s is not None:
            print(f"Ray-local over process-pool time: {ray_s / parallel_s:.2f} "
                  f"({(ray_s + ray_init_s) / parallel_s:.2f} with Ray's start-up)")
        print(f"parallel sweep speedup: {serial_s / parallel_s:.2f}")


if __name__ == "__main__":
    main()
