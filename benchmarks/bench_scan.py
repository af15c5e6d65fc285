"""Selective scan, forward + backward: the sequential reference against the chunked scan, side by side.

One SSM block at a preset's widths (the `seed` preset: d_inner 512, d_state 64), batch 4, float32, for each
sequence length. Every (implementation, length) pair runs in a fresh child process, so one's allocations cannot
lower another's peak. Time is the median over the repeats after one warm-up; peak memory is the growth of the
child's peak RSS (resource.getrusage ru_maxrss) over its RSS just before the measured work, inputs already built.
The reference runs only where its estimated footprint fits in half the available RAM. The last line is
`speedup S.SSx, peak memory ratio M.MM at T=...` (reference time / chunked time, chunked peak / reference peak) at
the longest length where both ran.

    python benchmarks/bench_scan.py --preset seed --batch 4 --frames 150 900 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from workbench.model import SelectiveSSM, get_config
from workbench.model.ssm import selective_scan

IMPLS = ("reference", "chunked")
# The reference's peak in (batch, time, d_inner, d_state) float32 tensors, measured at the seed widths
# (3.67 GB at batch 4, T = 900): decays, drives, every step's state and their gradients.
REFERENCE_FULL_TENSORS = 8


def block_for(preset: str) -> SelectiveSSM:
    """One direction's SSM block at the preset's widths."""
    cfg = get_config(preset)
    return SelectiveSSM(cfg.ssm_width, cfg.d_state, cfg.d_conv, cfg.expand, cfg.resolved_dt_rank)


def rss_bytes() -> int:
    """This process's current resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def measure(impl: str, frames: int, batch: int, preset: str, repeats: int) -> dict[str, float]:
    """Median fwd+bwd seconds and peak RSS growth in bytes of `repeats` scans (after one warm-up) in this process."""
    torch.manual_seed(0)
    ssm = block_for(preset)
    with torch.no_grad():
        A, D = ssm.A.clone(), ssm.D.clone()
    u = torch.randn(batch, frames, ssm.d_inner)
    dt = F.softplus(torch.randn(batch, frames, ssm.d_inner) - 1)
    B, C = torch.randn(batch, frames, ssm.d_state), torch.randn(batch, frames, ssm.d_state)
    inputs = [t.requires_grad_() for t in (u, dt, A, B, C, D)]
    grad_y = torch.randn(batch, frames, ssm.d_inner)
    before = rss_bytes()
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        torch.autograd.grad(selective_scan(*inputs, impl=impl), inputs, grad_y)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": statistics.median(times[1:]), "peak_bytes": peak - before}


def run_child(impl: str, frames: int, args: argparse.Namespace) -> dict[str, float]:
    """`measure` in a fresh interpreter."""
    command = [sys.executable, __file__, "--child", impl, "--frames", str(frames), "--batch", str(args.batch),
               "--preset", args.preset, "--repeats", str(args.repeats), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, nargs="+", default=[150, 900])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement, after one warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each child")
    parser.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args.child, args.frames[0], args.batch, args.preset, args.repeats)))
        return

    ssm = block_for(args.preset)
    print(f"selective scan fwd+bwd, preset {args.preset}: batch {args.batch}, d_inner {ssm.d_inner}, "
          f"d_state {ssm.d_state}, float32, {args.threads} thread(s), {torch.__version__}")
    print(f"time: median of {args.repeats} after one warm-up; peak memory: growth of a fresh child process's "
          "peak RSS (resource.getrusage ru_maxrss) over its RSS before the measured work")
    print(f"{'T':>6} {'impl':>10} {'time s':>9} {'peak MB':>9}")
    both = []
    for frames in args.frames:
        results = {}
        for impl in IMPLS:
            if impl == "reference":
                need = REFERENCE_FULL_TENSORS * 4 * args.batch * frames * ssm.d_inner * ssm.d_state
                if need > available_bytes() / 2:
                    print(f"{frames:>6} {impl:>10}  skipped: needs about {need / 2**30:.1f} GiB, "
                          f"over half of the {available_bytes() / 2**30:.1f} GiB available")
                    continue
            results[impl] = run_child(impl, frames, args)
            print(f"{frames:>6} {impl:>10} {results[impl]['seconds']:>9.3f} "
                  f"{results[impl]['peak_bytes'] / 2**20:>9.1f}")
        if len(results) == len(IMPLS):
            both.append((frames, results["reference"], results["chunked"]))
    if not both:
        print("the reference fitted at no length: no ratio")
        return
    for frames, old, new in both:
        print(f"T={frames}: reference/chunked time {old['seconds'] / new['seconds']:.2f}x, "
              f"chunked/reference peak {new['peak_bytes'] / old['peak_bytes']:.3f}")
    frames, old, new = max(both, key=lambda row: row[0])
    print(f"speedup {old['seconds'] / new['seconds']:.2f}x, "
          f"peak memory ratio {new['peak_bytes'] / old['peak_bytes']:.2f} at T={frames}")


if __name__ == "__main__":
    main()
