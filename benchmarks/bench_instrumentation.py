"""Overhead of the instrumentation on the reference training step.

Same model, optimizer and batches for four configurations, interleaved round by round (the order rotating) so
drift in machine load hits all of them alike:

    plain  TrainStep with no observers
    a      + GradNormProbe (groups and per-parameter) + OptimizerCoverage (sharing the probe's copy)
    b      a + ActivationStats on every leaf module with parameters
    c      a + NonFiniteTracer armed as a run arms it (a replay bundle every CAPTURE_EVERY steps and each step's
           inputs; no step here is non-finite). Its tracer is attached for each round, so it captures a bundle at
           every round's first step: with --steps below CAPTURE_EVERY (the default is equal) more often than a run.

Prints the median ms/step of each, the device reads per step of each (counted on one extra untimed round by
tests/host_reads.py: copies through `to_host` plus any other read from workbench code) and the median per-round
ratio instrumented / plain; the last line is `grad-norm instrumentation overhead ratio: X.XXX` for configuration a.

    python benchmarks/bench_instrumentation.py --preset small --rounds 15 --steps 16
    python benchmarks/bench_instrumentation.py --preset seed --lengths b2t --rounds 3 --steps 1

`--lengths b2t` runs on a synthetic set with the real Brain-to-Text '25 trial lengths (generated once into
runs/data/, see `workbench.data.real_length_dataset`) instead of data_samples/.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from workbench.data import B2TDataset, Batch, DataError, collate, real_length_dataset, write_dataset
from workbench.train.device import pick_device, seed_everything
from workbench.instrument import ActivationStats, GradNormProbe, NonFiniteTracer, OptimizerCoverage
from workbench.instrument.tracer import CAPTURE_EVERY
from workbench.model.losses import LossWeights
from workbench.model import HybridModel, get_config
from workbench.train import StepConfig, TrainStep, build_optimizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from host_reads import HostReads  # noqa: E402  (the read counter the tests use)


def load_batches(root: Path, n: int, batch_size: int, device: torch.device, scratch: Path) -> list[Batch]:
    """n batches of the train split under `root`; a small synthetic set when `root` holds no data yet."""
    try:
        dataset = B2TDataset(root, "train")
    except DataError:
        print(f"no data under {root}: using a synthetic set")
        write_dataset(scratch, sessions=1, trials=n * batch_size)
        dataset = B2TDataset(scratch, "train")
    trials = [dataset[i % len(dataset)] for i in range(n * batch_size)]
    return [collate(trials[i * batch_size:(i + 1) * batch_size]).to(device) for i in range(n)]


def timed(run: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(wall, CPU) seconds of `run()`: the process's CPU time counts only while it runs, so other work on a
    loaded machine moves it less than the wall time (on a GPU the wall time is the measure)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu


def overhead(model: HybridModel, batches: list[Batch], device: torch.device, rounds: int,
             precision: str = "fp32") -> dict[str, Any]:
    """Median seconds per round of each configuration (plain, a, b, c) over `rounds` interleaved rounds of one step
    per batch, and the median per-round ratios of a, b and c to plain."""
    step = TrainStep(model, build_optimizer(model.parameters(), lr=1e-4), StepConfig(precision=precision), device)
    weights = LossWeights(ctc=0.3, rnnt=1.0, mode=0.0)
    probe = GradNormProbe(model)
    coverage = OptimizerCoverage(model, probe=probe)
    acts = ActivationStats(model)
    tracer = NonFiniteTracer(capture_every=CAPTURE_EVERY)  # as a run's (workbench.run.joint)

    def steps() -> None:
        for batch in batches:
            step(batch, weights)

    def with_grads() -> None:
        with probe.attached(step), coverage.attached(step):
            steps()

    def with_activations() -> None:
        with probe.attached(step), coverage.attached(step), acts.attached(step):
            steps()

    def with_tracer() -> None:
        with probe.attached(step), coverage.attached(step), tracer.attached(step):
            steps()

    configs = {"plain": steps, "a": with_grads, "b": with_activations, "c": with_tracer}
    for run in configs.values():  # warm-up: allocator, lazy init, first-layout masks
        run()
    reads: dict[str, tuple[float, float]] = {}  # (all, the reference model's own) per step
    for name, run in configs.items():
        with HostReads() as counted:
            run()
        in_model = sum(r.startswith("workbench/model/") for r in counted.outside)
        reads[name] = (counted.per_step(len(batches)), in_model / len(batches))
    times: dict[str, list[float]] = {name: [] for name in configs}
    cpu: dict[str, list[float]] = {name: [] for name in configs}
    names = list(configs)
    for r in range(rounds):
        # the order rotates round by round, so no configuration always follows the same one (whose hooks, caches
        # and allocations it would inherit) or runs first after the warm-up
        for name in names[r % len(names):] + names[:r % len(names)]:
            wall, used = timed(configs[name], device)
            times[name].append(wall)
            cpu[name].append(used)
    return {"median_s": {name: statistics.median(values) for name, values in times.items()},
            "ratio": {name: statistics.median(t / p for t, p in zip(times[name], times["plain"]))
                      for name in ("a", "b", "c")},
            "cpu_ratio": {name: statistics.median(t / p for t, p in zip(cpu[name], cpu["plain"]))
                          for name in ("a", "b", "c")},
            "reads_per_step": reads, "policy": step.config.semantics.nonfinite_policy,
            "tensors": len(probe.param_labels), "groups": len(probe.groups), "hooked": len(acts.modules)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=CAPTURE_EVERY,
                        help="training steps per configuration per round (c's tracer captures at each round's start)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lengths", choices=("sample", "b2t"), default="sample",
                        help="trial lengths when --data is not given: data_samples/ or the real B2T lengths")
    parser.add_argument("--data", default=None, help="a data root (default: chosen by --lengths)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    seed_everything(0)
    device = pick_device(args.device)
    if args.data is not None:
        data = Path(args.data)
    else:
        data = real_length_dataset(ROOT / "runs" / "data") if args.lengths == "b2t" else ROOT / "data_samples"
    with tempfile.TemporaryDirectory() as scratch:
        batches = load_batches(data, args.steps, args.batch_size, device, Path(scratch))
    model = HybridModel(get_config(args.preset)).to(device)
    result = overhead(model, batches, device, args.rounds)
    print(f"device {device}, preset {args.preset}, data {data.name} (padded T per batch "
          f"{[b.features.shape[1] for b in batches]}), {args.rounds} rounds x {args.steps} steps, "
          f"{sum(p.numel() for p in model.parameters())} parameters in {result['tensors']} tensors, "
          f"{result['groups']} groups, {result['hooked']} hooked modules")
    for name, seconds in result["median_s"].items():
        total, in_model = result["reads_per_step"][name]
        print(f"  {name:5s} median {1000 * seconds / args.steps:8.2f} ms/step, {total:g} device reads/step "
              f"({in_model:g} of them in the reference model's loss, {total - in_model:g} by the step and instruments)")
    print(f"  (reads: copies through to_host plus any other read from workbench code; fp32, nonfinite policy "
          f"{result['policy']})")
    print(f"  CPU-time ratios (median per round): a {result['cpu_ratio']['a']:.3f}, b {result['cpu_ratio']['b']:.3f}, "
          f"c {result['cpu_ratio']['c']:.3f}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end")
    print(f"  b (+ activations) / plain median ratio: {result['ratio']['b']:.3f}")
    print(f"  c (+ tracer armed, a bundle every {min(args.steps, CAPTURE_EVERY)} steps here, every {CAPTURE_EVERY} "
          f"in a run, or 2 s if sooner) / plain median ratio: {result['ratio']['c']:.3f}")
    print(f"grad-norm instrumentation overhead ratio: {result['ratio']['a']:.3f}")


if __name__ == "__main__":
    main()
